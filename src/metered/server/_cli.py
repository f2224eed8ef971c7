"""``metered serve`` and ``metered keys create|list|revoke``.

Importing this module adds :func:`register` to the CLI's extensions; it imports neither
FastAPI nor uvicorn until ``serve`` runs, so ``metered keys`` works without the server extra.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from metered._drivers import resolve_url
from metered.cli import _EXTENSIONS, EXIT_REFUSED, CommandError, _url, command, emit, table
from metered.plans import Catalog
from metered.server.keys import MODES, check_mode, create_key, list_keys, revoke_key


@command("serve")
def _serve(args: argparse.Namespace) -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise CommandError(
            f"metered serve needs the server extra: pip install 'metered-billing[server]' ({exc})"
        ) from exc
    # Configuration travels to the workers through the environment; check it here first so
    # that a mistake is one line and exit code 2, not a traceback from every worker.
    url = _url(args)
    plans = args.plans or os.environ.get("METERED_PLANS")
    if not plans:
        raise CommandError("metered serve needs the plans: --plans FILE or $METERED_PLANS")
    Catalog.load(plans)
    resolve_url(url, asynchronous=True)
    mode = args.mode or os.environ.get("METERED_MODE")
    if mode:
        os.environ["METERED_MODE"] = check_mode(mode)
    if url:
        os.environ["METERED_DATABASE_URL"] = url
    os.environ["METERED_PLANS"] = os.path.abspath(plans)
    uvicorn.run(
        "metered.server.app:from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        access_log=not args.no_access_log,
    )


@command("keys.create")
def _keys_create(args: argparse.Namespace) -> None:
    new = create_key(_url(args), args.mode, name=args.name)
    data = {"key": new.secret, "id": new.key.id, "mode": new.key.mode, "name": new.key.name}
    emit(
        args,
        data,
        f"{new.secret}\n\nThis is the only time the key is shown; it is stored hashed."
        f"\nKey id (for list/revoke): {new.key.id}",
    )


@command("keys.list")
def _keys_list(args: argparse.Namespace) -> None:
    keys = list_keys(_url(args))
    rows: list[dict[str, Any]] = [
        {
            "id": k.id,
            "mode": k.mode,
            "name": k.name,
            "created_at": k.created_at,
            "revoked_at": k.revoked_at,
        }
        for k in keys
    ]
    emit(args, rows, table(rows, ["id", "mode", "name", "created_at", "revoked_at"]))


@command("keys.revoke")
def _keys_revoke(args: argparse.Namespace) -> None:
    if not revoke_key(_url(args), args.key_id):
        raise CommandError(f"no active key {args.key_id!r}", EXIT_REFUSED)
    emit(args, {"revoked": args.key_id}, f"revoked {args.key_id}")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    serve = sub.add_parser(
        "serve",
        parents=[common],
        help="run the HTTP API under uvicorn",
        description="Serve the ledger over HTTP (needs the server extra). Stripe billing is "
        "enabled by $STRIPE_API_KEY and $STRIPE_WEBHOOK_SECRET.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="default: 8000 (0: any free port)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    serve.add_argument(
        "--mode",
        choices=MODES,
        help="which API keys are accepted (default: $METERED_MODE, else the Stripe key's mode,"
        " else test)",
    )
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--no-access-log", action="store_true")

    keys = sub.add_parser("keys", help="API keys of the HTTP API").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    create = keys.add_parser("create", parents=[common], help="create a key (shown once)")
    create.add_argument("--mode", choices=MODES, required=True)
    create.add_argument("--name", help="what the key is for")
    keys.add_parser("list", parents=[common], help="list keys (never their secrets)")
    revoke = keys.add_parser("revoke", parents=[common], help="revoke a key")
    revoke.add_argument("key_id", help="the key id (mk_test_...) shown by create and list")


_EXTENSIONS.append(register)
