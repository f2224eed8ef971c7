"""metered: runtime entitlements and exactly-once usage metering for Stripe-billed web apps.

The core (this package minus ``metered.integrations`` and ``metered.stripe``) imports no web
framework and no Stripe code.
"""

from metered.clock import Clock, ManualClock, SystemClock
from metered.errors import (
    ConfigurationError,
    IdempotencyKeyMismatch,
    InvalidFeature,
    InvalidInput,
    InvalidKey,
    InvalidSubject,
    InvalidUnits,
    LedgerUnavailable,
    MeteredError,
    NotMeteredFeature,
    OperationInProgress,
    ReservationError,
    ReservationExpired,
    ReservationNotFound,
    ReservationSettled,
    UnknownFeature,
    UnknownPlan,
)
from metered.ledger import AsyncLedger, Ledger
from metered.plans import Catalog, Feature, Plan, load_plans
from metered.results import (
    Balance,
    CheckResult,
    ConsumeResult,
    GrantResult,
    HistoryEntry,
    Reservation,
    Subscription,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncLedger",
    "Balance",
    "Catalog",
    "CheckResult",
    "Clock",
    "ConfigurationError",
    "ConsumeResult",
    "Feature",
    "GrantResult",
    "HistoryEntry",
    "IdempotencyKeyMismatch",
    "InvalidFeature",
    "InvalidInput",
    "InvalidKey",
    "InvalidSubject",
    "InvalidUnits",
    "Ledger",
    "LedgerUnavailable",
    "ManualClock",
    "MeteredError",
    "NotMeteredFeature",
    "OperationInProgress",
    "Plan",
    "Reservation",
    "ReservationError",
    "ReservationExpired",
    "ReservationNotFound",
    "ReservationSettled",
    "Subscription",
    "SystemClock",
    "UnknownFeature",
    "UnknownPlan",
    "__version__",
    "load_plans",
]
