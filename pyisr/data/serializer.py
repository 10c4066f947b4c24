"""Turning data-cache values into stored bytes and back, without ever running stored code.

The data cache lives in a store that other code can write to: a directory, or a
Redis shared by every app of a deployment. Reading a value back must therefore never
be a way to run code, which rules out plain ``pickle.loads`` of whatever is stored.

``"json"`` (the default) stores JSON: the JSON types as they are, and a few common
Python types (tuple, set, frozenset, bytes, datetime/date/time/timedelta, Decimal,
UUID, dicts with non-string keys) in a tagged form so they come back as the same
type. Anything else is refused when stored, naming what and where, rather than
coming back as something else (a namedtuple as a plain tuple, an enum as an int).

``"pickle"`` stores any picklable value, signed with HMAC-SHA256; bytes whose
signature does not verify are never unpickled. The key is ``PYISR_SIGNING_KEY``,
else whatever the store allows (:meth:`CacheHandler.signing_key_home`): a random key
for a store private to this process, a key file beside a local cache directory, and
none at all for a store other machines may share, where pyisr cannot make up a key
the other instances would agree on and refuses pickle instead.

Both formats start with a marker, so the bytes of one are never read as the other;
bytes that do not parse raise :class:`UnreadableEntry`, which the caller treats as a
missing entry.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import hashlib
import hmac
import json
import math
import pickle
import reprlib
import uuid
import zoneinfo
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from pyisr.data.signing import SigningKeyError

SerializerName = Literal["json", "pickle"]
SERIALIZERS: tuple[str, ...] = ("json", "pickle")


JSON_MARKER = b"pyisr-json/1\n"
PICKLE_MARKER = b"pyisr-pickle+hmac-sha256/1\n"
_MAC_BYTES = hashlib.sha256().digest_size

#: The key of a tagged JSON object (``{"__pyisr__": "tuple", "v": [...]}``). A user's
#: dict holding this key is stored in the tagged ``dict`` form, so it can never be
#: mistaken for a tagged value.
TAG = "__pyisr__"
#: Larger ints are stored as hex: CPython refuses to turn ints of more than 4,300
#: digits into decimal text (and back), as a guard against slow conversions.
_MAX_PLAIN_INT_BITS = 13_000


class UnreadableEntry(ValueError):
    """Stored bytes that are not a value this version of pyisr wrote with this key.

    Never trusted: the caller treats the entry as missing and computes the value again.
    """


# -- JSON ---------------------------------------------------------------------------------

_short = reprlib.Repr()
_short.maxstring = 40
_short.maxother = 40


def _type_name(cls: type) -> str:
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


#: Types stored as JSON, checked by exact type: a subclass would come back as its base.
_BASES: tuple[type, ...] = (
    bool,
    int,
    float,
    str,
    list,
    dict,
    tuple,
    set,
    frozenset,
    bytes,
    datetime.datetime,
    datetime.date,
    datetime.time,
    datetime.timedelta,
    decimal.Decimal,
    uuid.UUID,
)


#: Where a part of the value is, rendered only for an error message: ``None`` is the
#: value itself, otherwise ``(parent, how, what)`` with ``how`` one of "item" (a list
#: or tuple index, or a dict key), "key" (a dict key itself), "element" (of a set)
#: and "attr".
_Path = tuple[Any, str, Any] | None


def _shown(value: object) -> str:
    try:
        return _short.repr(value)
    except Exception:  # noqa: BLE001 - a repr that fails must not hide the real error
        return f"<{_type_name(type(value))}>"


def _render(path: _Path) -> str:
    if path is None:
        return "value"
    parent, how, what = path
    if how == "item":
        return f"{_render(parent)}[{_shown(what)}]"
    if how == "key":
        return f"the key {_shown(what)} of {_render(parent)}"
    if how == "element":
        return f"an element of {_render(parent)}"
    return f"{_render(parent)}.{what}"


def _unsupported(value: object, path: _Path, where: str) -> TypeError:
    cls = type(value)
    base = next((b for b in _BASES if isinstance(value, b)), None)
    what = _type_name(cls)
    if base is not None:
        what += f" (a subclass of {base.__name__}, which JSON would bring back as a plain {base.__name__})"
    return TypeError(
        f"{where} cannot store its result as JSON: {_render(path)} is of type {what}. Convert it to plain "
        "values first (e.g. to a dict: dataclasses.asdict(obj), obj._asdict() for a namedtuple, "
        'obj.value for an enum), or pass serializer="pickle" to cached(...) to store any '
        "picklable value."
    )


class _Encoder:
    """One value's conversion to JSON-ready objects; knows the path for error messages."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.active: set[int] = set()

    @contextmanager
    def _inside(self, container: object, path: _Path) -> Iterator[None]:
        ident = id(container)
        if ident in self.active:
            raise ValueError(
                f"{self.where} cannot store its result as JSON: {_render(path)} is a container it is "
                'inside of (a reference cycle). Break the cycle, or pass serializer="pickle" to cached(...).'
            )
        self.active.add(ident)
        try:
            yield
        finally:
            self.active.discard(ident)

    def encode(self, value: Any, path: _Path) -> Any:
        cls = type(value)
        if value is None or cls is str or cls is bool:
            return value
        if cls is int:
            if value.bit_length() <= _MAX_PLAIN_INT_BITS:
                return value
            return {TAG: "int", "v": format(value, "x")}
        if cls is float:
            return value if math.isfinite(value) else {TAG: "float", "v": repr(value)}
        if cls is list:
            with self._inside(value, path):
                return [self.encode(item, (path, "item", i)) for i, item in enumerate(value)]
        if cls is dict:
            with self._inside(value, path):
                return self._dict(value, path)
        if cls is tuple:
            with self._inside(value, path):
                return {
                    TAG: "tuple",
                    "v": [self.encode(item, (path, "item", i)) for i, item in enumerate(value)],
                }
        if cls is set or cls is frozenset:
            with self._inside(value, path):
                items = [self.encode(item, (path, "element", None)) for item in value]
            return {TAG: cls.__name__, "v": items}
        if cls is bytes:
            return {TAG: "bytes", "v": base64.b64encode(value).decode("ascii")}
        if cls is datetime.datetime:
            naive = value.replace(tzinfo=None, fold=0).isoformat()
            return {TAG: "datetime", "v": [naive, value.fold, self._tz(value.tzinfo, path)]}
        if cls is datetime.date:
            return {TAG: "date", "v": value.isoformat()}
        if cls is datetime.time:
            naive = value.replace(tzinfo=None, fold=0).isoformat()
            return {TAG: "time", "v": [naive, value.fold, self._tz(value.tzinfo, path)]}
        if cls is datetime.timedelta:
            return {TAG: "timedelta", "v": [value.days, value.seconds, value.microseconds]}
        if cls is decimal.Decimal:
            return {TAG: "decimal", "v": str(value)}  # the decimal spec makes str() reversible
        if cls is uuid.UUID:
            return {TAG: "uuid", "v": str(value)}
        raise _unsupported(value, path, self.where)

    def _dict(self, value: dict[Any, Any], path: _Path) -> Any:
        if TAG not in value and all(type(k) is str for k in value):
            return {k: self.encode(v, (path, "item", k)) for k, v in value.items()}
        return {
            TAG: "dict",
            "v": [
                [self.encode(k, (path, "key", k)), self.encode(v, (path, "item", k))]
                for k, v in value.items()
            ],
        }

    def _tz(self, tz: datetime.tzinfo | None, path: _Path) -> Any:
        """A time zone that comes back as an equal one (same offset, name or zone key)."""
        if tz is None:
            return None
        if type(tz) is datetime.timezone:
            offset = tz.utcoffset(None)
            name = tz.tzname(None)
            default_name = datetime.timezone(offset).tzname(None)
            micros = offset // datetime.timedelta(microseconds=1)
            return ["offset", micros, None if name == default_name else name]
        if type(tz) is zoneinfo.ZoneInfo and tz.key is not None:
            try:
                same = zoneinfo.ZoneInfo(tz.key) is tz
            except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
                same = False
            if same:  # not a ZoneInfo.no_cache() copy: the key gives back this very object
                return ["zone", tz.key]
        raise _unsupported(tz, (path, "attr", "tzinfo"), self.where)


def dumps_json(value: Any, *, where: str = "cached()") -> bytes:
    """``value`` as marked JSON bytes; ``TypeError`` naming the path for what JSON cannot hold.

    Refusing is the point: a value that came back as another type (a namedtuple as a
    tuple) would break the caller only on a cache hit, far from its cause.
    """
    try:
        tree = _Encoder(where).encode(value, None)
    except RecursionError:
        raise ValueError(
            f"{where} cannot store its result as JSON: it is nested too deeply. Flatten it, "
            'or pass serializer="pickle" to cached(...).'
        ) from None
    text = json.dumps(tree, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return JSON_MARKER + text.encode("ascii")


def _reject_constant(name: str) -> Any:
    raise UnreadableEntry(f"JSON holds {name}, which pyisr never writes")


def _list(node: Any) -> list[Any]:
    if type(node) is not list:
        raise UnreadableEntry("a tagged value holds the wrong kind of data")
    return node


def _text(node: Any) -> str:
    if type(node) is not str:
        raise UnreadableEntry("a tagged value holds the wrong kind of data")
    return node


def _int(node: Any) -> int:
    if type(node) is not int:
        raise UnreadableEntry("a tagged value holds the wrong kind of data")
    return node


def _decode_tz(node: Any) -> datetime.tzinfo | None:
    if node is None:
        return None
    parts = _list(node)
    if len(parts) == 3 and parts[0] == "offset":
        offset = datetime.timedelta(microseconds=_int(parts[1]))
        if parts[2] is None:
            return datetime.timezone(offset)
        return datetime.timezone(offset, _text(parts[2]))
    if len(parts) == 2 and parts[0] == "zone":
        return zoneinfo.ZoneInfo(_text(parts[1]))
    raise UnreadableEntry("unknown time zone form")


def _clock_parts(node: Any) -> tuple[str, int, datetime.tzinfo | None]:
    parts = _list(node)
    if len(parts) != 3 or parts[1] not in (0, 1) or type(parts[1]) is not int:
        raise UnreadableEntry("malformed date/time value")
    return _text(parts[0]), parts[1], _decode_tz(parts[2])


def _decode_tagged(name: Any, v: Any) -> Any:
    if name == "tuple":
        return tuple(_decode(item) for item in _list(v))
    if name == "set":
        return {_decode(item) for item in _list(v)}
    if name == "frozenset":
        return frozenset(_decode(item) for item in _list(v))
    if name == "dict":
        result = {}
        for pair in _list(v):
            if type(pair) is not list or len(pair) != 2:
                raise UnreadableEntry("malformed dict pair")
            result[_decode(pair[0])] = _decode(pair[1])
        return result
    if name == "bytes":
        return base64.b64decode(_text(v), validate=True)
    if name == "int":
        return int(_text(v), 16)
    if name == "float":
        if v not in ("nan", "inf", "-inf"):
            raise UnreadableEntry("malformed float")
        return float(v)
    if name == "datetime":
        text, fold, tz = _clock_parts(v)
        return datetime.datetime.fromisoformat(text).replace(tzinfo=tz, fold=fold)
    if name == "date":
        return datetime.date.fromisoformat(_text(v))
    if name == "time":
        text, fold, tz = _clock_parts(v)
        return datetime.time.fromisoformat(text).replace(tzinfo=tz, fold=fold)
    if name == "timedelta":
        parts = _list(v)
        if len(parts) != 3:
            raise UnreadableEntry("malformed timedelta")
        return datetime.timedelta(days=_int(parts[0]), seconds=_int(parts[1]), microseconds=_int(parts[2]))
    if name == "decimal":
        return decimal.Decimal(_text(v))
    if name == "uuid":
        return uuid.UUID(_text(v))
    raise UnreadableEntry(f"unknown tagged type {_short.repr(name)}")


def _decode(node: Any) -> Any:
    cls = type(node)
    if cls is list:
        return [_decode(item) for item in node]
    if cls is dict:
        if TAG not in node:
            return {k: _decode(v) for k, v in node.items()}
        if len(node) != 2 or "v" not in node:
            raise UnreadableEntry("malformed tagged value")
        return _decode_tagged(node[TAG], node["v"])
    return node  # json.loads makes only str, int, float, bool and None besides


def loads_json(data: bytes) -> Any:
    """The value :func:`dumps_json` stored; :class:`UnreadableEntry` for anything else."""
    if not data.startswith(JSON_MARKER):
        raise UnreadableEntry("not a JSON data entry (unknown format marker)")
    try:
        return _decode(json.loads(data[len(JSON_MARKER) :], parse_constant=_reject_constant))
    except UnreadableEntry:
        raise
    except RecursionError:
        raise UnreadableEntry("JSON nested too deeply") from None
    except Exception as exc:  # noqa: BLE001 - whatever the bytes hold, they are only "unreadable"
        raise UnreadableEntry(f"malformed JSON ({type(exc).__name__}: {_short.repr(str(exc))})") from None


# -- signed pickle ------------------------------------------------------------------------


def _mac(secret: bytes, data_key: str, payload: bytes) -> bytes:
    # The data key is signed too: a signed value copied to another key is not accepted there.
    message = PICKLE_MARKER + data_key.encode("utf-8", "surrogatepass") + b"\0" + payload
    return hmac.new(secret, message, hashlib.sha256).digest()


def dumps_pickle(value: Any, *, data_key: str, secret: bytes) -> bytes:
    """``value`` pickled and signed for ``data_key``."""
    payload = pickle.dumps(value, protocol=5)
    return PICKLE_MARKER + _mac(secret, data_key, payload) + payload


def pickle_payload(data: bytes, *, data_key: str, secret: bytes) -> bytes:
    """The pickle :func:`dumps_pickle` signed for ``data_key``, not yet unpickled;
    :class:`UnreadableEntry` unless its signature verifies."""
    if not data.startswith(PICKLE_MARKER):
        raise UnreadableEntry("not a signed pickle data entry (unknown format marker)")
    start = len(PICKLE_MARKER)
    if len(data) < start + _MAC_BYTES:
        raise UnreadableEntry("signed pickle is truncated")
    mac, payload = data[start : start + _MAC_BYTES], data[start + _MAC_BYTES :]
    if not hmac.compare_digest(mac, _mac(secret, data_key, payload)):
        raise UnreadableEntry("signature does not verify")
    return payload


def unpickle(payload: bytes) -> Any:
    """A verified payload (:func:`pickle_payload`) unpickled."""
    try:
        return pickle.loads(payload)
    except Exception as exc:  # noqa: BLE001 - e.g. a class renamed since it was stored
        raise UnreadableEntry(f"signed pickle could not be loaded ({type(exc).__name__}: {exc})") from None


def loads_pickle(data: bytes, *, data_key: str, secret: bytes) -> Any:
    """The value :func:`dumps_pickle` stored; unpickles only after the signature verified."""
    return unpickle(pickle_payload(data, data_key=data_key, secret=secret))


# -- one entry point for both -------------------------------------------------------------


def dumps(name: str, value: Any, *, data_key: str, secret: bytes | None, where: str) -> bytes:
    """``value`` in the format ``name`` (``secret`` is the signing key for ``"pickle"``)."""
    if name == "pickle":
        if secret is None:
            raise SigningKeyError("serializer='pickle' needs a signing key")
        return dumps_pickle(value, data_key=data_key, secret=secret)
    return dumps_json(value, where=where)


def loads(name: str, data: bytes, *, data_key: str, secret: bytes | None) -> Any:
    """The value stored by :func:`dumps`; :class:`UnreadableEntry` for anything else."""
    if name == "pickle":
        if secret is None:
            raise SigningKeyError("serializer='pickle' needs a signing key")
        return loads_pickle(data, data_key=data_key, secret=secret)
    return loads_json(data)
