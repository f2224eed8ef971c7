"""WSGI middleware: meter any WSGI app by method and path, without touching its handlers.

::

    from metered.integrations.wsgi import MeteredWSGIMiddleware
    from metered.integrations._rules import Rule

    app = MeteredWSGIMiddleware(
        app,
        ledger=ledger,
        subject=lambda environ: environ.get("HTTP_X_API_KEY"),
        rules=[
            Rule("/v1/reports/*", units=0, requires="reports"),     # entitlement only
            Rule("/v1/*", methods=["POST"], units=1, feature="api_calls"),
        ],
    )

For each request whose path is not exempt (:func:`~metered.integrations._rules.exempt_path`,
e.g. the Stripe webhook) and matches a rule, the middleware admits the request *before* calling
the app (401/402/403/409/503 are answered as ``application/problem+json``), records the status
the app passes to ``start_response`` (a second call with ``exc_info`` replaces it), adds the
remaining balance header, and wraps the response iterable: ``close()`` commits the reservation
only when iteration ran to the end without error and the status passes the commit policy, and
releases it otherwise (an exception while iterating, or a client that went away, so the server
closed the iterable early). The inner iterable's ``close()`` is always called.

The admitted :class:`~metered.integrations._policy.Ticket` is put in
``environ["metered.ticket"]`` (:data:`ENVIRON_TICKET`): the app can
``environ["metered.ticket"].settle(units)`` to charge a different final amount, and the Flask
decorators on the same route see it and do not charge a second time.

``subject``, ``Rule.units`` and ``Rule.key`` are callables of the WSGI ``environ``. Recipes::

    subject=lambda environ: environ.get("HTTP_X_API_KEY")          # API key header
    subject=lambda environ: environ.get("REMOTE_USER")              # set by an auth middleware
    subject=lambda environ: api_keys.get(environ.get("HTTP_AUTHORIZATION", "")[7:])  # Bearer
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING

from metered.integrations._policy import (
    PROBLEM_CONTENT_TYPE,
    Denial,
    EventHook,
    FeatureSwitch,
    Policy,
    Ticket,
    admit_entitlement,
    admit_units,
    default_commit_on,
    finish,
    run_sync,
)
from metered.integrations._rules import Rule, first_match, is_exempt

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from metered.ledger import Ledger

__all__ = [
    "ENVIRON_TICKET",
    "MeteredWSGIMiddleware",
    "Rule",
    "current_ticket",
    "environ_header",
]

ENVIRON_TICKET = "metered.ticket"
"""``environ`` key of the request's first :class:`Ticket` (what ``settle()`` adjusts)."""
ENVIRON_METER = "metered.request"
"""``environ`` key of the per-request :class:`RequestMeter` shared by every metering layer."""


# --------------------------------------------------------------------------- per-request state


@dataclass(eq=False)
class Charge:
    """A ticket admitted by one metering layer, which also settles it."""

    ticket: Ticket
    ledger: Ledger
    owner: object
    remaining_header: str | None
    armed: bool = False
    """Settlement was handed to a response body wrapper (streamed responses)."""


@dataclass(eq=False)
class RequestMeter:
    """What every metering layer of one request knows (``environ["metered.request"]``).

    Lets a Flask decorator under the WSGI middleware see that the request is already charged
    or already checked for a feature, so a request is charged once.
    """

    charges: list[Charge] = field(default_factory=list)
    entitled: set[str] = field(default_factory=set)

    def ticket(self, feature: str | None = None) -> Ticket | None:
        """The ticket for ``feature`` (any when None), first admitted first."""
        for charge in self.charges:
            if feature is None or charge.ticket.feature == feature:
                return charge.ticket
        return None

    def add(self, environ: WSGIEnvironment, charge: Charge) -> None:
        self.charges.append(charge)
        environ.setdefault(ENVIRON_TICKET, charge.ticket)

    def settle(self, owner: object, *, succeeded: bool, status: int | None) -> None:
        """Commit (or release) every unfinished ticket of ``owner``. Never raises."""
        for charge in self.charges:
            if charge.owner is owner and not charge.ticket.finished:
                ok = succeeded and status is not None and charge.ticket.commit_on(status)
                run_sync(finish(charge.ticket, succeeded=ok), charge.ledger)


def request_meter(environ: WSGIEnvironment) -> RequestMeter:
    """The request's :class:`RequestMeter`, created on first use."""
    meter: RequestMeter | None = environ.get(ENVIRON_METER)
    if meter is None:
        meter = environ[ENVIRON_METER] = RequestMeter()
    return meter


def current_ticket(environ: WSGIEnvironment, feature: str | None = None) -> Ticket | None:
    """The request's ticket (for ``feature``, or the first one), or None when not metered."""
    meter: RequestMeter | None = environ.get(ENVIRON_METER)
    return None if meter is None else meter.ticket(feature)


def environ_header(environ: WSGIEnvironment, name: str) -> str | None:
    """A request header from ``environ`` (``Idempotency-Key`` -> ``HTTP_IDEMPOTENCY_KEY``)."""
    value: str | None = environ.get("HTTP_" + name.upper().replace("-", "_"))
    return value


def problem_body(denial: Denial) -> bytes:
    """The RFC 9457 body of a denial."""
    return json.dumps(denial.problem(), separators=(",", ":")).encode()


def status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def problem_response(denial: Denial, start_response: StartResponse) -> list[bytes]:
    """Answer ``denial`` as ``application/problem+json``."""
    body = problem_body(denial)
    start_response(
        status_line(denial.status),
        [("Content-Type", PROBLEM_CONTENT_TYPE), ("Content-Length", str(len(body)))],
    )
    return [body]


# --------------------------------------------------------------------------- response body


class SettlingBody:
    """Wraps a response iterable; on ``close()`` settles the tickets of ``owner``.

    Commits only when the iterable was exhausted without error (the server asked for the next
    chunk after writing the last one) and ``status()`` passes each ticket's commit policy;
    releases otherwise. Always closes the wrapped iterable first.
    """

    __slots__ = ("_body", "_closed", "_failed", "_finished", "_iter", "_meter", "_owner", "_status")

    def __init__(
        self,
        body: Iterable[bytes],
        meter: RequestMeter,
        owner: object,
        status: Callable[[], int | None],
    ) -> None:
        self._body = body
        self._meter = meter
        self._owner = owner
        self._status = status
        self._finished = False
        self._failed = False
        self._closed = False
        self._iter: Iterator[bytes] | None = None

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._iter is None:
            try:
                self._iter = iter(self._body)
            except BaseException:
                self._failed = True
                raise
        try:
            return next(self._iter)
        except StopIteration:
            self._finished = True
            raise
        except BaseException:
            self._failed = True
            raise

    def close(self) -> None:
        """Close the wrapped iterable, then commit or release."""
        if self._closed:
            return
        self._closed = True
        succeeded = self._finished and not self._failed
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        except BaseException:
            succeeded = False
            raise
        finally:
            self._meter.settle(self._owner, succeeded=succeeded, status=self._status())


# --------------------------------------------------------------------------- middleware


class MeteredWSGIMiddleware:
    """Meter a WSGI app by rules on method and path (see the module docstring).

    :param app: the WSGI app to wrap.
    :param ledger: a :class:`metered.Ledger`.
    :param subject: ``subject(environ) -> str | None``; None answers 401 on metered routes.
    :param rules: :class:`~metered.integrations._rules.Rule` objects, first match wins;
        ``Rule.units`` and ``Rule.key`` callables receive the ``environ``.
    :param fail_open: when the ledger is unreachable, let requests through uncharged instead
        of answering 503; ``True``, or per feature (names, or a mapping with ``"*"``).
    :param shadow: compute and emit denials (``metered.shadow_denied``) without enforcing
        them or charging anything; for every feature or per feature like ``fail_open``.
    :param on_event: ``on_event(name, fields)`` for every event (metrics hooks).
    :param commit_on: ``commit_on(status) -> bool``, default ``status < 400``; a rule's own
        ``commit_on`` wins.
    :param remaining_header: response header with the remaining balance (None: no header).
    :param idempotency_header: request header holding the idempotency key (used when the rule
        has no ``key``); without one each request is its own event.
    :param reservation_ttl: seconds a reservation lives if the worker dies (None: the
        ledger's default).
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        ledger: Ledger,
        subject: Callable[[WSGIEnvironment], str | None],
        rules: Sequence[Rule] = (),
        fail_open: FeatureSwitch = False,
        commit_on: Callable[[int], bool] = default_commit_on,
        remaining_header: str | None = "Metered-Remaining",
        idempotency_header: str = "Idempotency-Key",
        reservation_ttl: float | None = None,
        shadow: FeatureSwitch = False,
        on_event: EventHook | None = None,
    ) -> None:
        self.app = app
        self.ledger = ledger
        self.subject = subject
        self.rules = tuple(rules)
        self.policy = Policy(
            fail_open=fail_open,
            commit_on=commit_on,
            remaining_header=remaining_header,
            idempotency_header=idempotency_header,
            reservation_ttl=reservation_ttl,
            shadow=shadow,
            on_event=on_event,
        )

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        rule = None
        if self.rules and not is_exempt(path):
            rule = first_match(self.rules, environ.get("REQUEST_METHOD", "GET"), path)
        if rule is None:
            return self.app(environ, start_response)
        meter = request_meter(environ)
        try:
            charge = self._admit(rule, environ, meter)
        except Denial as denial:
            return problem_response(denial, start_response)
        if charge is None:
            return self.app(environ, start_response)
        return self._call(environ, start_response, meter, charge)

    def _admit(self, rule: Rule, environ: WSGIEnvironment, meter: RequestMeter) -> Charge | None:
        """Check and reserve for ``rule``; None when nothing is to be settled."""
        policy, ledger = self.policy, self.ledger
        subject = self.subject(environ)
        if rule.requires is not None and rule.requires not in meter.entitled:
            run_sync(admit_entitlement(policy, subject, rule.requires), ledger)
            meter.entitled.add(rule.requires)
        units = rule.units_for(environ)
        if units == 0:
            return None
        if rule.key is not None:
            key = rule.key(environ)
        else:
            key = environ_header(environ, policy.idempotency_header)
        ticket: Ticket = run_sync(
            admit_units(
                policy,
                subject,
                units,
                feature=rule.feature,
                key=key,
                commit_on=rule.commit_on,
            ),
            ledger,
        )
        charge = Charge(ticket, ledger, self, policy.remaining_header)
        meter.add(environ, charge)
        return charge

    def _call(
        self,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        meter: RequestMeter,
        charge: Charge,
    ) -> Iterable[bytes]:
        status: list[int | None] = [None]
        ticket, header = charge.ticket, charge.remaining_header

        def metered_start_response(
            status_text: str,
            headers: list[tuple[str, str]],
            exc_info: OptExcInfo | None = None,
            /,
        ) -> Callable[[bytes], object]:
            code = status[0] = _status_code(status_text)
            if header is not None and code is not None and ticket.commit_on(code):
                value = ticket.remaining_header_value()
                if value is not None:
                    lowered = header.lower()
                    headers = [h for h in headers if h[0].lower() != lowered]
                    headers.append((header, value))
            return start_response(status_text, headers, exc_info)

        try:
            body = self.app(environ, metered_start_response)
        except BaseException:
            meter.settle(self, succeeded=False, status=None)
            raise
        return SettlingBody(body, meter, self, lambda: status[0])


def _status_code(status: str) -> int | None:
    try:
        return int(status[:3])
    except ValueError:
        return None
