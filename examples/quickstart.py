"""The metered quickstart: assign a plan, consume until the quota runs out, print each result.

Runs on the embedded SQLite default (``sqlite:///metered.db`` in the working directory, or
``$METERED_DATABASE_URL``)::

    python examples/quickstart.py
"""

from __future__ import annotations

import os
import uuid

from metered import Ledger, Plan

PLANS = [
    Plan("free", features={"api_calls": 5}),
    Plan("pro", prices=["price_pro_monthly"], features={"api_calls": 10_000, "reports": True}),
]


def main(url: str | None = None) -> None:
    with Ledger(
        url or os.environ.get("METERED_DATABASE_URL"), plans=PLANS, default_plan="free"
    ) as ledger:
        ledger.create_schema()
        subject = f"user_{uuid.uuid4().hex[:8]}"
        ledger.assign_plan(subject, "free")
        print(
            f"{subject} is on the free plan: {ledger.check(subject, 'api_calls').usage_remaining}"
            " api_calls this period"
        )

        for request in range(1, 8):
            result = ledger.consume(subject, 1, feature="api_calls", key=f"request-{request}")
            status = "charged" if result.ok else f"denied ({result.reason})"
            print(f"request {request}: {status:<26} remaining={result.usage_remaining}")

        retry = ledger.consume(subject, 1, feature="api_calls", key="request-1")
        print(f"retry of request 1: replayed={retry.replayed}, charged nothing again")

        reservation = ledger.reserve(subject, 1, feature="api_calls", key="request-8")
        print(f"reserve while exhausted: ok={reservation.ok} ({reservation.reason})")

        print(f"reports allowed on free? {ledger.check(subject, 'reports').allowed}")
        ledger.assign_plan(subject, "pro")
        print(
            f"after upgrading to pro: reports allowed? {ledger.check(subject, 'reports').allowed},"
            f" api_calls left: {ledger.balance(subject, 'api_calls').usage_remaining}"
        )

        print("\nhistory (newest first):")
        for entry in ledger.history(subject):
            print(f"  {entry.kind:<8} {entry.state:<9} units={entry.units:<6} key={entry.key}")


if __name__ == "__main__":
    main()
