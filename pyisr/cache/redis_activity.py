"""The activity record of ``RedisCache``: one for every instance of a build, in Redis.

What ``pyisr cache explain`` and the dashboard read (:mod:`pyisr.cache.activity`), under
the namespace's hash tag (``ns`` is ``{prefix}:{build_id}``, one cluster slot)::

    {ns}:activity:inv        LIST  recent invalidations, newest first (JSON of each)
    {ns}:activity:hits       HASH  key -> hits, added up across instances
    {ns}:activity:m:<minute> HASH  counter -> count for one minute (epoch minutes)

* An invalidation is ``LPUSH`` + ``LTRIM`` to :data:`MAX_INVALIDATIONS` + ``PEXPIRE``
  (:data:`~pyisr.cache.redis.TAG_TTL`, like the tag manifest it explains), one
  round trip.
* A report (every few seconds per instance) is ``HINCRBY`` per key and counter, in
  pipelined batches; the hash of hits lives as long as the manifest, the minutes
  :data:`MINUTE_TTL`. When the hits hash grows past twice :data:`MAX_HIT_KEYS`, the
  instance that noticed drops the least requested down to :data:`MAX_HIT_KEYS`
  (``HDEL``; counts added concurrently to a dropped key are lost with it: hits are
  approximate by nature).

What Redis holds is read back as data: a record that does not parse is skipped.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pyisr.cache.activity import (
    MAX_HIT_KEYS,
    MAX_INVALIDATIONS,
    MINUTES,
    Activity,
    ActivityReport,
    Invalidation,
    encode_invalidation,
    minute_of,
    parse_invalidation,
    trim_hits,
)

#: Seconds a minute's counts stay in Redis (the record shows :data:`MINUTES`; twice that
#: covers instances whose clocks differ).
MINUTE_TTL = 2 * MINUTES * 60
#: Commands per pipeline round trip when adding a report.
BATCH = 1000


def _decode(value: Any) -> str:
    return value.decode("utf-8", "surrogatepass") if isinstance(value, bytes) else str(value)


def _count(value: Any) -> int | None:
    try:
        n = int(value)
    except (TypeError, ValueError):
        return None
    return n if n >= 0 else None


class RedisActivity:
    """The Redis keys of one namespace's activity record, and the commands on them.

    Every method takes the redis-py asyncio client to use (the handler has one per event
    loop) and raises what redis-py raises: the handler decides what an outage means.
    """

    def __init__(self, namespace: str, ttl_ms: int) -> None:
        head = f"{{{namespace}}}:activity:"
        self.invalidations_key = head + "inv"
        self.hits_key = head + "hits"
        self._minute_head = head + "m:"
        self.ttl_ms = ttl_ms

    def minute_key(self, minute: int) -> str:
        return f"{self._minute_head}{minute}"

    def names(self, now: float) -> list[str]:
        """Every key this record may hold now (for ``RedisCache.clear``)."""
        current = minute_of(now)
        minutes = range(current - MINUTE_TTL // 60 - 1, current + 2)
        return [self.invalidations_key, self.hits_key, *(self.minute_key(m) for m in minutes)]

    async def record(self, client: Any, invalidation: Invalidation) -> None:
        pipe = client.pipeline(transaction=False)
        pipe.lpush(self.invalidations_key, encode_invalidation(invalidation))
        pipe.ltrim(self.invalidations_key, 0, MAX_INVALIDATIONS - 1)
        pipe.pexpire(self.invalidations_key, self.ttl_ms)
        await pipe.execute()

    async def add(self, client: Any, report: ActivityReport) -> None:
        commands = [(self.hits_key, key, n) for key, n in report.hits.items() if n > 0]
        for minute, counts in report.minutes.items():
            commands += [(self.minute_key(minute), name, n) for name, n in counts.items() if n > 0]
        for start in range(0, len(commands), BATCH):
            pipe = client.pipeline(transaction=False)
            for name, field, n in commands[start : start + BATCH]:
                pipe.hincrby(name, field, n)
            await pipe.execute()
        pipe = client.pipeline(transaction=False)
        if report.hits:
            pipe.pexpire(self.hits_key, self.ttl_ms)
        for minute in report.minutes:
            pipe.expire(self.minute_key(minute), MINUTE_TTL)
        pipe.hlen(self.hits_key)
        *_, size = await pipe.execute()
        if int(size or 0) > 2 * MAX_HIT_KEYS:
            await self._trim_hits(client)

    async def _trim_hits(self, client: Any) -> None:
        """Drop the least requested keys, down to :data:`MAX_HIT_KEYS`."""
        hits = _hits(await client.hgetall(self.hits_key))
        kept = trim_hits(hits)
        dropped = [key for key in hits if key not in kept]
        for start in range(0, len(dropped), BATCH):
            await client.hdel(self.hits_key, *dropped[start : start + BATCH])

    async def read(self, client: Any, now: float, limit: int = MAX_INVALIDATIONS) -> Activity:
        current = minute_of(now)
        minutes = list(range(current - MINUTES + 1, current + 1))
        pipe = client.pipeline(transaction=False)
        pipe.lrange(self.invalidations_key, 0, limit - 1)
        pipe.hgetall(self.hits_key)
        for minute in minutes:
            pipe.hgetall(self.minute_key(minute))
        raw_records, raw_hits, *raw_minutes = await pipe.execute()
        invalidations = _invalidations(raw_records or ())
        by_minute = {m: _hits(c) for m, c in zip(minutes, raw_minutes, strict=True) if c}
        return Activity(invalidations, _hits(raw_hits or {}), by_minute)


def _invalidations(raw: Iterable[Any]) -> list[Invalidation]:
    found = []
    for item in raw:
        data = item if isinstance(item, bytes) else str(item).encode()
        invalidation = parse_invalidation(data)
        if invalidation is not None:
            found.append(invalidation)
    return found


def _hits(raw: Any) -> dict[str, int]:
    if not isinstance(raw, dict):
        return {}
    hits = {}
    for key, value in raw.items():
        n = _count(value)
        if n is not None:
            hits[_decode(key)] = n
    return hits
