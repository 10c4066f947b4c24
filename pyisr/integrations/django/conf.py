"""The ``PYISR`` settings of a Django project: read once, checked once, used everywhere.

A project configures pyisr in one place, its settings module::

    PYISR = {"cache": "redis://localhost:6379/0", "revalidate": 60, "draft_secret": env("DRAFT")}

:func:`get` returns the parsed :class:`ISRSettings` (cached until ``PYISR`` changes, so
``override_settings(PYISR=...)`` works in tests). Parsing never raises: what is wrong
is collected as :class:`Problem` entries, which the system checks report with their
ids (``manage.py check``) and which stop ``@isr`` from serving from a cache nobody
meant. The cache location is never relative to the current directory: a relative path
is anchored at ``BASE_DIR``, so ``runserver``, gunicorn and ``manage.py shell`` started
from anywhere all use the same cache.
"""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from django.core.signals import setting_changed

from pyisr import lifetimes
from pyisr.cache.urls import parse_size
from pyisr.lifetimes import Lifetime

#: What every key means; the README's settings table says the same.
KEYS: dict[str, str] = {
    "cache": "cache URL or directory (file://, memory://, redis://); default BASE_DIR/.pyisr/cache",
    "memory_tier": "memory tier in front of a file or Redis cache, e.g. '50MB'; 0 turns it off",
    "site_url": "scheme and host of pages rendered for the cache (https://www.example.com)",
    "allowed_hosts": "hosts that may lend their Host to a shared render; default ALLOWED_HOSTS",
    "revalidate": "default lifetime of @isr views: seconds, False (until invalidated) or a profile",
    "expire": "default expire of @isr views, in seconds",
    "render_timeout": "seconds a render may take",
    "render_concurrency": "renders at once in one process",
    "debug_cache": "log every cache decision",
    "revalidate_secret": "the secret of on-demand revalidation; draft mode's when draft_secret is unset",
    "draft_secret": "signs draft-mode cookies",
    "dashboard_secret": "signs in to the dashboard (include pyisr.integrations.django.dashboard_urls)",
    "draft_mode": "honour draft-mode cookies (default: whenever a secret is set)",
    "bypass": "dotted path of a callable(request) -> bool, or None; default: logged-in users",
    "orm_tags": "tag pages with the models they read and revalidate them when those change",
    "orm_tags_max_rows": "row tags a page keeps at most; past it a model is tagged as a whole",
    "orm_tags_ignore": "model labels never tagged nor revalidated (added to the defaults)",
    "cdn": "CDN URLs every invalidation purges (varnish://, fastly://, cloudflare://, a webhook); "
    "default PYISR_CDN",
    "cdn_tag_headers": "headers carrying a page's tags to the edge: a list of 'Surrogate-Key', "
    "'Cache-Tag', or 'none'; default both",
    "compress": "store and serve brotli and gzip encodings of text pages; default True",
    "rewarm_rate": "pages a second each process renders again, hottest first, after a wide "
    "invalidation; 0 turns it off; default 20",
    "build_id": "names the deploy (a commit hash): its pages never mix with another deploy's, "
    "in the cache or at the edge; default PYISR_BUILD_ID, else none",
}

#: Models whose rows change on every login or admin action and that no page shows.
DEFAULT_ORM_TAGS_IGNORE = (
    "sessions.session",
    "admin.logentry",
    "contenttypes.contenttype",
    "auth.permission",
)
DEFAULT_MAX_ROWS = 100
#: The default of ``bypass``: Django users who are logged in get their own fresh render.
AUTHENTICATED = "authenticated"

_CACHE_SCHEMES = ("file", "memory", "redis", "rediss", "redis+cluster", "rediss+cluster")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with ``PYISR``, as a system check reports it."""

    id: str
    msg: str
    hint: str | None = None


@dataclass(frozen=True)
class ISRSettings:
    """``PYISR`` parsed: the values pyisr uses, and what was wrong with it."""

    #: The handler URL (an absolute path for the default file cache); ``None`` when
    #: there is nowhere absolute to put it (no ``BASE_DIR``).
    cache: str | None = None
    memory_tier: int = 50 * 1024 * 1024
    site_url: str | None = None
    allowed_hosts: tuple[str, ...] | None = None
    lifetime: Lifetime = Lifetime(None)
    render_timeout: float = 30.0
    render_concurrency: int = 16
    debug_cache: bool = False
    draft_secret: str | None = None
    draft_mode: bool = False
    bypass: Callable[[Any], bool] | None = None
    orm_tags: bool = True
    orm_tags_max_rows: int = DEFAULT_MAX_ROWS
    orm_tags_ignore: frozenset[str] = frozenset(DEFAULT_ORM_TAGS_IGNORE)
    #: CDNs purged on every invalidation (pyisr.cdn), their tokens present.
    cdn: tuple[str, ...] = ()
    #: How pages are served; ``None``: not in ``PYISR``, so ``PYISR_CDN_TAG_HEADERS``,
    #: ``PYISR_COMPRESS``, ``PYISR_REWARM_RATE`` or the default (``pyisr.configure``).
    cdn_tag_headers: tuple[str, ...] | None = None
    compress: bool | None = None
    rewarm_rate: float | None = None
    #: The deploy's build id (pyisr.app_builds); ``None``: pages outlive deploys.
    build_id: str | None = None
    problems: tuple[Problem, ...] = field(default=())

    @property
    def errors(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if ".E" in p.id)


def get() -> ISRSettings:
    """The project's parsed ``PYISR`` (defaults when Django's settings are not configured)."""
    from django.conf import settings

    if not settings.configured:
        return ISRSettings()
    return _parse_current()


#: Whether the app is in ``INSTALLED_APPS`` (its ``ready()`` says so): then the engine
#: follows ``PYISR``, and invalid settings stop ``@isr`` rather than serve another cache.
_installed: list[bool] = []


def mark_installed() -> None:
    _installed[:] = [True]


def checked() -> ISRSettings:
    """:func:`get`, refusing settings with errors when the app configured the engine from them."""
    found = get()
    if _installed and found.errors:
        from django.core.exceptions import ImproperlyConfigured

        listed = "; ".join(f"{p.id}: {p.msg}" for p in found.errors)
        raise ImproperlyConfigured(f"PYISR is invalid ({listed}); `manage.py check` lists the fixes")
    return found


def clear() -> None:
    """Forget the parsed settings (``PYISR`` or what it depends on changed)."""
    _parse_current.cache_clear()


def _setting_changed(setting: str, **_: Any) -> None:
    if setting in ("PYISR", "BASE_DIR"):
        clear()


setting_changed.connect(_setting_changed, dispatch_uid="pyisr-settings")  # override_settings()


@functools.cache
def _parse_current() -> ISRSettings:
    from django.conf import settings

    return parse(
        getattr(settings, "PYISR", {}),
        base_dir=getattr(settings, "BASE_DIR", None),
        environ=os.environ,
    )


def parse(raw: object, *, base_dir: object, environ: Mapping[str, str]) -> ISRSettings:
    """Parse a ``PYISR`` value; every problem is collected, none raised."""
    problems: list[Problem] = []
    if not isinstance(raw, Mapping):
        problems.append(Problem("pyisr.E001", f"PYISR must be a dict, not {type(raw).__name__}."))
        raw = {}
    for key in raw:
        if key not in KEYS:
            close = difflib.get_close_matches(str(key), KEYS, n=1)
            hint = f"Did you mean {close[0]!r}?" if close else "Known keys: " + ", ".join(sorted(KEYS))
            problems.append(Problem("pyisr.E002", f"PYISR has an unknown key {key!r}.", hint))
    values: dict[str, Any] = {}
    values["cache"] = _cache(raw.get("cache") or environ.get("PYISR_CACHE"), base_dir, problems)
    values.update(_numbers(raw, problems))
    values["lifetime"] = _lifetime(raw, problems)
    values["site_url"] = _site_url(raw.get("site_url"), problems)
    values["allowed_hosts"] = _hosts(raw.get("allowed_hosts"), problems)
    values["debug_cache"] = bool(raw.get("debug_cache", False))
    secret = (
        raw.get("draft_secret")
        or raw.get("revalidate_secret")
        or environ.get("PYISR_DRAFT_SECRET")
        or environ.get("PYISR_REVALIDATE_SECRET")
        or None
    )
    draft_mode = raw.get("draft_mode", bool(secret))
    if draft_mode and not secret:
        problems.append(
            Problem(
                "pyisr.E006",
                "PYISR['draft_mode'] is on but no secret signs its cookies.",
                "Set PYISR['draft_secret'] (or 'revalidate_secret', or PYISR_DRAFT_SECRET).",
            )
        )
    values["draft_secret"] = secret
    values["draft_mode"] = bool(draft_mode and secret)
    values["bypass"] = _bypass(raw.get("bypass", AUTHENTICATED), problems)
    values["orm_tags"] = bool(raw.get("orm_tags", True))
    values["orm_tags_ignore"] = _ignored(raw.get("orm_tags_ignore", ()), problems)
    values["cdn"] = _cdn(raw.get("cdn", environ.get("PYISR_CDN", "")), environ, problems)
    values.update(_serving(raw, problems))
    values["build_id"] = _build_id(
        raw.get("build_id") or environ.get("PYISR_BUILD_ID"), values["cache"], problems
    )
    return ISRSettings(**values, problems=tuple(problems))


def _build_id(value: object, cache: str | None, problems: list[Problem]) -> str | None:
    """The deploy's build id, checked now rather than at the first request."""
    if value is None or value == "":
        return None
    from pyisr.app_builds import check_build_id, scope_cache

    try:
        build_id = check_build_id(value, "PYISR['build_id']")
        scope_cache(cache, build_id, ".")
    except ValueError as exc:
        example = 'PYISR["build_id"] = os.environ.get("GIT_COMMIT")'
        problems.append(Problem("pyisr.E012", f"{exc}.", f"For example {example}."))
        return None
    return build_id


def _serving(raw: Mapping[str, Any], problems: list[Problem]) -> dict[str, Any]:
    """``cdn_tag_headers``, ``compress`` and ``rewarm_rate``, checked by the parsers a
    site's ``pyisr.toml`` goes through (``compress`` must be a real bool here: the
    string ``"false"`` in Python code is a mistake, not a choice)."""
    from pyisr.config import PARSERS, SERVING_KEYS

    out: dict[str, Any] = {}
    for key in SERVING_KEYS:
        if key not in raw:
            continue
        value = raw[key]
        try:
            if key == "compress" and not isinstance(value, bool):
                raise ValueError("expected True or False")
            out[key] = PARSERS[key][0](value)
        except (TypeError, ValueError) as exc:
            problems.append(Problem("pyisr.E007", f"PYISR[{key!r}]: {exc}, not {value!r}."))
    return out


def _cdn(value: object, environ: Mapping[str, str], problems: list[Problem]) -> tuple[str, ...]:
    """The CDN URLs, each with its token in ``environ`` (a missing one is an error now, not
    an invalidation that silently never reaches the edge)."""
    from pyisr.cdn.urls import parse_cdn_urls, purger_from_url

    try:
        urls = parse_cdn_urls(value)
        for url in urls:
            purger_from_url(url, environ)
    except ValueError as exc:
        example = 'PYISR["cdn"] = ["varnish://127.0.0.1:6081"]'
        problems.append(Problem("pyisr.E011", f"PYISR['cdn']: {exc}", f"For example {example}."))
        return ()
    return urls


def _cache(value: object, base_dir: object, problems: list[Problem]) -> str | None:
    """The cache URL, a relative directory anchored at ``BASE_DIR``; ``None`` if it cannot be."""
    if value is not None and not isinstance(value, str):
        problems.append(Problem("pyisr.E003", f"PYISR['cache'] must be a string, not {value!r}."))
        return None
    url = value or ".pyisr/cache"
    parsed = urlparse(url)
    scheme = parsed.scheme if len(parsed.scheme) > 1 else ""  # "C:" is a drive, not a scheme
    if scheme and scheme not in _CACHE_SCHEMES:
        problems.append(
            Problem(
                "pyisr.E003",
                f"PYISR['cache'] has an unknown scheme {scheme!r}.",
                "Use a directory, file:///path, memory:// or redis://host:6379/0.",
            )
        )
        return None
    if scheme not in ("", "file"):
        if scheme == "memory":
            problems.append(
                Problem(
                    "pyisr.W001",
                    "PYISR['cache'] is memory://: each process has its own cache.",
                    "Other workers and manage.py commands never see its pages or invalidations; "
                    "use a directory or Redis when the site runs more than one process.",
                )
            )
        return url
    path = Path((parsed.netloc + parsed.path) if scheme else url)
    if path.is_absolute():
        return str(path)
    if base_dir is None:
        problems.append(
            Problem(
                "pyisr.E004",
                f"Cannot place the cache {url!r}: it is relative and the settings define no BASE_DIR.",
                "Set BASE_DIR, or PYISR['cache'] to an absolute path or a URL: a cache relative to "
                "the current directory would differ between runserver, gunicorn and manage.py.",
            )
        )
        return None
    return str(Path(str(base_dir)).resolve() / path)


def _numbers(raw: Mapping[str, Any], problems: list[Problem]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    checks: list[tuple[str, Callable[[Any], Any], str]] = [
        ("render_timeout", lambda v: float(v) if float(v) > 0 else None, "a number of seconds > 0"),
        ("render_concurrency", lambda v: v if isinstance(v, int) and v >= 1 else None, "an integer >= 1"),
        ("orm_tags_max_rows", lambda v: v if isinstance(v, int) and v >= 0 else None, "an integer >= 0"),
        ("memory_tier", lambda v: parse_size(v) if parse_size(v) >= 0 else None, "a size such as '50MB'"),
    ]
    for key, convert, what in checks:
        if key not in raw:
            continue
        value = raw[key]
        try:
            converted = None if isinstance(value, bool) else convert(value)
        except (TypeError, ValueError):
            converted = None
        if converted is None:
            problems.append(Problem("pyisr.E007", f"PYISR[{key!r}] must be {what}, not {value!r}."))
        else:
            out[key] = converted
    return out


def _lifetime(raw: Mapping[str, Any], problems: list[Problem]) -> Lifetime:
    try:
        return lifetimes.parse(raw.get("revalidate", False), raw.get("expire"), where="PYISR['revalidate']")
    except ValueError as exc:
        problems.append(Problem("pyisr.E005", f"{exc}."))
        return Lifetime(None)


def _site_url(value: object, problems: list[Problem]) -> str | None:
    if value is None:
        return None
    from pyisr.origin import parse_site_url

    try:
        parse_site_url(str(value), where="PYISR['site_url']")
    except ValueError as exc:
        problems.append(Problem("pyisr.E008", f"{exc}."))
        return None
    return str(value)


def _hosts(value: object, problems: list[Problem]) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(h, str) for h in value):  # type: ignore[attr-defined]
        problems.append(Problem("pyisr.E007", "PYISR['allowed_hosts'] must be a list of host names."))
        return None
    return tuple(value)  # type: ignore[arg-type]


def _bypass(value: object, problems: list[Problem]) -> Callable[[Any], bool] | None:
    if value is None:
        return None
    if value == AUTHENTICATED:
        return is_authenticated
    if callable(value):
        return value
    from django.utils.module_loading import import_string

    try:
        found = import_string(str(value))
    except ImportError as exc:
        problems.append(Problem("pyisr.E009", f"PYISR['bypass'] cannot be imported: {exc}."))
        return None
    if not callable(found):
        problems.append(Problem("pyisr.E009", f"PYISR['bypass'] ({value!r}) is not callable."))
        return None
    return found


def _ignored(value: object, problems: list[Problem]) -> frozenset[str]:
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):  # type: ignore[attr-defined]
        problems.append(Problem("pyisr.E010", "PYISR['orm_tags_ignore'] must be a list of model labels."))
        return frozenset(DEFAULT_ORM_TAGS_IGNORE)
    return frozenset(DEFAULT_ORM_TAGS_IGNORE) | {v.lower() for v in value}  # type: ignore[attr-defined]


def is_authenticated(request: Any) -> bool:
    """The default bypass: the visitor is a logged-in Django user (auth middleware installed)."""
    user = getattr(request, "user", None)
    return bool(user is not None and user.is_authenticated)
