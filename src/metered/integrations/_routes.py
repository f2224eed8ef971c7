"""List the metered routes of a Flask, Starlette or FastAPI app (``metered routes APP``)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from metered.errors import ConfigurationError
from metered.integrations._rules import describe_key, describe_units


def load_app(spec: str) -> Any:
    """Import ``module:attribute`` (the current directory is importable, as with gunicorn)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"expected MODULE:ATTRIBUTE (e.g. myapp:app), got {spec!r}")
    sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r}: {exc}") from exc
    try:
        app = getattr(module, attribute)
    except AttributeError:
        raise ConfigurationError(f"{module_name!r} has no attribute {attribute!r}") from None
    return app() if callable(app) and not _is_app(app) else app


def _is_app(obj: Any) -> bool:
    return hasattr(obj, "url_map") or hasattr(obj, "routes") or hasattr(obj, "router")


def metered_routes(app: Any) -> list[dict[str, Any]]:
    """One row per (route, metering): method, path, kind, feature, units, key, source."""
    if hasattr(app, "url_map"):
        return list(_flask_routes(app))
    if hasattr(app, "routes"):
        return list(_starlette_routes(app))
    raise ConfigurationError(f"not a Flask, Starlette or FastAPI app: {type(app).__name__}")


def _row(methods: Any, path: str, info: dict[str, Any], source: str) -> dict[str, Any]:
    shown = ",".join(sorted(m for m in (methods or ["*"]) if m not in ("HEAD", "OPTIONS")))
    return {
        "method": shown or "*",
        "path": path,
        "kind": info["kind"],
        "feature": info.get("feature") or "(default)",
        "units": info.get("units", "-"),
        "key": info.get("key", "-"),
        "source": source,
    }


def _flask_routes(app: Any) -> Iterator[dict[str, Any]]:
    for rule in app.url_map.iter_rules():
        view = app.view_functions.get(rule.endpoint)
        for info in getattr(view, "__metered__", ()):
            yield _row(rule.methods, rule.rule, info, "decorator")
        view_class = getattr(view, "view_class", None)
        if view_class is not None:
            for method in sorted(rule.methods or ()):
                handler = getattr(view_class, method.lower(), None)
                for info in getattr(handler, "__metered__", ()):
                    yield _row([method], rule.rule, info, f"{view_class.__name__}.{method}")


def _middleware_rules(app: Any) -> list[Any]:
    """Rules of a ``Metered(app)`` and of ``Middleware(MeteredMiddleware, rules=...)`` entries."""
    metered = getattr(getattr(app, "state", None), "metered", None)
    rules = list(getattr(metered, "rules", ()))
    for middleware in getattr(app, "user_middleware", ()):
        if getattr(middleware.cls, "__name__", "") == "MeteredMiddleware":
            options = getattr(middleware, "kwargs", {}) or {}
            configured = options.get("metered")
            if configured is not None and configured is not metered:
                rules += list(configured.rules)
            rules += list(options.get("rules", ()))
    return rules


def _starlette_routes(app: Any, prefix: str = "") -> Iterator[dict[str, Any]]:
    for rule in _middleware_rules(app):
        info: dict[str, Any] = {"kind": "requires_entitlement", "feature": rule.requires}
        if rule.units:
            info = {
                "kind": "consumes",
                "feature": rule.feature,
                "units": describe_units(rule.units),
                "key": describe_key(rule.key),
            }
        yield _row(rule.methods, str(getattr(rule.path, "pattern", rule.path)), info, "rule")
    for route in getattr(app, "routes", ()):
        path = prefix + getattr(route, "path", "")
        if (
            hasattr(route, "app")
            and hasattr(route.app, "routes")
            and not hasattr(route, "endpoint")
        ):
            yield from _starlette_routes(route.app, path)  # Mount
            continue
        methods = getattr(route, "methods", None)
        for info in getattr(getattr(route, "endpoint", None), "__metered__", ()):
            yield _row(methods, path, info, "decorator")
        for dependency in getattr(route, "dependencies", ()):
            described = getattr(getattr(dependency, "dependency", None), "__metered_info__", None)
            if described is not None:
                yield _row(methods, path, described, "dependency")
