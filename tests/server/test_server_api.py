"""Every route and error of the HTTP API, in-process, on SQLite and PostgreSQL.

Each response is also checked against the app's OpenAPI document (see ``conftest.py``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from server_support import PLANS

from metered import AsyncLedger, ManualClock, Plan
from metered.server import create_app, revoke_key

pytestmark = pytest.mark.slow
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
"""For behaviour decided before the database is reached (input validation, routing)."""

PROBLEM = "application/problem+json"


def problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["type"] == f"urn:metered:problem:{slug}"
    assert body["status"] == status
    return body


def consume(client: httpx.AsyncClient, subject: str, units: int, key: str | None = None) -> Any:
    headers = {"Idempotency-Key": key} if key else {}
    return client.post(
        "/v1/usage/consume", json={"subject_ref": subject, "units": units}, headers=headers
    )


# --------------------------------------------------------------------------- authentication


@SQLITE_ONLY
async def test_requests_without_a_key_are_refused(client: httpx.AsyncClient) -> None:
    del client.headers["Authorization"]
    response = await client.post("/v1/access/check", json={"subject_ref": "u1"})
    problem(response, 401, "api-key-required")
    assert response.headers["www-authenticate"] == "Bearer"
    client.headers["Authorization"] = "Basic dXNlcjpwYXNz"  # not a bearer token
    problem(await client.get("/v1/subjects/u1/balance"), 401, "api-key-required")


@SQLITE_ONLY
@pytest.mark.parametrize(
    "key",
    ["mk_test_nope", "mk_test_" + "A" * 55, "sk_test_123", "mk_other_" + "A" * 55],
    ids=["short", "unknown", "stripe-key", "bad-mode"],
)
async def test_wrong_keys_are_refused(client: httpx.AsyncClient, key: str) -> None:
    client.headers["Authorization"] = f"Bearer {key}"
    problem(await consume(client, "u1", 1), 401, "invalid-api-key")


async def test_a_tampered_key_is_refused(client: httpx.AsyncClient, keys: dict[str, str]) -> None:
    good = keys["test"]
    tampered = good[:-1] + ("a" if good[-1] != "a" else "b")  # same key id, wrong secret
    client.headers["Authorization"] = f"Bearer {tampered}"
    problem(await consume(client, "u1", 1), 401, "invalid-api-key")


async def test_a_revoked_key_is_refused(
    client: httpx.AsyncClient, keys: dict[str, str], db_url: str
) -> None:
    assert (await consume(client, "u1", 1)).status_code == 200
    assert await asyncio.to_thread(revoke_key, db_url, keys["test"])
    problem(await consume(client, "u1", 1), 401, "invalid-api-key")


async def test_revocation_applies_after_the_key_cache_expires(
    ledger: AsyncLedger,
    keys: dict[str, str],
    db_url: str,
    make_client: Callable[..., httpx.AsyncClient],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import metered.server.keys

    now = [1000.0]
    fake_time = SimpleNamespace(monotonic=lambda: now[0], time_ns=time.time_ns)
    monkeypatch.setattr(metered.server.keys, "time", fake_time)
    app = create_app(ledger, key_cache_seconds=5)
    async with make_client(app, keys["test"]) as client:
        assert (await consume(client, "u1", 1)).status_code == 200
        await asyncio.to_thread(revoke_key, db_url, keys["test"])
        now[0] += 4.9
        assert (await consume(client, "u1", 1)).status_code == 200  # still cached
        now[0] += 0.2
        problem(await consume(client, "u1", 1), 401, "invalid-api-key")


async def test_a_key_of_the_other_mode_never_touches_state(
    ledger: AsyncLedger, keys: dict[str, str], make_client: Callable[..., httpx.AsyncClient]
) -> None:
    test_app = create_app(ledger, mode="test")
    live_app = create_app(ledger, mode="live")
    async with make_client(test_app, keys["live"]) as client:
        body = problem(await consume(client, "u1", 1), 401, "api-key-wrong-mode")
        assert body["mode"] == "test"
    async with make_client(live_app, keys["test"]) as client:
        problem(await consume(client, "u1", 1), 401, "api-key-wrong-mode")
        problem(await client.get("/v1/subjects/u1/balance"), 401, "api-key-wrong-mode")
    assert (await ledger.balance("u1", "api_calls")).used == 0
    async with make_client(live_app, keys["live"]) as client:
        assert (await consume(client, "u1", 1)).json()["consumed"] == 1


@SQLITE_ONLY
async def test_the_openapi_document_needs_no_key(client: httpx.AsyncClient) -> None:
    del client.headers["Authorization"]
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert "/v1/usage/consume" in response.json()["paths"]


@SQLITE_ONLY
async def test_unknown_routes_answer_problems(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/nope")
    assert response.status_code == 404 and response.headers["content-type"] == PROBLEM
    response = await client.get("/v1/usage/consume")
    assert response.status_code == 405 and response.json()["status"] == 405


# --------------------------------------------------------------------------- access check


async def test_check(client: httpx.AsyncClient, ledger: AsyncLedger) -> None:
    response = await client.post("/v1/access/check", json={"subject_ref": "u1"})
    assert response.status_code == 200
    body = response.json()
    assert body["allowed"] is True and body["reason"] is None
    assert (body["subject_ref"], body["feature"], body["plan"]) == ("u1", "api_calls", "free")
    assert (body["usage_remaining"], body["limit"], body["metered"]) == (10, 10, True)

    body = (
        await client.post("/v1/access/check", json={"subject_ref": "u1", "feature": "reports"})
    ).json()
    assert body["allowed"] is False and body["reason"] == "no_entitlement"
    assert body["usage_remaining"] is None and body["metered"] is False

    await ledger.assign_plan("u2", "pro")
    body = (
        await client.post("/v1/access/check", json={"subject_ref": "u2", "feature": "reports"})
    ).json()
    assert body["allowed"] is True and body["plan"] == "pro"

    await ledger.consume("u1", 10, feature="api_calls")
    body = (await client.post("/v1/access/check", json={"subject_ref": "u1"})).json()
    assert body["allowed"] is False and body["reason"] == "quota_exhausted"
    assert body["usage_remaining"] == 0


async def test_check_with_inactive_subscription(
    client: httpx.AsyncClient, ledger: AsyncLedger
) -> None:
    await ledger.assign_plan("u1", "pro", status="canceled")
    body = (
        await client.post("/v1/access/check", json={"subject_ref": "u1", "feature": "reports"})
    ).json()
    assert body["allowed"] is False and body["reason"] == "subscription_inactive"


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({}, ["body", "subject_ref"]),
        ({"subject_ref": ""}, ["body", "subject_ref"]),
        ({"subject_ref": "x" * 256}, ["body", "subject_ref"]),
        ({"subject_ref": 42}, ["body", "subject_ref"]),
        ({"subject_ref": "u1", "feature": "nope"}, ["body", "feature"]),
        ({"subject_ref": "u1", "extra": 1}, ["body", "extra"]),
        ({"subject_ref": "u\x00"}, ["body", "subject_ref"]),
    ],
    ids=["missing", "empty", "long", "number", "unknown-feature", "extra-field", "nul"],
)
async def test_malformed_check_is_422_with_field_errors(
    client: httpx.AsyncClient, body: dict[str, Any], loc: list[str]
) -> None:
    response = await client.post("/v1/access/check", json=body)
    errors = problem(response, 422, "invalid-request")["errors"]
    assert [e["loc"] for e in errors] == [loc]


@SQLITE_ONLY
async def test_body_that_is_not_json_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/usage/consume", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert problem(response, 422, "invalid-request")["errors"][0]["type"] == "json_invalid"


async def test_feature_is_required_when_several_are_metered(
    db_url: str,
    clock: ManualClock,
    keys: dict[str, str],
    make_client: Callable[..., httpx.AsyncClient],
) -> None:
    plans = [*PLANS, Plan("tokens", features={"api_calls": 5, "tokens": 50})]
    ledger = AsyncLedger(db_url, plans=plans, default_plan="free", clock=clock)
    async with ledger, make_client(create_app(ledger), keys["test"]) as client:
        response = await consume(client, "u1", 1)
        errors = problem(response, 422, "invalid-request")["errors"]
        assert errors[0]["loc"] == ["body", "feature"]
        response = await client.post(
            "/v1/usage/consume", json={"subject_ref": "u1", "units": 1, "feature": "api_calls"}
        )
        assert response.status_code == 200


# --------------------------------------------------------------------------- consume


async def test_consume_and_retry(client: httpx.AsyncClient, ledger: AsyncLedger) -> None:
    first = await consume(client, "u1", 3, key="req-1")
    assert first.status_code == 200
    body = first.json()
    assert body["ok"] is True and body["consumed"] == 3 and body["usage_remaining"] == 7
    assert body["replayed"] is False and body["idempotency_key"] == "req-1"
    assert isinstance(body["entry_id"], str) and int(body["entry_id"]) > 2**53  # exact as str

    again = (await consume(client, "u1", 3, key="req-1")).json()
    assert again["replayed"] is True
    assert (again["consumed"], again["usage_remaining"], again["entry_id"]) == (
        3,
        7,
        body["entry_id"],
    )
    assert (await ledger.balance("u1", "api_calls")).used == 3  # charged once

    other = (await consume(client, "u1", 3)).json()  # no key: its own charge
    assert other["idempotency_key"] is None and other["usage_remaining"] == 4


async def test_consume_until_exhausted(client: httpx.AsyncClient, ledger: AsyncLedger) -> None:
    assert (await consume(client, "u1", 8, key="a")).status_code == 200
    body = problem(await consume(client, "u1", 5, key="b"), 402, "insufficient-units")
    assert body["ok"] is False and body["consumed"] == 0
    assert body["reason"] == "insufficient_units"
    assert (body["usage_remaining"], body["units_requested"], body["feature"]) == (
        2,
        5,
        "api_calls",
    )
    assert (await consume(client, "u1", 2, key="c")).json()["usage_remaining"] == 0
    body = problem(await consume(client, "u1", 1, key="d"), 402, "quota-exhausted")
    assert body["reason"] == "quota_exhausted" and body["usage_remaining"] == 0
    # a denied key is not spent: once units are back, the same key goes through
    await ledger.grant("u1", 5, feature="api_calls", key="topup")
    assert (await consume(client, "u1", 1, key="d")).json()["ok"] is True
    assert (await ledger.balance("u1", "api_calls")).used == 10


async def test_consume_denials(client: httpx.AsyncClient, ledger: AsyncLedger) -> None:
    await ledger.assign_plan("nofeature", "reports_only")
    body = problem(await consume(client, "nofeature", 1), 403, "no-entitlement")
    assert body["reason"] == "no_entitlement" and body["ok"] is False
    await ledger.assign_plan("gone", "pro", status="canceled")
    body = problem(await consume(client, "gone", 1), 403, "subscription-inactive")
    assert body["reason"] == "subscription_inactive"

    response = await client.post(
        "/v1/usage/consume", json={"subject_ref": "u1", "units": 1, "feature": "reports"}
    )
    errors = problem(response, 422, "invalid-request")["errors"]
    assert errors == [{"loc": ["body", "feature"], "msg": errors[0]["msg"], "type": "not_metered"}]


@SQLITE_ONLY
@pytest.mark.parametrize("units", [0, -1, 1.5, "5", True, None, 2**53])
async def test_consume_rejects_bad_units(client: httpx.AsyncClient, units: Any) -> None:
    response = await client.post("/v1/usage/consume", json={"subject_ref": "u1", "units": units})
    errors = problem(response, 422, "invalid-request")["errors"]
    assert errors[0]["loc"] == ["body", "units"]


async def test_consume_key_conflicts(client: httpx.AsyncClient) -> None:
    assert (await consume(client, "u1", 1, key="k")).status_code == 200
    body = problem(await consume(client, "u1", 2, key="k"), 422, "idempotency-key-reused")
    assert body["key"] == "k"
    reserved = await client.post(
        "/v1/usage/reserve",
        json={"subject_ref": "u1", "units": 1},
        headers={"Idempotency-Key": "r"},
    )
    assert reserved.status_code == 200
    body = problem(await consume(client, "u1", 1, key="r"), 409, "operation-in-progress")
    assert body["key"] == "r"
    response = await client.post(
        "/v1/usage/consume",
        json={"subject_ref": "u1", "units": 1},
        headers={"Idempotency-Key": "x" * 256},
    )
    problem(response, 400, "invalid-idempotency-key")


async def test_keys_are_scoped_per_subject(client: httpx.AsyncClient) -> None:
    assert (await consume(client, "u1", 1, key="same")).json()["replayed"] is False
    assert (await consume(client, "u2", 1, key="same")).json()["replayed"] is False


async def test_ledger_unreachable_is_503(
    tmp_path: Any, keys: dict[str, str], make_client: Callable[..., httpx.AsyncClient]
) -> None:
    empty = AsyncLedger(f"sqlite:///{tmp_path / 'no-schema.db'}", plans=PLANS, default_plan="free")
    async with empty, make_client(create_app(empty), keys["test"]) as client:
        body = problem(await consume(client, "u1", 1), 503, "ledger-unavailable")
        assert "unreachable" in body["detail"]


# --------------------------------------------------------------------------- two-phase


async def reserve(client: httpx.AsyncClient, subject: str, units: int, **extra: Any) -> Any:
    key = extra.pop("key", None)
    headers = {"Idempotency-Key": key} if key else {}
    return await client.post(
        "/v1/usage/reserve", json={"subject_ref": subject, "units": units, **extra}, headers=headers
    )


async def settle(
    client: httpx.AsyncClient, action: str, subject: str, rid: str, **extra: Any
) -> Any:
    body = {"subject_ref": subject, "reservation_id": rid, **extra}
    return await client.post(f"/v1/usage/{action}", json=body)


async def test_reserve_commit(client: httpx.AsyncClient, ledger: AsyncLedger) -> None:
    held = (await reserve(client, "u1", 6, key="job-1")).json()
    assert held["ok"] is True and held["units"] == 6 and held["usage_remaining"] == 4
    assert held["expires_at"] is not None and held["replayed"] is False
    assert (await ledger.balance("u1", "api_calls")).held == 6

    done = await settle(client, "commit", "u1", held["reservation_id"], units=4)
    assert done.status_code == 200
    body = done.json()
    assert (body["ok"], body["consumed"], body["usage_remaining"]) == (True, 4, 6)
    assert body["entry_id"] == held["reservation_id"] and body["idempotency_key"] == "job-1"
    balance = await ledger.balance("u1", "api_calls")
    assert (balance.used, balance.held) == (4, 0)

    # a retried commit returns the original result and charges nothing
    again = (await settle(client, "commit", "u1", held["reservation_id"], units=4)).json()
    assert again["replayed"] is True and again["consumed"] == 4 and again["usage_remaining"] == 6
    assert (await ledger.balance("u1", "api_calls")).used == 4

    # the same key reserved again after the commit: replayed, the work must not run again
    replay = (await reserve(client, "u1", 6, key="job-1")).json()
    assert replay["replayed"] is True and replay["consumed"] == 4
    again = (await settle(client, "commit", "u1", replay["reservation_id"])).json()
    assert again["replayed"] is True and again["consumed"] == 4

    body = problem(
        await settle(client, "release", "u1", held["reservation_id"]), 409, "reservation-settled"
    )
    assert body["state"] == "committed"


async def test_reserve_release(client: httpx.AsyncClient, ledger: AsyncLedger) -> None:
    held = (await reserve(client, "u1", 10)).json()
    assert held["usage_remaining"] == 0
    problem(await consume(client, "u1", 1), 402, "quota-exhausted")  # holds count
    released = await settle(client, "release", "u1", held["reservation_id"])
    assert released.json() == {
        "released": True,
        "reservation_id": held["reservation_id"],
        "subject_ref": "u1",
    }
    assert (await settle(client, "release", "u1", held["reservation_id"])).json()[
        "released"
    ] is False
    problem(
        await settle(client, "commit", "u1", held["reservation_id"]), 409, "reservation-settled"
    )
    assert (await ledger.balance("u1", "api_calls")).usage_remaining == 10


async def test_a_retried_reserve_learns_the_held_reservation(client: httpx.AsyncClient) -> None:
    held = (await reserve(client, "u1", 2, key="job-9")).json()
    # the first response was lost; the retry is told which reservation holds the key
    body = problem(await reserve(client, "u1", 2, key="job-9"), 409, "operation-in-progress")
    assert body["reservation_id"] == held["reservation_id"] and body["key"] == "job-9"
    done = (await settle(client, "commit", "u1", body["reservation_id"])).json()
    assert done["consumed"] == 2 and done["idempotency_key"] == "job-9"


async def test_commit_more_than_available(client: httpx.AsyncClient, ledger: AsyncLedger) -> None:
    held = (await reserve(client, "u1", 2)).json()
    await ledger.consume("u1", 8, feature="api_calls")
    body = problem(
        await settle(client, "commit", "u1", held["reservation_id"], units=5),
        402,
        "insufficient-units",
    )
    assert body["ok"] is False and body["units_requested"] == 5
    assert (await settle(client, "commit", "u1", held["reservation_id"])).json()["consumed"] == 2


async def test_reservation_errors(
    client: httpx.AsyncClient, ledger: AsyncLedger, clock: ManualClock
) -> None:
    problem(await reserve(client, "u1", 11), 402, "insufficient-units")
    held = (await reserve(client, "u1", 1, ttl_seconds=30)).json()
    rid = held["reservation_id"]
    problem(await settle(client, "commit", "u2", rid), 404, "reservation-not-found")
    problem(await settle(client, "commit", "u1", "12345"), 404, "reservation-not-found")
    problem(await settle(client, "release", "u1", "12345"), 404, "reservation-not-found")
    huge = "9" * 19  # beyond BIGINT
    problem(await settle(client, "commit", "u1", huge), 404, "reservation-not-found")
    spent = (await consume(client, "u1", 1)).json()
    body = problem(
        await settle(client, "release", "u1", spent["entry_id"]), 409, "reservation-settled"
    )
    assert body["state"] == "committed"
    grant = await ledger.grant("u1", 5, feature="api_calls", key="g")
    problem(await settle(client, "commit", "u1", str(grant.entry_id)), 404, "reservation-not-found")

    clock.advance(timedelta(seconds=31))
    problem(await settle(client, "commit", "u1", rid), 410, "reservation-expired")
    assert (await settle(client, "release", "u1", rid)).json()["released"] is False
    assert (await ledger.balance("u1", "api_calls")).held == 0


@SQLITE_ONLY
@pytest.mark.parametrize(
    "body",
    [
        {"subject_ref": "u1", "reservation_id": "abc"},
        {"subject_ref": "u1", "reservation_id": 123},
        {"subject_ref": "u1", "reservation_id": "0"},
        {"subject_ref": "u1", "reservation_id": "1" * 20},
        {"subject_ref": "u1"},
        {"subject_ref": "u1", "reservation_id": "1", "units": -1},
    ],
    ids=["letters", "number", "zero", "too-long", "missing", "negative-units"],
)
async def test_malformed_commit_is_422(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    problem(await client.post("/v1/usage/commit", json=body), 422, "invalid-request")


@SQLITE_ONLY
async def test_reserve_rejects_bad_ttl(client: httpx.AsyncClient) -> None:
    for ttl in (0, -5, 8 * 24 * 3600):
        problem(await reserve(client, "u1", 1, ttl_seconds=ttl), 422, "invalid-request")


# --------------------------------------------------------------------------- subjects


async def test_balance(client: httpx.AsyncClient, ledger: AsyncLedger) -> None:
    await consume(client, "u1", 2)
    await reserve(client, "u1", 3)
    response = await client.get("/v1/subjects/u1/balance")
    body = response.json()
    assert body["subject_ref"] == "u1" and len(body["balances"]) == 1
    line = body["balances"][0]
    assert (line["feature"], line["allowance"], line["used"], line["held"]) == (
        "api_calls",
        10,
        2,
        3,
    )
    assert line["usage_remaining"] == 5 and line["period_end"] is not None

    only = (await client.get("/v1/subjects/u1/balance", params={"feature": "api_calls"})).json()
    assert only["balances"] == body["balances"]
    errors = problem(
        await client.get("/v1/subjects/u1/balance", params={"feature": "nope"}),
        422,
        "invalid-request",
    )["errors"]
    assert errors[0]["loc"] == ["query", "feature"]
    problem(
        await client.get("/v1/subjects/u1/balance", params={"feature": ""}), 422, "invalid-request"
    )


async def test_subject_refs_with_slashes_and_spaces(client: httpx.AsyncClient) -> None:
    subject = "org/42 team"
    assert (await consume(client, subject, 4)).status_code == 200
    response = await client.get("/v1/subjects/org%2F42%20team/balance")
    assert response.json()["subject_ref"] == subject
    assert response.json()["balances"][0]["used"] == 4
    response = await client.get("/v1/subjects/org/42 team/history")
    assert response.json()["subject_ref"] == subject
    assert [e["units"] for e in response.json()["entries"] if e["kind"] == "consume"] == [4]


async def test_history_pages(client: httpx.AsyncClient) -> None:
    for i in range(3):
        await consume(client, "u1", i + 1, key=f"h{i}")
    first = (await client.get("/v1/subjects/u1/history", params={"limit": 2})).json()
    assert [e["units"] for e in first["entries"]] == [3, 2]
    assert first["entries"][0]["idempotency_key"] == "h2"
    assert first["entries"][0]["kind"] == "consume" and first["entries"][0]["state"] == "committed"
    assert first["next_before"] == first["entries"][-1]["id"]
    rest = (
        await client.get(
            "/v1/subjects/u1/history", params={"limit": 2, "before": first["next_before"]}
        )
    ).json()
    assert [e["kind"] for e in rest["entries"]] == ["consume", "period"]
    last = (
        await client.get("/v1/subjects/u1/history", params={"before": rest["entries"][-1]["id"]})
    ).json()
    assert last["entries"] == [] and last["next_before"] is None
    everything = (await client.get("/v1/subjects/u1/history", params={"before": "9" * 19})).json()
    assert len(everything["entries"]) == 4
    only = (await client.get("/v1/subjects/u1/history", params={"feature": "reports"})).json()
    assert only["entries"] == []
    for params in ({"limit": 0}, {"limit": 1001}, {"before": "x"}, {"before": "0"}):
        problem(await client.get("/v1/subjects/u1/history", params=params), 422, "invalid-request")


# --------------------------------------------------------------------------- mounting


async def test_mounted_in_a_starlette_app(ledger: AsyncLedger, keys: dict[str, str]) -> None:
    from fastapi import FastAPI
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    api = create_app(ledger)

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("host app")

    starlette_host = Starlette(routes=[Route("/", home), Mount("/metered", app=api)])
    fastapi_host = FastAPI()
    fastapi_host.mount("/metered", api)
    headers = {"Authorization": f"Bearer {keys['test']}"}
    for used, host in enumerate((starlette_host, fastapi_host), start=1):
        transport = httpx.ASGITransport(app=host)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://h", headers=headers
        ) as c:
            response = await c.post(
                "/metered/v1/usage/consume", json={"subject_ref": "m1", "units": 1}
            )
            assert response.status_code == 200, response.text
            balance = (await c.get("/metered/v1/subjects/m1/balance")).json()
            assert balance["balances"][0]["used"] == used
            assert (await c.get("/metered/openapi.json")).status_code == 200
    assert (await ledger.balance("m1", "api_calls")).used == 2


@SQLITE_ONLY
async def test_create_app_configuration(ledger: AsyncLedger) -> None:
    from server_support import FakeBilling

    from metered import ConfigurationError, Ledger

    assert create_app(ledger, billing=FakeBilling(livemode=True)).state.metered_mode == "live"
    assert create_app(ledger, billing=FakeBilling(livemode=False)).state.metered_mode == "test"
    assert create_app(ledger).state.metered_mode == "test"
    with pytest.raises(ConfigurationError, match="live mode"):
        create_app(ledger, mode="test", billing=FakeBilling(livemode=True))
    with pytest.raises(ConfigurationError):
        create_app(ledger, mode="prod")
    with Ledger(ledger.url, plans=PLANS) as sync_ledger, pytest.raises(ConfigurationError):
        create_app(sync_ledger)  # type: ignore[arg-type]
