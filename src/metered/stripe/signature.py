"""Webhook authenticity and shape: Stripe's ``Stripe-Signature`` scheme and the event envelope.

Stripe signs ``f"{t}.{body}"`` with HMAC-SHA256 under the endpoint's secret and sends
``t=<unix time>,v1=<hex>[,v1=<hex>...]`` (several ``v1`` during a secret roll). The body is
checked as received, byte for byte, before it is parsed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from metered.stripe.errors import PayloadError, SignatureError


@dataclass(frozen=True, slots=True)
class Event:
    """The parts of a Stripe event envelope that metered reads."""

    id: str
    type: str
    created: int
    livemode: bool | None
    object: dict[str, Any]
    api_version: str | None = None


def verify(
    payload: bytes, header: str | None, secrets: Sequence[str], *, tolerance: int, now: float
) -> None:
    """Raise :class:`SignatureError` unless ``header`` signs ``payload`` under one of ``secrets``.

    The timestamp must lie within ``tolerance`` seconds of ``now`` (either side).
    """
    if not header:
        raise SignatureError("missing Stripe-Signature header")
    timestamp: int | None = None
    signatures: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                raise SignatureError("malformed Stripe-Signature timestamp") from None
        elif key == "v1":
            signatures.append(value.strip())
    if timestamp is None or not signatures:
        raise SignatureError("Stripe-Signature header has no timestamp or no v1 signature")
    signed = f"{timestamp}.".encode() + payload
    expected = [hmac.new(s.encode(), signed, hashlib.sha256).hexdigest() for s in secrets]
    if not any(hmac.compare_digest(e, s) for e in expected for s in signatures):
        raise SignatureError("no v1 signature matches the payload under the configured secrets")
    if tolerance and abs(now - timestamp) > tolerance:
        raise SignatureError(f"signature timestamp is outside the {tolerance} s tolerance")


def parse_event(payload: bytes) -> Event:
    """The event in a verified body; :class:`PayloadError` if it is not one."""
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PayloadError(f"webhook body is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("object") != "event":
        raise PayloadError("webhook body is not a Stripe event")
    event_id, event_type, created = data.get("id"), data.get("type"), data.get("created")
    inner = data.get("data")
    obj = inner.get("object") if isinstance(inner, dict) else None
    if not (isinstance(event_id, str) and event_id and isinstance(event_type, str)):
        raise PayloadError("Stripe event without an id or a type")
    if not isinstance(created, int) or isinstance(created, bool) or not isinstance(obj, dict):
        raise PayloadError(f"Stripe event {event_id} has no created time or no data.object")
    livemode = data.get("livemode")
    return Event(
        id=event_id,
        type=event_type,
        created=created,
        livemode=livemode if isinstance(livemode, bool) else None,
        object=obj,
        api_version=data.get("api_version") if isinstance(data.get("api_version"), str) else None,
    )
