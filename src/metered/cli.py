"""The ``metered`` command line.

Human output (tables) by default, ``--json`` for scripts. Errors are one line on stderr.
Exit codes: 0 success, 1 the operation was refused (e.g. ``grant`` replay mismatch, a
denied check), 2 bad usage or configuration, 3 the database is unreachable.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import OperationalError

from metered import migrate
from metered._drivers import resolve_url
from metered.errors import ConfigurationError, LedgerUnavailable, MeteredError
from metered.ledger import Ledger
from metered.plans import Catalog

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3

Handler = Callable[[argparse.Namespace], Any]
_COMMANDS: dict[str, Handler] = {}


class CommandError(MeteredError):
    """A command could not do what was asked; printed as one line."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- output


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if hasattr(value, "model_dump"):
        return {k: _plain(v) for k, v in value.model_dump().items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain-text table, the way ``metered`` prints everything to humans."""
    if not rows:
        return "(none)"
    columns = list(columns or rows[0].keys())
    cells = [[_cell(row.get(col)) for col in columns] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(columns)]
    line = "  ".join(col.upper().ljust(w) for col, w in zip(columns, widths))
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([line.rstrip(), *(b.rstrip() for b in body)])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def emit(args: argparse.Namespace, data: Any, human: str) -> None:
    if args.json:
        print(json.dumps(_plain(data), indent=2, sort_keys=True))
    else:
        print(human)


# --------------------------------------------------------------------------- helpers


def _url(args: argparse.Namespace) -> str | None:
    return args.url or os.environ.get("METERED_DATABASE_URL")


def _catalog(args: argparse.Namespace) -> Catalog:
    path = args.plans or os.environ.get("METERED_PLANS")
    if not path:
        raise CommandError("this command needs the plans: --plans FILE or $METERED_PLANS")
    return Catalog.load(path)


def _ledger(args: argparse.Namespace) -> Ledger:
    return Ledger(_url(args), plans=_catalog(args))


def command(name: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        _COMMANDS[name] = handler
        return handler

    return register


# --------------------------------------------------------------------------- commands


@command("db.upgrade")
def _db_upgrade(args: argparse.Namespace) -> None:
    target = resolve_url(_url(args), asynchronous=False)
    migrate.upgrade(target.sqlalchemy_url, args.revision)
    revision = migrate.current(target.sqlalchemy_url)
    emit(args, {"revision": revision}, f"database at revision {revision}")


@command("db.downgrade")
def _db_downgrade(args: argparse.Namespace) -> None:
    target = resolve_url(_url(args), asynchronous=False)
    migrate.downgrade(target.sqlalchemy_url, args.revision)
    revision = migrate.current(target.sqlalchemy_url)
    emit(args, {"revision": revision}, f"database at revision {revision or 'base (empty)'}")


@command("db.current")
def _db_current(args: argparse.Namespace) -> None:
    revision = migrate.current(resolve_url(_url(args), asynchronous=False).sqlalchemy_url)
    emit(args, {"revision": revision}, revision or "no metered schema (run: metered db upgrade)")


@command("plans.validate")
def _plans_validate(args: argparse.Namespace) -> None:
    catalog = Catalog.load(args.file)
    rows = [
        {
            "plan": plan.name,
            "prices": ", ".join(plan.prices) or "-",
            "features": ", ".join(
                f"{name}={spec.units}" if spec.metered else name
                for name, spec in plan.features.items()
            ),
            "default": "yes" if plan.name == catalog.default_plan else "",
        }
        for plan in catalog.plans.values()
    ]
    emit(args, {"valid": True, "plans": rows}, f"{args.file}: valid\n" + table(rows))


@command("assign")
def _assign(args: argparse.Namespace) -> None:
    with _ledger(args) as ledger:
        sub = ledger.assign_plan(args.subject, args.plan, status=args.status)
    emit(
        args,
        sub,
        table(
            [sub.model_dump()],
            ["subject", "plan", "status", "access", "period_start", "period_end"],
        ),
    )


@command("grant")
def _grant(args: argparse.Namespace) -> None:
    with _ledger(args) as ledger:
        result = ledger.grant(args.subject, args.units, feature=args.feature, key=args.key)
    note = " (replayed: this key was already granted)" if result.replayed else ""
    emit(args, result, f"granted {result.units} {result.feature} to {result.subject}{note}")


@command("balance")
def _balance(args: argparse.Namespace) -> None:
    with _ledger(args) as ledger:
        features = (
            [args.feature]
            if args.feature
            else [name for name, metered in ledger.catalog.metered.items() if metered]
        )
        balances = [ledger.balance(args.subject, feature) for feature in features]
    emit(
        args,
        balances,
        table(
            [b.model_dump() for b in balances],
            [
                "feature",
                "plan",
                "status",
                "allowance",
                "used",
                "credits",
                "held",
                "overage",
                "usage_remaining",
                "period_end",
            ],
        ),
    )


@command("history")
def _history(args: argparse.Namespace) -> None:
    with _ledger(args) as ledger:
        entries = ledger.history(args.subject, feature=args.feature, limit=args.limit)
    emit(
        args,
        entries,
        table(
            [e.model_dump() for e in entries],
            [
                "created_at",
                "feature",
                "kind",
                "state",
                "units",
                "charged",
                "from_allowance",
                "from_credit",
                "overage",
                "key",
            ],
        ),
    )


@command("routes")
def _routes(args: argparse.Namespace) -> None:
    from metered.integrations._routes import load_app, metered_routes

    rows = metered_routes(load_app(args.app))
    emit(args, rows, table(rows, ["method", "path", "kind", "feature", "units", "key", "source"]))


def _billing(args: argparse.Namespace, ledger: Ledger, *, need_secret: bool) -> Any:
    try:
        import stripe

        from metered.stripe import StripeBilling
    except ImportError as exc:
        raise CommandError(
            f"needs the stripe extra: pip install 'metered-billing[stripe]' ({exc})"
        ) from exc
    key = os.environ.get("STRIPE_API_KEY")
    secret = os.environ.get("STRIPE_WEBHOOK_SECRET")
    if not key:
        raise CommandError("set STRIPE_API_KEY (sk_test_... or sk_live_...)")
    if need_secret and not secret:
        raise CommandError("set STRIPE_WEBHOOK_SECRET (whsec_...)")
    options: dict[str, Any] = {}
    if base := os.environ.get("STRIPE_API_BASE"):  # e.g. stripe-mock or a local stand-in
        options["base_addresses"] = {"api": base}
    client = stripe.StripeClient(key, **options)
    return StripeBilling(ledger, client=client, webhook_secret=secret or "whsec_not_needed")


@command("export-usage")
def _export_usage(args: argparse.Namespace) -> None:
    import time

    with _ledger(args) as ledger:
        billing = _billing(args, ledger, need_secret=False)
        totals: dict[str, Any] = {"sent": 0, "stale": 0, "rejected": 0, "no_customer": 0}
        while True:
            progress = not args.json and sys.stderr.isatty()
            while True:  # drain the backlog in batches, with a progress line
                report = billing.export_usage(batch_size=args.batch_size, limit=args.batch_size)
                for name in totals:
                    totals[name] += len(getattr(report, name))
                if progress:
                    print(f"\rexported {totals['sent']} entries ...", end="", file=sys.stderr)
                if report.interrupted or len(report.sent) + len(report.stale) < args.batch_size:
                    break
            if progress:
                print(file=sys.stderr)
            if report.interrupted:
                totals["interrupted"] = report.interrupted
            if not args.loop:
                break
            time.sleep(args.interval)
    human = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in totals.items())
    emit(args, totals, f"usage export: {human}")
    if totals["rejected"] or totals.get("interrupted"):
        raise CommandError("some usage was not exported (see above); it stays queued", 1)


@command("webhooks.replay")
def _webhooks_replay(args: argparse.Namespace) -> None:
    from metered._stripe_events import sign_stripe_payload

    payload = Path(args.file).read_bytes()
    with _ledger(args) as ledger:
        billing = _billing(args, ledger, need_secret=True)
        secret = os.environ["STRIPE_WEBHOOK_SECRET"]
        result = billing.handle_webhook(payload, sign_stripe_payload(payload, secret))
    emit(
        args,
        {
            "event_id": result.event_id,
            "type": result.type,
            "outcome": result.outcome,
            "subject": result.subject,
        },
        f"{result.event_id} ({result.type}): {result.outcome}"
        + (f" for {result.subject}" if result.subject else ""),
    )


@command("demo")
def _demo(args: argparse.Namespace) -> None:
    try:
        from metered import demo
    except ImportError as exc:  # pragma: no cover - depends on the extras installed
        raise CommandError(f"the demo needs: pip install 'metered-billing[demo]' ({exc})") from exc
    demo.run(_url(args), keep_running=args.keep_running)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", help="database URL (default: $METERED_DATABASE_URL, else sqlite:///metered.db)"
    )
    common.add_argument("--plans", help="plans file, TOML or JSON (default: $METERED_PLANS)")
    common.add_argument("--json", action="store_true", help="machine-readable output")

    parser = argparse.ArgumentParser(
        prog="metered", description="Entitlements and usage metering for Stripe-billed apps."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    routes = sub.add_parser("routes", parents=[common], help="list an app's metered routes")
    routes.add_argument("app", help="MODULE:ATTRIBUTE of a Flask, Starlette or FastAPI app")

    export = sub.add_parser(
        "export-usage", parents=[common], help="send committed usage to Stripe Meters"
    )
    export.add_argument("--loop", action="store_true", help="keep exporting every --interval s")
    export.add_argument("--interval", type=float, default=60.0)
    export.add_argument("--batch-size", type=int, default=100)

    webhooks = sub.add_parser("webhooks", help="Stripe webhooks").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    replay = webhooks.add_parser(
        "replay", parents=[common], help="apply a saved Stripe event through the normal path"
    )
    replay.add_argument("file", help="the event as Stripe sent it (JSON)")

    demo = sub.add_parser("demo", parents=[common], help="run the end-to-end demo (SQLite)")
    demo.add_argument("--keep-running", action="store_true", help="leave the demo app up")

    db = sub.add_parser("db", help="schema migrations").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    up = db.add_parser("upgrade", parents=[common], help="create or upgrade the schema")
    up.add_argument("revision", nargs="?", default="head")
    down = db.add_parser("downgrade", parents=[common], help="revert migrations")
    down.add_argument("revision", help="target revision ('base' drops metered's tables)")
    db.add_parser("current", parents=[common], help="show the applied revision")

    plans = sub.add_parser("plans", help="plan files").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    validate = plans.add_parser("validate", parents=[common], help="validate a plans file")
    validate.add_argument("file")

    assign = sub.add_parser("assign", parents=[common], help="put a subject on a plan")
    assign.add_argument("subject")
    assign.add_argument("plan")
    assign.add_argument("--status", default="active")

    grant = sub.add_parser("grant", parents=[common], help="grant credits (idempotent by key)")
    grant.add_argument("subject")
    grant.add_argument("units", type=int)
    grant.add_argument("--feature")
    grant.add_argument("--key", required=True, help="idempotency key of the grant")

    balance = sub.add_parser("balance", parents=[common], help="a subject's balances")
    balance.add_argument("subject")
    balance.add_argument("--feature")

    history = sub.add_parser("history", parents=[common], help="a subject's ledger lines")
    history.add_argument("subject")
    history.add_argument("--feature")
    history.add_argument("--limit", type=int, default=50)

    from metered.server import _cli  # noqa: F401  (adds `serve` and `keys` to _EXTENSIONS)

    for extend in _EXTENSIONS:
        extend(sub, common)
    return parser


# Later modules (demo, Stripe, routes) add their subcommands here.
_EXTENSIONS: list[Callable[[Any, argparse.ArgumentParser], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    # The pool logs every failed reconnection attempt; the CLI reports the outcome once.
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
    parser = build_parser()
    args = parser.parse_args(argv)
    name = args.command + (f".{args.action}" if getattr(args, "action", None) else "")
    handler = _COMMANDS[name]
    try:
        handler(args)
    except CommandError as exc:
        print(f"metered: {exc}", file=sys.stderr)
        return exc.code
    except (LedgerUnavailable, OperationalError) as exc:
        print(f"metered: database unavailable: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except ConfigurationError as exc:
        print(f"metered: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except MeteredError as exc:
        print(f"metered: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return 130
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
