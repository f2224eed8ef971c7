"""Reading Stripe objects across API versions (plain dicts, as found in event payloads).

Two payload generations exist: before 2025-03-31.basil a subscription carries
``current_period_start/end`` itself and an invoice names its subscription in
``invoice.subscription``; from basil on, the period lives on each subscription item and the
invoice's subscription moved to ``invoice.parent.subscription_details``. Every reader here
accepts both, and accepts expanded objects wherever Stripe may send an id or an object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Obj = dict[str, Any]


def ref(value: Any) -> str | None:
    """The id of an expandable field: an id string, or an expanded object's ``id``."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        return str(value["id"])
    return None


def expanded(value: Any) -> Obj | None:
    """The object of an expandable field when it was expanded, else None."""
    return value if isinstance(value, dict) and "object" in value else None


def metadata(obj: Any) -> dict[str, str]:
    data = obj.get("metadata") if isinstance(obj, dict) else None
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _list(obj: Any, field: str) -> list[Obj]:
    value = obj.get(field) if isinstance(obj, dict) else None
    if isinstance(value, dict):
        value = value.get("data")
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True, slots=True)
class Item:
    """One subscription item: the names its price goes by, and its period (basil and later)."""

    price_names: tuple[str, ...]
    period: tuple[int, int] | None


def _price_names(item: Obj) -> tuple[str, ...]:
    names: list[str] = []
    for field in ("price", "plan"):  # ``plan`` is the legacy twin of ``price``
        value = item.get(field)
        if (price_id := ref(value)) is not None:
            names.append(price_id)
        if isinstance(value, dict) and isinstance(value.get("lookup_key"), str):
            names.append(value["lookup_key"])
    return tuple(dict.fromkeys(names))


def _period(obj: Obj, start: str, end: str) -> tuple[int, int] | None:
    s, e = _int(obj.get(start)), _int(obj.get(end))
    return (s, e) if s is not None and e is not None and e > s else None


def subscription_items(subscription: Obj) -> list[Item]:
    return [
        Item(_price_names(item), _period(item, "current_period_start", "current_period_end"))
        for item in _list(subscription, "items")
    ]


def subscription_period(subscription: Obj, item: Item | None) -> tuple[int, int] | None:
    """The current period: the plan item's (basil), any item's, or the subscription's (older)."""
    if item is not None and item.period is not None:
        return item.period
    for other in subscription_items(subscription):
        if other.period is not None:
            return other.period
    return _period(subscription, "current_period_start", "current_period_end")


def _subscription_details(invoice: Obj) -> Obj:
    parent = invoice.get("parent")
    details = parent.get("subscription_details") if isinstance(parent, dict) else None
    if isinstance(details, dict):
        return details
    legacy = invoice.get("subscription_details")  # 2023-2025: metadata only
    return legacy if isinstance(legacy, dict) else {}


def invoice_subscription(invoice: Obj) -> str | None:
    """The subscription an invoice bills: ``parent.subscription_details`` or ``subscription``."""
    return ref(_subscription_details(invoice).get("subscription")) or ref(
        invoice.get("subscription")
    )


def invoice_subscription_metadata(invoice: Obj) -> dict[str, str]:
    """The subscription's metadata as copied onto the invoice (both generations)."""
    return metadata(_subscription_details(invoice))


def invoice_period(invoice: Obj) -> tuple[int, int] | None:
    """The subscription period an invoice pays for, from its non-proration subscription lines.

    (``invoice.period_start/end`` is the *previous* period on renewal invoices, so the lines
    are what tell the new one.)
    """
    best: tuple[int, int] | None = None
    for line in _list(invoice, "lines"):
        parent = line.get("parent")
        details = parent.get("subscription_item_details") if isinstance(parent, dict) else None
        if isinstance(details, dict):  # basil
            proration = bool(details.get("proration"))
        elif line.get("type") == "subscription":  # before basil
            proration = bool(line.get("proration"))
        else:
            continue
        period = line.get("period")
        span = _period(period, "start", "end") if isinstance(period, dict) else None
        if not proration and span is not None and (best is None or span[1] > best[1]):
            best = span
    return best
