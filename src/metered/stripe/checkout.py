"""Checkout Session parameters: one subject reference, carried everywhere Stripe lets it ride.

The subject goes into ``client_reference_id`` and ``metadata`` of the session, into
``subscription_data.metadata`` (so every subscription event names it) or
``payment_intent_data.metadata`` (so refunds can be traced), and a pack purchase records the
pack and quantity in the session's metadata, so the webhook knows what was bought without
another API call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from metered.errors import InvalidInput, UnknownPlan
from metered.stripe.config import CreditPack, Settings
from metered.stripe.errors import CheckoutError
from metered.validation import subject as check_subject

_CLIENT_REFERENCE_MAX = 200


@dataclass(frozen=True)
class Target:
    """What is being bought: a plan (subscription mode) or a credit pack (payment mode)."""

    mode: Literal["subscription", "payment"]
    price: str
    pack: CreditPack | None = None


def resolve(settings: Settings, name: str, price: str | None) -> Target:
    """A plan name, a pack name, or a price of either, as a checkout target."""
    catalog = settings.catalog
    if name in settings.packs:
        pack = settings.packs[name]
        return Target("payment", pack.price, pack)
    plan = catalog.plans.get(name) or catalog.by_price.get(name)
    if plan is None:
        raise UnknownPlan(
            f"{name!r} is neither a plan nor a credit pack; plans: {sorted(catalog.plans)},"
            f" packs: {sorted({p.key for p in settings.packs.values()})}"
        )
    if price is None:
        price = name if name in catalog.by_price else (plan.prices[0] if plan.prices else None)
    if price is None:
        raise CheckoutError(f"plan {plan.name!r} has no Stripe price to check out")
    if catalog.by_price.get(price) is not plan:
        raise CheckoutError(f"price {price!r} is not one of plan {plan.name!r}'s prices")
    return Target("subscription", price)


def is_price_id(price: str) -> bool:
    """Price ids start with ``price_`` (or ``plan_`` for legacy plans); anything else is a
    lookup key to resolve through the API."""
    return price.startswith(("price_", "plan_"))


def session_params(
    settings: Settings,
    subject: str,
    target: Target,
    price_id: str,
    *,
    success_url: str,
    cancel_url: str,
    quantity: int,
    customer: str | None,
    customer_email: str | None,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``checkout.sessions.create`` parameters for one subject and target."""
    check_subject(subject)
    if not isinstance(quantity, int) or isinstance(quantity, bool) or quantity < 1:
        raise InvalidInput("quantity must be a positive int")
    key = settings.metadata_key
    metadata = {**dict(extra.get("metadata") or {}), key: subject}
    params: dict[str, Any] = {
        **extra,
        "mode": target.mode,
        "line_items": [{"price": price_id, "quantity": quantity}],
        "success_url": success_url,
        "cancel_url": cancel_url,
        "metadata": metadata,
    }
    if len(subject) <= _CLIENT_REFERENCE_MAX:
        params["client_reference_id"] = subject
    if target.pack is not None:
        metadata.update(metered_pack=target.pack.key, metered_quantity=str(quantity))
        params["payment_intent_data"] = _with_metadata(
            extra.get("payment_intent_data"), {key: subject, "metered_pack": target.pack.key}
        )
    else:
        params["subscription_data"] = _with_metadata(extra.get("subscription_data"), {key: subject})
    if customer is not None:
        params["customer"] = customer
        params.pop("customer_email", None)
    else:
        if customer_email is not None:
            params["customer_email"] = customer_email
        if target.mode == "payment":
            params.setdefault("customer_creation", "always")  # a customer to link and reuse
    return params


def _with_metadata(section: Any, metadata: dict[str, str]) -> dict[str, Any]:
    merged: dict[str, Any] = dict(section or {})
    merged["metadata"] = {**dict(merged.get("metadata") or {}), **metadata}
    return merged
