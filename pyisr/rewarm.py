"""Hottest-first re-warm: after a wide invalidation, popular pages are rendered again
in the background, before their next visitor asks for them.

Why: ``revalidate_tag("posts")`` marks every page carrying the tag at once, and each
then waits for a fresh render at its next visit. On a busy site the popular pages are
asked for again within seconds, and each of those first visitors pays for a render (or
a STALE answer, for a tag marked stale). The re-warmer renders the most requested of
them first, at a bounded rate, so they are fresh again before anyone waits; pages
nobody asks for stay lazy and render at their next visit, as before.

What starts a run:

* an invalidation this engine made (:meth:`Engine.on_invalidation`) of kind ``tag``,
  ``page`` (a route's pages) or ``layout`` (a subtree): not ``path`` (one page, rendered
  at its next visit) nor ``regenerate`` (``revalidate(path)`` rendered it already);
* one another process made (a script, ``pyisr revalidate``, another instance), seen by
  polling the store's tag changes every second (:meth:`CacheHandler.tag_changes`: a
  ``stat`` and an empty read of the file-system tag log, the pub/sub-fed mirror for
  Redis: ~10 µs when nothing changed; reading the activity record instead parses its
  whole hits file each time, ~10 ms of CPU for 10,000 keys). A change's kind is read
  from its tag: a path tag (``_pyisr:path:``) is one page and starts nothing; any other
  tag is wide. Changes this process saw already, or
  older than :data:`HORIZON` (a compacted log or a resynced mirror lists every tag
  again), start nothing. The run waits (:data:`CATCH_UP` at most) until this process's
  view of the tag times shows the change: the engine decides by that view, and a
  memory tier mirrors another process's invalidations only within its refresh.

A run (:meth:`Rewarmer._run`) goes through the keys by recent hits, most first: this
process's own, each hit counting half every ten minutes (:mod:`pyisr.recent_hits`; with
a load balancer, one process's traffic is a fair sample of the site's), then, for keys
it has not served lately, the store's record of every process's hits since the build.
It re-renders those whose stored entry one of its tags invalidated or marked stale
and that a resolver knows (:meth:`Engine.resolve`), at most :data:`MAX_RENDERS` of them
and never more than ``rate`` starts per second. Each is :meth:`Engine.rewarm`: the
engine's single flight and the store's lock, so a key another process is rendering is
skipped and one it rendered meanwhile adopted, never rendered twice; a key that is
fresh by then is skipped. Renders run alongside requests, never in the way of one:
they start only while two render slots are free, hold at most half of them, and never
take the last free one (:meth:`RenderSlots.acquire` ``spare``); the run yields to the
event loop between keys. A newer invalidation supersedes a running run: it is
cancelled (renders already started finish) and a new one starts from the hottest key,
with the older run's tags too, so what it left is still covered and what it rendered
is skipped as fresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyisr.cache.entry import CacheEntry, EntryKind
from pyisr.cache.tags import PATH_TAG, STALE_TAG, with_stale_tags
from pyisr.events import REPORT_EVERY

if TYPE_CHECKING:
    from pyisr.cache.activity import Invalidation
    from pyisr.engine import Engine
    from pyisr.render import RenderFn, RenderPolicy

logger = logging.getLogger("pyisr")

#: Re-warm renders started per second per process when nothing says otherwise
#: (``rewarm_rate`` of ``pyisr.toml``, Django's ``PYISR``, ``configure()``, the middleware).
DEFAULT_RATE = 20.0
#: How many worker processes share one instance's rate (``pyisr start --workers N`` sets it).
WORKERS_ENV = "PYISR_START_WORKERS"
#: Invalidation kinds that touch many entries, and so start a run.
WIDE_KINDS = frozenset({"tag", "page", "layout"})
#: Re-warm renders started per run at most (the hottest candidates).
MAX_RENDERS = 1000
#: Keys looked at per run at most (the store keeps the hits of this many).
MAX_EXAMINED = 10_000
#: Seconds between two looks at the store's tag changes (other processes' invalidations).
POLL_EVERY = 1.0
#: An invalidation first seen this many seconds after it was made starts nothing: its
#: pages have had visitors since (and a re-read log or mirror lists every tag again).
HORIZON = 60.0
#: Tag times closer than this are the same invalidation (seen by the listener and the poll).
SAME_TIME = 1e-3
#: Seconds the store's hit counts are reused between runs (processes report every few).
HITS_FRESH_FOR = REPORT_EVERY
#: Seconds between two looks at the render slots while too few are free.
SLOT_WAIT = 0.05
#: Tags a run carries at most (a superseded run's join the next one's; the oldest go first).
MAX_RUN_TAGS = 1000
#: Seconds a run waits for this process's view of the tag times to show the invalidation
#: that started it (a memory tier mirrors another process's within its refresh, 0.5 s).
CATCH_UP = 2.0


@dataclass
class RunReport:
    """What one run did (logged when it ends; tests and tools read it)."""

    tags: tuple[str, ...]
    #: Keys looked at, hottest first.
    examined: int = 0
    #: Keys whose re-warm started, in order (each one paced by the rate).
    started: list[str] = field(default_factory=list)
    #: Fresh again: rendered here, or adopted from another process that rendered it.
    rendered: int = 0
    #: Nothing done: another process was rendering it, or it needed nothing by then.
    skipped: int = 0
    #: The render failed: the last good entry stays, marked with the failure.
    failed: int = 0
    #: Invalidated, but no resolver knows the key (it renders at its next visit).
    unknown: int = 0
    #: A newer invalidation cancelled it.
    superseded: bool = False
    done: bool = False


def process_share(rate: float) -> float:
    """One worker process's part of an instance's ``rewarm_rate``: ``pyisr start
    --workers 4`` at 20 pages a second re-warms 5 a second in each worker, so the instance
    renders 20 a second at most whatever its number of workers."""
    try:
        workers = int(os.environ.get(WORKERS_ENV) or 1)
    except ValueError:
        workers = 1
    return rate / max(1, workers)


def is_wide_tag(tag: str) -> bool:
    """Whether revalidating ``tag`` (as a store records it) may touch many entries.

    Path tags name one entry; every other tag (a user's, a route's, a layout's, any of
    them marked stale) may be carried by any number of pages.
    """
    return not base_tag(tag).startswith(PATH_TAG)


def base_tag(tag: str) -> str:
    """The tag a stale mark (``revalidate_tag(tag, stale=True)``) was recorded for."""
    return tag[len(STALE_TAG) :] if tag.startswith(STALE_TAG) else tag


def touched(entry: CacheEntry, times: Mapping[str, float]) -> bool:
    """Whether ``times`` (some tags' and their stale marks') invalidate or mark ``entry``."""
    return entry.is_invalidated(times) or entry.is_marked_stale(times)


class Rewarmer:
    """Re-renders the hottest invalidated pages of one engine (see the module docstring).

    ``rate`` is re-warm renders started per second at most (``rewarm_rate``; 0: off).
    ``clock`` and ``sleep`` pace the starts (tests pass fake ones); ``poll_every`` is how
    often other processes' invalidations are looked for (``None``: never).
    """

    def __init__(
        self,
        engine: Engine,
        rate: float,
        *,
        limit: int = MAX_RENDERS,
        poll_every: float | None = POLL_EVERY,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not rate >= 0:
            raise ValueError(f"rewarm rate must be >= 0 pages per second, not {rate!r}")
        self.engine = engine
        self.rate = rate
        self.limit = limit
        self.poll_every = poll_every
        self.clock = clock
        self.sleep = sleep
        #: The last run, finished or not (``None`` before the first).
        self.last: RunReport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listening = False
        self._stopped = False
        self._run_task: asyncio.Task[None] | None = None
        self._poller: asyncio.Task[None] | None = None
        #: Tags (base names) of the run in progress, oldest first.
        self._tags: dict[str, None] = {}
        #: The tag times (as recorded) that started it: the run waits until it sees them.
        self._known: dict[str, float] = {}
        #: Recorded tag name -> the latest time of it this process acted on (or ignored).
        self._seen: dict[str, float] = {}
        self._cursor: Any = None
        self._baseline = False
        self._next_start = float("-inf")
        self._store_hits: tuple[float, dict[str, int]] | None = None

    @property
    def enabled(self) -> bool:
        """Off at rate 0, and with one render slot (the last free slot is never taken)."""
        return self.rate > 0 and self.engine.slots.size >= 2

    # -- starting and stopping ----------------------------------------------------------------

    def start(self) -> None:
        """Listen for invalidations and poll for other processes' (on the running loop)."""
        if not self.enabled:
            if self.rate > 0:
                logger.info("re-warming is off: it needs render_concurrency >= 2 (one slot stays free)")
            return
        self._loop = asyncio.get_running_loop()
        self._stopped = False
        if not self._listening:
            self.engine.on_invalidation(self.notice)
            self._listening = True
        if self.poll_every is not None and self._poller is None:
            self._poller = self._loop.create_task(self._poll_forever())

    async def stop(self) -> None:
        """Stop polling and the run in progress (renders already started finish: ``drain``)."""
        self._stopped = True
        tasks = [t for t in (self._poller, self._run_task) if t is not None]
        self._poller = self._run_task = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._tags.clear()
        self._known.clear()

    async def idle(self) -> None:
        """Wait until no run is in progress (one that supersedes another included)."""
        while self._run_task is not None and not self._run_task.done():
            await asyncio.gather(self._run_task, return_exceptions=True)

    # -- what starts a run --------------------------------------------------------------------

    def notice(self, invalidation: Invalidation) -> None:
        """The engine's listener: a wide invalidation this process made starts a run.

        Called on whichever loop made it (the sync API's bridge loop too): the run starts
        on the re-warmer's own loop.
        """
        if self._stopped or self._loop is None or invalidation.kind not in WIDE_KINDS:
            return
        names = [STALE_TAG + t if invalidation.stale else t for t in invalidation.tags]
        times = dict.fromkeys(names, invalidation.at)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._consider(times, wide=lambda _tag: True)
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed: nothing to re-warm
                self._loop.call_soon_threadsafe(self._consider, times, lambda _tag: True)

    async def poll(self) -> None:
        """Look once at the store's tag changes; a wide one made elsewhere starts a run.

        The first look only notes where the store is: what happened before is not ours.
        """
        changes = await self.engine.handler.tag_changes(self._cursor)
        if changes is None:
            self.poll_every = None  # the store cannot list changes: only our own are seen
            return
        self._cursor, times = changes
        if not self._baseline:
            self._baseline = True
            return
        if times:
            self._consider(times, wide=is_wide_tag)

    async def _poll_forever(self) -> None:
        while self.poll_every is not None:
            try:
                await self.poll()
            except Exception as exc:  # noqa: BLE001 - the next look may work; serving goes on
                logger.debug("re-warm: looking for invalidations failed: %s: %s", type(exc).__name__, exc)
            if self.poll_every is None:
                return
            await asyncio.sleep(self.poll_every)

    def _consider(self, times: Mapping[str, float], wide: Callable[[str], bool]) -> None:
        """Start a run for the recorded tag times not seen yet, if any is wide and recent."""
        if self._stopped:
            return
        now = self.engine.clock()
        oldest = now - HORIZON
        new: dict[str, float] = {}
        for name, at in times.items():
            if at < oldest or at <= self._seen.get(name, float("-inf")) + SAME_TIME:
                continue
            self._seen[name] = at
            if wide(name):
                new[name] = at
        if len(self._seen) > MAX_RUN_TAGS:
            self._seen = {name: at for name, at in self._seen.items() if at >= oldest}
        if new:
            self._begin(new)

    def _begin(self, times: Mapping[str, float]) -> None:
        """Start a run for the tags of ``times`` (as recorded), superseding the one in
        progress, whose tags it keeps."""
        for name, at in times.items():
            tag = base_tag(name)
            self._tags.pop(tag, None)
            self._tags[tag] = None
            self._known.pop(name, None)
            self._known[name] = at
        while len(self._tags) > MAX_RUN_TAGS:
            del self._tags[next(iter(self._tags))]
        while len(self._known) > MAX_RUN_TAGS:
            del self._known[next(iter(self._known))]
        if self._run_task is not None and not self._run_task.done():
            self._run_task.cancel()
            if self.last is not None:
                self.last.superseded = True
        assert self._loop is not None
        report = self.last = RunReport(tuple(self._tags))
        self._run_task = self._loop.create_task(self._run(report, dict(self._known)))

    # -- a run --------------------------------------------------------------------------------

    async def _run(self, report: RunReport, known: Mapping[str, float]) -> None:
        me = asyncio.current_task()
        running: set[asyncio.Task[None]] = set()
        began = time.perf_counter()
        try:
            handler = self.engine.handler
            times = await self._tag_times(report.tags, known)
            hottest = await self._hottest() if times else []
            for key in hottest:
                if len(report.started) >= self.limit:
                    break
                await asyncio.sleep(0)  # a run never holds the loop: requests go first
                report.examined += 1
                entry = await handler.get(key)
                if entry is None or entry.kind is EntryKind.DATA or not touched(entry, times):
                    continue
                found = await self.engine.resolve(key)
                if found is None:
                    report.unknown += 1
                    continue
                await self._room(running)
                await self._pace()
                report.started.append(found[0])
                one = asyncio.get_running_loop().create_task(self._one(report, *found))
                running.add(one)
                one.add_done_callback(running.discard)
            if running:
                await asyncio.gather(*running)
            report.done = True
        finally:
            for one in running:
                one.cancel()  # the renders themselves go on (the engine's flights)
            if self._run_task is me and not report.superseded:
                self._tags.clear()
                self._known.clear()
            self._log(report, time.perf_counter() - began)

    async def _tag_times(self, tags: tuple[str, ...], known: Mapping[str, float]) -> Mapping[str, float]:
        """The times of ``tags`` and their stale marks, once this process's view of them
        (what the engine decides by) shows the invalidations ``known`` started the run with.

        Another process's invalidation reaches the store first: a memory tier in front of
        it mirrors the tag times within its refresh, and until then the engine would
        answer (and re-warm) by the old ones.
        """
        names = with_stale_tags(tags)
        deadline = time.monotonic() + CATCH_UP
        while True:
            times = await self.engine.handler.tag_times(names)
            behind = any(times.get(name, float("-inf")) < at - SAME_TIME for name, at in known.items())
            if not behind or time.monotonic() >= deadline:
                return times
            await asyncio.sleep(SLOT_WAIT)

    async def _one(self, report: RunReport, key: str, render: RenderFn, policy: RenderPolicy) -> None:
        try:
            made = await self.engine.rewarm(key, render, policy)
        except Exception:  # noqa: BLE001 - logged and recorded by the engine; the run goes on
            report.failed += 1
            return
        if made is None or made.skipped:
            report.skipped += 1
        else:
            report.rendered += 1

    async def _pace(self) -> None:
        """Wait for the next start allowed by the rate (starts are ``1 / rate`` apart)."""
        now = self.clock()
        if now < self._next_start:
            await self.sleep(self._next_start - now)
            now = self.clock()
        self._next_start = max(now, self._next_start) + 1.0 / self.rate

    async def _room(self, running: set[asyncio.Task[None]]) -> None:
        """Wait until a re-warm render may start: two slots free, half at most re-warming."""
        slots = self.engine.slots
        most = max(1, slots.size // 2)
        while True:
            if len(running) >= most:
                await asyncio.wait(set(running), return_when=asyncio.FIRST_COMPLETED)
            elif slots.size - slots.busy() < 2:
                await self.sleep(SLOT_WAIT)
            else:
                return

    async def _hottest(self) -> list[str]:
        """Keys hottest first: by this process's recent hits (pyisr.recent_hits), then, for
        keys it has not served lately (a process just started), by the store's record of
        every process's hits since the build."""
        recent = self.engine.events.recent_hits()
        now = self.clock()
        if self._store_hits is None or now - self._store_hits[0] >= HITS_FRESH_FOR:
            try:
                activity = await self.engine.handler.activity(self.engine.clock())
                self._store_hits = (now, activity.hits)
            except Exception as exc:  # noqa: BLE001 - this process's own counts still order the run
                logger.debug("re-warm: reading the store's hits failed: %s: %s", type(exc).__name__, exc)
                self._store_hits = (now, {})
        stored = self._store_hits[1]
        keys = set(recent).union(stored)
        return heapq.nsmallest(MAX_EXAMINED, keys, key=lambda k: (-recent.get(k, 0.0), -stored.get(k, 0), k))

    @staticmethod
    def _log(report: RunReport, seconds: float) -> None:
        if not report.started and not report.unknown:
            return
        what = "superseded by a newer invalidation" if report.superseded else "done"
        logger.info(
            "re-warm after %s %s in %.1fs: %d fresh again, %d skipped (rendered elsewhere or "
            "fresh by then), %d failed, %d unknown to every resolver; %d hot keys looked at",
            " ".join(report.tags)[:200],
            what,
            seconds,
            report.rendered,
            report.skipped,
            report.failed,
            report.unknown,
            report.examined,
        )


# -- re-warming for apps with no lifespan (Django, Flask) ------------------------------------

#: The re-warmers running on pyisr's bridge loop in this process, by engine.
_background: weakref.WeakKeyDictionary[Engine, Rewarmer] = weakref.WeakKeyDictionary()
_background_lock = threading.Lock()


def rewarm_in_background(engine: Engine) -> None:
    """Re-warm ``engine``'s pages from now on in this process, on pyisr's bridge loop,
    at ``engine.rewarm_rate`` (nothing at 0, an engine's default when made by hand).

    Django and Flask views call it as they serve an ``@isr`` request: those apps have no
    start-up that runs only in a process that serves (``manage.py migrate`` imports the
    same app), and the first request is the first sure sign of one. The bridge loop is
    where their requests, regenerations and single-flight state already live. Repeat
    calls cost a dictionary lookup; after a ``fork`` (gunicorn's pre-loaded workers) the
    child starts its own.
    """
    if engine.rewarm_rate <= 0 or engine in _background:
        return
    from pyisr.runtime import bridge

    with _background_lock:
        if engine in _background:
            return
        rewarmer = _background[engine] = Rewarmer(engine, engine.rewarm_rate)
    bridge.loop().call_soon_threadsafe(rewarmer.start)


def stop_rewarm_in_background(engine: Engine) -> None:
    """Stop the re-warmer :func:`rewarm_in_background` started for ``engine``, if any
    (a test's engine going away; the process's own runs until the process ends)."""
    from pyisr.runtime import run_sync

    with _background_lock:
        rewarmer = _background.pop(engine, None)
    if rewarmer is not None:
        run_sync(rewarmer.stop())


def background_rewarmer(engine: Engine) -> Rewarmer | None:
    """The re-warmer :func:`rewarm_in_background` started for ``engine`` (tests, tools)."""
    return _background.get(engine)


def _forget_background_after_fork() -> None:
    """In a forked child the bridge loop those re-warmers ran on is gone: they stop
    listening, and the child's first request starts its own."""
    for rewarmer in list(_background.values()):
        rewarmer._stopped = True
    _background.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_background_after_fork)
