"""Billing period arithmetic: calendar months from an anchor, like Stripe's billing cycle anchor."""

from __future__ import annotations

import calendar
from datetime import datetime

from metered.clock import from_us, to_us


def add_months(when: datetime, months: int) -> datetime:
    """``when`` moved by whole calendar months, clamping the day (Jan 31 + 1 month = Feb 28/29)."""
    month_index = when.month - 1 + months
    year, month = when.year + month_index // 12, month_index % 12 + 1
    day = min(when.day, calendar.monthrange(year, month)[1])
    return when.replace(year=year, month=month, day=day)


def period_containing(anchor_us: int, interval_months: int, now_us: int) -> tuple[int, int]:
    """The ``(start, end)`` of the period, counted from ``anchor_us``, that contains ``now_us``.

    Periods are computed from the anchor rather than from the previous end so that day
    clamping never drifts (Jan 31 -> Feb 28 -> Mar 31).
    """
    anchor = from_us(anchor_us)
    if now_us < anchor_us:
        return anchor_us, to_us(add_months(anchor, interval_months))
    now = from_us(now_us)
    # Estimate the number of elapsed periods, then correct by at most a step either way.
    months = (now.year - anchor.year) * 12 + (now.month - anchor.month)
    count = max(months // interval_months, 0)
    while count > 0 and to_us(add_months(anchor, count * interval_months)) > now_us:
        count -= 1
    while to_us(add_months(anchor, (count + 1) * interval_months)) <= now_us:
        count += 1
    start = to_us(add_months(anchor, count * interval_months))
    end = to_us(add_months(anchor, (count + 1) * interval_months))
    return start, end
