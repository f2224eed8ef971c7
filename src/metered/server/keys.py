"""API keys of the HTTP server.

A key reads ``mk_test_<id><secret>`` or ``mk_live_<id><secret>``: the mode is in the
prefix, ``mk_<mode>_<id>`` is the public key id (listed and revoked by it), and only the
SHA-256 of the whole key is stored. Keys are 256-bit-strength random strings, so a fast hash
is the right one (nothing to brute-force); the comparison is constant-time.

Administration (:func:`create_key`, :func:`list_keys`, :func:`revoke_key`) is synchronous
SQLAlchemy Core, for the CLI and scripts. The server's lookup, on the request path, is one
indexed ``SELECT`` driven by the ledger's own executor (:class:`KeyLookup`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, get_args

from sqlalchemy import create_engine, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.pool import NullPool

from metered._drivers import resolve_url
from metered._sql import render
from metered.clock import from_us
from metered.errors import ConfigurationError, InvalidInput, LedgerUnavailable
from metered.schema import api_keys

Mode = Literal["test", "live"]
MODES: tuple[Mode, ...] = get_args(Mode)
KEY_PREFIX = "mk_"
_ALPHABET = string.ascii_letters + string.digits
_ID_CHARS = 12
_SECRET_CHARS = 43  # 43 base62 characters ~ 256 bits


@dataclass(frozen=True)
class ApiKey:
    """A stored key (never its secret)."""

    id: str
    """The public part, ``mk_<mode>_<12 chars>``: what ``metered keys list`` shows."""
    mode: Mode
    name: str | None
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class NewKey:
    """A key just created: ``secret`` is the full key, shown once and stored only hashed."""

    key: ApiKey
    secret: str


def check_mode(mode: str) -> Mode:
    if mode not in MODES:
        raise ConfigurationError(f"mode must be 'test' or 'live', got {mode!r}")
    return mode


def parse_key(key: str) -> tuple[Mode, str] | None:
    """``(mode, key id)`` of a well-formed key, else None."""
    for mode in MODES:
        prefix = f"{KEY_PREFIX}{mode}_"
        if key.startswith(prefix):
            body = key[len(prefix) :]
            if len(body) == _ID_CHARS + _SECRET_CHARS and all(c in _ALPHABET for c in body):
                return mode, prefix + body[:_ID_CHARS]
    return None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _random(n: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


# --------------------------------------------------------------------------- administration


@contextmanager
def _connect(url: str | None) -> Iterator[Connection]:
    engine = create_engine(resolve_url(url, asynchronous=False).sqlalchemy_url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            yield conn
    except (OperationalError, ProgrammingError) as exc:
        text = str(exc.orig) if exc.orig is not None else str(exc)
        if "metered_api_keys" in text:
            raise LedgerUnavailable(
                "the API key table is missing: run `metered db upgrade` first"
            ) from exc
        raise
    finally:
        engine.dispose()


def _row_to_key(row: Any) -> ApiKey:
    return ApiKey(
        id=row.id,
        mode=row.mode,
        name=row.name,
        created_at=from_us(row.created_at),
        revoked_at=from_us(row.revoked_at) if row.revoked_at is not None else None,
    )


def create_key(url: str | None, mode: str, *, name: str | None = None) -> NewKey:
    """Create a key for ``mode`` on the database at ``url`` (default ``$METERED_DATABASE_URL``)."""
    mode = check_mode(mode)
    if name is not None and not 0 < len(name) <= 100:
        raise InvalidInput("key name must be 1 to 100 characters")
    secret = f"{KEY_PREFIX}{mode}_{_random(_ID_CHARS)}{_random(_SECRET_CHARS)}"
    parsed = parse_key(secret)
    assert parsed is not None
    now = time.time_ns() // 1000
    values = {
        "id": parsed[1],
        "mode": mode,
        "name": name,
        "secret_hash": hash_key(secret),
        "created_at": now,
        "revoked_at": None,
    }
    with _connect(url) as conn:
        conn.execute(insert(api_keys).values(**values))
    return NewKey(ApiKey(parsed[1], mode, name, from_us(now), None), secret)


def list_keys(url: str | None) -> list[ApiKey]:
    """Every key, newest first (revoked ones too)."""
    with _connect(url) as conn:
        rows = conn.execute(select(api_keys).order_by(api_keys.c.created_at.desc())).all()
    return [_row_to_key(row) for row in rows]


def revoke_key(url: str | None, key_id: str) -> bool:
    """Revoke by key id (or the full key); False if no such active key."""
    parsed = parse_key(key_id)
    key_id = parsed[1] if parsed else key_id
    with _connect(url) as conn:
        result = conn.execute(
            update(api_keys)
            .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=time.time_ns() // 1000)
        )
    return bool(result.rowcount)


# --------------------------------------------------------------------------- request path

_LOOKUP = "SELECT mode, secret_hash, revoked_at FROM metered_api_keys WHERE id = :id"


class KeyLookup:
    """Verifies bearer keys for one server mode, with a short in-memory cache of valid keys.

    Only keys that verified are cached, for ``cache_seconds`` (default 5 s): a revocation
    takes effect on every worker within that time. ``cache_seconds=0`` disables the cache.
    """

    def __init__(self, ledger: Any, mode: Mode, *, cache_seconds: float = 5.0) -> None:
        self._ledger = ledger
        self.mode = mode
        self._stmt = render(_LOOKUP, ledger.target.paramstyle)
        self._ttl = cache_seconds
        self._cache: dict[str, float] = {}

    def _lookup(self, key_id: str) -> Any:
        rows = yield self._stmt, {"id": key_id}
        return rows[0] if rows else None

    async def verify(self, key: str) -> Literal["ok", "invalid", "wrong_mode"]:
        """Whether ``key`` is a live key of this server's mode."""
        parsed = parse_key(key)
        if parsed is None:
            return "invalid"
        mode, key_id = parsed
        if mode != self.mode:
            return "wrong_mode"
        digest = hash_key(key)
        now = time.monotonic()
        if self._cache.get(digest, 0.0) > now:
            return "ok"
        row = await self._ledger._run(self._lookup(key_id))
        if row is None or row[2] is not None or row[0] != self.mode:
            return "invalid"
        if not hmac.compare_digest(row[1], digest):
            return "invalid"
        if self._ttl > 0:
            if len(self._cache) >= 10_000:
                self._cache.clear()
            self._cache[digest] = now + self._ttl
        return "ok"
