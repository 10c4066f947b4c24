"""Logging of cache events: text lines for people, or one JSON object per line for machines.

**Text** (the default): ``<key> <WORD> <details>``, the key first, then the decision word,
then details, so ``grep /blog/1`` shows a page's whole history. Decisions are logged only
with ``PYISR_DEBUG_CACHE=1``; failures always. Disabled, a decision costs one test.

**JSON** (``PYISR_LOG_FORMAT=json``, or ``log_format = "json"`` in ``pyisr.toml``): every
line of the ``pyisr.cache`` and ``pyisr.fetch`` loggers is one JSON object: ``event`` (the
word: ``MISS``, ``REGENERATE``, ``FAILED``, ``INVALIDATE``, ``STORE_FAILED``, …; ``LOG``
for a line that names none), ``key``, ``route``, ``duration_ms``, ``build_id``,
``reason`` (what went wrong), ``details``, ``level``, ``time`` (UTC, ISO 8601), and
whatever else the call adds (``kind`` and ``by`` of an invalidation). Fields with no
value are left out.

Which events are logged when:

- *per-request decisions* (``HIT``, ``STALE``, ``EXPIRED``, ``INVALIDATED``, ``PRIVATE``,
  ``NOT_ALLOWED``, ``FALLBACK``) only with ``PYISR_DEBUG_CACHE``, in either format. There
  is one per request; the server's fast path answers a hot page without formatting
  anything, and a line per hit shipped to a log store would cost more than the hit. The
  metrics (:mod:`pyisr.metrics`) count them instead.
- *renders, invalidations and store failures* (:data:`JSON_EVENTS`) always in JSON. There
  is one line per render (which costs milliseconds; the line, microseconds) or per
  invalidation, and they are what an operator asks about afterwards: when did
  ``/blog/1`` last regenerate and how long did it take, which render failed and why,
  who invalidated ``posts``. Store failures are already limited to one line per reason
  a minute (:mod:`pyisr.incidents`). In text they stay as they were (debug only,
  failures always), so nothing changes for whoever reads today's lines.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

logger = logging.getLogger("pyisr.cache")
fetch_logger = logging.getLogger("pyisr.fetch")

#: Events logged in JSON whether or not PYISR_DEBUG_CACHE is on (see the module's doc).
JSON_EVENTS = frozenset(
    {
        "MISS",  # a page rendered because nothing was cached
        "REGENERATE",  # a page rendered again (stale, invalidated, on demand), or skipped
        "ADOPT",  # another process's render taken instead of rendering
        "FAILED",  # a render raised; the last good page stays served
        "UNCACHED",  # an expected outcome that is never cached (a fetch answered 404)
        "UNSTORED",  # rendered, the store refused it
        "FENCED",  # rendered, a newer entry was stored meanwhile
        "INVALIDATE",  # a tag revalidated: its pages wait for a fresh render
        "MARK_STALE",  # a tag marked stale: its pages are refreshed in the background
        "STORE_FAILED",  # the store refused a write, a lock, a record
        "RENDER_FAILED",  # a render refused: every render slot is held by a stuck render
    }
)

#: The process's settings: the format, debug on, and the build id every JSON line carries.
_settings: dict[str, Any] = {"json": False, "debug": False, "build_id": None}


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def debug_cache_enabled() -> bool:
    return env_flag("PYISR_DEBUG_CACHE")


def json_logs_enabled() -> bool:
    """Whether lines are JSON: set by :func:`configure_log_format`, or ``PYISR_LOG_FORMAT=json``."""
    return bool(_settings["json"]) or os.environ.get("PYISR_LOG_FORMAT", "").strip().lower() == "json"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: the fields the call gave (``extra={"pyisr": {...}}``)."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] | None = getattr(record, "pyisr", None)
        out: dict[str, Any] = {}
        if fields:
            out.update((k, v) for k, v in fields.items() if v is not None and v != "")
        else:
            out["event"] = "LOG"
            out["message"] = record.getMessage()
        if "build_id" not in out and _settings["build_id"] is not None:
            out["build_id"] = _settings["build_id"]
        out["level"] = record.levelname.lower()
        out["logger"] = record.name
        out["time"] = _iso_time(record.created)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def _iso_time(created: float) -> str:
    seconds = int(created)
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int((created - seconds) * 1000):03d}Z"
    )


def _install(stream: object = None) -> None:
    """pyisr's own handler on ``pyisr.cache`` and ``pyisr.fetch``, in the format and at the
    level the settings say (idempotent: called again, it updates the one handler)."""
    formatter = JsonFormatter() if json_logs_enabled() else logging.Formatter("%(message)s")
    level = logging.DEBUG if _settings["debug"] else logging.INFO
    for log in (logger, fetch_logger):
        handler = next((h for h in log.handlers if getattr(h, "_pyisr", False)), None)
        if handler is None:
            handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
            handler._pyisr = True  # type: ignore[attr-defined]
            log.addHandler(handler)
        handler.setFormatter(formatter)
        log.setLevel(level)
        log.propagate = False


def enable_debug_logging(stream: object = None) -> None:
    """Send ``pyisr.cache`` and ``pyisr.fetch`` lines, decisions included, to stderr (idempotent)."""
    _settings["debug"] = True
    _install(stream)


def configure_log_format(
    log_format: str | None, *, build_id: str | None = None, cache_log: CacheLog | None = None
) -> None:
    """Lines as ``"json"`` or ``"text"`` for this process (the site's ``log_format``), every
    JSON line carrying ``build_id``; ``cache_log`` (an engine's) follows the format too.

    Called once by a server at start-up: one process serves one build.
    """
    if build_id is not None:
        _settings["build_id"] = build_id
    if log_format is not None:
        _settings["json"] = log_format == "json"
    if json_logs_enabled():
        _install()
        if cache_log is not None:
            cache_log.use_json()
    elif any(getattr(h, "_pyisr", False) for h in logger.handlers):
        _install()  # back to text lines


#: ``log_fetches`` / ``log_fetches_full_url`` from the site's configuration (pyisr.toml,
#: PYISR_* or flags), set by whoever loads it; the environment alone works without one.
_fetch_settings = {"log": False, "full_url": False}


def configure_fetch_logging(log_fetches: bool, full_url: bool) -> None:
    """Log every ``fetch`` with its cache outcome (Next.js' ``logging.fetches``)."""
    _fetch_settings["log"] = log_fetches
    _fetch_settings["full_url"] = full_url


def fetch_logging() -> tuple[bool, bool]:
    """Whether to log fetches, and whether with full URLs."""
    enabled = _fetch_settings["log"] or env_flag("PYISR_LOG_FETCHES") or debug_cache_enabled()
    full = _fetch_settings["full_url"] or env_flag("PYISR_LOG_FETCHES_FULL_URL")
    return enabled, full


def log_fields(event: str, key: str, **fields: Any) -> dict[str, Any]:
    """``extra=`` for a logging call: the fields of its JSON line (ignored by text lines)."""
    return {"pyisr": {"event": event, "key": key, **fields}}


class CacheLog:
    """The engine's logger: ``<key> <WORD> <details>`` lines, or their JSON objects.

    ``enabled`` is debug on (every decision logged; the fast path asks it before it logs
    a hit). Keyword fields of :meth:`decision` and :meth:`failure` (``route``,
    ``duration_ms``, ``reason``, …) only reach JSON lines.
    """

    def __init__(self, enabled: bool | None = None, *, json_format: bool | None = None) -> None:
        self.enabled = debug_cache_enabled() if enabled is None else enabled
        #: Words logged although debug is off: :data:`JSON_EVENTS` in JSON, none in text.
        self._always: frozenset[str] = frozenset()
        if self.enabled:
            enable_debug_logging()
        if json_logs_enabled() if json_format is None else json_format:
            self.use_json()

    def use_json(self) -> None:
        """Log :data:`JSON_EVENTS` whether or not debug is on (JSON lines)."""
        self._always = JSON_EVENTS
        _install()

    def decision(self, key: str, word: str, details: str = "", **fields: Any) -> None:
        if self.enabled or word in self._always:
            logger.log(
                logging.INFO if word in JSON_EVENTS else logging.DEBUG,
                "%s %s%s",
                key,
                word,
                f" {details}" if details else "",
                extra=log_fields(word, key, details=details, **fields),
            )

    def failure(self, key: str, word: str, exc: BaseException, details: str = "", **fields: Any) -> None:
        """Failures are logged whether or not debugging is on: a failing page must be seen."""
        extra = f" {details}" if details else ""
        reason = f"{type(exc).__name__}: {exc}"
        logger.error(
            "%s %s%s %s: %s",
            key,
            word,
            extra,
            type(exc).__name__,
            exc,
            extra=log_fields(word, key, reason=reason, details=details, **fields),
        )
