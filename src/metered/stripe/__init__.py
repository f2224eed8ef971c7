"""Stripe billing for metered: checkout, webhooks into entitlement state, meter export.

::

    from metered.stripe import StripeBilling, CreditPack

    billing = StripeBilling(
        ledger,
        client=stripe.StripeClient("sk_test_..."),
        webhook_secret="whsec_...",
        credit_packs=[CreditPack(price="price_1k_calls", feature="api_calls", units=1000)],
    )

Needs the ``stripe`` extra: ``pip install 'metered-billing[stripe]'``.
"""

from metered.stripe.billing import AsyncStripeBilling, CheckoutResult, StripeBilling
from metered.stripe.config import CreditPack
from metered.stripe.errors import (
    CheckoutError,
    LivemodeMismatch,
    PayloadError,
    SignatureError,
    StripeBillingError,
    WebhookProcessingError,
    WebhookRejected,
)
from metered.stripe.export import ExportReport, UsageEntry
from metered.stripe.handlers import WebhookResult

__all__ = [
    "AsyncStripeBilling",
    "CheckoutError",
    "CheckoutResult",
    "CreditPack",
    "ExportReport",
    "LivemodeMismatch",
    "PayloadError",
    "SignatureError",
    "StripeBilling",
    "StripeBillingError",
    "UsageEntry",
    "WebhookProcessingError",
    "WebhookRejected",
    "WebhookResult",
]
