"""Plans and features: validation, the catalog's consistency rules, loading from TOML and JSON.

Every error metered raises derives from ``MeteredError`` (DESIGN.md, the public contract), and
that includes a plan that does not validate: it is a :class:`ConfigurationError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from metered import (
    Catalog,
    ConfigurationError,
    Feature,
    Ledger,
    ManualClock,
    MeteredError,
    Plan,
    UnknownFeature,
    UnknownPlan,
    load_plans,
)
from metered.validation import MAX_UNITS

# --------------------------------------------------------------------------- Plan / Feature


def test_feature_shorthands() -> None:
    plan = Plan(
        "pro",
        prices=["price_pro_monthly", "pro_lookup_key"],
        features={
            "reports": True,
            "api_calls": 10_000,
            "payg": 0,
            "tokens": Feature(units=1000, overage=True),
            "seats": {"units": 5, "rollover": True},
        },
    )
    assert plan.name == "pro"
    assert plan.prices == ("price_pro_monthly", "pro_lookup_key")
    assert plan.interval_months == 1
    features = plan.features
    assert features["reports"] == Feature() and not features["reports"].metered
    assert features["api_calls"] == Feature(units=10_000) and features["api_calls"].metered
    assert features["payg"].units == 0 and features["payg"].metered
    assert features["tokens"].overage and not features["tokens"].rollover
    assert features["seats"].rollover and features["seats"].units == 5
    assert not features["api_calls"].overage, "hard limit by default"


def test_plan_name_keyword_and_positional_agree() -> None:
    assert Plan("free", features={"a": 1}) == Plan(name="free", features={"a": 1})


@pytest.mark.parametrize(
    "name",
    ["Pro_2.monthly:v-1", "a" * 100, "0free"],
)
def test_valid_plan_names(name: str) -> None:
    assert Plan(name).name == name


@pytest.mark.parametrize(
    "name",
    ["", " pro", "pro plan", "-pro", "_pro", "pro\n", "pro\x00", "a" * 101, "pläne", "pro/1"],
)
def test_bad_plan_names_are_configuration_errors(name: str) -> None:
    with pytest.raises(ConfigurationError):
        Plan(name, features={"api_calls": 1})


@pytest.mark.parametrize(
    "feature",
    ["", "api calls", "-api", "api\n", "a" * 101, "api/calls"],
)
def test_bad_feature_names(feature: str) -> None:
    with pytest.raises(ConfigurationError):
        Plan("free", features={feature: 1})


def test_feature_name_of_100_chars_is_accepted() -> None:
    assert "a" * 100 in Plan("free", features={"a" * 100: 1}).features


@pytest.mark.parametrize(
    "spec",
    [
        {"overage": True},
        {"rollover": True},
        {"units": None, "overage": True},
    ],
)
def test_boolean_feature_with_unit_options_is_rejected(spec: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        Feature(**spec)
    with pytest.raises(ConfigurationError):
        Plan("pro", features={"reports": spec})


@pytest.mark.parametrize(
    "spec",
    [-1, MAX_UNITS + 1, 1.5, "10", None, False, [1], {"units": -5}, {"units": 1, "extra": 1}],
)
def test_bad_feature_specs(spec: Any) -> None:
    with pytest.raises(ConfigurationError):
        Plan("free", features={"api_calls": spec})


def test_largest_allowance_is_accepted() -> None:
    assert Plan("big", features={"api_calls": MAX_UNITS}).features["api_calls"].units == MAX_UNITS


@pytest.mark.parametrize("months", [0, 13, -1])
def test_bad_interval(months: int) -> None:
    with pytest.raises(ConfigurationError):
        Plan("yearly", interval_months=months)


def test_unknown_plan_fields_are_rejected() -> None:
    with pytest.raises(ConfigurationError):
        Plan("free", featurez={"api_calls": 1})


def test_plans_are_immutable() -> None:
    plan = Plan("free", features={"api_calls": 1})
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        plan.name = "other"  # type: ignore[misc]


def test_plan_errors_are_metered_errors() -> None:
    assert issubclass(ConfigurationError, MeteredError)
    with pytest.raises(MeteredError):
        Plan("bad name")


# --------------------------------------------------------------------------- Catalog


def test_catalog_indexes_plans_prices_and_feature_kinds() -> None:
    catalog = Catalog(
        [
            Plan("free", features={"api_calls": 100}),
            Plan("pro", prices=["price_pro"], features={"api_calls": 10, "reports": True}),
        ],
        "free",
    )
    assert catalog.default_plan == "free"
    assert catalog.plan("pro").name == "pro"
    assert catalog.by_price["price_pro"].name == "pro"
    assert catalog.feature_is_metered("api_calls") is True
    assert catalog.feature_is_metered("reports") is False
    with pytest.raises(UnknownPlan):
        catalog.plan("enterprise")
    with pytest.raises(UnknownFeature):
        catalog.feature_is_metered("storage")


def test_duplicate_plan_names_are_rejected() -> None:
    with pytest.raises(ConfigurationError, match="twice"):
        Catalog([Plan("free"), Plan("free", features={"api_calls": 1})])


def test_a_price_maps_to_one_plan() -> None:
    with pytest.raises(ConfigurationError, match="price_x"):
        Catalog([Plan("a", prices=["price_x"]), Plan("b", prices=["price_y", "price_x"])])


def test_feature_cannot_be_metered_in_one_plan_and_boolean_in_another() -> None:
    with pytest.raises(ConfigurationError, match="reports"):
        Catalog([Plan("a", features={"reports": True}), Plan("b", features={"reports": 10})])
    # the same kind in several plans is fine, even with different options
    Catalog(
        [
            Plan("a", features={"tokens": 10}),
            Plan("b", features={"tokens": Feature(units=5, overage=True)}),
        ]
    )


def test_default_plan_must_exist() -> None:
    with pytest.raises(ConfigurationError, match="default_plan"):
        Catalog([Plan("free")], "enterprise")


def test_catalog_rejects_non_plans() -> None:
    with pytest.raises(ConfigurationError):
        Catalog([{"name": "free"}])  # type: ignore[list-item]


def test_ledger_validates_its_plans(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    with pytest.raises(ConfigurationError):
        Ledger(url, plans=[Plan("a"), Plan("a")])
    with pytest.raises(ConfigurationError):
        Ledger(url, plans=[Plan("a")], default_plan="b")


# --------------------------------------------------------------------------- files

TOML = """
default_plan = "free"

[plans.free.features]
api_calls = 100

[plans.pro]
prices = ["price_pro_monthly"]
features = { api_calls = 10000, reports = true, tokens = { units = 1000, overage = true } }

[plans.yearly]
interval_months = 12
features = { api_calls = { units = 50, rollover = true } }
"""

DATA: dict[str, Any] = {
    "default_plan": "free",
    "plans": {
        "free": {"features": {"api_calls": 100}},
        "pro": {
            "prices": ["price_pro_monthly"],
            "features": {
                "api_calls": 10000,
                "reports": True,
                "tokens": {"units": 1000, "overage": True},
            },
        },
        "yearly": {
            "interval_months": 12,
            "features": {"api_calls": {"units": 50, "rollover": True}},
        },
    },
}


def _check_loaded(catalog: Catalog) -> None:
    assert sorted(catalog.plans) == ["free", "pro", "yearly"]
    assert catalog.default_plan == "free"
    pro = catalog.plan("pro")
    assert pro.prices == ("price_pro_monthly",)
    assert pro.features["api_calls"] == Feature(units=10000)
    assert pro.features["reports"] == Feature()
    assert pro.features["tokens"] == Feature(units=1000, overage=True)
    assert catalog.plan("yearly").interval_months == 12
    assert catalog.plan("yearly").features["api_calls"].rollover
    assert catalog.by_price["price_pro_monthly"] is pro


def test_load_toml(tmp_path: Path) -> None:
    path = tmp_path / "plans.toml"
    path.write_text(TOML)
    _check_loaded(Catalog.load(path))
    _check_loaded(load_plans(str(path)))


def test_load_json(tmp_path: Path) -> None:
    path = tmp_path / "plans.json"
    path.write_text(json.dumps(DATA))
    _check_loaded(Catalog.load(path))
    _check_loaded(load_plans(str(path)))


def test_toml_and_json_give_the_same_plans(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text(TOML)
    (tmp_path / "p.json").write_text(json.dumps(DATA))
    assert Catalog.load(tmp_path / "p.toml").plans == Catalog.load(tmp_path / "p.json").plans


def test_ledger_takes_a_plan_file(tmp_path: Path, clock: ManualClock) -> None:
    path = tmp_path / "plans.toml"
    path.write_text(TOML)
    with Ledger(f"sqlite:///{tmp_path / 'l.db'}", plans=path, clock=clock) as ledger:
        ledger.create_schema()
        assert ledger.catalog.default_plan == "free"
        result = ledger.consume("u", 100, feature="api_calls")
        assert result.ok and result.usage_remaining == 0
        assert ledger.consume("u", 1, feature="api_calls").reason == "quota_exhausted"
    with Ledger(f"sqlite:///{tmp_path / 'l.db'}", plans=str(path), default_plan="pro") as ledger:
        assert ledger.catalog.default_plan == "pro"


BAD_FILES: list[tuple[str, str]] = [
    ("broken.toml", "[plans.free\napi_calls = 1"),
    ("broken.json", '{"plans": {"free": '),
    ("no_plans.toml", 'default_plan = "free"\n'),
    ("plans_not_table.toml", "plans = 5\n"),
    ("plans_list.json", '{"plans": [{"name": "free"}]}'),
    ("top_level_list.json", "[1, 2]"),
    ("top_level_string.json", '"plans"'),
    ("plan_not_table.json", '{"plans": {"free": "x"}}'),
    ("plan_number.json", '{"plans": {"free": 5}}'),
    ("bad_plan_name.toml", '[plans."free plan".features]\napi_calls = 1\n'),
    ("bad_units.toml", "[plans.free.features]\napi_calls = -1\n"),
    ("float_units.json", '{"plans": {"free": {"features": {"api_calls": 1.5}}}}'),
    ("bool_overage.toml", "[plans.pro.features]\nreports = { overage = true }\n"),
    ("unknown_key.toml", "[plans.free]\nfeaturez = { api_calls = 1 }\n"),
    ("unknown_default.toml", 'default_plan = "gold"\n[plans.free.features]\napi_calls = 1\n'),
    (
        "dup_price.json",
        '{"plans": {"a": {"prices": ["p"]}, "b": {"prices": ["p"]}}}',
    ),
    (
        "kind_conflict.toml",
        "[plans.a.features]\nreports = true\n[plans.b.features]\nreports = 3\n",
    ),
    ("not_utf8.toml", "\udcff"),
]


@pytest.mark.parametrize(("name", "text"), BAD_FILES, ids=[name for name, _ in BAD_FILES])
def test_invalid_plan_files(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ConfigurationError):
        Catalog.load(path)


def test_missing_plan_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        Catalog.load(tmp_path / "nope.toml")
    with pytest.raises(ConfigurationError):
        Ledger(f"sqlite:///{tmp_path / 'x.db'}", plans=tmp_path / "nope.json")
