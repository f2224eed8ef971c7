"""The Stripe webhook endpoint as a Starlette route (re-exported by
``metered.integrations.starlette``; works in FastAPI's ``app.router.routes`` too).

::

    app = Starlette(routes=[stripe_webhook_route(billing)])   # POST /stripe/webhook
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from metered.integrations._rules import exempt_path
from metered.stripe import AsyncStripeBilling, StripeBilling, StripeBillingError, WebhookResult
from metered.stripe._http import error_body, success_body


def stripe_webhook_route(
    billing: StripeBilling | AsyncStripeBilling,
    path: str = "/stripe/webhook",
    *,
    name: str = "metered_stripe_webhook",
) -> Route:
    """A ``POST path`` route that feeds Stripe webhooks to ``billing``.

    With :class:`AsyncStripeBilling` the event is applied on the event loop; a sync
    :class:`StripeBilling` runs in Starlette's thread pool. Status codes as in the Flask
    blueprint: 200 applied/duplicate/ignored, 400 rejected, 500 failed (Stripe retries).
    ``path`` is exempt from metering middleware (pass the full path if the route is mounted).
    """
    exempt_path(path)

    async def stripe_webhook(request: Request) -> JSONResponse:
        payload = await request.body()
        signature = request.headers.get("stripe-signature")
        try:
            result: WebhookResult
            if isinstance(billing, AsyncStripeBilling):
                result = await billing.handle_webhook(payload, signature)
            else:
                result = await run_in_threadpool(billing.handle_webhook, payload, signature)
        except StripeBillingError as exc:
            body, status, content_type = error_body(exc)
            return JSONResponse(body, status_code=status, media_type=content_type)
        return JSONResponse(success_body(result))

    return Route(path, stripe_webhook, methods=["POST"], name=name)
