"""What :class:`metered.stripe.StripeBilling` is configured with, validated once at start-up."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

from metered.errors import ConfigurationError
from metered.plans import Catalog

OnInactive = Literal["default_plan", "status"]


@dataclass(frozen=True)
class CreditPack:
    """A one-time Stripe price that buys ``units`` credits of a metered ``feature``.

    ``price`` is the Stripe price id (``price_...``) or lookup key; ``name`` (default: the
    price) is what :meth:`StripeBilling.create_checkout_session` accepts. Credits bought with
    a pack expire ``expires_after`` the purchase when set.
    """

    price: str
    feature: str
    units: int
    name: str | None = None
    expires_after: timedelta | None = None

    @property
    def key(self) -> str:
        return self.name or self.price


@dataclass(frozen=True)
class Settings:
    """The validated configuration the event handlers read."""

    catalog: Catalog
    packs: Mapping[str, CreditPack] = field(default_factory=dict)
    """Packs by name and by price."""
    on_inactive: OnInactive = "default_plan"
    entitlement_plans: Mapping[str, str] = field(default_factory=dict)
    metadata_key: str = "metered_subject"

    @classmethod
    def build(
        cls,
        catalog: Catalog,
        packs: Iterable[CreditPack],
        on_inactive: OnInactive,
        entitlement_plans: Mapping[str, str] | None,
        metadata_key: str,
    ) -> Settings:
        by_name: dict[str, CreditPack] = {}
        for pack in packs:
            if not isinstance(pack, CreditPack):
                raise ConfigurationError(f"expected CreditPack, got {type(pack).__name__}")
            if not catalog.feature_is_metered(pack.feature):
                raise ConfigurationError(f"credit pack feature {pack.feature!r} is not metered")
            if not isinstance(pack.units, int) or pack.units <= 0:
                raise ConfigurationError(f"credit pack {pack.key!r} needs a positive int of units")
            for name in {pack.key, pack.price}:
                if name in by_name or name in catalog.plans or name in catalog.by_price:
                    raise ConfigurationError(f"credit pack name or price {name!r} is ambiguous")
                by_name[name] = pack
        if on_inactive not in ("default_plan", "status"):
            raise ConfigurationError("on_inactive must be 'default_plan' or 'status'")
        entitlements = dict(entitlement_plans or {})
        for lookup_key, plan in entitlements.items():
            catalog.plan(plan)  # raises UnknownPlan
            if not lookup_key:
                raise ConfigurationError("entitlement lookup keys must be non-empty")
        return cls(catalog, by_name, on_inactive, entitlements, metadata_key)
