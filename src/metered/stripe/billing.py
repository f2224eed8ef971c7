"""``StripeBilling`` and ``AsyncStripeBilling``: checkout, webhooks and meter export.

Both share every flow (:class:`_BillingBase`); they differ only in how effects run (see
:mod:`metered.stripe._effects`): blocking calls on a :class:`metered.Ledger`, or ``await`` on a
:class:`metered.AsyncLedger` with the Stripe client's ``*_async`` methods.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import stripe

from metered import _core
from metered.clock import duration_us
from metered.errors import ConfigurationError
from metered.ledger import AsyncLedger, Ledger
from metered.stripe import checkout
from metered.stripe._effects import Api, Db, Flow, run_async, run_sync
from metered.stripe.config import CreditPack, OnInactive, Settings
from metered.stripe.errors import (
    CheckoutError,
    LivemodeMismatch,
    WebhookProcessingError,
    WebhookRejected,
)
from metered.stripe.export import Exporter, ExportReport
from metered.stripe.handlers import KINDS, Applier, Kind, Outcome, WebhookResult
from metered.stripe.shapes import Obj, invoice_subscription, ref
from metered.stripe.signature import Event, parse_event, verify
from metered.stripe.store import StripeStatements
from metered.validation import subject as check_subject

logger = logging.getLogger("metered.stripe")

_SESSION_EXPAND = {"expand": ["subscription", "line_items"]}


@dataclass(frozen=True, slots=True)
class CheckoutResult:
    """What :meth:`StripeBilling.sync_checkout_session` found and applied."""

    session_id: str
    status: str | None
    """The session's status: ``complete`` (applied), ``open`` or ``expired`` (nothing to do)."""
    payment_status: str | None
    subject: str | None
    outcome: Outcome


def key_livemode(client: stripe.StripeClient) -> bool | None:
    """Live or test mode, from the client's API key prefix (None when it cannot tell)."""
    options = getattr(getattr(client, "_requestor", None), "_options", None)
    key = getattr(options, "api_key", None)
    if isinstance(key, str):
        if key.startswith(("sk_live_", "rk_live_")):
            return True
        if key.startswith(("sk_test_", "rk_test_")):
            return False
    return None


def _refetch_call(event: Event, kind: Kind) -> tuple[Api, Kind] | None:
    """The API call that returns the current state of the event's object, and how to apply it."""
    obj = event.object
    if kind == "subscription" and (sub := ref(obj.get("id"))):
        return Api(("v1", "subscriptions"), "retrieve", (sub,)), "subscription"
    if kind == "invoice" and (sub := invoice_subscription(obj)):
        return Api(("v1", "subscriptions"), "retrieve", (sub,)), "subscription"
    if kind == "session" and (session := ref(obj.get("id"))):
        call = Api(
            ("v1", "checkout", "sessions"), "retrieve", (session,), {"params": _SESSION_EXPAND}
        )
        return call, "session"
    if kind == "charge" and (charge := ref(obj.get("id"))):
        return Api(("v1", "charges"), "retrieve", (charge,)), "charge"
    if kind == "entitlements" and (customer := ref(obj.get("customer"))):
        params = {"customer": customer, "limit": 100}
        return Api(("v1", "entitlements", "active_entitlements"), "list", (params,)), kind
    return None


class _BillingBase:
    """Configuration and the flows shared by the sync and async billing classes."""

    def __init__(
        self,
        ledger: Any,
        *,
        client: stripe.StripeClient,
        webhook_secret: str | Sequence[str],
        credit_packs: Iterable[CreditPack] = (),
        refetch: bool = False,
        livemode: bool | None = None,
        tolerance: int = 300,
        on_inactive: OnInactive = "default_plan",
        entitlement_plans: Mapping[str, str] | None = None,
        metadata_key: str = "metered_subject",
        export_retries: int = 4,
        export_backoff: float = 0.5,
    ) -> None:
        if not isinstance(client, stripe.StripeClient):
            raise ConfigurationError("client must be a stripe.StripeClient")
        secrets = [webhook_secret] if isinstance(webhook_secret, str) else list(webhook_secret)
        if not secrets or not all(isinstance(s, str) and s.strip() for s in secrets):
            raise ConfigurationError("webhook_secret must be a non-empty string (or several)")
        self.ledger = ledger
        self.client = client
        self.refetch = refetch
        self.tolerance = tolerance
        self.livemode = key_livemode(client) if livemode is None else livemode
        self.export_retries = export_retries
        self.export_backoff = export_backoff
        self._secrets = tuple(secrets)
        ctx: _core.Context = ledger._ctx
        self._ctx = ctx
        self.settings = Settings.build(
            ledger.catalog, credit_packs, on_inactive, entitlement_plans, metadata_key
        )
        sql = StripeStatements(ctx.stmts.dialect, ledger.target.paramstyle)
        self._applier = Applier(ctx, sql, self.settings)
        self._exporter = Exporter(ctx, sql)

    def _check_livemode(self, livemode: Any, what: str) -> None:
        if self.livemode is not None and isinstance(livemode, bool) and livemode != self.livemode:
            mode = "live" if livemode else "test"
            key = "live" if self.livemode else "test"
            raise LivemodeMismatch(f"{what} is a {mode}-mode object but the API key is {key}-mode")

    # ------------------------------------------------------------------- flows

    def _webhook_flow(self, payload: bytes, signature_header: str | None) -> Flow[WebhookResult]:
        if isinstance(payload, str):
            payload = payload.encode()
        now = self._ctx.clock.now_us() / 1_000_000
        verify(payload, signature_header, self._secrets, tolerance=self.tolerance, now=now)
        event = parse_event(payload)
        self._check_livemode(event.livemode, f"event {event.id}")
        kind = KINDS.get(event.type)
        if kind is None:
            logger.debug("Stripe event %s of type %s ignored", event.id, event.type)
            return WebhookResult(event.id, event.type, "ignored")
        try:
            obj, fetched = event.object, False
            if self.refetch and (call := _refetch_call(event, kind)) is not None:
                if (yield Db(self._applier.seen(event.id))):
                    return WebhookResult(event.id, event.type, "duplicate")
                request, kind = call
                obj = yield request
                if kind == "entitlements":
                    obj = {"customer": event.object.get("customer"), "entitlements": obj}
                self._check_livemode(obj.get("livemode"), f"object {obj.get('id')}")
                fetched = True
            result: WebhookResult = yield Db(self._applier.event(event, obj, kind, fetched=fetched))
        except WebhookRejected:
            raise
        except Exception as exc:
            logger.exception(
                "Stripe event %s (%s) failed; not marked processed, Stripe will retry it",
                event.id,
                event.type,
            )
            raise WebhookProcessingError(
                f"applying Stripe event {event.id} ({event.type}) failed: {exc}",
                event_id=event.id,
                event_type=event.type,
            ) from exc
        if result.outcome == "unresolved":
            logger.warning("Stripe event %s (%s): no subject found", event.id, event.type)
        return result

    def _checkout_flow(
        self,
        subject: str,
        plan: str,
        *,
        success_url: str,
        cancel_url: str,
        quantity: int,
        price: str | None,
        customer_email: str | None,
        idempotency_key: str | None,
        params: Mapping[str, Any] | None,
    ) -> Flow[Any]:
        check_subject(subject)
        target = checkout.resolve(self.settings, plan, price)
        customer = yield Db(self._applier.customer_of(subject))
        price_id = target.price
        if not checkout.is_price_id(price_id):
            query = {"lookup_keys": [price_id], "active": True, "limit": 1}
            found = yield Api(("v1", "prices"), "list", (query,))
            data = found.get("data") or []
            if not data:
                raise CheckoutError(f"no active Stripe price has lookup key {price_id!r}")
            price_id = data[0]["id"]
        session_params = checkout.session_params(
            self.settings,
            subject,
            target,
            price_id,
            success_url=success_url,
            cancel_url=cancel_url,
            quantity=quantity,
            customer=customer,
            customer_email=customer_email,
            extra=params or {},
        )
        options = {"idempotency_key": idempotency_key or f"metered-checkout-{uuid.uuid4().hex}"}
        create = Api(("v1", "checkout", "sessions"), "create", (session_params, options), raw=True)
        return (yield create)

    def _sync_flow(self, session_id: str) -> Flow[CheckoutResult]:
        if not isinstance(session_id, str) or not session_id.startswith("cs_"):
            raise CheckoutError(f"not a checkout session id: {session_id!r}")
        retrieve = Api(
            ("v1", "checkout", "sessions"), "retrieve", (session_id,), {"params": _SESSION_EXPAND}
        )
        session: Obj = yield retrieve
        self._check_livemode(session.get("livemode"), f"checkout session {session_id}")
        status, payment_status = session.get("status"), session.get("payment_status")
        if status != "complete":
            return CheckoutResult(session_id, status, payment_status, None, "ignored")
        outcome, subject = yield Db(self._applier.fetched_session(session))
        return CheckoutResult(session_id, status, payment_status, subject, outcome)

    def _export_flow(self, batch_size: int, limit: int | None) -> Flow[ExportReport]:
        return self._exporter.flow(
            batch_size=batch_size,
            max_retries=self.export_retries,
            backoff=self.export_backoff,
            limit=limit,
        )

    def _prune_op(self, older_than: timedelta) -> _core.Op:
        return self._applier.prune(self._ctx.clock.now_us() - duration_us(older_than))


class StripeBilling(_BillingBase):
    """Stripe billing for a :class:`metered.Ledger`.

    >>> billing = StripeBilling(ledger, client=stripe.StripeClient("sk_test_..."),
    ...                         webhook_secret="whsec_...")
    >>> session = billing.create_checkout_session("user_123", "pro",
    ...     success_url="https://app.example/billing/done?session={CHECKOUT_SESSION_ID}",
    ...     cancel_url="https://app.example/billing")
    >>> billing.handle_webhook(request_body_bytes, request.headers["Stripe-Signature"])

    Options: ``credit_packs`` (one-time prices that buy credits), ``refetch`` (re-read every
    event's object from the API before applying it), ``livemode`` (default: from the key),
    ``tolerance`` (signature age, seconds), ``on_inactive`` (``"default_plan"``: a subject
    whose subscriptions grant no access falls back to the default plan; ``"status"``: it keeps
    its plan with the inactive status), ``entitlement_plans`` (Stripe Entitlements feature
    lookup key -> plan, first active one wins), ``metadata_key``, ``export_retries`` and
    ``export_backoff``. ``webhook_secret`` may be a list while rotating secrets.
    """

    def __init__(
        self, ledger: Ledger, *, sleep: Callable[[float], None] = time.sleep, **options: Any
    ) -> None:
        if isinstance(ledger, AsyncLedger):
            raise ConfigurationError("StripeBilling needs a Ledger; use AsyncStripeBilling")
        super().__init__(ledger, **options)
        self._sleep = sleep

    def _run(self, flow: Flow[Any]) -> Any:
        return run_sync(flow, self.ledger, self.client, self._sleep)

    def handle_webhook(self, payload: bytes, signature_header: str | None) -> WebhookResult:
        """Verify, deduplicate and apply one webhook delivery (the raw request body).

        Raises :class:`WebhookRejected` (HTTP 400) for a bad signature or body and
        :class:`WebhookProcessingError` (HTTP 500) when applying fails; duplicates, ignored and
        stale events return normally (HTTP 200).
        """
        return self._run(self._webhook_flow(payload, signature_header))  # type: ignore[no-any-return]

    def create_checkout_session(
        self,
        subject: str,
        plan: str,
        *,
        success_url: str,
        cancel_url: str,
        quantity: int = 1,
        price: str | None = None,
        customer_email: str | None = None,
        idempotency_key: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> stripe.checkout.Session:
        """A Checkout Session for a plan (subscription mode) or a credit pack (payment mode).

        ``plan`` is a plan name, a credit pack name or a price of either; ``price`` picks one
        of a plan's prices (default: its first). ``params`` are extra Stripe parameters.
        Redirect the user to ``session.url``.
        """
        return self._run(  # type: ignore[no-any-return]
            self._checkout_flow(
                subject,
                plan,
                success_url=success_url,
                cancel_url=cancel_url,
                quantity=quantity,
                price=price,
                customer_email=customer_email,
                idempotency_key=idempotency_key,
                params=params,
            )
        )

    def sync_checkout_session(self, session_id: str) -> CheckoutResult:
        """Re-fetch a session from Stripe and apply it now (for the success page)."""
        return self._run(self._sync_flow(session_id))  # type: ignore[no-any-return]

    def export_usage(self, *, batch_size: int = 100, limit: int | None = None) -> ExportReport:
        """Send pending metered usage to Stripe Billing Meters; see :class:`ExportReport`."""
        return self._run(self._export_flow(batch_size, limit))  # type: ignore[no-any-return]

    def stripe_customer(self, subject: str) -> str | None:
        """The Stripe customer id of ``subject`` (newest live one), if any."""
        return self.ledger._run(self._applier.customer_of(check_subject(subject)))  # type: ignore[no-any-return]

    def prune_events(self, older_than: timedelta = timedelta(days=30)) -> None:
        """Forget processed event ids older than ``older_than`` (Stripe retries for 3 days)."""
        self.ledger._run(self._prune_op(older_than))


class AsyncStripeBilling(_BillingBase):
    """:class:`StripeBilling` for a :class:`metered.AsyncLedger`; the same methods, awaitable."""

    def __init__(
        self,
        ledger: AsyncLedger,
        *,
        sleep: Callable[[float], Any] = asyncio.sleep,
        **options: Any,
    ) -> None:
        if isinstance(ledger, Ledger):
            raise ConfigurationError("AsyncStripeBilling needs an AsyncLedger; use StripeBilling")
        super().__init__(ledger, **options)
        self._sleep = sleep

    async def _run(self, flow: Flow[Any]) -> Any:
        return await run_async(flow, self.ledger, self.client, self._sleep)

    async def handle_webhook(self, payload: bytes, signature_header: str | None) -> WebhookResult:
        """See :meth:`StripeBilling.handle_webhook`."""
        return await self._run(self._webhook_flow(payload, signature_header))  # type: ignore[no-any-return]

    async def create_checkout_session(
        self,
        subject: str,
        plan: str,
        *,
        success_url: str,
        cancel_url: str,
        quantity: int = 1,
        price: str | None = None,
        customer_email: str | None = None,
        idempotency_key: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> stripe.checkout.Session:
        """See :meth:`StripeBilling.create_checkout_session`."""
        return await self._run(  # type: ignore[no-any-return]
            self._checkout_flow(
                subject,
                plan,
                success_url=success_url,
                cancel_url=cancel_url,
                quantity=quantity,
                price=price,
                customer_email=customer_email,
                idempotency_key=idempotency_key,
                params=params,
            )
        )

    async def sync_checkout_session(self, session_id: str) -> CheckoutResult:
        """See :meth:`StripeBilling.sync_checkout_session`."""
        return await self._run(self._sync_flow(session_id))  # type: ignore[no-any-return]

    async def export_usage(
        self, *, batch_size: int = 100, limit: int | None = None
    ) -> ExportReport:
        """See :meth:`StripeBilling.export_usage`."""
        return await self._run(self._export_flow(batch_size, limit))  # type: ignore[no-any-return]

    async def stripe_customer(self, subject: str) -> str | None:
        """See :meth:`StripeBilling.stripe_customer`."""
        return await self.ledger._run(self._applier.customer_of(check_subject(subject)))  # type: ignore[no-any-return]

    async def prune_events(self, older_than: timedelta = timedelta(days=30)) -> None:
        """See :meth:`StripeBilling.prune_events`."""
        await self.ledger._run(self._prune_op(older_than))
