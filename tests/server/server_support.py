"""Helpers for the HTTP API tests (imported by ``test_server_*.py``; not a test module).

* :class:`OpenApiChecker` validates every response a test client receives against the app's
  own OpenAPI document: the status must be documented for the route, the content type and
  the body must match the documented schema. So every endpoint test also proves the document.
* :class:`LiveServer` runs ``metered serve`` (uvicorn) in a subprocess on a free port.
* :class:`FakeBilling` stands in for ``StripeBilling`` (duck-typed, sync and async methods,
  raising metered.stripe's errors).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
from openapi_schema_validator import OAS31Validator, validate

from metered import Plan, UnknownPlan
from metered.stripe.errors import CheckoutError, SignatureError, WebhookProcessingError

PLANS = [
    Plan("free", features={"api_calls": 10}),
    Plan("pro", prices=["price_pro_monthly"], features={"api_calls": 1000, "reports": True}),
    Plan("reports_only", features={"reports": True}),
]

PLANS_TOML = """
default_plan = "free"
[plans.free.features]
api_calls = {units}
[plans.pro]
prices = ["price_pro_monthly"]
features = {{ api_calls = 1000, reports = true }}
"""


class OpenApiChecker:
    """An httpx response hook: each response must be one the OpenAPI document describes."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.routes = [
            (re.compile("^" + re.sub(r"\{\w+\}", ".+", path) + "$"), path)
            for path in document["paths"]
        ]
        self.checked: list[tuple[str, str, int]] = []

    def template(self, path: str) -> str | None:
        return next((t for pattern, t in self.routes if pattern.match(path)), None)

    async def __call__(self, response: httpx.Response) -> None:
        await response.aread()
        self.check(response)

    def check(self, response: httpx.Response) -> None:
        request = response.request
        template = self.template(request.url.path)
        operation = self.document["paths"].get(template, {}).get(request.method.lower())
        if operation is None:
            return  # /openapi.json, unknown routes and methods: not part of the API
        status = str(response.status_code)
        assert status in operation["responses"], (
            f"{request.method} {template} answered {status}, which the OpenAPI document does"
            f" not list: {response.text}"
        )
        content = operation["responses"][status]["content"]
        media_type = response.headers["content-type"].split(";")[0]
        assert media_type in content, f"{media_type} not documented for {template} {status}"
        schema = {**content[media_type]["schema"], "components": self.document["components"]}
        validate(response.json(), schema, cls=OAS31Validator)
        self.checked.append((request.method, template, response.status_code))


class FakeBilling:
    """Duck-typed ``StripeBilling``: async checkout, sync webhooks (run on a worker thread)."""

    def __init__(self, *, livemode: bool | None = None) -> None:
        self.livemode = livemode
        self.sessions: list[dict[str, Any]] = []
        self.deliveries: list[tuple[bytes, str | None]] = []

    async def create_checkout_session(
        self, subject: str, plan: str, *, success_url: str, cancel_url: str
    ) -> Any:
        if plan == "nope":
            raise UnknownPlan(f"unknown plan {plan!r}")
        if plan == "free":
            raise CheckoutError("plan 'free' has no Stripe price to check out")
        if plan == "down":
            raise ConnectionError("Stripe is unreachable")
        self.sessions.append({"subject": subject, "plan": plan, "success_url": success_url})
        return SimpleNamespace(id="cs_test_1", url="https://checkout.stripe.com/c/pay/cs_test_1")

    def handle_webhook(self, payload: bytes, signature_header: str | None) -> Any:
        assert threading.current_thread() is not threading.main_thread()
        self.deliveries.append((payload, signature_header))
        if signature_header == "fail":
            raise WebhookProcessingError("applying failed", event_id="evt_2", event_type="x")
        if signature_header != "t=1,v1=good":
            raise SignatureError("bad signature")
        return SimpleNamespace(event_id="evt_1", type="customer.created", outcome="ignored")


# `python -m metered.cli` would run the CLI as __main__, a second copy of the module that the
# extensions (serve, keys) do not register with; the console script imports it normally.
_MAIN = "import sys; from metered.cli import main; sys.exit(main())"


class LiveServer:
    """``metered serve`` on 127.0.0.1 and a port the OS picks; always stopped on exit."""

    def __init__(
        self,
        url: str,
        plans: Path,
        *,
        workers: int = 1,
        mode: str = "test",
        timeout: float = 60.0,
    ) -> None:
        self.args = [
            *("--url", url, "--plans", str(plans), "--port", "0", "--mode", mode),
            *("--workers", str(workers), "--no-access-log", "--log-level", "info"),
        ]
        self.timeout = timeout
        self.lines: list[str] = []
        self.port: int | None = None
        self._found = threading.Event()
        self.process: subprocess.Popen[str] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _drain(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if self.port is None and (m := re.search(r"running on http://[\d.]+:(\d+)", line)):
                self.port = int(m.group(1))
                self._found.set()
        self._found.set()

    def __enter__(self) -> LiveServer:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("STRIPE_API_KEY", None)
        self.process = subprocess.Popen(
            [sys.executable, "-c", _MAIN, "serve", *self.args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # its own process group: workers are stopped with it
        )
        threading.Thread(target=self._drain, daemon=True).start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout
        self._found.wait(self.timeout)
        if self.port is None:
            raise RuntimeError("metered serve did not start:\n" + "".join(self.lines))
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.base_url + "/openapi.json", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("metered serve never answered:\n" + "".join(self.lines))

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def __exit__(self, *exc: object) -> None:
        self.stop()
