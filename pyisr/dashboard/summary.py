"""The summary page's numbers: entries by state, the hit ratio, the chart of the last hour.

All of it is computed from what the store keeps (:mod:`pyisr.cache.activity`'s counts
per minute, the rows of :func:`pyisr.explain.list_rows`); the chart is plain geometry a
template draws as SVG, so the page needs no script to show it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pyisr.cache.activity import MINUTES, minute_of
from pyisr.explain import EntryRow, EntryState, clock_time

#: The chart's drawing box (the SVG scales it to the page's width).
CHART_WIDTH = 600
CHART_HEIGHT = 120


@dataclass(frozen=True)
class Bar:
    """One minute of the chart: regenerations (the whole bar) and failures (its red part)."""

    x: float
    width: float
    regenerations: int
    failures: int
    ok_y: float
    ok_height: float
    fail_y: float
    fail_height: float
    label: str


@dataclass(frozen=True)
class Chart:
    bars: list[Bar]
    peak: int
    width: int = CHART_WIDTH
    height: int = CHART_HEIGHT
    start_label: str = ""
    end_label: str = ""


@dataclass(frozen=True)
class Totals:
    """The last hour's counts, added up."""

    hits: int
    stale: int
    misses: int
    regenerations: int
    failures: int
    invalidations: int

    @property
    def answers(self) -> int:
        return self.hits + self.stale + self.misses

    @property
    def hit_ratio(self) -> float | None:
        """Answers from the cache (HIT and STALE) among all; ``None`` before any answer."""
        return (self.hits + self.stale) / self.answers if self.answers else None


def totals(minutes: Mapping[int, Mapping[str, int]], now: float) -> Totals:
    oldest = minute_of(now) - MINUTES + 1
    summed: Counter[str] = Counter()
    for minute, counts in minutes.items():
        if minute >= oldest:
            summed.update(counts)
    return Totals(
        hits=summed["hits"],
        stale=summed["stale"],
        misses=summed["misses"],
        regenerations=summed["regenerations"],
        failures=summed["failures"],
        invalidations=summed["invalidations"],
    )


def chart(minutes: Mapping[int, Mapping[str, int]], now: float) -> Chart:
    """Regenerations and failures in each of the last :data:`MINUTES` minutes, oldest first.

    The bar's height is the minute's regenerations plus its failures (both are renders
    that ran); the failed part is drawn on top in its own colour.
    """
    last = minute_of(now)
    first = last - MINUTES + 1
    counts = [minutes.get(m, {}) for m in range(first, last + 1)]
    peak = max((c.get("regenerations", 0) + c.get("failures", 0) for c in counts), default=0)
    scale = (CHART_HEIGHT - 4) / peak if peak else 0.0
    step = CHART_WIDTH / MINUTES
    bars = []
    for i, c in enumerate(counts):
        ok, failed = c.get("regenerations", 0), c.get("failures", 0)
        ok_h, fail_h = ok * scale, failed * scale
        at = (first + i) * 60
        bars.append(
            Bar(
                x=round(i * step + 1, 2),
                width=round(step - 2, 2),
                regenerations=ok,
                failures=failed,
                ok_y=round(CHART_HEIGHT - ok_h, 2),
                ok_height=round(ok_h, 2),
                fail_y=round(CHART_HEIGHT - ok_h - fail_h, 2),
                fail_height=round(fail_h, 2),
                label=f"{clock_time(at, now)}: {ok} regenerated, {failed} failed",
            )
        )
    return Chart(bars, peak, start_label=clock_time(first * 60, now), end_label="now")


def by_state(rows: Iterable[EntryRow]) -> dict[str, int]:
    """How many entries are in each state, every state named (zeros too), in a fixed order."""
    counted = Counter(row.state for row in rows)
    return {state.value: counted.get(state, 0) for state in EntryState}
