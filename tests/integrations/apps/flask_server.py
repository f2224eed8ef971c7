"""The Flask app the server tests run under gunicorn (``apps.flask_server:app``).

The ledger URL comes from ``METERED_TEST_APP_DB``; the schema must already exist. The subject
is the ``X-Subject`` header.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from flask import Flask, Response, request, stream_with_context

from metered import Ledger, Plan
from metered.integrations.flask import Metered, consumes

PLANS = [Plan("free", features={"api_calls": 100})]
STREAM_UNITS = 5


def create_app(url: str) -> Flask:
    app = Flask(__name__)
    ledger = Ledger(url, plans=PLANS, default_plan="free")
    Metered(app, ledger=ledger, subject=lambda: request.headers.get("X-Subject"))

    @app.get("/health")
    def health() -> str:
        return "ok"

    @app.post("/charge")
    @consumes(1, feature="api_calls")
    def charge() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/stream")
    @consumes(STREAM_UNITS, feature="api_calls")
    def stream() -> Response:
        chunks = int(request.args.get("chunks", "10"))
        delay = float(request.args.get("delay", "0"))
        fail_at = int(request.args.get("fail_at", "-1"))

        def generate() -> Iterator[str]:
            for i in range(chunks):
                if i == fail_at:
                    raise RuntimeError("boom while streaming")
                yield f"chunk {i:04d}\n" + "." * 1000 + "\n"
                if delay:
                    time.sleep(delay)

        return Response(stream_with_context(generate()), mimetype="text/plain")

    return app


app = create_app(os.environ["METERED_TEST_APP_DB"]) if "METERED_TEST_APP_DB" in os.environ else None
