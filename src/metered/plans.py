"""Plans and features, validated with pydantic and loadable from TOML or JSON.

A feature is either boolean (access only) or metered (a number of units per billing period)::

    Plan("pro", prices=["price_pro_monthly"], features={
        "reports": True,                                   # boolean
        "api_calls": 10_000,                               # metered, hard limit
        "tokens": Feature(units=1_000_000, overage=True),  # metered, overage past it
    })
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from metered.errors import ConfigurationError, UnknownFeature, UnknownPlan
from metered.validation import MAX_UNITS, NAME_PATTERN

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class Feature(BaseModel):
    """One feature of a plan. ``units=None`` makes it boolean (access only)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    units: int | None = Field(default=None, ge=0, le=MAX_UNITS)
    overage: bool = False
    """Let usage continue past allowance and credits; the excess is recorded as overage."""
    rollover: bool = False
    """Carry unused allowance into the next period as a credit that expires at its end."""
    meter: str | None = Field(default=None, min_length=1, max_length=100)
    """Stripe Billing Meter ``event_name``: committed usage is queued for export to it."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigurationError(str(exc)) from exc

    @property
    def metered(self) -> bool:
        return self.units is not None

    @model_validator(mode="after")
    def _boolean_has_no_unit_options(self) -> Feature:
        if self.units is None and (self.overage or self.rollover or self.meter):
            raise ValueError("overage, rollover and meter apply to metered features (set units)")
        return self


def _coerce_feature(value: Any) -> Any:
    if isinstance(value, bool):
        if not value:
            raise ValueError("a feature set to False is simply not in the plan; leave it out")
        return Feature()
    if isinstance(value, int):
        return Feature(units=value)
    return value


class Plan(BaseModel):
    """A named bundle of features, mapped to Stripe prices (``price_...`` ids or lookup keys)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, max_length=100)
    prices: tuple[str, ...] = ()
    features: dict[str, Feature] = Field(default_factory=dict)
    interval_months: int = Field(default=1, ge=1, le=12)
    """Length of the billing period when it is not given explicitly (e.g. by Stripe)."""

    def __init__(self, name: str | None = None, /, **data: Any) -> None:
        if name is not None:
            data["name"] = name
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigurationError(str(exc)) from exc

    @field_validator("features", mode="before")
    @classmethod
    def _coerce_features(cls, value: Any) -> Any:
        if not isinstance(value, Mapping):
            return value
        return {name: _coerce_feature(spec) for name, spec in value.items()}

    @field_validator("features", mode="after")
    @classmethod
    def _feature_names(cls, value: dict[str, Feature]) -> dict[str, Feature]:
        import re

        for name in value:
            if not re.fullmatch(NAME_PATTERN, name) or len(name) > 100:
                raise ValueError(f"invalid feature name {name!r}")
        return value


class Catalog:
    """The validated set of plans a ledger enforces, with the default plan for new subjects."""

    def __init__(self, plans: Iterable[Plan], default_plan: str | None = None) -> None:
        self.plans: dict[str, Plan] = {}
        self.by_price: dict[str, Plan] = {}
        for plan in plans:
            if not isinstance(plan, Plan):
                raise ConfigurationError(f"expected Plan, got {type(plan).__name__}")
            if plan.name in self.plans:
                raise ConfigurationError(f"plan {plan.name!r} is defined twice")
            self.plans[plan.name] = plan
            for price in plan.prices:
                if price in self.by_price:
                    raise ConfigurationError(
                        f"price {price!r} maps to both {self.by_price[price].name!r}"
                        f" and {plan.name!r}"
                    )
                self.by_price[price] = plan
        if default_plan is not None and default_plan not in self.plans:
            raise ConfigurationError(f"default_plan {default_plan!r} is not a configured plan")
        self.default_plan = default_plan
        kinds: dict[str, bool] = {}
        for plan in self.plans.values():
            for name, feature in plan.features.items():
                if kinds.setdefault(name, feature.metered) != feature.metered:
                    raise ConfigurationError(
                        f"feature {name!r} is metered in one plan and boolean in another"
                    )
        self.metered: dict[str, bool] = kinds
        self.grants: frozenset[tuple[str, str]] = frozenset(
            (plan.name, name) for plan in self.plans.values() for name in plan.features
        )
        """Every (plan, feature) pair a plan grants, for one-lookup entitlement checks."""

    def plan(self, name: str) -> Plan:
        try:
            return self.plans[name]
        except KeyError:
            raise UnknownPlan(f"unknown plan {name!r}; configured: {sorted(self.plans)}") from None

    def feature_is_metered(self, feature: str) -> bool:
        """Whether ``feature`` counts units; raises :class:`UnknownFeature` if no plan has it."""
        try:
            return self.metered[feature]
        except KeyError:
            raise UnknownFeature(
                f"unknown feature {feature!r}; configured: {sorted(self.metered)}"
            ) from None

    @classmethod
    def load(cls, path: str | Path) -> Catalog:
        """Read plans from a ``.toml`` or ``.json`` file.

        The file holds an optional ``default_plan`` and a ``plans`` table keyed by plan name::

            default_plan = "free"
            [plans.free.features]
            api_calls = 100
            [plans.pro]
            prices = ["price_pro_monthly"]
            features = { api_calls = 10000, reports = true }
        """
        path = Path(path)
        try:
            text = path.read_bytes()
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text.decode())
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"cannot read plans from {path}: {exc}") from exc
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "plans") -> Catalog:
        plans_data = data.get("plans") if isinstance(data, Mapping) else None
        if not isinstance(plans_data, Mapping):
            raise ConfigurationError(f"{source}: expected a 'plans' table keyed by plan name")
        try:
            plans = [Plan(name, **dict(spec)) for name, spec in plans_data.items()]
        except (TypeError, ValueError) as exc:  # ConfigurationError is a ValueError too
            raise ConfigurationError(f"{source}: {exc}") from exc
        return cls(plans, data.get("default_plan"))


def load_plans(path: str | Path) -> Catalog:
    """Load and validate a plan file (TOML or JSON). See :meth:`Catalog.load`."""
    return Catalog.load(path)
