"""Request and response bodies of the HTTP API (the OpenAPI document is built from these).

Conventions: subjects are ``subject_ref`` everywhere; ledger ids (reservations, history
entries) are 63-bit integers and travel as decimal *strings*, which JavaScript's ``Number``
could not hold exactly; times are RFC 3339 strings in UTC.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from metered.results import Reason
from metered.validation import MAX_FEATURE, MAX_SUBJECT, MAX_TTL_SECONDS, MAX_UNITS

SubjectRef = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_SUBJECT,
        description="The subject (user, org, ...) the units belong to.",
        examples=["user_123"],
    ),
]
FeatureName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_FEATURE,
        description="A feature of the plans. Optional when the plans meter exactly one feature.",
        examples=["api_calls"],
    ),
]
Units = Annotated[int, Field(strict=True, ge=1, le=MAX_UNITS, examples=[1])]
LEDGER_ID = r"^[1-9][0-9]{0,18}$"
LedgerId = Annotated[
    str,
    Field(
        pattern=LEDGER_ID,
        description="A ledger id: a 63-bit integer as a decimal string.",
        examples=["7312418822365184001"],
    ),
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


# --------------------------------------------------------------------------- requests


class CheckoutRequest(_Body):
    subject_ref: SubjectRef
    plan: Annotated[
        str,
        Field(
            min_length=1,
            max_length=255,
            description="A plan name, a credit pack name, or a Stripe price of either.",
            examples=["pro"],
        ),
    ]
    success_url: Annotated[str, Field(min_length=1, max_length=2048)]
    cancel_url: Annotated[str, Field(min_length=1, max_length=2048)]


class CheckRequest(_Body):
    subject_ref: SubjectRef
    feature: FeatureName | None = None


class ConsumeRequest(_Body):
    subject_ref: SubjectRef
    units: Units
    feature: FeatureName | None = None


class ReserveRequest(ConsumeRequest):
    ttl_seconds: Annotated[
        float | None,
        Field(
            gt=0,
            le=MAX_TTL_SECONDS,
            description="How long the hold lives if never settled (default: the ledger's).",
        ),
    ] = None


class CommitRequest(_Body):
    subject_ref: SubjectRef
    reservation_id: LedgerId
    units: Annotated[
        int | None,
        Field(
            strict=True,
            ge=0,
            le=MAX_UNITS,
            description="The final amount to charge (default: the reserved units).",
        ),
    ] = None


class ReleaseRequest(_Body):
    subject_ref: SubjectRef
    reservation_id: LedgerId


# --------------------------------------------------------------------------- responses


class CheckoutResponse(_Out):
    id: str = Field(description="The Stripe Checkout Session id.")
    url: str | None = Field(description="Where to send the customer.")


class CheckResponse(_Out):
    allowed: bool
    reason: Reason | None
    subject_ref: str
    feature: str
    plan: str
    status: str = Field(description="Subscription status (``none`` without a plan).")
    metered: bool
    usage_remaining: int | None = Field(
        description="Spendable now (allowance + credits - holds); null for boolean features."
    )
    limit: int | None = Field(description="The period allowance; null for boolean features.")
    overage_allowed: bool
    period_end: datetime | None


class ConsumeResponse(_Out):
    ok: Literal[True]
    consumed: int = Field(description="Units charged (by the original request when replayed).")
    usage_remaining: int
    replayed: bool = Field(
        description="True when this key (or reservation) was already charged: nothing new was."
    )
    subject_ref: str
    feature: str
    idempotency_key: str | None
    entry_id: LedgerId | None = Field(description="The ledger entry of the charge.")
    overage: int = Field(description="Units recorded past allowance and credits.")


class ReservationResponse(_Out):
    ok: Literal[True]
    reservation_id: LedgerId
    subject_ref: str
    feature: str
    units: int
    idempotency_key: str | None
    expires_at: datetime | None
    usage_remaining: int
    replayed: bool = Field(
        description="True when the key already committed: do not do the work again; "
        "``consumed`` is what the original charged."
    )
    consumed: int


class ReleaseResponse(_Out):
    released: bool = Field(description="False if the hold was already released or expired.")
    reservation_id: LedgerId
    subject_ref: str


class FeatureBalance(_Out):
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


class BalanceResponse(_Out):
    subject_ref: str
    balances: list[FeatureBalance] = Field(
        description="One entry per metered feature (or only the one asked with ?feature=)."
    )


class HistoryItem(_Out):
    id: LedgerId
    feature: str
    kind: str = Field(description="consume, reserve, grant, credit_expired, revoke or period.")
    state: str = Field(description="committed, held, released, expired or applied.")
    units: int
    charged: int | None
    from_allowance: int
    from_credit: int
    overage: int
    idempotency_key: str | None
    created_at: datetime
    expires_at: datetime | None
    settled_at: datetime | None


class HistoryResponse(_Out):
    subject_ref: str
    entries: list[HistoryItem] = Field(description="Newest first.")
    next_before: LedgerId | None = Field(
        description="Pass as ?before= for the next page; null on the last page."
    )


class WebhookResponse(_Out):
    received: Literal[True]
    event_id: str | None
    outcome: str | None = Field(
        description="applied, duplicate (already processed), ignored, stale or unresolved."
    )


# --------------------------------------------------------------------------- problems


class Problem(BaseModel):
    """An RFC 9457 problem document (``application/problem+json``); may carry more fields."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(examples=["urn:metered:problem:invalid-api-key"])
    title: str
    status: int
    detail: str


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="Where: ``body``/``query``/``path``/``header``, ...")
    msg: str
    type: str


class ValidationProblem(Problem):
    """422: the request is malformed; ``errors`` lists what is wrong, field by field."""

    errors: list[FieldError]


class UnitsDenied(Problem):
    """402/403: the units were not taken. The body is both the adapters' problem document
    and an ``ok: false`` usage result."""

    ok: Literal[False]
    consumed: Literal[0]
    reason: Reason
    feature: str
    usage_remaining: int
    units_requested: int
