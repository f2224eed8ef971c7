"""Usage export to Stripe Billing Meters, from the ledger's outbox.

Committed usage of a feature with ``Feature(meter=...)`` is written with its meter name in
the same statement as the commit; ``exported_at IS NULL`` marks it pending. The export reads
pending rows page by page (keyset, so a row that cannot be sent never blocks the others),
sends each as a ``billing.meter_events`` event whose ``identifier`` is derived from the row
(retries and re-runs never double count: Stripe refuses a second event with the same
identifier), and marks a page's rows only after Stripe accepted them. Rows older than Stripe's
35-day window are never sent: they leave the outbox and are reported as ``stale``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import stripe

from metered import _core
from metered.stripe._effects import Api, Db, Flow, Sleep
from metered.stripe.store import StripeStatements

STRIPE_WINDOW = timedelta(days=35)
_MARGIN = timedelta(minutes=10)  # never race the window's edge


@dataclass(frozen=True, slots=True)
class UsageEntry:
    """One committed usage line of the outbox."""

    subject: str
    id: int
    meter: str
    units: int
    timestamp: int
    """Seconds since the epoch: when the usage was committed."""
    customer: str | None

    @property
    def identifier(self) -> str:
        """The meter event's stable identifier (at most 100 characters, unique per entry)."""
        digest = hashlib.sha256(self.subject.encode()).hexdigest()[:16]
        return f"metered-{self.id}-{digest}"


@dataclass
class ExportReport:
    """What one :meth:`StripeBilling.export_usage` run did."""

    sent: list[UsageEntry] = field(default_factory=list)
    """Accepted by Stripe (or already known to it under the same identifier); marked."""
    stale: list[UsageEntry] = field(default_factory=list)
    """Older than Stripe's 35-day window: never sent, taken out of the outbox."""
    rejected: list[tuple[UsageEntry, str]] = field(default_factory=list)
    """Refused by Stripe (e.g. unknown meter or customer): left pending, retried next run."""
    no_customer: list[UsageEntry] = field(default_factory=list)
    """The subject has no Stripe customer yet: left pending."""
    interrupted: str | None = None
    """Why the run stopped early (Stripe kept failing); what was not sent stays pending."""

    @property
    def complete(self) -> bool:
        return self.interrupted is None and not self.rejected and not self.no_customer


_RETRYABLE = (stripe.APIConnectionError, stripe.RateLimitError, stripe.APIError)
_FATAL = (stripe.AuthenticationError, stripe.PermissionError)


def _already_sent(exc: stripe.InvalidRequestError) -> bool:
    """Stripe's answer to a second event with the same identifier."""
    message = str(exc.user_message or exc).lower()
    return "already exists" in message and "identifier" in message


class Exporter:
    """The export's database operations and its flow."""

    def __init__(self, ctx: _core.Context, sql: StripeStatements) -> None:
        self.ctx = ctx
        self.sql = sql

    def pending(self, after: tuple[int, str], limit: int) -> _core.Op:
        rows = yield (
            self.sql.export_pending,
            {"after_id": after[0], "after_subject": after[1], "limit": limit},
        )
        return [
            UsageEntry(
                subject=row[0],
                id=int(row[1]),
                meter=row[2],
                units=int(row[3] or 0),
                timestamp=int(row[4]) // 1_000_000,
                customer=row[5],
            )
            for row in rows
        ]

    def settle(
        self,
        done: Iterable[UsageEntry],
        stale: Iterable[UsageEntry],
        rejected: Iterable[tuple[UsageEntry, str]],
    ) -> _core.Op:
        """Take sent and stale entries out of the outbox; note rejections. One transaction."""
        stmts, sql = self.ctx.stmts, self.sql
        now = self.ctx.clock.now_us()
        yield stmts.begin, {}
        for entry in done:
            yield sql.export_mark, {"subject": entry.subject, "id": entry.id, "now": now}
            yield sql.issue_clear, {"subject": entry.subject, "id": entry.id}
        for entry in stale:
            yield sql.export_mark, {"subject": entry.subject, "id": entry.id, "now": now}
            issue = {"reason": "stale", "detail": "older than Stripe's 35-day window"}
            yield sql.issue_put, {"subject": entry.subject, "id": entry.id, "now": now, **issue}
        for entry, detail in rejected:
            issue = {"reason": "rejected", "detail": detail[:500]}
            yield sql.issue_put, {"subject": entry.subject, "id": entry.id, "now": now, **issue}
        yield stmts.commit_tx, {}
        return None

    def flow(
        self,
        *,
        batch_size: int,
        max_retries: int,
        backoff: float,
        limit: int | None,
    ) -> Flow[ExportReport]:
        report = ExportReport()
        after: tuple[int, str] = (-1, "")
        budget = limit if limit is not None else -1
        while budget != 0:
            size = batch_size if budget < 0 else min(batch_size, budget)
            entries: list[UsageEntry] = yield Db(self.pending(after, size))
            if not entries:
                break
            budget = budget - len(entries) if budget > 0 else budget
            after = (entries[-1].id, entries[-1].subject)
            cutoff = self.ctx.clock.now_us() // 1_000_000 - int(
                (STRIPE_WINDOW - _MARGIN).total_seconds()
            )
            done: list[UsageEntry] = []
            stale: list[UsageEntry] = []
            rejected: list[tuple[UsageEntry, str]] = []
            for entry in entries:
                if entry.timestamp < cutoff:
                    stale.append(entry)
                elif entry.units <= 0:
                    done.append(entry)  # committed with units=0: nothing to bill
                elif entry.customer is None:
                    report.no_customer.append(entry)
                elif report.interrupted is None:
                    problem = yield from self._send(entry, max_retries, backoff)
                    if problem is None:
                        done.append(entry)
                        report.sent.append(entry)
                    elif problem[0] == "rejected":
                        rejected.append((entry, problem[1]))
                    else:
                        report.interrupted = problem[1]
            yield Db(self.settle(done, stale, rejected))
            report.stale += stale
            report.rejected += rejected
            if report.interrupted is not None:
                break
        return report

    def _send(
        self, entry: UsageEntry, max_retries: int, backoff: float
    ) -> Flow[tuple[str, str] | None]:
        """Send one meter event. None when accepted, else ("rejected"|"unavailable", why)."""
        params: dict[str, Any] = {
            "event_name": entry.meter,
            "payload": {"stripe_customer_id": entry.customer, "value": str(entry.units)},
            "identifier": entry.identifier,
            "timestamp": entry.timestamp,
        }
        call = Api(("v1", "billing", "meter_events"), "create", (params,))
        for attempt in range(max_retries + 1):
            try:
                yield call
                return None
            except stripe.InvalidRequestError as exc:
                if _already_sent(exc):
                    return None
                return "rejected", str(exc.user_message or exc)
            except _FATAL:
                raise
            except _RETRYABLE as exc:
                if attempt == max_retries:
                    return "unavailable", f"Stripe unavailable: {exc.user_message or exc}"
                delay = min(backoff * 2**attempt, 30.0) * random.uniform(0.5, 1.0)
                yield Sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover
