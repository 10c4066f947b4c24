"""Data-cache values never run stored code: JSON by default, signed pickle on request.

The attack tests do what someone who can write to the store would do: take the key
of an entry ``cached``/``fetch`` stored, and put their own bytes there (through the
handler, as a co-tenant of a shared Redis would, or straight into the cache files).
The planted pickle creates a marker file when unpickled; it must never exist, and
the caller must still get its right value, computed afresh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import decimal
import enum
import fractions
import hashlib
import hmac
import json
import logging
import math
import os
import pickle
import stat
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import zoneinfo
from collections import namedtuple
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Counter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis_support import redis_py, redis_url, unique_prefix  # noqa: F401
from test_fetch import Origin

from pyisr import Engine, MemoryCache, Rendered, RenderPolicy, cached, fetch, fetch_sync, set_engine
from pyisr.cache.entry import CacheEntry, EntryKind
from pyisr.cache.filesystem import FileSystemCache
from pyisr.cache.handler import as_handler
from pyisr.cache.tags import implicit_tags
from pyisr.cache.tier import MemoryTier
from pyisr.data import _lookup, signing
from pyisr.data import fetch as fetch_module
from pyisr.data.serializer import (
    JSON_MARKER,
    PICKLE_MARKER,
    TAG,
    UnreadableEntry,
    dumps_json,
    loads_json,
)
from pyisr.data.signing import SigningKeyError
from pyisr.runtime import run_sync

SIGNING_KEY = "k" * 16 + "the-deployment-secret"
ATTACKER_KEY = b"a" * 16 + b"the-attacker-guess"


# -- what an attacker plants ----------------------------------------------------------


class Exploit:
    """Unpickling this creates ``path``: the proof that stored bytes ran code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def forged(payload: bytes, key: str) -> bytes:
    """A signed pickle in pyisr's format, signed with a key that is not the deployment's."""
    message = PICKLE_MARKER + key.encode() + b"\0" + payload
    return PICKLE_MARKER + hmac.new(ATTACKER_KEY, message, hashlib.sha256).digest() + payload


#: Bytes planted under a data key, by name: (bytes, the reason the reader gives).
def plants(marker: Path, key: str) -> dict[str, bytes]:
    payload = pickle.dumps(Exploit(marker), protocol=5)
    return {
        "raw-pickle": payload,  # what pyisr itself stored before, and loaded blindly
        "forged-signature": forged(payload, key),
        "zero-signature": PICKLE_MARKER + bytes(32) + payload,
        "json-marker-then-pickle": JSON_MARKER + payload,
    }


PLANTS = ["raw-pickle", "forged-signature", "zero-signature", "json-marker-then-pickle"]


def planted_entry(key: str, body: bytes, created_at: float) -> CacheEntry:
    # Far in the future, so a reader that only tried to overwrite it would be fenced off.
    return CacheEntry(key=key, body=body, created_at=created_at + 10**6, revalidate=None, kind=EntryKind.DATA)


def plant_files(handler: FileSystemCache, entry: CacheEntry) -> None:
    """Write the entry's two files by hand, as someone with write access to the directory can."""
    slot = handler.slot(entry.key)
    slot.dir.mkdir(parents=True, exist_ok=True)
    slot.body.write_bytes(entry.body)
    slot.meta.write_bytes(entry.meta_bytes())


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("PYISR_SIGNING_KEY", raising=False)
    _lookup._warned.clear()
    yield
    _lookup._warned.clear()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pyisr.data" and r.levelno >= logging.WARNING]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return tmp_path / "site"


@pytest.fixture
async def fs_engine(site: Path, clock: Any) -> AsyncIterator[Engine]:
    """An engine over a real FileSystemCache at ``SITE/.pyisr/cache``, the default layout."""
    eng = Engine(FileSystemCache(site / ".pyisr" / "cache"), clock=clock, debug=True)
    set_engine(eng)
    yield eng
    await eng.drain()
    set_engine(None)
    await eng.close()


async def only_data_key(engine: Engine) -> str:
    keys = [k async for k in engine.handler.keys("data:")]
    assert len(keys) == 1, keys
    return keys[0]


def loaded(path: Path) -> None:
    assert not path.exists(), "the planted pickle was unpickled: stored bytes ran code"


# -- the exploit is real ------------------------------------------------------------------


def test_the_planted_payload_runs_code_when_unpickled(tmp_path: Path) -> None:
    """Without this, "the marker never exists" would prove nothing."""
    marker = tmp_path / "ran"
    opened = pickle.loads(plants(marker, "data:00")["raw-pickle"])
    opened.close()
    assert marker.exists()


# -- attacks on the file-system store -------------------------------------------------------


@pytest.mark.parametrize("how", ["handler", "files"])
@pytest.mark.parametrize("plant", PLANTS)
@pytest.mark.parametrize("kind", ["json", "pickle"])
async def test_planted_pickle_in_the_filesystem_cache_never_runs(
    fs_engine, clock, counter, caplog, tmp_path, monkeypatch, kind, plant, how
):
    if kind == "pickle":
        monkeypatch.setenv("PYISR_SIGNING_KEY", SIGNING_KEY)
    marker = tmp_path / "pwned"

    @cached(key_parts=["posts"], tags=["posts"], serializer=kind)
    async def load_posts() -> dict:
        return {"n": counter.next(), "when": datetime.date(2024, 5, 1)}

    caplog.set_level(logging.WARNING, logger="pyisr.data")
    assert await load_posts() == {"n": 1, "when": datetime.date(2024, 5, 1)}
    key = await only_data_key(fs_engine)
    entry = planted_entry(key, plants(marker, key)[plant], clock())
    if how == "handler":
        assert await fs_engine.handler.set(entry)
    else:
        plant_files(fs_engine.handler, entry)
    assert (await fs_engine.handler.get(key)).body == entry.body  # the store really holds it now

    assert await load_posts() == {"n": 2, "when": datetime.date(2024, 5, 1)}
    assert await load_posts() == {"n": 2, "when": datetime.date(2024, 5, 1)}  # stored afresh: a hit
    loaded(marker)
    assert counter.calls == 2
    (warning,) = warnings_of(caplog)
    assert key in warning and "load_posts" in warning
    if plant == "forged-signature" and kind == "pickle":
        assert "signature does not verify" in warning
    stored = (await fs_engine.handler.get(key)).body
    assert stored.startswith(PICKLE_MARKER if kind == "pickle" else JSON_MARKER)


def test_planted_pickle_through_the_sync_path_never_runs(site, clock, counter, caplog, tmp_path):
    """A sync function called from a script: ``read_through_sync`` on the bridge loop."""
    engine = Engine(FileSystemCache(site / ".pyisr" / "cache"), clock=clock)
    set_engine(engine)
    try:
        marker = tmp_path / "pwned"
        load = cached(lambda slug: f"{slug} {counter.next()}", ["sync"], revalidate=60, serializer="pickle")
        caplog.set_level(logging.WARNING, logger="pyisr.data")
        assert load("a") == "a 1"
        key = run_sync(only_data_key(engine))
        assert run_sync(
            engine.handler.set(planted_entry(key, plants(marker, key)["forged-signature"], clock()))
        )
        assert load("a") == "a 2" and load("a") == "a 2"
        loaded(marker)
        (warning,) = warnings_of(caplog)
        assert "signature does not verify" in warning
    finally:
        run_sync(engine.drain())
        set_engine(None)
        run_sync(engine.close())


async def test_a_page_reading_planted_data_gets_fresh_data_and_its_tags(fs_engine, clock, counter, tmp_path):
    marker = tmp_path / "pwned"
    data = cached(lambda: counter.next(), ["page-data"], tags=["feed"], revalidate=40)

    async def render() -> Rendered:
        return Rendered(f"data {await data.aio()}")

    assert await data.aio() == 1
    key = await only_data_key(fs_engine)
    await fs_engine.handler.set(planted_entry(key, plants(marker, key)["raw-pickle"], clock()))
    policy = RenderPolicy(revalidate=None, tags=implicit_tags("/p", "/p"))
    served = await fs_engine.get("/p", render, policy)
    assert served.entry.body == b"data 2"
    assert "feed" in served.entry.tags and served.entry.revalidate == 40  # record_in_render saw the fresh one
    loaded(marker)


async def test_a_compute_failing_after_a_planted_entry_raises_its_own_error(fs_engine, clock, tmp_path):
    """The planted entry counts as missing: the caller gets the function's error, not a wrapper."""
    marker = tmp_path / "pwned"
    state = {"fail": False}

    async def load() -> int:
        if state["fail"]:
            raise LookupError("db down")
        return 1

    fn = cached(load, ["failing"])
    assert await fn() == 1
    key = await only_data_key(fs_engine)
    await fs_engine.handler.set(planted_entry(key, plants(marker, key)["raw-pickle"], clock()))
    state["fail"] = True
    with pytest.raises(LookupError, match="db down"):
        await fn()
    loaded(marker)
    state["fail"] = False
    assert await fn() == 1


async def test_a_signed_value_moved_to_another_key_is_not_accepted(fs_engine, clock, monkeypatch, caplog):
    """The signature covers the key: a valid value copied elsewhere is refused there."""
    monkeypatch.setenv("PYISR_SIGNING_KEY", SIGNING_KEY)
    fn = cached(lambda who: {"secret-of": who}, ["moved"], serializer="pickle")
    caplog.set_level(logging.WARNING, logger="pyisr.data")
    assert await fn.aio("admin") == {"secret-of": "admin"}
    admin_key = await only_data_key(fs_engine)
    assert await fn.aio("guest") == {"secret-of": "guest"}
    (guest_key,) = [k async for k in fs_engine.handler.keys("data:") if k != admin_key]
    admin = await fs_engine.handler.get(admin_key)
    await fs_engine.handler.set(planted_entry(guest_key, admin.body, clock()))
    assert await fn.aio("guest") == {"secret-of": "guest"}
    assert "signature does not verify" in warnings_of(caplog)[0]


# -- attacks on Redis -------------------------------------------------------------------------


@pytest.fixture
async def redis_engine(redis_url, clock) -> AsyncIterator[Engine]:  # noqa: F811
    redis_cache = redis_py().RedisCache
    handler = redis_cache.from_url(redis_url, prefix=unique_prefix())
    eng = Engine(handler, clock=clock, debug=True)
    set_engine(eng)
    yield eng
    await eng.drain()
    set_engine(None)
    with contextlib.suppress(Exception):
        await handler.clear()
    await eng.close()


@pytest.mark.parametrize("plant", PLANTS)
@pytest.mark.parametrize("kind", ["json", "pickle"])
async def test_planted_pickle_in_redis_never_runs(
    redis_engine, clock, counter, caplog, tmp_path, monkeypatch, kind, plant
):
    if kind == "pickle":
        monkeypatch.setenv("PYISR_SIGNING_KEY", SIGNING_KEY)
    marker = tmp_path / "pwned"

    @cached(key_parts=["shared"], serializer=kind)
    def load(user_id: int) -> dict:
        return {"user": user_id, "n": counter.next()}

    caplog.set_level(logging.WARNING, logger="pyisr.data")
    assert await load.aio(7) == {"user": 7, "n": 1}
    key = await only_data_key(redis_engine)
    assert await redis_engine.handler.set(planted_entry(key, plants(marker, key)[plant], clock()))
    assert await load.aio(7) == {"user": 7, "n": 2}
    assert load(7) == {"user": 7, "n": 2}
    loaded(marker)
    assert counter.calls == 2
    (warning,) = warnings_of(caplog)
    assert key in warning


async def test_pickle_with_redis_needs_a_signing_key(redis_engine, counter):
    fn = cached(lambda: counter.next(), ["no-key"], serializer="pickle")  # decorating is fine
    with pytest.raises(SigningKeyError, match="PYISR_SIGNING_KEY") as raised:
        await fn.aio()
    with pytest.raises(SigningKeyError):
        fn()
    message = str(raised.value)
    assert "'redis'" in message and "the same on every instance" in message and 'serializer="json"' in message
    assert isinstance(raised.value, ValueError)
    assert counter.calls == 0
    assert [k async for k in redis_engine.handler.keys("data:")] == []


async def test_pickle_with_redis_and_a_signing_key_is_shared_by_instances(
    redis_engine,
    redis_url,  # noqa: F811
    clock,
    counter,
    monkeypatch,
    caplog,
):
    monkeypatch.setenv("PYISR_SIGNING_KEY", SIGNING_KEY)
    fn = cached(
        lambda: {"by": Author(f"ann {counter.next()}"), "ratio": fractions.Fraction(1, 3)},
        ["p"],
        serializer="pickle",
    )
    assert await fn.aio() == {"by": Author("ann 1"), "ratio": fractions.Fraction(1, 3)}
    key = await only_data_key(redis_engine)

    # A second instance (its own handler and engine) with the same key reads it.
    other_handler = redis_py().RedisCache.from_url(redis_url, prefix=redis_engine.handler.prefix)
    other = Engine(other_handler, clock=clock)
    set_engine(other)
    try:
        assert await fn.aio() == {"by": Author("ann 1"), "ratio": fractions.Fraction(1, 3)}
        assert counter.calls == 1
        # An instance with another key cannot read it: it warns, computes and stores its own.
        monkeypatch.setenv("PYISR_SIGNING_KEY", "another-secret-of-16-bytes")
        caplog.set_level(logging.WARNING, logger="pyisr.data")
        assert (await fn.aio())["by"] == Author("ann 2")
        assert "signature does not verify" in warnings_of(caplog)[0] and key in warnings_of(caplog)[0]
    finally:
        set_engine(redis_engine)
        await other.close()


# -- fetch ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def _origin_server() -> Iterator[Origin]:
    server = Origin()
    yield server
    server.close()


@pytest.fixture
def origin(_origin_server: Origin, monkeypatch: pytest.MonkeyPatch) -> Origin:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    _origin_server.reset()
    return _origin_server


def fetch_plants(marker: Path) -> dict[str, bytes]:
    good = {
        "format": "pyisr-fetch/1",
        "status": 200,
        "headers": [["content-type", "application/json"]],
        "body": "e30=",
        "url": "http://example.test/",
        "method": "GET",
    }

    def variant(**changes: Any) -> bytes:
        return json.dumps({**good, **changes}).encode()

    return {
        "raw-pickle": pickle.dumps(Exploit(marker), protocol=5),
        "malformed-json": b'{"format": "pyisr-fetch/1", "status": 2',
        "json-list": b"[200, [], null]",
        "bad-status": variant(status=999),
        "bool-status": variant(status=True),
        "headers-not-pairs": variant(headers=[["a", "b", "c"]]),
        "header-not-text": variant(headers=[["a", 1]]),
        "body-not-base64": variant(body="not base64!"),
        "extra-field": variant(pickle="gASV"),
        "other-format": variant(format="pyisr-fetch/0"),
        "bad-method": variant(method="GET /x"),
    }


@pytest.mark.parametrize("plant", list(fetch_plants(Path("x"))))
async def test_fetch_ignores_a_planted_entry_and_asks_the_origin_again(
    fs_engine, clock, origin, caplog, tmp_path, plant
):
    marker = tmp_path / "pwned"
    url = origin.url(f"/planted-{plant}")
    caplog.set_level(logging.WARNING, logger="pyisr.data")
    assert (await fetch(url, revalidate=60)).json()["n"] == 1
    key = await only_data_key(fs_engine)
    await fs_engine.handler.set(planted_entry(key, fetch_plants(marker)[plant], clock()))

    response = await fetch(url, revalidate=60)
    assert response.status_code == 200 and response.json()["n"] == 2
    assert response.headers["x-origin"] == "yes"
    assert (await fetch(url, revalidate=60)).json()["n"] == 2  # stored afresh
    assert origin.hits[f"/planted-{plant}"] == 2
    loaded(marker)
    (warning,) = warnings_of(caplog)
    assert key in warning and url in warning


def test_fetch_sync_ignores_a_planted_entry(site, clock, origin, tmp_path):
    engine = Engine(FileSystemCache(site / ".pyisr" / "cache"), clock=clock)
    set_engine(engine)
    try:
        marker = tmp_path / "pwned"
        url = origin.url("/sync-planted")
        assert fetch_sync(url, revalidate=60).json()["n"] == 1
        key = run_sync(only_data_key(engine))
        run_sync(engine.handler.set(planted_entry(key, fetch_plants(marker)["raw-pickle"], clock())))
        assert fetch_sync(url, revalidate=60).json()["n"] == 2
        loaded(marker)
    finally:
        run_sync(engine.drain())
        set_engine(None)
        run_sync(engine.close())


async def test_fetch_planted_entry_with_a_failing_origin_returns_the_origin_response(
    fs_engine, clock, origin, tmp_path
):
    url = origin.url("/planted-then-404")
    await fetch(url, revalidate=60)
    key = await only_data_key(fs_engine)
    await fs_engine.handler.set(planted_entry(key, fetch_plants(tmp_path / "m")["raw-pickle"], clock()))
    origin.status = 404
    response = await fetch(url, revalidate=60)
    assert response.status_code == 404 and response.json()["n"] == 2


def test_stored_response_round_trips() -> None:
    import httpx

    request = httpx.Request("POST", "http://example.test/a?b=1")
    original = httpx.Response(
        201,
        headers=[(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2"), (b"x-bin", "é".encode())],
        content=bytes(range(256)),
        request=request,
    )
    back = fetch_module._decode(fetch_module._encode(original))
    assert back.status_code == 201 and back.content == bytes(range(256))
    assert back.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert back.headers.raw == original.headers.raw and back.headers["x-bin"] == "é"
    assert str(back.url) == "http://example.test/a?b=1" and back.request.method == "POST"


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.recursive(st.none() | st.integers() | st.text(), st.lists)))
def test_fetch_decode_only_ever_refuses_bad_bytes(data: Any) -> None:
    body = data if isinstance(data, bytes) else json.dumps(data).encode()
    with contextlib.suppress(UnreadableEntry):
        fetch_module._decode(body)


# -- the JSON serializer ---------------------------------------------------------------------


def same(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down (``==`` alone says ``1 == True == 1.0``)."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if type(a) is decimal.Decimal:
        return str(a) == str(b)
    if type(a) in (list, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is dict:
        return len(a) == len(b) and all(
            same(ka, kb) and same(va, vb) for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True)
        )
    if type(a) in (set, frozenset):
        return len(a) == len(b) and all(any(same(x, y) for y in b) for x in a)
    if type(a) in (datetime.datetime, datetime.time):
        ta, tb = a.tzinfo, b.tzinfo
        same_tz = type(ta) is type(tb) and (
            ta is tb
            if isinstance(ta, zoneinfo.ZoneInfo)
            else ta == tb and (ta is None or ta.tzname(None) == tb.tzname(None))
        )
        return same_tz and a.fold == b.fold and a.replace(tzinfo=None) == b.replace(tzinfo=None)
    return bool(a == b)


fixed_zones = st.builds(
    datetime.timezone,
    st.timedeltas(
        min_value=datetime.timedelta(hours=-23, minutes=-59),
        max_value=datetime.timedelta(hours=23, minutes=59),
    ),
) | st.builds(
    datetime.timezone,
    st.timedeltas(min_value=datetime.timedelta(hours=-23), max_value=datetime.timedelta(hours=23)),
    st.text(max_size=8),
)
zones = st.none() | fixed_zones | st.timezones()
hashable_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**20), max_value=2**20).map(
        lambda n: 10**4400 + n
    )  # past the int-to-text limit
    | st.floats()
    | st.text()
    | st.binary()
    | st.datetimes(timezones=zones).map(lambda d: d.replace(fold=1) if d.microsecond % 2 else d)
    | st.dates()
    | st.times(timezones=zones)
    | st.timedeltas()
    | st.decimals(allow_nan=False)
    | st.decimals(allow_nan=True, allow_infinity=True).filter(lambda d: not d.is_snan())
    | st.uuids()
)
hashables = st.recursive(
    hashable_leaves, lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3), max_leaves=6
)
values = st.recursive(
    hashable_leaves | st.decimals(allow_nan=True),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=4) | st.sampled_from([TAG, "v"]), inner, max_size=4)
        | st.dictionaries(hashables, inner, max_size=3)
        | st.sets(hashables, max_size=3)
        | st.frozensets(hashables, max_size=3)
    ),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_json_round_trips_every_supported_value_exactly(value: Any) -> None:
    data = dumps_json(value)
    assert data.startswith(JSON_MARKER)
    json.loads(data[len(JSON_MARKER) :])  # strict JSON: no NaN, no Infinity
    assert same(loads_json(data), value)


def test_json_keeps_a_user_dict_that_looks_like_a_tagged_value() -> None:
    for value in (
        {TAG: "tuple", "v": [1, 2]},
        {TAG: "pickle", "v": "gASV"},
        [{TAG: None}],
        {"a": {TAG: "bytes", "v": "AA=="}},
    ):
        assert same(loads_json(dumps_json(value)), value)


def test_json_round_trips_common_values() -> None:
    value = {
        "posts": [{"id": 1, "title": "Hi", "tags": ("a", "b"), "at": datetime.datetime(2024, 1, 2, 3, 4, 5)}],
        "price": decimal.Decimal("19.90"),
        "ids": {uuid.UUID(int=1), uuid.UUID(int=2)},
        "seen": frozenset({1, 2}),
        "blob": b"\x00\xff",
        "utc": datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC),
        "paris": datetime.datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=zoneinfo.ZoneInfo("Europe/Paris")),
        "span": datetime.timedelta(days=-1, seconds=5, microseconds=7),
        "day": datetime.date(1, 1, 1),
        "noon": datetime.time(12, tzinfo=datetime.timezone(datetime.timedelta(hours=2), "CEST")),
        (1, "two"): "tuple key",
        3: "int key",
        "inf": float("-inf"),
        "big": -(10**5000),
    }
    back = loads_json(dumps_json(value))
    assert same(back, value)
    assert back["paris"].utcoffset() == datetime.timedelta(hours=1)  # fold kept


Point = namedtuple("Point", "x y")


class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


@dataclasses.dataclass
class Author:
    name: str


class Tags(list):  # type: ignore[type-arg]
    pass


@pytest.mark.parametrize(
    "value,path,kind",
    [
        ([0, 1, 2, {"author": Author("ann")}], r"value\[3\]\['author'\]", "test_data_serialization.Author"),
        ({"at": Point(1, 2)}, r"value\['at'\]", r"test_data_serialization.Point \(a subclass of tuple"),
        ([Color.RED], r"value\[0\]", "test_data_serialization.Color"),
        ({"level": Level.HIGH}, r"value\['level'\]", r"test_data_serialization.Level \(a subclass of int"),
        (Tags(), "value", r"Tags \(a subclass of list"),
        ({Point(1, 2): 1}, "the key Point", "Point"),
        ({"s": {fractions.Fraction(1, 2)}}, r"an element of value\['s'\]", "fractions.Fraction"),
        ([bytearray(b"x")], r"value\[0\]", "bytearray"),
        (
            datetime.datetime(2024, 1, 1, tzinfo=zoneinfo.ZoneInfo.no_cache("UTC")),
            r"value.tzinfo",
            "zoneinfo.ZoneInfo",
        ),
    ],
)
def test_json_refuses_other_types_naming_the_path_and_both_ways_out(value, path, kind) -> None:
    with pytest.raises(
        TypeError, match=rf"cached\('load'\) cannot store its result as JSON: {path}.*{kind}"
    ) as raised:
        dumps_json(value, where="cached('load')")
    message = str(raised.value)
    assert "Convert it" in message and "to a dict" in message
    assert 'serializer="pickle"' in message and "cached(...)" in message


async def test_cached_raises_the_type_error_at_the_call_and_stores_nothing(fs_engine, counter) -> None:
    @cached(key_parts=["nt"])
    async def load() -> list:
        counter.next()
        return [Point(1, 2)]

    with pytest.raises(TypeError, match=r"cached\('.*load'\) cannot store its result as JSON: value\[0\]"):
        await load()
    assert [k async for k in fs_engine.handler.keys("data:")] == []
    with pytest.raises(TypeError):
        await load()
    assert counter.calls == 2


def test_json_refuses_a_reference_cycle() -> None:
    looped: list[Any] = []
    looped.append(looped)
    with pytest.raises(ValueError, match="reference cycle"):
        dumps_json(looped)


tagged_names = st.sampled_from(
    ["tuple", "set", "frozenset", "dict", "bytes", "int", "float", "datetime", "date", "time", "timedelta",
     "decimal", "uuid", "nope", 1]
)  # fmt: skip
json_trees = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=3), inner, max_size=3)
        | st.fixed_dictionaries({TAG: tagged_names, "v": inner})
    ),
    max_leaves=12,
)


@settings(max_examples=500, deadline=None)
@given(json_trees)
def test_json_reader_only_ever_refuses_bad_input(tree: Any) -> None:
    """Whatever JSON is planted, reading it gives a value or UnreadableEntry, nothing else."""
    with contextlib.suppress(UnreadableEntry):
        loads_json(JSON_MARKER + json.dumps(tree).encode())


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"[1]",  # no marker
        JSON_MARKER + b"{",
        JSON_MARKER + b"NaN",
        JSON_MARKER + b"[" * 100_000,
        JSON_MARKER + b'{"__pyisr__": "tuple"}',
        JSON_MARKER + b'{"__pyisr__": "set", "v": [[1]]}',  # unhashable element
        JSON_MARKER + b'{"__pyisr__": "datetime", "v": ["2024-01-01", 0, ["zone", "../../etc/passwd"]]}',
        JSON_MARKER + b'{"__pyisr__": "decimal", "v": "one"}',
        PICKLE_MARKER + b"x" * 40,
    ],
)
def test_json_reader_refuses_malformed_bytes(data: bytes) -> None:
    with pytest.raises(UnreadableEntry):
        loads_json(data)


# -- serializer choice and keys ------------------------------------------------------------------


def test_unknown_serializer_is_refused_when_decorating() -> None:
    with pytest.raises(ValueError, match=r"serializer='yaml'; use 'json' \(the default\) or 'pickle'"):
        cached(lambda: 1, serializer="yaml")  # type: ignore[call-overload]


async def test_json_and_pickle_entries_never_share_a_key(counter) -> None:
    engine = Engine(MemoryCache())
    set_engine(engine)
    try:

        def load() -> int:
            return counter.next()

        as_json = cached(load, ["same"])
        as_pickle = cached(load, ["same"], serializer="pickle")  # MemoryCache: a per-process key
        assert await as_json.aio() == 1 and await as_pickle.aio() == 2
        keys = [k async for k in engine.handler.keys("data:")]
        assert len(keys) == 2
        assert as_json.cache_serializer == "json" and as_pickle.cache_serializer == "pickle"
    finally:
        set_engine(None)


def test_data_keys_are_of_version_2() -> None:
    assert _lookup.DATA_KEY_VERSION == "v2"


def test_where_each_handler_keeps_its_key(tmp_path: Path, redis_url: str) -> None:  # noqa: F811
    fs = FileSystemCache(tmp_path / "site" / ".pyisr" / "cache")
    assert fs.signing_key_home() == tmp_path / "site" / ".pyisr" / "signing.key"  # outside the replaced dir
    assert MemoryCache().signing_key_home() == "process"
    assert MemoryTier(fs).signing_key_home() == fs.signing_key_home()
    assert MemoryTier(MemoryCache()).signing_key_home() == "process"
    assert redis_py().RedisCache.from_url(redis_url).signing_key_home() is None

    class Duck:
        async def get(self, key): ...
        async def set(self, entry): ...
        async def revalidate_tags(self, tags, at): ...
        async def tag_times(self, tags): ...
        def signing_key_home(self) -> Path:
            return tmp_path / "duck.key"

    duck = as_handler(Duck())
    assert duck.signing_key_home() is None
    with pytest.raises(SigningKeyError, match="PYISR_SIGNING_KEY"):
        signing.signing_key(duck)


def test_a_short_signing_key_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("PYISR_SIGNING_KEY", "short")
    with pytest.raises(SigningKeyError, match="at least 16"):
        signing.signing_key(MemoryCache())


# -- the key file --------------------------------------------------------------------------------

SCRIPT = """
import os, sys
sys.path.insert(0, sys.argv[1])
from pyisr import Engine, set_engine
from pyisr.cache.filesystem import FileSystemCache
from pyisr.runtime import run_sync
engine = Engine(FileSystemCache(sys.argv[2]))
set_engine(engine)
import datamod
print(repr(datamod.get_ratio(2)))
run_sync(engine.close())
"""

MODULE = """
import fractions, os
from pyisr import cached

def load(n):
    with open(os.environ["CALLS_FILE"], "a") as f:
        f.write("call\\n")
    return fractions.Fraction(n, 3)

get_ratio = cached(load, ["ratio"], serializer="pickle")
"""


def run_process(tmp_path: Path, cache: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "PYISR_SIGNING_KEY"}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), str(cache)],
        capture_output=True,
        text=True,
        env={**base, "CALLS_FILE": str(tmp_path / "calls"), **env},
        check=True,
        timeout=60,
    )


def calls(tmp_path: Path) -> int:
    path = tmp_path / "calls"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_key_file_is_made_once_and_shared_by_processes(tmp_path: Path) -> None:
    (tmp_path / "datamod.py").write_text(textwrap.dedent(MODULE))
    cache = tmp_path / "site" / ".pyisr" / "cache"
    key_file = tmp_path / "site" / ".pyisr" / "signing.key"

    first = run_process(tmp_path, cache)
    assert first.stdout.strip() == "Fraction(2, 3)" and calls(tmp_path) == 1
    info = key_file.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_size == 32
    key = key_file.read_bytes()

    second = run_process(tmp_path, cache)
    assert second.stdout.strip() == "Fraction(2, 3)" and calls(tmp_path) == 1  # read, not computed
    assert key_file.read_bytes() == key and "signature" not in second.stderr

    # PYISR_SIGNING_KEY wins over the file: the stored value does not verify under it.
    third = run_process(tmp_path, cache, PYISR_SIGNING_KEY=SIGNING_KEY)
    assert third.stdout.strip() == "Fraction(2, 3)" and calls(tmp_path) == 2
    assert "signature does not verify" in third.stderr
    assert key_file.read_bytes() == key
    fourth = run_process(tmp_path, cache, PYISR_SIGNING_KEY=SIGNING_KEY)
    assert fourth.stdout.strip() == "Fraction(2, 3)" and calls(tmp_path) == 2


def test_the_env_key_needs_no_key_file(site: Path, monkeypatch) -> None:
    monkeypatch.setenv("PYISR_SIGNING_KEY", SIGNING_KEY)
    handler = FileSystemCache(site / ".pyisr" / "cache")
    assert signing.signing_key(handler) == SIGNING_KEY.encode()
    assert not (site / ".pyisr" / "signing.key").exists()


def test_a_second_handler_instance_reads_what_the_first_pickled(site: Path, clock) -> None:
    cache = site / ".pyisr" / "cache"
    counter = Counter()
    fn = cached(lambda: fractions.Fraction(counter.next(), 7), ["two-handlers"], serializer="pickle")
    for _ in range(2):
        engine = Engine(FileSystemCache(cache), clock=clock)
        set_engine(engine)
        try:
            assert fn() == fractions.Fraction(1, 7)
        finally:
            set_engine(None)
            run_sync(engine.close())
    assert counter.calls == 1


RACE = """
import sys, time
from pathlib import Path
from pyisr.data.signing import key_from_file
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
print(key_from_file(Path(sys.argv[1])).hex())
"""


def test_processes_racing_to_create_the_key_file_agree(tmp_path: Path) -> None:
    key_file, go = tmp_path / "signing.key", tmp_path / "go"
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(key_file), str(go)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(6)
    ]
    time.sleep(0.3)  # let them all start and wait
    go.touch()
    keys = {racer.communicate(timeout=60)[0].strip() for racer in racers}
    assert len(keys) == 1 and keys == {key_file.read_bytes().hex()}


def test_a_key_file_still_being_written_is_waited_for(tmp_path: Path) -> None:
    key_file = tmp_path / "signing.key"
    fd = os.open(key_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)  # a creator, not done yet
    key = os.urandom(32)

    def finish() -> None:
        time.sleep(0.2)
        os.write(fd, key)
        os.close(fd)

    writer = threading.Thread(target=finish)
    writer.start()
    try:
        assert signing.key_from_file(key_file) == key
    finally:
        writer.join()


def test_a_key_file_left_empty_names_the_fix(tmp_path: Path) -> None:
    key_file = tmp_path / "signing.key"
    os.close(os.open(key_file, os.O_CREAT | os.O_WRONLY, 0o600))
    with pytest.raises(SigningKeyError, match="delete it.*PYISR_SIGNING_KEY"):
        signing._read_key_file(key_file, wait=0.05)


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    key_file = tmp_path / "signing.key"
    key_file.write_bytes(os.urandom(32))
    key_file.chmod(0o644)
    with pytest.raises(SigningKeyError, match="open to other users"):
        signing.key_from_file(key_file)
