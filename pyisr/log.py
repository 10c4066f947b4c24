"""Debug logging of cache decisions (``PYISR_DEBUG_CACHE=1``).

One line per decision, the key first, then the decision word, then details, so
``grep /blog/1`` shows a page's whole history. Disabled, it costs one boolean test.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("pyisr.cache")
fetch_logger = logging.getLogger("pyisr.fetch")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def debug_cache_enabled() -> bool:
    return env_flag("PYISR_DEBUG_CACHE")


def enable_debug_logging(stream: object = None) -> None:
    """Send ``pyisr.cache`` and ``pyisr.fetch`` lines to stderr (idempotent)."""
    for log in (logger, fetch_logger):
        if not any(getattr(h, "_pyisr", False) for h in log.handlers):
            handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
            handler.setFormatter(logging.Formatter("%(message)s"))
            handler._pyisr = True  # type: ignore[attr-defined]
            log.addHandler(handler)
        log.setLevel(logging.DEBUG)
        log.propagate = False


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


class CacheLog:
    """The engine's logger: formats ``<key> <WORD> <details>`` lines when enabled."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = debug_cache_enabled() if enabled is None else enabled
        if self.enabled:
            enable_debug_logging()

    def decision(self, key: str, word: str, details: str = "") -> None:
        if self.enabled:
            logger.debug("%s %s%s", key, word, f" {details}" if details else "")

    def failure(self, key: str, word: str, exc: BaseException, details: str = "") -> None:
        """Failures are logged whether or not debugging is on: a failing page must be seen."""
        extra = f" {details}" if details else ""
        logger.error("%s %s%s %s: %s", key, word, extra, type(exc).__name__, exc)
