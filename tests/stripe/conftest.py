"""Fixtures of the Stripe tests: every test that takes ``database_url`` runs on SQLite and
PostgreSQL; ``env`` adds the three webhook endpoints (Flask, Starlette async, Starlette sync).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from stripe_support import Env

from metered.clock import ManualClock

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
ENDPOINTS = ["flask", "starlette-async", "starlette-sync"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "database_url" in metafunc.fixturenames and not any(
        "database_url" in marker.args[0]
        for marker in metafunc.definition.iter_markers("parametrize")
    ):
        metafunc.parametrize("database_url", BACKENDS, indirect=True)


@pytest.fixture(params=ENDPOINTS)
def endpoint(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_env(database_url: str, clock: ManualClock, endpoint: str) -> Iterator[Callable[..., Env]]:
    """``make_env(generation=None, **billing_options)`` -> a fresh :class:`Env`.

    The payload generation defaults by endpoint, so that every test sees both across the
    matrix: basil on Flask, the older (acacia) shapes on the Starlette endpoints.
    """
    made: list[Env] = []

    def make(generation: str | None = None, kind: str | None = None, **options: Any) -> Env:
        generation = generation or ("basil" if endpoint == "flask" else "acacia")
        env = Env(kind or endpoint, database_url, clock, options, generation)
        made.append(env)
        return env

    yield make
    for env in made:
        env.close()


@pytest.fixture
def env(make_env: Callable[..., Env]) -> Env:
    return make_env()
