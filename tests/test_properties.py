"""Property tests: the freshness rule against a reference model, and path normalisation."""

from __future__ import annotations

import asyncio
import string
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyisr import (
    CacheEntry,
    CacheHandler,
    Engine,
    MemoryCache,
    MemoryTier,
    Rendered,
    RenderPolicy,
)
from pyisr.paths import BadPath, normalize_path, split_key
from pyisr.site.router import PatternRoute, Router

# =======================================================================================
# (a) The freshness rule
#
# Every handler and the engine share one rule (DESIGN.md, "The cache entry"):
#   stale        iff now >= created_at + revalidate        (revalidate None: never stale)
#   invalidated  iff any tag's revalidation time >= created_at
# and created_at is the clock time at which the render that made the entry *started*.
#
# The model below is that rule plus the state machine around it, written as plainly as
# possible. One "read" at clock time t:
#   - no entry, or an invalidated one -> MISS: render now (blocking), store the result;
#   - a stale entry                    -> STALE: serve the old body, then regenerate; with
#     a fake clock and ``engine.drain()`` after every read, that regeneration happens at
#     the same time t, so the new entry's created_at is t;
#   - otherwise                        -> HIT.
# A render whose revalidate is 0 is never stored (BYPASS when it answered the read).
# "set" re-defines a key (its revalidate and tags) and regenerates it on demand, as
# ``revalidate(path)`` does.
# =======================================================================================

KEYS = ("/a", "/b")
TAGS = ("t1", "t2", "t3")
REVALIDATES = (None, *range(11))
#: Mostly small, so whole-second clock moves often land exactly on created_at + revalidate.
revalidates = st.one_of(st.sampled_from(REVALIDATES), st.sampled_from((1, 2, 3)))


@dataclass
class ModelEntry:
    created_at: float
    revalidate: int | None
    tags: frozenset[str]
    version: int


@dataclass
class Model:
    now: float = 1_000_000.0
    tag_times: dict[str, float] = field(default_factory=dict)
    entries: dict[str, ModelEntry] = field(default_factory=dict)
    definitions: dict[str, tuple[int | None, frozenset[str]]] = field(default_factory=dict)
    renders: dict[str, int] = field(default_factory=dict)

    def definition(self, key: str) -> tuple[int | None, frozenset[str]]:
        return self.definitions.get(key, (None, frozenset()))

    def render(self, key: str) -> ModelEntry:
        self.renders[key] = self.renders.get(key, 0) + 1
        revalidate, tags = self.definition(key)
        made = ModelEntry(self.now, revalidate, tags, self.renders[key])
        if revalidate != 0:
            self.entries[key] = made
        return made

    def stale(self, e: ModelEntry) -> bool:
        return e.revalidate is not None and self.now >= e.created_at + e.revalidate

    def invalidated(self, e: ModelEntry) -> bool:
        return any(t in self.tag_times and self.tag_times[t] >= e.created_at for t in e.tags)

    def read(self, key: str) -> tuple[str, int]:
        e = self.entries.get(key)
        if e is None or self.invalidated(e):
            made = self.render(key)
            return ("BYPASS" if made.revalidate == 0 else "MISS"), made.version
        if self.stale(e):
            self.render(key)
            return "STALE", e.version
        return "HIT", e.version

    def set(self, key: str, revalidate: int | None, tags: frozenset[str]) -> int:
        self.definitions[key] = (revalidate, tags)
        return self.render(key).version

    def revalidate_tag(self, tag: str) -> None:
        self.tag_times[tag] = self.now


Op = tuple[Any, ...]

ops_strategy = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.sampled_from(KEYS), revalidates, st.frozensets(st.sampled_from(TAGS))),
        st.tuples(st.just("read"), st.sampled_from(KEYS)),
        st.tuples(st.just("read"), st.sampled_from(KEYS)),  # reads twice as likely
        st.tuples(st.just("advance"), st.floats(min_value=0, max_value=15, allow_nan=False)),
        # whole seconds, so created_at + revalidate is often hit exactly
        st.tuples(st.just("advance"), st.integers(min_value=0, max_value=3).map(float)),
        st.tuples(st.just("advance"), st.integers(min_value=0, max_value=3).map(float)),
        st.tuples(st.just("revalidate_tag"), st.sampled_from(TAGS)),
    ),
    min_size=3,
    max_size=40,
)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def body_of(key: str, version: int) -> bytes:
    return f"{key} v{version}".encode()


class EngineDriver:
    """Runs the ops through ``Engine.get`` with render callables that count their calls."""

    def __init__(self, handler: CacheHandler, clock: Clock) -> None:
        self.engine = Engine(handler, clock=clock)
        self.definitions: dict[str, tuple[int | None, frozenset[str]]] = {}
        self.renders: dict[str, int] = {}

    def render_for(self, key: str) -> Callable[[], Awaitable[Rendered]]:
        async def render() -> Rendered:
            self.renders[key] = self.renders.get(key, 0) + 1
            return Rendered(body_of(key, self.renders[key]))

        return render

    def policy(self, key: str) -> RenderPolicy:
        revalidate, tags = self.definitions.get(key, (None, frozenset()))
        return RenderPolicy(revalidate=revalidate, tags=tuple(sorted(tags)))

    async def read(self, key: str) -> tuple[str, int]:
        served = await self.engine.get(key, self.render_for(key), self.policy(key))
        await self.engine.drain()
        assert served.entry is not None
        version = int(served.entry.body.decode().rsplit("v", 1)[1])
        return served.status.value, version

    async def set(self, key: str, revalidate: int | None, tags: frozenset[str]) -> int:
        self.definitions[key] = (revalidate, tags)
        entry = await self.engine.revalidate_now(key, self.render_for(key), self.policy(key))
        return int(entry.body.decode().rsplit("v", 1)[1])

    async def revalidate_tag(self, tag: str) -> None:
        await self.engine.revalidate_tag(tag)

    async def close(self) -> None:
        await self.engine.close()


class HandlerDriver:
    """Runs the ops against a handler and ``CacheEntry``'s rule, doing what the engine does."""

    def __init__(self, handler: CacheHandler, clock: Clock) -> None:
        self.handler = handler
        self.clock = clock
        self.definitions: dict[str, tuple[int | None, frozenset[str]]] = {}
        self.renders: dict[str, int] = {}

    async def render(self, key: str) -> CacheEntry:
        self.renders[key] = self.renders.get(key, 0) + 1
        revalidate, tags = self.definitions.get(key, (None, frozenset()))
        entry = CacheEntry(
            key=key,
            body=body_of(key, self.renders[key]),
            created_at=self.clock(),
            revalidate=revalidate,
            tags=tuple(sorted(tags)),
        )
        if revalidate != 0:
            assert await self.handler.set(entry)
        return entry

    async def read(self, key: str) -> tuple[str, int]:
        entry = await self.handler.get(key)
        if entry is not None:
            assert entry.key == key
            invalidated = entry.is_invalidated(await self.handler.tag_times(entry.tags))
        if entry is None or invalidated:
            made = await self.render(key)
            return ("BYPASS" if made.revalidate == 0 else "MISS"), self.renders[key]
        version = int(entry.body.decode().rsplit("v", 1)[1])
        if entry.is_stale(self.clock()):
            await self.render(key)
            return "STALE", version
        return "HIT", version

    async def set(self, key: str, revalidate: int | None, tags: frozenset[str]) -> int:
        self.definitions[key] = (revalidate, tags)
        await self.render(key)
        return self.renders[key]

    async def revalidate_tag(self, tag: str) -> None:
        await self.handler.revalidate_tags([tag], self.clock())

    async def close(self) -> None:
        await self.handler.close()


DRIVERS: dict[str, Callable[[Clock], Any]] = {
    "engine+memory": lambda clock: EngineDriver(MemoryCache(), clock),
    "engine+tier": lambda clock: EngineDriver(MemoryTier(MemoryCache()), clock),
    "memory": lambda clock: HandlerDriver(MemoryCache(), clock),
    "tier": lambda clock: HandlerDriver(MemoryTier(MemoryCache()), clock),
    # A tier too small to hold anything: every read goes to the backing store.
    "tier-no-room": lambda clock: HandlerDriver(MemoryTier(MemoryCache(), max_bytes=0), clock),
}


async def run_against_model(make_driver: Callable[[Clock], Any], ops: list[Op]) -> None:
    model = Model()
    clock = Clock(model.now)
    driver = make_driver(clock)
    try:
        for step, op in enumerate(ops):
            where = f"step {step} {op!r} at t={clock.now - 1_000_000.0:g}"
            if op[0] == "set":
                assert await driver.set(op[1], op[2], op[3]) == model.set(op[1], op[2], op[3]), where
            elif op[0] == "read":
                assert await driver.read(op[1]) == model.read(op[1]), where
            elif op[0] == "advance":
                model.now += op[1]
                clock.now = model.now
            else:
                model.revalidate_tag(op[1])
                await driver.revalidate_tag(op[1])
        assert driver.renders == model.renders
    finally:
        await driver.close()


@pytest.mark.parametrize("driver", list(DRIVERS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops_strategy)
def test_freshness_rule_matches_the_model(driver: str, ops: list[Op]) -> None:
    asyncio.run(run_against_model(DRIVERS[driver], ops))


@pytest.mark.parametrize("driver", list(DRIVERS))
def test_model_examples(driver: str) -> None:
    """Hand-picked sequences, kept so the interesting cases always run."""
    cases: list[list[Op]] = [
        # stale exactly at created_at + revalidate; regenerated at that same time
        [("set", "/a", 5, frozenset()), ("advance", 5.0), ("read", "/a"), ("read", "/a")],
        # a tag revalidated in the same instant as the render invalidates it (>=)
        [
            ("set", "/a", None, frozenset({"t1"})),
            ("revalidate_tag", "t1"),
            ("read", "/a"),
            ("read", "/a"),
            ("advance", 0.5),
            ("read", "/a"),
        ],
        # revalidate 0 is never stored: the older entry stays and keeps going stale
        [
            ("set", "/a", 3, frozenset()),
            ("set", "/a", 0, frozenset()),
            ("read", "/a"),
            ("advance", 4.0),
            ("read", "/a"),
            ("read", "/a"),
        ],
        # an invalidated entry whose definition became revalidate 0: BYPASS
        [
            ("set", "/a", 3, frozenset({"t2"})),
            ("set", "/a", 0, frozenset({"t2"})),
            ("advance", 1.0),
            ("revalidate_tag", "t2"),
            ("read", "/a"),
            ("read", "/a"),
        ],
        # invalidation wins over staleness
        [("set", "/b", 1, frozenset({"t3"})), ("advance", 2.0), ("revalidate_tag", "t3"), ("read", "/b")],
    ]
    for ops in cases:
        asyncio.run(run_against_model(DRIVERS[driver], ops))


def test_model_expectations() -> None:
    """The model itself, on the cases the SPEC spells out (S-02, S-45)."""
    m = Model()
    assert m.set("/p", 5, frozenset({"ft"})) == 1
    m.now += 6
    assert m.read("/p") == ("STALE", 1)
    m.now += 1
    assert m.read("/p") == ("HIT", 2)
    m.revalidate_tag("ft")
    m.now += 0.001
    assert m.read("/p") == ("MISS", 3)
    assert m.read("/p") == ("HIT", 3)


# =======================================================================================
# (b) Path normalisation
# =======================================================================================

# Text with the characters that matter to paths well represented.
path_pieces = st.one_of(
    st.sampled_from(
        [
            "",
            ".",
            "..",
            "index",
            "%2F",
            "%2f",
            "%2e",
            "%2E%2e",
            "%25",
            "%252F",
            "%3F",
            "%23",
            "?",
            "#",
            "%E3%81%82",
            "あ",
            "%20",
            "a",
            "blog",
            "[id]",
            "\\",
            "%00",
        ]
    ),
    st.text(max_size=6),
)
path_like = st.lists(path_pieces, max_size=8).map(lambda parts: "/" + "/".join(parts))
any_text = st.one_of(st.text(), path_like, st.lists(path_pieces, max_size=8).map("".join))


def normalise_or_none(path: str) -> str | None:
    try:
        return normalize_path(path)
    except BadPath:
        return None


@settings(max_examples=500, deadline=None)
@given(path=any_text)
def test_normalize_path_is_idempotent_and_stays_under_root(path: str) -> None:
    key = normalise_or_none(path)
    if key is None:
        return
    assert normalize_path(key) == key
    assert key.startswith("/")
    if key != "/":
        segments = key[1:].split("/")
        assert all(segments), f"empty segment in {key!r}"
        assert not {".", ".."} & set(segments), key
        assert "?" not in key and "#" not in key
    assert key != "/index"


# A segment as a user or a route's static params may spell it: any text but the three
# that are path syntax rather than names.
segment_text = st.one_of(
    st.sampled_from(["index", "...", ".a", "a.b", "%", "%2F", "a/b", "?", "#", " ", "あ", "[id]"]),
    st.text(min_size=1, max_size=12).filter(lambda s: s not in (".", "..")),
)


@settings(max_examples=300, deadline=None)
@given(segments=st.lists(segment_text, min_size=1, max_size=5))
def test_encoded_segments_survive_normalisation(segments: list[str]) -> None:
    """Percent-encoding a segment (``/`` as ``%2F``...) never splits it or merges it away."""
    if segments == ["index"]:
        return  # the one alias: /index is /
    path = "/" + "/".join(quote(s, safe="") for s in segments)
    key = normalize_path(path)
    assert split_key(key) == segments
    assert len(key[1:].split("/")) == len(segments)


ROUTER = Router(
    [
        PatternRoute("/blog", "blog index"),
        PatternRoute("/blog/[id]", "post"),
        PatternRoute("/blog/[id]/comments", "comments"),
        PatternRoute("/docs/[...slug]", "docs"),
    ]
)


@settings(max_examples=500, deadline=None)
@given(post_id=segment_text, raw=st.booleans())
def test_a_post_path_never_maps_outside_its_route(post_id: str, raw: bool) -> None:
    """``/blog/<id>`` is the ``[id]`` page for exactly that id, whatever the id contains."""
    path = "/blog/" + (quote(post_id, safe="") if not raw else post_id)
    key = normalise_or_none(path)
    if raw and (key is None or any(c in post_id for c in "/?#%")):
        return  # unencoded delimiters are the client's own path syntax
    assert key is not None
    route, params = ROUTER.match(key) or (None, None)
    assert route is not None and route.target == "post", (path, key)
    assert params == {"id": post_id}


@settings(max_examples=150, deadline=None)
@given(slug=st.lists(segment_text, min_size=1, max_size=4))
def test_a_catch_all_keeps_every_segment(slug: list[str]) -> None:
    key = normalize_path("/docs/" + "/".join(quote(s, safe="") for s in slug))
    route, params = ROUTER.match(key) or (None, None)
    assert route is not None and route.target == "docs" and params == {"slug": slug}


not_hex = st.characters(blacklist_characters=string.hexdigits + "/?#")
bad_escape = st.one_of(
    st.tuples(st.sampled_from(string.hexdigits), not_hex).map("".join),
    st.tuples(not_hex, st.text(max_size=1)).map("".join),
    st.just(""),  # '%' at the end
    st.sampled_from(["FF", "C3", "E3%81", "80", "ED%A0%80"]),  # not UTF-8
)


@settings(max_examples=400, deadline=None)
@given(
    before=st.text(alphabet=st.characters(blacklist_characters="%?#"), max_size=8),
    escape=bad_escape,
    after=st.text(alphabet=st.characters(blacklist_characters="%?#/"), max_size=4),
)
def test_malformed_percent_escapes_are_bad_paths(before: str, escape: str, after: str) -> None:
    path = "/" + before + "%" + escape + ("" if escape in ("", "E3%81") else after)
    with pytest.raises(BadPath):
        normalize_path(path)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=20))
def test_the_query_and_fragment_never_change_the_key(text: str) -> None:
    assert normalize_path("/blog/1?" + text) == "/blog/1"
    assert normalize_path("/blog/1#" + text) == "/blog/1"
