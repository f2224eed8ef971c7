"""Result objects returned by the ledger (immutable pydantic models).

The ledger builds them with :meth:`_Result._make` from values it produced itself: no
validation on the hot path (a result costs about 1 us instead of 5-7 us through
``model_construct``), and they are still ordinary pydantic models (``model_dump``,
``model_copy``, JSON schema).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, TypeVar, cast

from pydantic import BaseModel, ConfigDict

_R = TypeVar("_R", bound="_Result")

Reason = Literal[
    "no_entitlement",
    "subscription_inactive",
    "quota_exhausted",
    "insufficient_units",
    "not_metered",
]
"""Why access or units were denied (machine-readable, stable)."""


class _Result(BaseModel):
    model_config = ConfigDict(frozen=True)

    @classmethod
    def _make(cls: type[_R], **values: Any) -> _R:
        """Build from trusted values, skipping validation (what ``model_construct`` does,
        without its per-call bookkeeping). Missing fields take their defaults."""
        if not _FAST_CONSTRUCT:
            return cast(_R, cls.model_construct(**values))
        fields, defaults = _SHAPES.get(cls) or _shape(cls)
        if len(values) != len(fields):
            for name, default in defaults:
                values.setdefault(name, default)
        return cls._of(values, fields)

    @classmethod
    def _of(cls: type[_R], values: dict[str, Any], fields: set[str]) -> _R:
        """:meth:`_make` from a dict holding every field (``fields`` is their names)."""
        if not _FAST_CONSTRUCT:
            return cast(_R, cls.model_construct(**values))
        obj: _R = _new(cls)
        _set_dict(obj, values)
        _set_fields(obj, fields)
        _set_extra(obj, None)
        _set_private(obj, None)
        return obj


_SHAPES: dict[type[_Result], tuple[set[str], tuple[tuple[str, Any], ...]]] = {}
_FAST_CONSTRUCT = True
_new = object.__new__
# BaseModel's instance slots, set through their descriptors (what object.__setattr__ ends
# up calling, minus the lookup). _fast_construct_works() checks the result at import.
_set_dict, _set_fields, _set_extra, _set_private = (
    getattr(BaseModel.__dict__.get(name), "__set__", None) or (lambda obj, value: None)
    for name in (
        "__dict__",
        "__pydantic_fields_set__",
        "__pydantic_extra__",
        "__pydantic_private__",
    )
)


def _shape(cls: type[_Result]) -> tuple[set[str], tuple[tuple[str, Any], ...]]:
    defaults = tuple(
        (name, field.default) for name, field in cls.model_fields.items() if not field.is_required()
    )
    # One set per class is safe: pydantic copies it before mutating (model_copy).
    _SHAPES[cls] = shape = (set(cls.model_fields), defaults)
    return shape


class CheckResult(_Result):
    """Whether ``subject`` may use ``feature`` now, and how much is left."""

    allowed: bool
    reason: Reason | None
    subject: str
    feature: str
    plan: str
    status: str
    metered: bool
    usage_remaining: int | None
    """Spendable now: allowance left + credits - in-flight holds. None for boolean features."""
    limit: int | None
    """The period allowance; None for boolean features."""
    overage_allowed: bool = False
    period_end: datetime | None = None


class ConsumeResult(_Result):
    """Outcome of :meth:`Ledger.consume` (and the shape :meth:`Ledger.commit` shares)."""

    ok: bool
    consumed: int
    usage_remaining: int
    replayed: bool = False
    reason: Reason | None = None
    subject: str
    feature: str
    key: str | None = None
    entry_id: int | None = None
    overage: int = 0
    """Units of this operation recorded past allowance and credits (overage features only)."""


class Reservation(_Result):
    """Units held for a piece of work until it is committed, released or expires.

    ``ok=False`` means the hold was refused (``reason`` says why) and there is nothing to
    settle. ``replayed=True`` means the key already committed: the work must not be charged
    again, and committing this reservation returns the original result.
    """

    ok: bool
    id: int | None
    subject: str
    feature: str
    units: int
    key: str | None
    expires_at: datetime | None
    usage_remaining: int
    reason: Reason | None = None
    replayed: bool = False
    consumed: int = 0
    """For a replayed reservation, the units the original operation charged."""


class Balance(_Result):
    """Where a subject stands on one metered feature in the current period."""

    subject: str
    feature: str
    plan: str
    status: str
    allowance: int
    used: int
    credits: int
    held: int
    overage: int
    usage_remaining: int
    period_start: datetime | None
    period_end: datetime | None


class HistoryEntry(_Result):
    """One line of the append-only ledger of a subject."""

    id: int
    subject: str
    feature: str
    kind: str
    """``consume``, ``reserve``, ``grant``, ``credit_expired``, ``revoke`` or ``period``."""
    state: str
    """``committed``, ``held``, ``released``, ``expired`` or ``applied``."""
    units: int
    """Units asked (consume), held (reserve), granted, expired or allowed (period)."""
    charged: int | None
    from_allowance: int
    from_credit: int
    overage: int
    key: str | None
    created_at: datetime
    expires_at: datetime | None
    settled_at: datetime | None


class GrantResult(_Result):
    """Outcome of :meth:`Ledger.grant`: the credit, or the original one when the key replayed."""

    subject: str
    feature: str
    units: int
    key: str | None
    entry_id: int
    expires_at: datetime | None
    replayed: bool = False


class Subscription(_Result):
    """A subject's plan and subscription state, as written by :meth:`Ledger.assign_plan`."""

    subject: str
    plan: str
    status: str
    access: bool
    """Whether the status grants access right now (``past_due`` within its grace period does)."""
    period_start: datetime
    period_end: datetime
    cancel_at_period_end: bool = False


def _fast_construct_works() -> bool:
    """Guard against pydantic changing its instance layout: compare with a validated model."""
    values = {
        "subject": "s",
        "feature": "f",
        "plan": "p",
        "status": "active",
        "allowance": 1,
        "used": 0,
        "credits": 0,
        "held": 0,
        "overage": 0,
        "usage_remaining": 1,
        "period_start": None,
        "period_end": None,
    }
    try:
        made = Balance._make(**values)
        return made == Balance(**values) and made.model_dump() == values
    except Exception:  # pragma: no cover - only on an incompatible pydantic
        return False


_FAST_CONSTRUCT = _fast_construct_works()
