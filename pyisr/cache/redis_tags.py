"""``RedisCache``'s copy of the tag manifest, and what keeps it in step with Redis.

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

Merging is idempotent and a tag's time is only ever raised (:class:`TagTimes`), so a
message that arrives after a resync which already included it changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from pyisr.cache.redis_connection import aclose
from pyisr.cache.tags import TagTimes

logger = logging.getLogger("pyisr.cache")


def as_time(value: Any) -> float | None:
    """A manifest value as a time; ``None`` for a missing or hand-mangled one."""
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


class TagMirror:
    """This instance's copy of the tag manifest, with a change log for ``tag_changes``.

    Shared by every event loop that uses the handler (hence the lock). A cursor is
    ``(epoch, position in the log)``; compacting the log starts a new epoch, and an
    old-epoch cursor simply gets everything again (correct, just larger).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.times = TagTimes()
        self._log: list[str] = []
        self._epoch = secrets.randbits(31)

    def __len__(self) -> int:
        return len(self.times)

    def merge(self, times: Mapping[str, float]) -> None:
        """Raise each tag to the later of the two times (never lower one)."""
        with self._lock:
            self._log.extend(self.times.merge(times))
            if len(self._log) > 2 * len(self.times) + 1024:
                self._log = list(self.times)
                self._epoch += 1

    def get(self, tags: Iterable[str]) -> dict[str, float]:
        return self.times.pick(tags)

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


class MirrorSync:
    """Keeps a :class:`TagMirror` honest: pub/sub messages, counter checks, resyncs.

    It owns no connection: the handler passes in how to read the counter, take a
    snapshot and open a subscription, each going through its outage handling.
    """

    def __init__(self, mirror: TagMirror, *, resync_interval: float, seq_check_interval: float) -> None:
        self.mirror = mirror
        self.resync_interval = resync_interval
        self.seq_check_interval = seq_check_interval
        self._last_seq: int | None = None
        self._need_resync = True
        self._next_resync = 0.0
        self._next_seq_check = 0.0
        self._seq_ahead: int | None = None
        #: Event loops whose subscriber is currently subscribed.
        self._subscribed = 0
        self._lock = threading.Lock()

    @property
    def subscribed(self) -> bool:
        """True while at least one event loop's subscriber is subscribed."""
        return self._subscribed > 0

    def request_resync(self) -> None:
        """Resync at the next chance: messages may have been missed (e.g. during an outage)."""
        self._need_resync = True

    async def keep_honest(
        self,
        resync: Callable[[], Awaitable[object]],
        read_counter: Callable[[], Awaitable[int | None]],
    ) -> None:
        """Resync when due, or when the counter in Redis says a message was missed.

        ``read_counter`` returns ``None`` when Redis could not be asked.
        """
        now = time.monotonic()
        if self._need_resync or now >= self._next_resync:
            await resync()
            return
        if now < self._next_seq_check:
            return
        self._next_seq_check = now + self.seq_check_interval
        remote = await read_counter()
        if remote is None:
            return
        last = self._last_seq
        if last is None or remote < last:
            # Never synced, or Redis lost its data (restart, flush): start again.
            await resync()
        elif remote > last:
            if self._seq_ahead is not None and last < self._seq_ahead:
                # Messages up to what we saw last time should have arrived by now.
                await resync()
            else:
                self._seq_ahead = remote
        else:
            self._seq_ahead = None

    async def resync(self, snapshot: Callable[[], Awaitable[tuple[int, list[Any]]]]) -> None:
        """Merge an atomic snapshot of the manifest, and adopt its counter as ours."""
        # Cleared first: a resubscription while the snapshot is read asks for another.
        self._need_resync = False
        try:
            seq, flat = await snapshot()
        except BaseException:
            self._need_resync = True
            raise
        times = {
            flat[i].decode("utf-8", "surrogatepass"): as_time(flat[i + 1]) for i in range(0, len(flat) - 1, 2)
        }
        self.mirror.merge({tag: at for tag, at in times.items() if at is not None})
        self._last_seq = seq
        self._seq_ahead = None
        now = time.monotonic()
        self._next_resync = now + self.resync_interval
        self._next_seq_check = now + self.seq_check_interval

    def on_message(self, data: bytes) -> None:
        """Apply one invalidation message; a gap in its counter asks for a resync."""
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
        self.mirror.merge(dict.fromkeys(tags, at))
        last = self._last_seq
        if last is not None and seq:
            if seq == last + 1:
                self._last_seq = seq
            elif seq > last + 1:
                self._need_resync = True

    async def subscribe_forever(
        self,
        connect: Callable[[], Awaitable[tuple[Any, Any]]],
        channel: str,
        *,
        retry_interval: float,
        closed: Callable[[], bool],
    ) -> None:
        """Feed the mirror from ``channel``; reconnect (and resync) after errors, until ``closed()``.

        ``connect`` returns ``(pubsub, client to close or None)``.
        """
        while not closed():
            pubsub = client = None
            subscribed = False
            try:
                pubsub, client = await connect()
                await pubsub.subscribe(channel)
                while not closed():
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
                        self.on_message(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: wait, reconnect, resync
                if subscribed:
                    subscribed = False
                    self._count_subscribed(-1)
                logger.debug("pyisr: Redis subscriber error (%s); reconnecting", exc)
                await asyncio.sleep(retry_interval)
            finally:
                if subscribed:
                    self._count_subscribed(-1)
                with contextlib.suppress(Exception):
                    if pubsub is not None:
                        await aclose(pubsub)
                    if client is not None:
                        await aclose(client)

    def _count_subscribed(self, delta: int) -> None:
        with self._lock:
            self._subscribed += delta
