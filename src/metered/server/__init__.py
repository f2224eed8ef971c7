"""``metered.server``: the ledger over HTTP, for services in any language.

``create_app(async_ledger, billing=..., mode=...)`` returns an ASGI app (FastAPI) to mount in
an existing Starlette/FastAPI app or to serve alone; ``metered serve`` runs it under uvicorn.
Needs the ``server`` extra: ``pip install 'metered-billing[server]'``. API keys:
:func:`create_key`, :func:`list_keys`, :func:`revoke_key` (or ``metered keys ...``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from metered.server.keys import ApiKey, NewKey, create_key, list_keys, revoke_key

if TYPE_CHECKING:
    from metered.server.app import Billing, create_app, from_env

_LAZY = {"create_app", "from_env", "Billing"}


def __getattr__(name: str) -> Any:
    # The app needs FastAPI; importing it lazily keeps `metered keys ...` free of it.
    if name in _LAZY:
        from metered.server import app

        return getattr(app, name)
    raise AttributeError(f"module 'metered.server' has no attribute {name!r}")


__all__ = [
    "ApiKey",
    "Billing",
    "NewKey",
    "create_app",
    "create_key",
    "from_env",
    "list_keys",
    "revoke_key",
]
