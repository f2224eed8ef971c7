"""The served OpenAPI document: valid OpenAPI 3.1, and it lists exactly the API's routes.

(That each response matches the document is checked on every response of the endpoint
tests, by ``OpenApiChecker``.)
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from openapi_spec_validator import validate
from server_support import PLANS

from metered import AsyncLedger
from metered.server import create_app

pytestmark = pytest.mark.slow

CONTRACT = {
    ("post", "/v1/checkout/session"),
    ("post", "/v1/access/check"),
    ("post", "/v1/usage/consume"),
    ("post", "/v1/usage/reserve"),
    ("post", "/v1/usage/commit"),
    ("post", "/v1/usage/release"),
    ("post", "/v1/webhooks/stripe"),
    ("get", "/v1/subjects/{subject_ref}/balance"),
    ("get", "/v1/subjects/{subject_ref}/history"),
}


@pytest.fixture
async def served() -> tuple[Any, dict[str, Any]]:
    ledger = AsyncLedger("sqlite:///:memory:", plans=PLANS, default_plan="free")
    app = create_app(ledger)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/openapi.json")
    assert response.status_code == 200
    return app, response.json()


def operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method, path): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
    }


def test_document_is_valid_openapi(served: tuple[Any, dict[str, Any]]) -> None:
    _, document = served
    validate(document)  # raises on an invalid document
    assert document["openapi"].startswith("3.1")
    assert document["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": document["components"]["securitySchemes"]["ApiKey"]["description"],
    }


def test_document_lists_every_route(served: tuple[Any, dict[str, Any]]) -> None:
    app, document = served
    assert set(operations(document)) == CONTRACT
    routes = {
        (method.lower(), route.path_format)
        for route in app.routes
        if isinstance(route, APIRoute)
        for method in route.methods
    }
    assert routes == CONTRACT  # nothing served that the document leaves out


def test_operations_describe_auth_and_errors(served: tuple[Any, dict[str, Any]]) -> None:
    _, document = served
    for (_, path), operation in operations(document).items():
        assert operation["operationId"] and operation["summary"], path
        responses = operation["responses"]
        assert "application/json" in responses["200"]["content"]
        for status, response in responses.items():
            if status[0] in "45":
                assert list(response["content"]) == ["application/problem+json"], (path, status)
        if path == "/v1/webhooks/stripe":
            assert operation["security"] == []  # Stripe signs; it sends no API key
            assert {p["name"] for p in operation["parameters"]} == {"Stripe-Signature"}
        else:
            assert operation["security"] == [{"ApiKey": []}]
            assert "401" in responses and "422" in responses and "503" in responses
    consume = operations(document)[("post", "/v1/usage/consume")]
    assert {p["name"] for p in consume["parameters"]} == {"Idempotency-Key"}
    denied = consume["responses"]["402"]["content"]["application/problem+json"]["schema"]
    assert denied == {"$ref": "#/components/schemas/UnitsDenied"}
    ids = document["components"]["schemas"]["ReservationResponse"]["properties"]
    assert ids["reservation_id"]["type"] == "string"  # 63-bit ids: strings, exact in JavaScript
