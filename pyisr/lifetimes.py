"""How long an entry lives: ``revalidate`` (stale after) and ``expire`` (never served after).

Every place a user writes a lifetime (a page module's ``revalidate`` / ``expire``, a
``get_static_props`` result, ``cached(...)``, ``fetch(...)``, ``@isr``) comes here, so a
number, ``False`` and a profile name mean the same thing everywhere. A profile is a
named pair, as Next.js 16's ``cacheLife`` has them: the built-in ones below, and the
site's own from ``pyisr.toml``::

    [profiles.hourly]
    revalidate = 3600
    expire = 86400

``revalidate = "hourly"`` then sets both. An explicit ``expire`` next to a profile wins
over the profile's. When nothing says otherwise an entry that revalidates in time
expires after the site's ``expire`` setting (one year by default, which is what the
``stale-while-revalidate`` of today's headers has always said); one that only an
invalidation ends (``revalidate = False``) never expires unless it names an expire.

The profiles in use are the process's: a site's server, build and ``configure(site=)``
install the site's (:func:`use_config`); every process has the built-in ones.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pyisr.cache.entry import ONE_YEAR, Revalidate, validate_revalidate


@dataclass(frozen=True, slots=True)
class Lifetime:
    """A normalised pair: ``revalidate`` seconds (``None`` never, ``0`` not cached) and
    ``expire`` seconds (``None``: the site's default applies)."""

    revalidate: Revalidate
    expire: int | None = None


#: Next.js 16's built-in ``cacheLife`` profiles (revalidate and expire; its ``stale`` is a
#: browser-side hint pyisr has no use for). A site may redefine any of them.
BUILTIN_PROFILES: dict[str, Lifetime] = {
    "seconds": Lifetime(1, 60),
    "minutes": Lifetime(60, 3600),
    "hours": Lifetime(3600, 86400),
    "days": Lifetime(86400, 604800),
    "weeks": Lifetime(604800, 2592000),
    "max": Lifetime(2592000, ONE_YEAR),
}


class UnknownProfile(ValueError):
    """A lifetime names a profile nobody defined."""


@dataclass(frozen=True)
class _Settings:
    profiles: Mapping[str, Lifetime]
    default_expire: int


_lock = threading.Lock()
_settings = _Settings(dict(BUILTIN_PROFILES), ONE_YEAR)


def use(profiles: Mapping[str, Lifetime] | None = None, default_expire: int = ONE_YEAR) -> None:
    """Install the profiles (added to the built-in ones) and default expire of this process."""
    global _settings
    merged = {**BUILTIN_PROFILES, **(profiles or {})}
    with _lock:
        _settings = _Settings(merged, default_expire)


def use_config(config: Any) -> None:
    """Install a site's ``pyisr.toml`` profiles and ``expire`` (a :class:`pyisr.config.Config`)."""
    use(config.profiles, config.expire)


def profiles() -> Mapping[str, Lifetime]:
    return _settings.profiles


def default_expire() -> int:
    """Seconds after which an entry that names no ``expire`` is never served."""
    return _settings.default_expire


def validate_expire(value: object, *, where: str = "expire") -> int | None:
    """A user's ``expire``: whole seconds > 0, or ``None``/``False`` for "the site's default"."""
    if value is None or value is False:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(
            f"Invalid expire value {value!r} for {where}: must be a whole number of seconds > 0 "
            "(e.g. expire = 86400)"
        )
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value) or not value.is_integer()):
        raise ValueError(f"Invalid expire value {value!r} for {where}: must be a whole number of seconds")
    if value <= 0:
        raise ValueError(f"Invalid expire value {value!r} for {where}: must be > 0 seconds")
    return int(value)


def _check_name(name: str, where: str) -> None:
    """A number in quotes is a mistake, not a profile: say so at once, with the fix."""
    text = name.strip()
    if not text or text.lstrip("+-").replace(".", "", 1).isdigit():
        raise ValueError(
            f"Invalid revalidate value {name!r} for {where}: must be a number of seconds "
            f"(e.g. revalidate = 60, without quotes), False or a profile name"
        )


def profile(name: str, *, where: str = "revalidate") -> Lifetime:
    """The lifetime a profile name stands for; :class:`UnknownProfile` names the known ones."""
    _check_name(name, where)
    found = _settings.profiles.get(name)
    if found is None:
        known = ", ".join(sorted(_settings.profiles))
        raise UnknownProfile(
            f"{where}: unknown cache profile {name!r}; known profiles: {known} "
            f"(define it in pyisr.toml as [profiles.{name}] with revalidate and expire)"
        )
    return found


def parse(revalidate: object, expire: object = None, *, where: str = "revalidate") -> Lifetime:
    """One lifetime from what a user wrote: ``revalidate`` a number, ``False``, ``None`` or
    a profile name; ``expire`` a number or ``None``. Raises ``ValueError`` naming ``where``.

    ``expire`` below ``revalidate`` is refused: the entry would expire before it could
    ever be served stale, which is never what was meant.
    """
    if isinstance(revalidate, str):
        named = profile(revalidate, where=where)
        seconds, own_expire = named.revalidate, named.expire
    else:
        seconds, own_expire = validate_revalidate(revalidate, where=where), None
    explicit = validate_expire(expire, where=where)
    chosen = explicit if explicit is not None else own_expire
    if chosen is not None and seconds and chosen < seconds:
        raise ValueError(
            f"{where}: expire ({chosen}s) is shorter than revalidate ({seconds}s); an entry must "
            "live at least until it is due for revalidation"
        )
    return Lifetime(seconds, chosen)


def deferred(revalidate: object, expire: object = None, *, where: str) -> Callable[[], Lifetime]:
    """A lifetime for a decorator: numbers are checked now, a profile name is looked up at
    each use, since a site's profiles may be installed after the decorated module loads."""
    if isinstance(revalidate, str):
        _check_name(revalidate, where)
        validate_expire(expire, where=where)
        return lambda: parse(revalidate, expire, where=where)
    fixed = parse(revalidate, expire, where=where)
    return lambda: fixed


def min_expire(a: int | None, b: int | None) -> int | None:
    """The shorter of two ``expire`` values (``None`` = not given is the loosest)."""
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def entry_expire(revalidate: Revalidate, expire: int | None) -> int | None:
    """The ``expire`` an entry is stored with: its own, else the site's default for an
    entry that revalidates in time.

    ``None`` (never expires) for an entry only an invalidation ends (``revalidate =
    False``, SPEC S-20 "FOREVER") unless it names an expire, and for one never stored.
    """
    if revalidate == 0 or (revalidate is None and expire is None):
        return None
    return expire if expire is not None else default_expire()


def parse_profiles(table: object) -> dict[str, Lifetime]:
    """``[profiles.NAME]`` tables of ``pyisr.toml``; ``ValueError`` names the profile at fault."""
    if not isinstance(table, Mapping):
        raise ValueError("expected tables such as [profiles.hourly] with revalidate and expire")
    parsed: dict[str, Lifetime] = {}
    for name, values in table.items():
        if not isinstance(values, Mapping):
            raise ValueError(f"profile {name!r} must be a table with revalidate and expire")
        unknown = set(values) - {"revalidate", "expire"}
        if unknown:
            raise ValueError(f"profile {name!r}: unknown keys {sorted(unknown)}; use revalidate and expire")
        if "revalidate" not in values:
            raise ValueError(f"profile {name!r} needs revalidate (seconds, or false for never)")
        revalidate = values["revalidate"]
        if isinstance(revalidate, str):
            raise ValueError(f"profile {name!r}: revalidate must be seconds or false, not a name")
        parsed[str(name)] = parse(revalidate, values.get("expire"), where=f"profile {name!r}")
    return parsed
