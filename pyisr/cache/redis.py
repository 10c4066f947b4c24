"""``RedisCache``: one cache shared by many instances, through Redis (``pip install 'pyisr[redis]'``).

Key layout (``ns`` is ``{prefix}:{build_id}``, so two deployments never read each
other's pages; ``h`` is the SHA-1 of the cache key)::

    {ns:h}:e        HASH  key, created_at, meta (compact JSON), body (raw bytes), and
                          enc:<coding> (raw bytes) for each stored encoding the meta lists
    {ns:h}:l        STRING  regeneration lock: a random token, with PX expiry
    {ns}:tags       HASH  tag -> time it was last revalidated (the tag manifest)
    {ns}:tagseq     STRING  counter bumped by every revalidation
    {ns}:inval      pub/sub channel: {"seq": n, "tags": [...], "at": t}
    {ns}:activity:* recent invalidations, hits, counts per minute (:mod:`pyisr.cache.redis_activity`)
    {prefix}:builds LIST  the builds of an app that served lately, newest last (:mod:`pyisr.app_builds`)

Every key expires by itself (``PTTL`` is never -1), so the keys of an old build, whose
id is in the prefix, vanish with no one deleting them:

* an entry lives until a day (:data:`TTL_MARGIN`) past its ``expire``, or a year and a
  day after its ``created_at`` when it names none (a year and a day at most either way),
  and never longer than ``entry_ttl`` from its write when the handler has one
  (:func:`entry_ttl_ms`);
* the manifest and its counter get that longest lifetime again on every revalidation
  (:data:`TAG_TTL`), so they outlive every entry rendered before the revalidation they
  record, which is the one that must still look invalidated;
* a lock has the ``ttl`` its holder asked for.

The braces are Redis Cluster hash tags: an entry and its lock share a slot, and so do
the manifest and its counter, so every script touches one slot and the layout works
unchanged with redis-py's cluster client (``redis+cluster://host:port``).

Writes that must be atomic are Lua scripts (:mod:`pyisr.cache.redis_scripts`):
storing an entry is fenced by ``created_at`` and revalidating records, counts and
publishes in one step. Each instance mirrors the manifest in memory, fed by pub/sub
and resynced whenever a message may have been missed (:mod:`pyisr.cache.redis_tags`);
the URL and the clients are :mod:`pyisr.cache.redis_connection`'s.

While Redis is unreachable the handler is in degraded mode
(:mod:`pyisr.cache.redis_outage`): every call fails fast, the instance serves from
memory, renders locally and queues its invalidations until Redis is back.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import hashlib
import json
import logging
import secrets
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster

from pyisr.cache.activity import Activity, ActivityReport, Invalidation
from pyisr.cache.entry import ONE_YEAR, CacheEntry, EntrySummary, encoded_sizes
from pyisr.cache.handler import CacheHandler
from pyisr.cache.redis_activity import RedisActivity
from pyisr.cache.redis_connection import (
    aclose,
    check_name,
    describe_client,
    new_client,
    node_url,
    seconds,
    split_url,
    subscriber_client,
)
from pyisr.cache.redis_outage import OUTAGE_ERRORS, Outage
from pyisr.cache.redis_scripts import Scripts
from pyisr.cache.redis_tags import MirrorSync, TagMirror, as_time
from pyisr.cache.urls import redact_url
from pyisr.loop_local import LoopLocal

logger = logging.getLogger("pyisr.cache")

T = TypeVar("T")

DEFAULT_BUILD_ID = "default"
#: Prefix of the hash field that holds one stored encoding of an entry (``enc:br``).
ENCODING_FIELD = "enc:"
LOCAL_TOKEN_PREFIX = "local:"

#: Seconds an entry stays in Redis past the end of its life: clocks of instances differ,
#: and an entry just past ``expire`` is still worth a look for tools. One day.
TTL_MARGIN = 86_400
#: The longest an entry lives in Redis, from its ``created_at`` (an entry with no
#: ``expire`` and no ``entry_ttl`` lives this long: a year, plus the margin).
MAX_ENTRY_LIFETIME = ONE_YEAR
#: TTL of the tag manifest and its counter, set again on every revalidation: at least
#: the longest any entry lives, so no entry outlives the invalidation that ended it.
TAG_TTL = MAX_ENTRY_LIFETIME + TTL_MARGIN
#: Seconds a handler closing, or a process ending, tries to write queued invalidations.
EXIT_FLUSH_WAIT = 2.0
#: What ends that last try (Redis still down, or answering with an error).
_GIVE_UP_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, *OUTAGE_ERRORS, redis_errors.RedisError)


def entry_ttl_ms(entry: CacheEntry, now: float, entry_ttl: float | None = None) -> int:
    """How long Redis keeps ``entry`` (milliseconds, always > 0).

    Until ``created_at + expire`` plus :data:`TTL_MARGIN`, or ``created_at`` plus a year
    and the margin when it names no ``expire``; at most ``entry_ttl`` from now when the
    handler has one (the operator's cap); never less than the margin, so an entry whose
    ``created_at`` is old (or comes from a clock behind ours) is not dropped at once.
    """
    life = MAX_ENTRY_LIFETIME if entry.expire is None else min(entry.expire, MAX_ENTRY_LIFETIME)
    seconds = max(entry.created_at + life - now, 0.0) + TTL_MARGIN
    if entry_ttl:
        seconds = min(seconds, entry_ttl)
    return max(1, int(seconds * 1000))


class RedisUnavailableError(ConnectionError):
    """Raised only by listing (``keys``), where an empty answer would mislead a user."""


class _Down:
    """Marker returned by :meth:`RedisCache._call` when Redis could not be used."""


_DOWN = _Down()


@dataclass
class _LoopState:
    """What one event loop owns: redis-py clients are bound to the loop that made them."""

    client: Any
    scripts: Scripts
    subscriber: asyncio.Task[None] | None = None
    probe: asyncio.Task[None] | None = None


class RedisCache(CacheHandler):
    """Entries, the tag manifest and locks in Redis, shared by every instance of a build.

    ``url_or_client`` is a URL (``redis://``, ``rediss://``, ``redis+cluster://``) or
    a redis-py asyncio client. Prefer a URL: the handler then makes one client per
    event loop, which the engine needs when it also runs on its sync-bridge loop; a
    client you pass is used as is on every loop.

    Options may also come from the URL's query (``?prefix=site&build_id=abc``);
    keyword arguments win:

    * ``prefix`` (``"pyisr"``) and ``build_id`` (``"default"``; ``pyisr build`` passes
      its own) name the namespace, so sites and deployments sharing a Redis never
      read each other's pages;
    * ``socket_timeout`` (0.5 s): the longest a request waits on Redis before this
      instance switches to degraded mode; keep it well under your response budget;
    * ``retry_interval`` (1 s): how often a degraded instance tries Redis again;
    * ``resync_interval`` (30 s) and ``seq_check_interval`` (1 s): how often the tag
      mirror is re-read in full, and how often the revalidation counter is checked;
    * ``entry_ttl`` (none): the longest Redis keeps an entry, in seconds from its write
      (every entry expires by itself anyway: see the module docstring);
    * ``client_options``: extra keyword arguments for redis-py's client.

    See the module docstring for the key layout, how missed pub/sub messages are
    caught, and degraded mode.
    """

    name = "redis"

    def __init__(
        self,
        url_or_client: str | Any = "redis://127.0.0.1:6379/0",
        *,
        prefix: str | None = None,
        build_id: str | None = None,
        socket_timeout: float | None = None,
        retry_interval: float | None = None,
        resync_interval: float | None = None,
        seq_check_interval: float = 1.0,
        entry_ttl: float | None = None,
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        options: dict[str, str] = {}
        if isinstance(url_or_client, str):
            self._url, self.cluster, options = split_url(url_or_client)
            self._client: Any = None
        else:
            self._client = url_or_client
            self.cluster = isinstance(url_or_client, RedisCluster)
            self._url = describe_client(url_or_client)
        self.prefix = check_name(prefix if prefix is not None else options.get("prefix", "pyisr"), "prefix")
        self.build_id = check_name(
            build_id if build_id is not None else options.get("build_id", DEFAULT_BUILD_ID),
            "build_id",
            forbidden="{}:",  # so "prefix:build" names exactly one (prefix, build) pair
        )
        self.socket_timeout = seconds(socket_timeout, options.get("socket_timeout"), 0.5)
        self.retry_interval = seconds(retry_interval, options.get("retry_interval"), 1.0)
        ttl = seconds(entry_ttl, options.get("entry_ttl"), 0.0)
        self.entry_ttl: float | None = ttl or None
        self._client_options = dict(client_options or {})

        self.namespace = f"{self.prefix}:{self.build_id}"
        self._tags_key = f"{{{self.namespace}}}:tags"
        self._seq_key = f"{{{self.namespace}}}:tagseq"
        #: The builds of this prefix that served lately (:meth:`record_served_build`).
        self._builds_key = f"{{{self.prefix}}}:builds"
        self.channel = f"{{{self.namespace}}}:inval"
        self._activity_keys = RedisActivity(self.namespace, int(TAG_TTL * 1000))

        self._states: LoopLocal[_LoopState] = LoopLocal(self._new_state)
        self._closed = False
        self._mirror = TagMirror()
        self._sync = MirrorSync(
            self._mirror,
            resync_interval=seconds(resync_interval, options.get("resync_interval"), 30.0),
            seq_check_interval=seq_check_interval,
        )
        self._outage = Outage(
            redact_url(self._url), retry_interval=self.retry_interval, on_recovery=self._sync.request_resync
        )
        # A process that never closes its handler (a script, a Django worker) still
        # writes, or names, what an outage left queued as it ends.
        atexit.register(_flush_at_exit, weakref.ref(self))

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisCache:
        """The handler a cache URL names, e.g. ``redis://localhost:6379/0?prefix=site``.

        ``redis+cluster://host:port`` uses redis-py's cluster client (any node will do).
        """
        return cls(url, **options)

    # -- keys ---------------------------------------------------------------------------

    def _slot_tag(self, key: str) -> str:
        digest = hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()
        return f"{{{self.namespace}:{digest}}}"

    def entry_key(self, key: str) -> str:
        """The Redis key of the hash holding ``key`` (for tools and tests)."""
        return self._slot_tag(key) + ":e"

    def lock_key(self, key: str) -> str:
        """The Redis key of ``key``'s regeneration lock (same cluster slot as the entry)."""
        return self._slot_tag(key) + ":l"

    @property
    def tags_key(self) -> str:
        """The Redis hash holding the tag manifest (tag -> time)."""
        return self._tags_key

    # -- clients, one set per event loop ------------------------------------------------

    def _state(self) -> _LoopState:
        return self._states.get()

    def _new_state(self) -> _LoopState:
        if self._client is not None:
            client = self._client
        else:
            client = new_client(
                self._url, cluster=self.cluster, timeout=self.socket_timeout, options=self._client_options
            )
        return _LoopState(client, Scripts(client))

    # -- degraded mode ------------------------------------------------------------------

    @property
    def degraded(self) -> bool:
        """True while Redis is unreachable and this instance serves from memory."""
        return self._outage.down

    async def _call(self, fn: Callable[[_LoopState], Awaitable[T]], what: str) -> T | _Down:
        """Run ``fn`` against Redis, or return ``_DOWN`` (fast while degraded, never raising)."""
        state = self._state()
        if self._outage.down:
            self._ensure_probe(state)
            return _DOWN
        try:
            return await fn(state)
        except OUTAGE_ERRORS as exc:
            self._went_down(exc, state)
            return _DOWN
        except redis_errors.RedisError as exc:
            # Not an outage (a bad value, OOM, ...): this call falls back, Redis stays in use.
            self._outage.log_error(what, exc)
            return _DOWN

    def _went_down(self, exc: BaseException, state: _LoopState) -> None:
        self._outage.went_down(exc)
        self._ensure_probe(state)

    def _ensure_probe(self, state: _LoopState) -> None:
        if self._closed or (state.probe is not None and not state.probe.done()):
            return

        publish = functools.partial(self._publish_tags, state)
        probe = self._outage.probe(state.client.ping, publish, closed=lambda: self._closed)
        state.probe = asyncio.get_running_loop().create_task(probe, name="pyisr-redis-probe")

    def health(self) -> dict[str, Any]:
        """Whether Redis is in use, for the health endpoint and monitoring."""
        return self._outage.health()

    def describe(self) -> dict[str, Any]:
        """Handler, URL (no password), namespace and health, for logs and ``/_pyisr/health``."""
        return {
            "handler": self.name,
            "url": redact_url(self._url),
            "cluster": self.cluster,
            "prefix": self.prefix,
            "build_id": self.build_id,
            "namespace": self.namespace,
            "tags_mirrored": len(self._mirror),
            "subscribed": self._sync.subscribed,
            **self.health(),
        }

    # -- entries ------------------------------------------------------------------------

    async def get(self, key: str) -> CacheEntry | None:
        """The entry from its hash (one HGETALL: the body and any stored encodings), or
        ``None`` if missing, unreadable or Redis is down."""

        async def op(state: _LoopState) -> dict[Any, Any]:
            return dict(await state.client.hgetall(self.entry_key(key)))

        fields = await self._call(op, f"get({key!r})")
        if isinstance(fields, _Down) or fields.get(b"meta") is None:
            return None
        try:
            meta = json.loads(fields[b"meta"])
            if meta.get("key") != key:
                return None
            encodings = {}
            for coding in encoded_sizes(meta):
                data = fields.get((ENCODING_FIELD + coding).encode())
                if data is not None:
                    encodings[coding] = bytes(data)  # one missing: from_meta calls it torn
            return CacheEntry.from_meta(meta, bytes(fields.get(b"body") or b""), encodings)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self._outage.log_error(f"get({key!r}): unreadable entry", exc)
            return None

    async def summary(self, key: str) -> EntrySummary | None:
        """``key``'s metadata field alone (one HGET: never the body or its encodings), for
        a listing; ``None`` if missing, unreadable or Redis is down."""

        async def op(state: _LoopState) -> Any:
            return await state.client.hget(self.entry_key(key), "meta")

        raw = await self._call(op, f"summary({key!r})")
        if isinstance(raw, _Down) or raw is None:
            return None
        return self._summary_of(key, raw)

    def _summary_of(self, key: str, raw: bytes) -> EntrySummary | None:
        """``key``'s summary from its stored metadata; ``None`` if it names another key
        or cannot be read (logged: a listing shows what can be read)."""
        try:
            meta = json.loads(raw)
            if meta.get("key") != key:
                return None
            return EntrySummary.from_meta(meta)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self._outage.log_error(f"summary({key!r}): unreadable entry", exc)
            return None

    async def set(self, entry: CacheEntry) -> bool:
        """Store ``entry`` unless a newer one is stored (atomic compare-and-write in Lua).

        Returns ``False`` when fenced off, or when Redis is down (nothing stored).
        """
        ttl_ms = entry_ttl_ms(entry, time.time(), self.entry_ttl)

        extra = {ENCODING_FIELD + coding: data for coding, data in entry.encodings.items()}

        async def op(state: _LoopState) -> bool:
            return await state.scripts.set_entry(
                self.entry_key(entry.key),
                entry.key,
                entry.created_at,
                entry.meta_bytes(),
                entry.body,
                ttl_ms,
                extra,
            )

        result = await self._call(op, f"set({entry.key!r})")
        return not isinstance(result, _Down) and result

    async def delete(self, key: str) -> None:
        """Remove ``key``'s entry (a no-op while Redis is down)."""

        async def op(state: _LoopState) -> Any:
            return await state.client.delete(self.entry_key(key))

        await self._call(op, f"delete({key!r})")

    async def keys(self, prefix: str = "") -> AsyncIterator[str]:
        """Every stored key of this build starting with ``prefix`` (SCAN; for the CLI).

        Raises :class:`RedisUnavailableError` when Redis is down: an empty listing
        would say the cache is empty, which it is not.
        """
        state = self._listable_state()
        try:
            async for batch in self._entry_batches(state):
                for key in await self._key_names(state, batch):
                    if key.startswith(prefix):
                        yield key
        except OUTAGE_ERRORS as exc:
            self._went_down(exc, state)
            raise self._unavailable(exc) from exc

    async def summaries(self, prefix: str = "") -> AsyncIterator[EntrySummary]:
        """Every entry's metadata field, 200 entries per round trip (one pipeline of
        HMGETs); an unreadable entry is logged and left out. Raises
        :class:`RedisUnavailableError` when Redis is down, as :meth:`keys` does."""
        state = self._listable_state()
        try:
            async for batch in self._entry_batches(state):
                pipe = state.client.pipeline(transaction=False)
                for redis_key in batch:
                    pipe.hmget(redis_key, "key", "meta")
                for name, raw in await pipe.execute():
                    if name is None or raw is None:
                        continue  # expired or deleted since the scan
                    key = name.decode("utf-8", "surrogatepass")
                    if key.startswith(prefix) and (found := self._summary_of(key, raw)) is not None:
                        yield found
        except OUTAGE_ERRORS as exc:
            self._went_down(exc, state)
            raise self._unavailable(exc) from exc

    def _listable_state(self) -> _LoopState:
        """This loop's client, unless Redis is known to be down: a listing then raises
        :class:`RedisUnavailableError` at once (an empty one would say the cache is empty)."""
        state = self._state()
        if self._outage.down:
            self._ensure_probe(state)
            raise self._unavailable(self._outage.last_error)
        return state

    async def _entry_batches(self, state: _LoopState) -> AsyncIterator[list[str]]:
        """This build's entry hashes, by batches of 200 Redis key names."""
        batch: list[str] = []
        async for name in self._scan_per_key(state, "}:e"):
            batch.append(name)
            if len(batch) >= 200:
                yield batch
                batch = []
        if batch:
            yield batch

    def _unavailable(self, reason: object) -> RedisUnavailableError:
        return RedisUnavailableError(f"Redis unreachable at {redact_url(self._url)}: {reason}")

    async def _scan_per_key(self, state: _LoopState, suffix: str) -> AsyncIterator[str]:
        """The Redis keys of this namespace's entries and locks (``{ns:h}:e``, ``{ns:h}:l``)
        that end with ``suffix``."""
        head = "{" + self.namespace + ":"
        async for redis_key in state.client.scan_iter(match=_glob_escape(head) + "*" + suffix, count=500):
            name = redis_key.decode() if isinstance(redis_key, bytes) else str(redis_key)
            # The glob also matches longer namespaces ("pyisr:b1:x"): keep exactly ours.
            if len(name) == len(head) + 40 + 3:
                yield name

    async def _key_names(self, state: _LoopState, redis_keys: list[str]) -> list[str]:
        if not redis_keys:
            return []
        pipe = state.client.pipeline(transaction=False)
        for redis_key in redis_keys:
            pipe.hget(redis_key, "key")
        names = await pipe.execute()
        return [n.decode("utf-8", "surrogatepass") for n in names if n is not None]

    async def record_served_build(self, keep: int) -> tuple[list[str], bool] | None:
        """Record this handler's build as the newest that served (``{prefix}:builds``, a
        list shared by every build of the prefix, the last ``keep`` kept); returns the
        builds recorded before it, oldest first, and whether it was not the newest yet.
        ``None`` while Redis is down (:mod:`pyisr.app_builds` asks again next start)."""

        async def op(state: _LoopState) -> Any:
            # Not a transaction (a cluster client has none): two processes starting at
            # once may both find themselves newer, and both purge: harmless.
            pipe = state.client.pipeline(transaction=False)
            pipe.lrange(self._builds_key, 0, -1)
            pipe.lrem(self._builds_key, 0, self.build_id)
            pipe.rpush(self._builds_key, self.build_id)
            pipe.ltrim(self._builds_key, -keep, -1)
            pipe.pexpire(self._builds_key, int(TAG_TTL * 1000))
            return await pipe.execute()

        found = await self._call(op, "record_served_build()")
        if isinstance(found, _Down):
            return None
        before = [b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b) for b in found[0]]
        return before, before[-1:] != [self.build_id]

    async def newest_served_build(self) -> str | None:
        """The build :meth:`record_served_build` recorded last (``None``: none, or Redis down)."""

        async def op(state: _LoopState) -> Any:
            return await state.client.lindex(self._builds_key, -1)

        found = await self._call(op, "newest_served_build()")
        if isinstance(found, _Down) or found is None:
            return None
        return found.decode("utf-8", "replace") if isinstance(found, bytes) else str(found)

    async def clear(self) -> int:
        """Delete every key of this build (entries, locks, manifest); returns how many."""
        state = self._state()
        names = [self._tags_key, self._seq_key, *self._activity_keys.names(time.time())]
        names += [name async for name in self._scan_per_key(state, "")]
        deleted = 0
        for start in range(0, len(names), 500):
            # One DEL per key: keys in different cluster slots cannot share a command.
            pipe = state.client.pipeline(transaction=False)
            for name in names[start : start + 500]:
                pipe.delete(name)
            deleted += sum(int(n) for n in await pipe.execute())
        return deleted

    # -- tags -----------------------------------------------------------------------------

    async def _publish_tags(self, state: _LoopState, tags: list[str], at: float) -> int:
        return await state.scripts.revalidate(
            self._tags_key, self._seq_key, self.channel, tags, at, int(TAG_TTL * 1000)
        )

    async def revalidate_tags(self, tags: Iterable[str], at: float) -> None:
        """Raise each tag's time to ``at`` in Redis and tell every instance (one script).

        While Redis is down the invalidation applies to this instance at once and is
        queued, then written when Redis is back, so it is never lost.
        """
        tags = list(dict.fromkeys(str(t) for t in tags))
        if not tags:
            return
        times = dict.fromkeys(tags, at)
        self._mirror.merge(times)

        async def op(state: _LoopState) -> Any:
            return await self._publish_tags(state, tags, at)

        if isinstance(await self._call(op, "revalidate_tags"), _Down):
            self._outage.queue(times)

    async def tag_times(self, tags: Iterable[str]) -> Mapping[str, float]:
        """When each tag was last revalidated: HMGET of the manifest (the mirror if Redis is down)."""
        wanted = list(dict.fromkeys(tags))
        if not wanted:
            return {}

        async def op(state: _LoopState) -> list[Any]:
            return list(await state.client.hmget(self._tags_key, wanted))

        values = await self._call(op, "tag_times")
        if not isinstance(values, _Down):
            found = {t: as_time(v) for t, v in zip(wanted, values, strict=True)}
            self._mirror.merge({t: at for t, at in found.items() if at is not None})
        return self._mirror.get(wanted)

    async def tag_changes(self, cursor: Any) -> tuple[Any, Mapping[str, float]] | None:
        """Tag times changed since ``cursor``, from the local mirror (no round trip, usually).

        Starts this loop's subscriber on first use, and resyncs the mirror from Redis
        when it may have missed something (see the module docstring).
        """
        state = self._state()
        self._ensure_subscriber(state)
        if not self._outage.down:
            await self._sync.keep_honest(self._resync, self._read_counter)
        return self._mirror.changes_since(cursor)

    async def _resync(self) -> None:
        async def op(state: _LoopState) -> None:
            await self._sync.resync(lambda: state.scripts.snapshot(self._tags_key, self._seq_key))

        await self._call(op, "tag manifest resync")

    async def _read_counter(self) -> int | None:
        """The revalidation counter in Redis, or ``None`` if Redis could not be asked."""

        async def op(state: _LoopState) -> Any:
            return await state.client.get(self._seq_key)

        raw = await self._call(op, "tag counter check")
        return None if isinstance(raw, _Down) else int(raw or 0)

    # -- the subscriber -------------------------------------------------------------------

    def _ensure_subscriber(self, state: _LoopState) -> None:
        if self._closed or (state.subscriber is not None and not state.subscriber.done()):
            return
        subscription = self._sync.subscribe_forever(
            lambda: self._pubsub_client(state),
            self.channel,
            retry_interval=self.retry_interval,
            closed=lambda: self._closed,
        )
        state.subscriber = asyncio.get_running_loop().create_task(subscription, name="pyisr-redis-subscriber")

    async def _pubsub_client(self, state: _LoopState) -> tuple[Any, Any]:
        """``(pubsub, client to close or None)``: a dedicated connection with no read timeout."""
        if self._client is not None:
            return self._client.pubsub(), None
        url = self._url
        if self.cluster:
            # Classic pub/sub is broadcast to every node, so any node will do.
            await state.client.initialize()
            node = state.client.get_random_node()
            url = node_url(url, node.host, node.port)
        client = subscriber_client(
            url, timeout=self.socket_timeout, options=self._client_options, name=f"pyisr-sub:{self.namespace}"
        )
        return client.pubsub(), client

    # -- the lock -------------------------------------------------------------------------

    async def acquire_lock(self, key: str, ttl: float) -> str | None:
        """``SET lock token NX PX ttl``: one instance regenerates a key; the lock expires if it dies.

        While Redis is down the lock is in-process, so this instance still renders each
        key once at a time.
        """
        token = secrets.token_hex(16)
        ttl_ms = max(1, int(ttl * 1000))

        async def op(state: _LoopState) -> Any:
            return await state.client.set(self.lock_key(key), token, nx=True, px=ttl_ms)

        result = await self._call(op, f"acquire_lock({key!r})")
        if isinstance(result, _Down):
            local = await super().acquire_lock(key, ttl)
            return None if local is None else LOCAL_TOKEN_PREFIX + local
        return token if result else None

    async def release_lock(self, key: str, token: str) -> None:
        """Delete the lock only if ``token`` still holds it (compare-and-delete in Lua)."""
        if token.startswith(LOCAL_TOKEN_PREFIX):
            await super().release_lock(key, token[len(LOCAL_TOKEN_PREFIX) :])
            return

        async def op(state: _LoopState) -> Any:
            await state.scripts.release(self.lock_key(key), token)

        await self._call(op, f"release_lock({key!r})")

    async def is_locked(self, key: str) -> bool | None:
        """Whether an instance holds ``key``'s regeneration lock (``EXISTS``; ``None`` while down)."""

        async def op(state: _LoopState) -> Any:
            return await state.client.exists(self.lock_key(key))

        result = await self._call(op, f"is_locked({key!r})")
        if isinstance(result, _Down):
            return None
        return bool(result) or bool(await super().is_locked(key))

    # -- activity: shared by every instance (pyisr.cache.redis_activity) -------------------
    # While Redis is down, each falls back to this process's memory (the default record):
    # a failure never reaches a request, and what happened meanwhile is still shown here.

    async def record_invalidation(self, invalidation: Invalidation) -> None:
        async def op(state: _LoopState) -> None:
            await self._activity_keys.record(state.client, invalidation)

        if isinstance(await self._call(op, "record_invalidation"), _Down):
            await super().record_invalidation(invalidation)

    async def add_activity(self, report: ActivityReport, now: float) -> None:
        async def op(state: _LoopState) -> None:
            await self._activity_keys.add(state.client, report)

        if isinstance(await self._call(op, "add_activity"), _Down):
            await super().add_activity(report, now)

    async def activity(self, now: float) -> Activity:
        async def op(state: _LoopState) -> Activity:
            return await self._activity_keys.read(state.client, now)

        result = await self._call(op, "activity")
        if isinstance(result, _Down):
            return await super().activity(now)
        return result

    # -- lifecycle ------------------------------------------------------------------------

    async def flush_queued(self, timeout: float = EXIT_FLUSH_WAIT) -> list[str]:
        """Write the invalidations queued during an outage now, trying for ``timeout``
        seconds at most; returns the tags still not written."""
        if not self._outage.queued():
            return []
        state = self._state()
        publish = functools.partial(self._publish_tags, state)
        try:
            await asyncio.wait_for(self._outage.flush_now(state.client.ping, publish), timeout)
        except _GIVE_UP_ERRORS:
            pass
        return self._outage.queued()

    def _report_lost(self, left: list[str]) -> None:
        """Name the invalidations a closing handler or an ending process never wrote."""
        if left:
            named = ", ".join(left[:20]) + (f" and {len(left) - 20} more" if len(left) > 20 else "")
            logger.error(
                "pyisr: Redis at %s is still unreachable: the invalidations of %d tag(s) made during "
                "the outage never reached it and are lost with this process (%s). Revalidate them "
                "again once Redis is back (pyisr.revalidate_tag, or `manage.py pyisr revalidate --tag`)",
                redact_url(self._url),
                len(left),
                named,
            )

    async def close(self) -> None:
        """Write what an outage left queued (for a few seconds at most), stop the
        subscriber and probe tasks and close this handler's clients."""
        if not self._closed:
            self._report_lost(await self.flush_queued())
        self._closed = True
        current = asyncio.get_running_loop()
        for loop, state in self._states.pop_all():
            if loop is current:
                await self._close_state(state)
            elif loop.is_running() and not loop.is_closed():
                # Another thread's loop (the sync bridge): close there, but never wait long,
                # since that loop may itself be waiting on this one.
                future = asyncio.run_coroutine_threadsafe(self._close_state(state), loop)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.wrap_future(future), 1.0)

    async def _close_state(self, state: _LoopState) -> None:
        for task in (state.subscriber, state.probe):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if state.client is not self._client:
            with contextlib.suppress(Exception):
                await aclose(state.client)


def _flush_at_exit(ref: weakref.ref[RedisCache]) -> None:
    cache = ref()
    if cache is None or cache._closed or not cache._outage.queued():
        return
    with contextlib.suppress(Exception):  # an exit never fails for this
        cache._report_lost(asyncio.run(cache.flush_queued()))


def _glob_escape(text: str) -> str:
    """``text`` as a literal inside a Redis SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
