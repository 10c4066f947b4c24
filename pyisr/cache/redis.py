"""``RedisCache``: one cache shared by many instances, through Redis (``pip install 'pyisr[redis]'``).

Key layout (``ns`` is ``{prefix}:{build_id}``, so two deployments never read each
other's pages; ``h`` is the SHA-1 of the cache key)::

    {ns:h}:e        HASH  key, created_at, meta (compact JSON), body (raw bytes)
    {ns:h}:l        STRING  regeneration lock: a random token, with PX expiry
    {ns}:tags       HASH  tag -> time it was last revalidated (the tag manifest)
    {ns}:tagseq     STRING  counter bumped by every revalidation
    {ns}:inval      pub/sub channel: {"seq": n, "tags": [...], "at": t}

The braces are Redis Cluster hash tags: an entry and its lock share a slot, and so do
the manifest and its counter, so every script touches one slot and the layout works
unchanged with redis-py's cluster client (``redis+cluster://host:port``).

Writes that must be atomic are Lua scripts (sent by SHA, re-sent on ``NOSCRIPT``):
storing an entry compares ``created_at`` and writes in one step (the fencing rule of
:meth:`CacheHandler.set`); revalidating raises each tag's time to ``max(old, at)``,
bumps the counter and publishes, in one step, so an instance cannot record an
invalidation and die before announcing it.

Each instance mirrors the manifest in memory, fed by a pub/sub subscriber, so the
memory tier's ``tag_changes`` polls cost no round trip. Pub/sub is at-most-once, so
the manifest in Redis stays the truth and a missed message is caught by:

* a full resync (an atomic snapshot of the manifest and its counter) on the first
  call, whenever the subscription (re)connects and after an outage;
* the counter: a message whose ``seq`` skips a number, or a counter read (at most
  once per ``seq_check_interval``) that is lower than ours (Redis restarted) or still
  ahead of us one interval later, triggers a resync, so a lost message costs at most
  about two intervals;
* a full resync every ``resync_interval`` seconds (default 30) as a backstop for
  writes made by hand, outside the scripts.

Degraded mode: a connection error or timeout marks Redis as down, logs one warning
and from then on every call fails fast (no request waits for a timeout): ``get``
returns ``None``, ``set`` ``False``, tag reads come from the mirror, the lock is an
in-process one and invalidations are queued. One probe per event loop retries at most
every ``retry_interval`` seconds; when Redis answers, the queued invalidations are
written, the mirror is resynced, and one info line is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from pyisr.cache.entry import CacheEntry
from pyisr.cache.handler import CacheHandler

logger = logging.getLogger("pyisr.cache")

T = TypeVar("T")

#: Errors that mean "Redis is unreachable or not answering": they switch to degraded mode.
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ClusterError,
    redis_errors.RedisClusterException,
    redis_errors.TryAgainError,
    redis_errors.ReadOnlyError,  # a failover in progress: the old primary is now a replica
    TimeoutError,
    OSError,
)
_PROBE_ERRORS: tuple[type[BaseException], ...] = (*OUTAGE_ERRORS, redis_errors.RedisError)

#: Query parameters of a cache URL that configure pyisr, not redis-py.
URL_OPTIONS = ("prefix", "build_id", "socket_timeout", "retry_interval", "resync_interval", "entry_ttl")

DEFAULT_BUILD_ID = "default"
LOCAL_TOKEN_PREFIX = "local:"

# KEYS[1] entry hash; ARGV: created_at, meta, body, key, ttl in ms (0 = keep for ever).
_SET_ENTRY = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'created_at') or '')
if cur and cur > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'key', ARGV[4], 'created_at', ARGV[1], 'meta', ARGV[2], 'body', ARGV[3])
local ttl = tonumber(ARGV[5])
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) else redis.call('PERSIST', KEYS[1]) end
return 1
"""

# KEYS[1] manifest, KEYS[2] counter; ARGV: channel, at, payload JSON {"tags","at"}, tags...
_REVALIDATE = """
local at = tonumber(ARGV[2])
for i = 4, #ARGV do
  local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '')
  if (not cur) or cur < at then redis.call('HSET', KEYS[1], ARGV[i], ARGV[2]) end
end
local seq = redis.call('INCR', KEYS[2])
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

_SCRIPTS = {"set": _SET_ENTRY, "revalidate": _REVALIDATE, "snapshot": _SNAPSHOT, "release": _RELEASE}


class RedisUnavailableError(ConnectionError):
    """Raised only by listing (``keys``), where an empty answer would mislead a user."""


class _Down:
    """Marker returned by :meth:`RedisCache._call` when Redis could not be used."""


_DOWN = _Down()


def _redact(url: str) -> str:
    """The URL without its password, for logs and the health endpoint."""
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    user = parsed.username or ""
    host = parsed.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parsed.port}" if parsed.port else "")
    return urlunparse(parsed._replace(netloc=netloc))


def _split_url(url: str) -> tuple[str, bool, dict[str, str]]:
    """``(redis-py URL, is_cluster, pyisr options)`` from a cache URL."""
    parsed = urlparse(url)
    scheme = parsed.scheme
    cluster = scheme.endswith("+cluster")
    if cluster:
        scheme = scheme[: -len("+cluster")]
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            f"Unsupported Redis URL {_redact(url)!r}: use redis://HOST:PORT/DB, rediss://... "
            "or redis+cluster://HOST:PORT"
        )
    ours: dict[str, str] = {}
    rest: list[tuple[str, str]] = []
    for name, value in parse_qsl(parsed.query, keep_blank_values=True):
        if name in URL_OPTIONS:
            ours[name] = value
        else:
            rest.append((name, value))
    clean = urlunparse(parsed._replace(scheme=scheme, query=urlencode(rest)))
    return clean, cluster, ours


def _check_name(value: str, what: str, forbidden: str = "{}") -> str:
    """Reject names that would break the hash-tag layout (braces) or be ambiguous."""
    if not value or any(c in value for c in forbidden) or any(c.isspace() for c in value):
        shown = " or ".join(repr(c) for c in forbidden)
        raise ValueError(
            f"Redis cache {what} {value!r} must be non-empty, without spaces, {shown} (e.g. {what}=mysite)"
        )
    return value


class _TagMirror:
    """This instance's copy of the tag manifest, with a change log for ``tag_changes``.

    Shared by every event loop that uses the handler (hence the lock). A cursor is
    ``(epoch, position in the log)``; compacting the log starts a new epoch, and an
    old-epoch cursor simply gets everything again (correct, just larger).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.times: dict[str, float] = {}
        self._log: list[str] = []
        self._epoch = secrets.randbits(31)

    def __len__(self) -> int:
        return len(self.times)

    def merge(self, times: Mapping[str, float]) -> None:
        """Raise each tag to the later of the two times (never lower one)."""
        with self._lock:
            for tag, at in times.items():
                if at > self.times.get(tag, float("-inf")):
                    self.times[tag] = at
                    self._log.append(tag)
            if len(self._log) > 2 * len(self.times) + 1024:
                self._log = list(self.times)
                self._epoch += 1

    def get(self, tags: Iterable[str]) -> dict[str, float]:
        times = self.times
        return {t: times[t] for t in tags if t in times}

    def changes_since(self, cursor: Any) -> tuple[tuple[int, int], dict[str, float]]:
        with self._lock:
            end = len(self._log)
            new_cursor = (self._epoch, end)
            valid = (
                isinstance(cursor, tuple)
                and len(cursor) == 2
                and cursor[0] == self._epoch
                and isinstance(cursor[1], int)
                and 0 <= cursor[1] <= end
            )
            if not valid:
                return new_cursor, dict(self.times)
            return new_cursor, {t: self.times[t] for t in self._log[cursor[1] :]}


@dataclass
class _LoopState:
    """What one event loop owns: redis-py clients are bound to the loop that made them."""

    client: Any
    scripts: dict[str, Any] = field(default_factory=dict)
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
    * ``entry_ttl`` (none): let Redis expire entries, e.g. so old builds' pages go away;
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
            self._url, self.cluster, options = _split_url(url_or_client)
            parse_url(self._url)  # a malformed URL fails here, not on the first request
            self._client: Any = None
        else:
            self._client = url_or_client
            self.cluster = isinstance(url_or_client, RedisCluster)
            self._url = _describe_client(url_or_client)
        self.prefix = _check_name(prefix if prefix is not None else options.get("prefix", "pyisr"), "prefix")
        self.build_id = _check_name(
            build_id if build_id is not None else options.get("build_id", DEFAULT_BUILD_ID),
            "build_id",
            forbidden="{}:",  # so "prefix:build" names exactly one (prefix, build) pair
        )
        self.socket_timeout = _float(socket_timeout, options.get("socket_timeout"), 0.5)
        self.retry_interval = _float(retry_interval, options.get("retry_interval"), 1.0)
        self.resync_interval = _float(resync_interval, options.get("resync_interval"), 30.0)
        self.seq_check_interval = seq_check_interval
        ttl = _float(entry_ttl, options.get("entry_ttl"), 0.0)
        self.entry_ttl: float | None = ttl or None
        self._client_options = dict(client_options or {})

        self.namespace = f"{self.prefix}:{self.build_id}"
        self._tags_key = f"{{{self.namespace}}}:tags"
        self._seq_key = f"{{{self.namespace}}}:tagseq"
        self.channel = f"{{{self.namespace}}}:inval"

        self._lock = threading.Lock()
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = (
            weakref.WeakKeyDictionary()
        )
        self._closed = False
        # Tag mirror and what keeps it honest.
        self._mirror = _TagMirror()
        self._last_seq: int | None = None
        self._need_resync = True
        self._next_resync = 0.0
        self._next_seq_check = 0.0
        self._seq_ahead: int | None = None
        #: Event loops whose subscriber is currently subscribed.
        self._subscribed = 0
        #: Invalidations made while Redis was down, written when it is back (tag -> time).
        self._pending: dict[str, float] = {}
        # Degraded mode.
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._last_error: str | None = None
        self._outages = 0
        self._error_logged: dict[str, float] = {}

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
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            with self._lock:
                state = self._states.get(loop)
                if state is None:
                    # Forget loops closed without close(): their clients cannot be used again.
                    for dead in [other for other in self._states if other.is_closed()]:
                        del self._states[dead]
                    state = _LoopState(self._client if self._client is not None else self._new_client())
                    self._states[loop] = state
        return state

    def _new_client(self, url: str | None = None, *, cluster: bool | None = None, **extra: Any) -> Any:
        """A client that gives up after one timeout: degraded mode, not retries, handles outages."""
        kwargs: dict[str, Any] = {
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.socket_timeout,
            **self._client_options,
            **extra,
        }
        if self.cluster if cluster is None else cluster:
            # One retry lets the cluster client refresh its slot map after a failover.
            kwargs.setdefault("retry", Retry(NoBackoff(), 1))
            return RedisCluster.from_url(url or self._url, **kwargs)
        # One immediate retry on a broken connection (a pooled socket Redis closed, e.g.
        # after a restart); none on a timeout, which would only double the wait.
        kwargs.setdefault("retry", Retry(NoBackoff(), 1, supported_errors=(redis_errors.ConnectionError,)))
        return Redis.from_url(url or self._url, **kwargs)

    def _script(self, state: _LoopState, name: str) -> Any:
        script = state.scripts.get(name)
        if script is None:
            script = state.scripts[name] = state.client.register_script(_SCRIPTS[name])
        return script

    # -- degraded mode ------------------------------------------------------------------

    @property
    def degraded(self) -> bool:
        """True while Redis is unreachable and this instance serves from memory."""
        return self._down_since is not None

    async def _call(self, fn: Callable[[_LoopState], Awaitable[T]], what: str) -> T | _Down:
        """Run ``fn`` against Redis, or return ``_DOWN`` (fast while degraded, never raising)."""
        state = self._state()
        if self._down_since is not None:
            self._ensure_probe(state)
            return _DOWN
        try:
            return await fn(state)
        except OUTAGE_ERRORS as exc:
            self._went_down(exc, state)
            return _DOWN
        except redis_errors.RedisError as exc:
            # Not an outage (a bad value, OOM, ...): this call falls back, Redis stays in use.
            self._log_error(what, exc)
            return _DOWN

    def _went_down(self, exc: BaseException, state: _LoopState) -> None:
        with self._lock:
            self._last_error = f"{type(exc).__name__}: {exc}"
            first = self._down_since is None
            if first:
                self._down_since = time.monotonic()
                self._retry_at = self._down_since + self.retry_interval
                self._outages += 1
        if first:
            logger.warning(
                "Redis unreachable at %s (%s); serving from memory and rendering locally until it is back",
                _redact(self._url),
                self._last_error,
            )
        self._ensure_probe(state)

    def _ensure_probe(self, state: _LoopState) -> None:
        if self._closed or (state.probe is not None and not state.probe.done()):
            return
        state.probe = asyncio.get_running_loop().create_task(self._probe(state), name="pyisr-redis-probe")

    async def _probe(self, state: _LoopState) -> None:
        """Retry Redis at most every ``retry_interval``; on success flush queued invalidations."""
        while self._down_since is not None and not self._closed:
            await asyncio.sleep(max(0.0, self._retry_at - time.monotonic()))
            if self._down_since is None:
                return
            self._retry_at = time.monotonic() + self.retry_interval
            try:
                await state.client.ping()
                # Invalidations queued while we flush would wait for the next outage if
                # we declared Redis back first: flush until nothing is left.
                while not self._came_back_if_flushed():
                    await self._flush_pending(state)
            except _PROBE_ERRORS as exc:
                self._last_error = f"{type(exc).__name__}: {exc}"

    def _came_back_if_flushed(self) -> bool:
        """Leave degraded mode if no invalidation is still queued; True once Redis is in use."""
        with self._lock:
            if self._down_since is None:
                return True
            if self._pending:
                return False
            down_for = time.monotonic() - self._down_since
            self._down_since = None
            self._need_resync = True
        logger.info("Redis at %s is reachable again after %.1fs of outage", _redact(self._url), down_for)
        return True

    async def _flush_pending(self, state: _LoopState) -> None:
        """Write invalidations queued during an outage (raises if Redis fails meanwhile)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        by_time: dict[float, list[str]] = {}
        for tag, at in pending.items():
            by_time.setdefault(at, []).append(tag)
        try:
            for at, tags in sorted(by_time.items()):
                await self._publish_tags(state, tags, at)
                for tag in tags:
                    del pending[tag]
        finally:
            if pending:
                self._queue(pending)

    def _queue(self, times: Mapping[str, float]) -> None:
        with self._lock:
            for tag, at in times.items():
                if at > self._pending.get(tag, float("-inf")):
                    self._pending[tag] = at

    def _log_error(self, what: str, exc: BaseException) -> None:
        """Warn about a non-outage Redis error, at most once a minute per message."""
        message = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        if now - self._error_logged.get(message, float("-inf")) >= 60:
            self._error_logged[message] = now
            logger.warning("Redis error during %s at %s: %s", what, _redact(self._url), message)

    def health(self) -> dict[str, Any]:
        """Whether Redis is in use, for the health endpoint and monitoring."""
        down = self._down_since
        return {
            "status": "degraded" if down is not None else "ok",
            "degraded": down is not None,
            "down_for": None if down is None else round(time.monotonic() - down, 3),
            "last_error": self._last_error,
            "outages": self._outages,
            "queued_invalidations": len(self._pending),
        }

    def describe(self) -> dict[str, Any]:
        """Handler, URL (no password), namespace and health, for logs and ``/_pyisr/health``."""
        return {
            "handler": self.name,
            "url": _redact(self._url),
            "cluster": self.cluster,
            "prefix": self.prefix,
            "build_id": self.build_id,
            "namespace": self.namespace,
            "tags_mirrored": len(self._mirror),
            "subscribed": self._subscribed > 0,
            **self.health(),
        }

    # -- entries ------------------------------------------------------------------------

    async def get(self, key: str) -> CacheEntry | None:
        """The entry from its hash (one HMGET), or ``None`` if missing, unreadable or Redis is down."""

        async def op(state: _LoopState) -> list[Any]:
            return list(await state.client.hmget(self.entry_key(key), ["meta", "body"]))

        fields = await self._call(op, f"get({key!r})")
        if isinstance(fields, _Down) or fields[0] is None:
            return None
        meta_raw, body = fields
        try:
            meta = json.loads(meta_raw)
            if meta.get("key") != key:
                return None
            return CacheEntry.from_meta(meta, bytes(body or b""))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self._log_error(f"get({key!r}): unreadable entry", exc)
            return None

    async def set(self, entry: CacheEntry) -> bool:
        """Store ``entry`` unless a newer one is stored (atomic compare-and-write in Lua).

        Returns ``False`` when fenced off, or when Redis is down (nothing stored).
        """
        ttl_ms = int(self.entry_ttl * 1000) if self.entry_ttl else 0

        async def op(state: _LoopState) -> Any:
            return await self._script(state, "set")(
                keys=[self.entry_key(entry.key)],
                args=[repr(entry.created_at), entry.meta_bytes(), entry.body, entry.key, ttl_ms],
            )

        result = await self._call(op, f"set({entry.key!r})")
        return not isinstance(result, _Down) and int(result) == 1

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
        state = self._state()
        if self._down_since is not None:
            self._ensure_probe(state)
            raise RedisUnavailableError(f"Redis unreachable at {_redact(self._url)}: {self._last_error}")
        head = "{" + self.namespace + ":"
        pattern = _glob_escape(head) + "*}:e"
        batch: list[Any] = []
        try:
            async for redis_key in state.client.scan_iter(match=pattern, count=500):
                name = redis_key.decode() if isinstance(redis_key, bytes) else str(redis_key)
                # The glob also matches longer namespaces ("pyisr:b1:x"): keep exactly ours.
                if len(name) == len(head) + 40 + 3:
                    batch.append(name)
                if len(batch) >= 200:
                    for key in await self._key_names(state, batch):
                        if key.startswith(prefix):
                            yield key
                    batch = []
            for key in await self._key_names(state, batch):
                if key.startswith(prefix):
                    yield key
        except OUTAGE_ERRORS as exc:
            self._went_down(exc, state)
            raise RedisUnavailableError(f"Redis unreachable at {_redact(self._url)}: {exc}") from exc

    async def _key_names(self, state: _LoopState, redis_keys: list[str]) -> list[str]:
        if not redis_keys:
            return []
        pipe = state.client.pipeline(transaction=False)
        for redis_key in redis_keys:
            pipe.hget(redis_key, "key")
        names = await pipe.execute()
        return [n.decode("utf-8", "surrogatepass") for n in names if n is not None]

    async def clear(self) -> int:
        """Delete every key of this build (entries, locks, manifest); returns how many."""
        state = self._state()
        pattern = _glob_escape("{" + self.namespace + ":") + "*"
        names: list[Any] = [self._tags_key, self._seq_key]
        head = "{" + self.namespace + ":"
        async for redis_key in state.client.scan_iter(match=pattern, count=500):
            name = redis_key.decode() if isinstance(redis_key, bytes) else str(redis_key)
            if len(name) == len(head) + 40 + 3:  # ours, not a longer namespace's
                names.append(name)
        deleted = 0
        for start in range(0, len(names), 500):
            # One DEL per key: keys in different cluster slots cannot share a command.
            pipe = state.client.pipeline(transaction=False)
            for name in names[start : start + 500]:
                pipe.delete(name)
            deleted += sum(int(n) for n in await pipe.execute())
        return deleted

    # -- tags -----------------------------------------------------------------------------

    async def _publish_tags(self, state: _LoopState, tags: list[str], at: float) -> Any:
        payload = json.dumps({"tags": tags, "at": at}, separators=(",", ":"), ensure_ascii=False)
        return await self._script(state, "revalidate")(
            keys=[self._tags_key, self._seq_key], args=[self.channel, repr(at), payload, *tags]
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
            self._queue(times)

    async def tag_times(self, tags: Iterable[str]) -> Mapping[str, float]:
        """When each tag was last revalidated: HMGET of the manifest (the mirror if Redis is down)."""
        wanted = list(dict.fromkeys(tags))
        if not wanted:
            return {}

        async def op(state: _LoopState) -> list[Any]:
            return list(await state.client.hmget(self._tags_key, wanted))

        values = await self._call(op, "tag_times")
        if not isinstance(values, _Down):
            found = {t: _as_time(v) for t, v in zip(wanted, values, strict=True)}
            self._mirror.merge({t: at for t, at in found.items() if at is not None})
        return self._mirror.get(wanted)

    async def tag_changes(self, cursor: Any) -> tuple[Any, Mapping[str, float]] | None:
        """Tag times changed since ``cursor``, from the local mirror (no round trip, usually).

        Starts this loop's subscriber on first use, and resyncs the mirror from Redis
        when it may have missed something (see the module docstring).
        """
        state = self._state()
        self._ensure_subscriber(state)
        if self._down_since is None:
            await self._keep_mirror_honest(state)
        return self._mirror.changes_since(cursor)

    async def _keep_mirror_honest(self, state: _LoopState) -> None:
        now = time.monotonic()
        if self._need_resync or now >= self._next_resync:
            await self._call(self._resync, "tag manifest resync")
            return
        if now < self._next_seq_check:
            return
        self._next_seq_check = now + self.seq_check_interval

        async def op(s: _LoopState) -> Any:
            return await s.client.get(self._seq_key)

        raw = await self._call(op, "tag counter check")
        if isinstance(raw, _Down):
            return
        remote = int(raw or 0)
        last = self._last_seq
        if last is None or remote < last:
            # Never synced, or Redis lost its data (restart, flush): start again.
            await self._call(self._resync, "tag manifest resync")
        elif remote > last:
            if self._seq_ahead is not None and last < self._seq_ahead:
                # Messages up to what we saw last time should have arrived by now.
                await self._call(self._resync, "tag manifest resync")
            else:
                self._seq_ahead = remote
        else:
            self._seq_ahead = None

    async def _resync(self, state: _LoopState) -> None:
        """Merge an atomic snapshot of the manifest, and adopt its counter as ours."""
        self._need_resync = False
        try:
            seq, flat = await self._script(state, "snapshot")(keys=[self._tags_key, self._seq_key])
        except BaseException:
            self._need_resync = True
            raise
        times = {
            flat[i].decode("utf-8", "surrogatepass"): _as_time(flat[i + 1])
            for i in range(0, len(flat) - 1, 2)
        }
        self._mirror.merge({tag: at for tag, at in times.items() if at is not None})
        self._last_seq = int(seq)
        self._seq_ahead = None
        now = time.monotonic()
        self._next_resync = now + self.resync_interval
        self._next_seq_check = now + self.seq_check_interval

    def _on_message(self, data: bytes) -> None:
        try:
            message = json.loads(data)
            at = float(message["at"])
            tags = [t for t in message["tags"] if isinstance(t, str)]
            seq = int(message.get("seq") or 0)
        except (ValueError, KeyError, TypeError) as exc:
            logger.debug("pyisr: ignoring malformed invalidation message %r (%s)", data[:200], exc)
            self._need_resync = True
            return
        # Always merge (merging is idempotent); the counter only detects gaps.
        self._mirror.merge(dict.fromkeys(tags, at))
        last = self._last_seq
        if last is not None and seq:
            if seq == last + 1:
                self._last_seq = seq
            elif seq > last + 1:
                self._need_resync = True

    # -- the subscriber -------------------------------------------------------------------

    def _ensure_subscriber(self, state: _LoopState) -> None:
        if self._closed or (state.subscriber is not None and not state.subscriber.done()):
            return
        state.subscriber = asyncio.get_running_loop().create_task(
            self._subscribe_forever(state), name="pyisr-redis-subscriber"
        )

    async def _pubsub_client(self, state: _LoopState) -> tuple[Any, Any]:
        """``(pubsub, client to close or None)``: a dedicated connection with no read timeout."""
        if self._client is not None:
            return self._client.pubsub(), None
        url = self._url
        if self.cluster:
            # Classic pub/sub is broadcast to every node, so any node will do.
            await state.client.initialize()
            node = state.client.get_random_node()
            parsed = urlparse(url)
            auth = parsed.netloc.rpartition("@")[0]
            netloc = (auth + "@" if auth else "") + f"{node.host}:{node.port}"
            url = urlunparse(parsed._replace(netloc=netloc, path=""))
        # Named, so operators (and tests) can find the subscriber in CLIENT LIST.
        # No retries: a broken subscription comes back through _subscribe_forever, which
        # waits retry_interval between attempts and resyncs the mirror after each one.
        client = self._new_client(
            url,
            cluster=False,
            socket_timeout=None,
            client_name=f"pyisr-sub:{self.namespace}",
            retry=Retry(NoBackoff(), 0),
        )
        return client.pubsub(), client

    async def _subscribe_forever(self, state: _LoopState) -> None:
        """Feed the mirror from the invalidation channel; reconnect (and resync) after errors."""
        while not self._closed:
            pubsub = client = None
            subscribed = False
            try:
                pubsub, client = await self._pubsub_client(state)
                await pubsub.subscribe(self.channel)
                while not self._closed:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        # Also sent when redis-py resubscribes by itself after a reconnect.
                        # Anything published before this point may be missed: resync.
                        self._need_resync = True
                        if not subscribed:
                            subscribed = True
                            self._count_subscribed(+1)
                    elif message["type"] == "message":
                        self._on_message(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: wait, reconnect, resync
                if subscribed:
                    subscribed = False
                    self._count_subscribed(-1)
                logger.debug("pyisr: Redis subscriber error (%s); reconnecting", exc)
                await asyncio.sleep(self.retry_interval)
            finally:
                if subscribed:
                    self._count_subscribed(-1)
                with contextlib.suppress(Exception):
                    if pubsub is not None:
                        await _aclose(pubsub)
                    if client is not None:
                        await _aclose(client)

    def _count_subscribed(self, delta: int) -> None:
        with self._lock:
            self._subscribed += delta

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
            return await self._script(state, "release")(keys=[self.lock_key(key)], args=[token])

        await self._call(op, f"release_lock({key!r})")

    # -- lifecycle ------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop the subscriber and probe tasks and close this handler's clients."""
        self._closed = True
        current = asyncio.get_running_loop()
        with self._lock:
            states = list(self._states.items())
            self._states = weakref.WeakKeyDictionary()
        for loop, state in states:
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
                await _aclose(state.client)


def _float(explicit: float | None, from_url: str | None, default: float) -> float:
    if explicit is not None:
        return float(explicit)
    if from_url is not None and from_url != "":
        try:
            return float(from_url)
        except ValueError:
            raise ValueError(
                f"Redis cache URL option must be a number of seconds, not {from_url!r}"
            ) from None
    return default


def _as_time(value: Any) -> float | None:
    """A manifest value as a time; ``None`` for a missing or hand-mangled one."""
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _glob_escape(text: str) -> str:
    """``text`` as a literal inside a Redis SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _describe_client(client: Any) -> str:
    """A URL-like name for a client object the user passed."""
    try:
        kwargs = client.connection_pool.connection_kwargs
        return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
    except AttributeError:
        return f"<{type(client).__name__}>"


async def _aclose(obj: Any) -> None:
    """``aclose()`` where redis-py has it (>= 5.0.1), else the older ``close()``."""
    closer = getattr(obj, "aclose", None) or obj.close
    result = closer()
    if asyncio.iscoroutine(result):
        await result
