"""FastAPI: decorators on path operations, dependencies, OpenAPI, over SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from typing import Annotated, Any

import pytest
from apps.asgi_support import (
    H,
    async_ledger,
    client,
    eventually_held,
    module_fixtures,
    spent,
)
from fastapi import BackgroundTasks, Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from metered import AsyncLedger, CheckResult
from metered.integrations.fastapi import (
    Consumes,
    Metered,
    RequiresEntitlement,
    Rule,
    Ticket,
    consumes,
    metered_responses,
    requires_entitlement,
    settle,
)

db_url, ledger, subject = module_fixtures("fastapi")


class Item(BaseModel):
    name: str
    size: int = 1


class Out(BaseModel):
    name: str
    item_id: int


def current_user(x_user: Annotated[str | None, Header()] = None) -> str | None:
    """An app's own auth dependency (here: trust a header)."""
    return x_user


calls = Consumes(3, feature="api_calls")
by_user = Consumes(1, feature="api_calls", subject=Depends(current_user))
reports = RequiresEntitlement("reports")
gate: dict[str, asyncio.Event] = {}


def make_app(ledger: AsyncLedger, **options: Any) -> FastAPI:
    app = FastAPI()
    options.setdefault("subject", lambda request: request.headers.get("x-subject"))
    Metered(app, ledger=ledger, **options)

    @app.post("/items/{item_id}", response_model=Out, responses=metered_responses())
    @consumes(2, feature="api_calls")
    async def create(item_id: int, item: Item, verbose: bool = False) -> Out:
        """No Request parameter: the decorator adds one FastAPI fills in."""
        return Out(name=item.name, item_id=item_id)

    @app.post("/sync/{n}")
    @consumes(lambda request: int(request.path_params["n"]), feature="api_calls")
    def sync_endpoint(n: int, request: Request) -> dict[str, int]:
        settle(request, 1)
        return {"n": n}

    @app.get("/report", responses=metered_responses(401, 402, 403))
    @requires_entitlement("reports")
    @consumes(2, feature="api_calls")
    async def report(q: str = "all") -> dict[str, str]:
        return {"q": q}

    @app.post("/status/{code}")
    @consumes(2, feature="api_calls")
    async def status(code: int) -> Any:
        if code == 0:
            raise RuntimeError("handler failed")
        if code == 404:
            raise HTTPException(404, "nope")
        return JSONResponse({"code": code}, status_code=code)

    @app.get("/invalid", response_model=Out)
    @consumes(2, feature="api_calls")
    async def invalid() -> Any:
        return {"not": "an Out"}  # fails response validation: 500

    @app.get("/dep", dependencies=[Depends(reports)], responses={**calls.responses})
    async def dep(ticket: Annotated[Ticket, Depends(calls)]) -> dict[str, Any]:
        ticket.settle(1)
        return {"units": ticket.units, "replayed": ticket.replayed}

    @app.get("/dep-status/{code}", dependencies=[Depends(calls)])
    async def dep_status(code: int) -> Any:
        return JSONResponse({"code": code}, status_code=code)

    @app.get("/dep-slow", dependencies=[Depends(Consumes(1, feature="api_calls"))])
    async def dep_slow(x_gate: Annotated[str, Header()]) -> str:
        await gate[x_gate].wait()
        return "slow"

    @app.get("/by-user")
    async def by_user_route(
        ticket: Annotated[Ticket, Depends(by_user)],
        check: Annotated[
            CheckResult | None,
            Depends(RequiresEntitlement("reports", subject=Depends(current_user))),
        ],
    ) -> dict[str, Any]:
        return {"subject": ticket.subject, "checked": check is not None}

    @app.get("/stream", dependencies=[Depends(Consumes(4, feature="api_calls"))])
    async def stream(fail: bool = False) -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(3):
                if fail and i == 2:
                    raise RuntimeError("boom while streaming")
                yield b"chunk\n"

        return StreamingResponse(chunks(), media_type="text/plain")

    @app.get("/background")
    @consumes(1, feature="api_calls")
    async def background(tasks: BackgroundTasks) -> dict[str, bool]:
        tasks.add_task(asyncio.sleep, 0)
        return {"ok": True}

    return app


async def test_decorator_keeps_fastapi_injection(ledger: AsyncLedger, subject: str) -> None:
    async with client(make_app(ledger)) as c:
        r = await c.post("/items/7?verbose=true", json={"name": "pen"}, headers=H(subject))
        assert r.status_code == 200 and r.json() == {"name": "pen", "item_id": 7}
        assert r.headers["metered-remaining"] == "8"
        r = await c.post("/items/x", json={"name": "pen"}, headers=H(subject))
        assert r.status_code == 422  # FastAPI validates before the endpoint: nothing reserved
        r = await c.post("/sync/3", headers=H(subject))
        assert r.status_code == 200 and r.json() == {"n": 3}
        assert r.headers["metered-remaining"] == "7"  # reserved 3, settled 1
        assert (await c.get("/background", headers=H(subject))).status_code == 200
    assert await spent(ledger, subject) == (4, 0)


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/status/0", 500),
        ("/status/404", 404),
        ("/status/409", 409),
        ("/status/500", 500),
        ("/invalid", 500),
        ("/dep-status/400", 400),
        ("/dep-status/503", 503),
    ],
)
async def test_failures_charge_nothing(
    ledger: AsyncLedger, subject: str, path: str, status: int
) -> None:
    method = "GET" if path in ("/invalid",) or path.startswith("/dep") else "POST"
    async with client(make_app(ledger), raise_app_exceptions=False) as c:
        r = await c.request(method, path, headers=H(subject))
    assert r.status_code == status
    assert await spent(ledger, subject) == (0, 0)


async def test_denials(ledger: AsyncLedger, subject: str) -> None:
    async with client(make_app(ledger)) as c:
        r = await c.get("/report")
        assert r.status_code == 401
        assert r.headers["content-type"] == "application/problem+json"
        r = await c.get("/report", headers=H(subject))
        assert r.status_code == 403 and r.json()["feature"] == "reports"
        r = await c.get("/dep", headers=H(subject))
        assert r.status_code == 403
        for _ in range(5):
            r = await c.post("/items/1", json={"name": "a"}, headers=H(subject))
            assert r.status_code == 200
        r = await c.post("/items/1", json={"name": "a"}, headers=H(subject))
        assert r.status_code == 402
        problem = r.json()
        assert problem["usage_remaining"] == 0 and problem["units_requested"] == 2
        assert problem["type"] == "urn:metered:problem:quota-exhausted"
    assert await spent(ledger, subject) == (10, 0)


async def test_stacked_decorators_and_dependencies(ledger: AsyncLedger, subject: str) -> None:
    await ledger.assign_plan(subject, "pro")
    async with client(make_app(ledger)) as c:
        r = await c.get("/report?q=x", headers=H(subject))
        assert r.status_code == 200 and r.json() == {"q": "x"}
        assert r.headers["metered-remaining"] == "998"
        r = await c.get("/dep", headers=H(subject, idempotency_key="d-1"))
        assert r.json() == {"units": 3, "replayed": False}
        assert r.headers["metered-remaining"] == "997"  # 3 reserved, settled at 1
        r = await c.get("/dep", headers=H(subject, idempotency_key="d-1"))
        assert r.json() == {"units": 3, "replayed": True}
    assert await spent(ledger, subject) == (3, 0)


async def test_subject_from_a_dependency(ledger: AsyncLedger, subject: str) -> None:
    async with client(make_app(ledger)) as c:
        r = await c.get("/by-user", headers={"x-user": subject})
        assert r.status_code == 403  # checked against the dependency's subject
        await ledger.assign_plan(subject, "pro")
        r = await c.get("/by-user", headers={"x-user": subject})
        assert r.json() == {"subject": subject, "checked": True}
        assert (await c.get("/by-user")).status_code == 401
    assert await spent(ledger, subject) == (1, 0)


async def test_in_flight_key_is_409(ledger: AsyncLedger, subject: str) -> None:
    gate[subject] = asyncio.Event()
    async with client(make_app(ledger)) as c:
        headers = H(subject, idempotency_key="k", x_gate=subject)
        first = asyncio.ensure_future(c.get("/dep-slow", headers=headers))
        await eventually_held(ledger, subject)
        r = await c.get("/dep-slow", headers=headers)
        assert r.status_code == 409
        assert r.json()["type"] == "urn:metered:problem:operation-in-progress"
        gate[subject].set()
        assert (await first).status_code == 200
    assert await spent(ledger, subject) == (1, 0)


async def test_streaming_with_a_dependency(ledger: AsyncLedger, subject: str) -> None:
    async with client(make_app(ledger)) as c:
        r = await c.get("/stream", headers=H(subject))
        assert r.text == "chunk\n" * 3 and r.headers["metered-remaining"] == "6"
        with pytest.raises(RuntimeError, match="boom"):
            await c.get("/stream?fail=true", headers=H(subject))
    assert await spent(ledger, subject) == (4, 0)


async def test_rule_and_decorator_charge_once(ledger: AsyncLedger, subject: str) -> None:
    app = make_app(ledger, rules=[Rule("/items/*", units=5, feature="api_calls")])
    async with client(app) as c:
        r = await c.post("/items/1", json={"name": "a"}, headers=H(subject))
        assert r.status_code == 200 and r.headers["metered-remaining"] == "5"
    assert await spent(ledger, subject) == (5, 0)


def test_openapi_documents_problem_responses(tmp_path: Any) -> None:
    from openapi_spec_validator import validate

    app = make_app(async_ledger(f"sqlite:///{tmp_path / 'unused.db'}"))
    schema = app.openapi()
    validate(schema)  # a valid OpenAPI document, problem+json responses included
    create = schema["paths"]["/items/{item_id}"]["post"]
    names = [p["name"] for p in create["parameters"]]
    assert names == ["item_id", "verbose"]  # no injected Request parameter
    assert create["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("Item")
    for status in ("401", "402", "403", "409", "503"):
        media = create["responses"][status]["content"]["application/problem+json"]
        props = media["schema"]["properties"]
        assert {"type", "title", "status", "detail", "usage_remaining", "units_requested"} <= set(
            props
        )
    assert (
        create["responses"]["402"]["content"]["application/problem+json"]["example"]["status"]
        == 402
    )
    assert "422" in create["responses"]  # FastAPI's own validation error stays documented
    dep = schema["paths"]["/dep"]["get"]
    assert {"401", "402", "403", "409", "503"} <= set(dep["responses"])
    assert "parameters" not in dep or all(p["name"] != "request" for p in dep["parameters"])
    by_user = schema["paths"]["/by-user"]["get"]
    assert [p["name"] for p in by_user["parameters"]] == ["x-user"]
    assert set(schema["paths"]["/report"]["get"]["responses"]) >= {"401", "402", "403"}


def test_decorators_refuse_generator_path_operations() -> None:
    with pytest.raises(TypeError, match="Consumes"):

        @consumes(1)
        async def gen() -> AsyncIterator[str]:
            yield "x"

    with pytest.raises(ValueError, match="never answers"):
        metered_responses(418)


def test_decorators_keep_fastapi_signatures() -> None:
    async def endpoint(item_id: int, q: str = "x", **extra: Any) -> dict[str, Any]:
        return {}

    def sync_endpoint(request: Request, n: int) -> dict[str, Any]:
        return {}

    wrapped = requires_entitlement("reports")(consumes(1, feature="api_calls")(endpoint))
    assert inspect.iscoroutinefunction(wrapped)
    params = inspect.signature(wrapped).parameters
    assert list(params) == ["item_id", "q", "_metered_request", "extra"]
    assert params["_metered_request"].annotation is Request
    assert inspect.signature(wrapped).return_annotation == dict[str, Any]

    wrapped_sync = consumes(1, feature="api_calls")(sync_endpoint)
    assert not inspect.iscoroutinefunction(wrapped_sync)
    assert list(inspect.signature(wrapped_sync).parameters) == ["request", "n"]
