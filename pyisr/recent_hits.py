"""Recent hits per key, each hit counting less as it ages: the order of a re-warm.

Why not the store's record of hits (:mod:`pyisr.cache.activity`): it adds up every hit
since the build, so a page that was the front page last week outranks today's. A
re-warm (:mod:`pyisr.rewarm`) should render first what visitors will ask for next,
which is what they asked for in the last minutes. Each process keeps its own: with a
load balancer spreading requests over instances and workers, one process's recent hits
are a fair sample of the site's, and nothing is written or read for them.

A hit counts 1 when it happens and half that every :data:`HALF_LIFE` seconds after.
Rather than scale every count down as time passes, new hits are added with a weight
that doubles every half-life (``2 ** (t / HALF_LIFE)``): the order of the keys is the
same, an addition costs one multiplication, and the counts are brought back to scale
only when the weight grows past :data:`RESCALE_AT` (every ~10 hours of a 10-minute
half-life). Bounded: past twice :data:`~pyisr.cache.activity.MAX_HIT_KEYS` keys, the
most requested are kept.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from operator import itemgetter

from pyisr.cache.activity import MAX_HIT_KEYS

#: Seconds after which a hit counts half.
HALF_LIFE = 600.0
#: Half-lives after which the stored weights are scaled back (2 ** 64: far from a float's limit).
RESCALE_AT = 64.0


class RecentHits:
    """Hits per key, decayed by age (see the module docstring). ``now`` is epoch seconds."""

    def __init__(self, half_life: float = HALF_LIFE, limit: int = MAX_HIT_KEYS) -> None:
        if half_life <= 0:
            raise ValueError(f"half_life must be > 0 seconds, not {half_life!r}")
        self.half_life = half_life
        self.limit = limit
        #: Key -> its hits, each weighted ``2 ** ((at - epoch) / half_life)``.
        self._weighted: dict[str, float] = {}
        self._epoch: float | None = None

    def __len__(self) -> int:
        return len(self._weighted)

    def add(self, hits: Mapping[str, int], now: float) -> None:
        """Count ``hits`` (key -> number) as made at ``now``."""
        if not hits:
            return
        if self._epoch is None:
            self._epoch = now
        exponent = (now - self._epoch) / self.half_life
        if exponent > RESCALE_AT:
            self._rescale(now)
            exponent = 0.0
        weight = 2.0**exponent
        weighted = self._weighted
        for key, n in hits.items():
            weighted[key] = weighted.get(key, 0.0) + n * weight
        if len(weighted) > 2 * self.limit:
            self._weighted = dict(heapq.nlargest(self.limit, weighted.items(), key=itemgetter(1)))

    def counts(self, now: float) -> dict[str, float]:
        """Each key's hits as of ``now``: a hit ``age`` seconds old counts ``2 ** -(age / half_life)``."""
        if self._epoch is None:
            return {}
        scale = 2.0 ** (-(now - self._epoch) / self.half_life)
        return {key: value * scale for key, value in self._weighted.items()}

    def _rescale(self, now: float) -> None:
        """Bring the stored weights back to scale, counted from ``now``."""
        assert self._epoch is not None
        scale = 2.0 ** (-(now - self._epoch) / self.half_life)
        self._weighted = {key: value * scale for key, value in self._weighted.items() if value * scale > 1e-9}
        self._epoch = now
