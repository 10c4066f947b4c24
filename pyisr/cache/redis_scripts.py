"""The Lua scripts of ``RedisCache``: every write that must be atomic, in one step on the server.

* storing an entry compares ``created_at`` and writes in one step, so a slow render
  that started before an invalidation never overwrites a newer entry (the fencing
  rule of :meth:`CacheHandler.set`), however many instances write at once; the step
  replaces the whole hash, so the body, its metadata and its stored encodings are
  always one write's, and no encoding of an older write outlives it;
* revalidating raises each tag's time to ``max(old, at)``, bumps the counter and
  publishes, in one step, so an instance cannot record an invalidation and die before
  announcing it, and every message carries the counter value its write made; it also
  sets the TTL of the manifest and the counter again, so neither lives for ever;
* a snapshot reads the manifest and its counter together, so a resync adopts a
  counter that matches the times it read;
* releasing a lock deletes it only if the token still holds it, so a holder whose
  lock expired cannot release the next holder's.

Each script touches keys of one Redis Cluster slot only (see the key layout in
:mod:`pyisr.cache.redis`). Scripts are sent by SHA and re-sent on ``NOSCRIPT`` (a
restarted or flushed server), which redis-py's registered scripts do by themselves.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

# KEYS[1] entry hash; ARGV: created_at, meta, body, key, ttl in ms (0 = keep for ever, which
# RedisCache never asks for), then a field name and its value for each stored encoding.
_SET_ENTRY = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'created_at') or '')
if cur and cur > tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'key', ARGV[4], 'created_at', ARGV[1], 'meta', ARGV[2], 'body', ARGV[3],
  unpack(ARGV, 6))
local ttl = tonumber(ARGV[5])
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) else redis.call('PERSIST', KEYS[1]) end
return 1
"""

# KEYS[1] manifest, KEYS[2] counter; ARGV: channel, at, payload JSON {"tags","at"}, ttl in ms,
# tags... The TTL is only ever raised, never shortened.
_REVALIDATE = """
local at = tonumber(ARGV[2])
for i = 5, #ARGV do
  local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '')
  if (not cur) or cur < at then redis.call('HSET', KEYS[1], ARGV[i], ARGV[2]) end
end
local seq = redis.call('INCR', KEYS[2])
local ttl = tonumber(ARGV[4])
for k = 1, 2 do
  if redis.call('PTTL', KEYS[k]) < ttl then redis.call('PEXPIRE', KEYS[k], ttl) end
end
redis.call('PUBLISH', ARGV[1], '{"seq":' .. seq .. ',' .. string.sub(ARGV[3], 2))
return seq
"""

# KEYS[1] manifest, KEYS[2] counter: a consistent snapshot of both.
_SNAPSHOT = """
return {redis.call('GET', KEYS[2]) or '0', redis.call('HGETALL', KEYS[1])}
"""

# KEYS[1] lock; ARGV[1] token: delete only if we still hold it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Scripts:
    """The scripts registered with one client (so with one event loop), each on first use.

    The methods name each script's keys and arguments, so the order the Lua reads them
    in is written down here only.
    """

    def __init__(self, client: Any) -> None:
        self._client = client
        self._registered: dict[str, Any] = {}

    def _script(self, source: str) -> Any:
        script = self._registered.get(source)
        if script is None:
            script = self._registered[source] = self._client.register_script(source)
        return script

    async def set_entry(
        self,
        entry_key: str,
        key: str,
        created_at: float,
        meta: bytes,
        body: bytes,
        ttl_ms: int,
        extra: Mapping[str, bytes] | None = None,
    ) -> bool:
        """Store the entry (and ``extra`` fields: its encodings) in place of whatever the
        hash held, unless a newer one is stored; ``False`` when fenced off."""
        args: list[Any] = [repr(created_at), meta, body, key, ttl_ms]
        for field, value in (extra or {}).items():
            args += [field, value]
        stored = await self._script(_SET_ENTRY)(keys=[entry_key], args=args)
        return int(stored) == 1

    async def revalidate(
        self, tags_key: str, seq_key: str, channel: str, tags: list[str], at: float, ttl_ms: int
    ) -> int:
        """Raise ``tags`` to ``at``, bump the counter, publish, and keep both keys at least
        ``ttl_ms`` more; returns the new counter."""
        payload = json.dumps({"tags": tags, "at": at}, separators=(",", ":"), ensure_ascii=False)
        script = self._script(_REVALIDATE)
        args = [channel, repr(at), payload, ttl_ms, *tags]
        return int(await script(keys=[tags_key, seq_key], args=args))

    async def snapshot(self, tags_key: str, seq_key: str) -> tuple[int, list[Any]]:
        """The counter and the manifest as a flat ``[tag, time, tag, time, ...]`` list, read together."""
        seq, flat = await self._script(_SNAPSHOT)(keys=[tags_key, seq_key])
        return int(seq), list(flat)

    async def release(self, lock_key: str, token: str) -> None:
        """Delete the lock if ``token`` still holds it."""
        await self._script(_RELEASE)(keys=[lock_key], args=[token])
