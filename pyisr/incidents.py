"""Failures that repeat on every request, counted per reason and logged once a minute.

A full disk, a read-only cache directory or a store that is down makes every render's
write fail; every page refused for want of a render slot fails the same way. One log
line per request would bury the log (and the one line that says what is wrong) under
thousands of copies, so each *reason* (the exception type with its errno, or the shape
of its message) is logged at most once per :data:`LOG_EVERY` seconds of the engine's
clock, with the count of those not logged, and kept for the health report.
"""

from __future__ import annotations

import errno
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyisr.log import log_fields

logger = logging.getLogger("pyisr.cache")

#: Seconds between two log lines of one reason; also how long a failure keeps health degraded.
LOG_EVERY = 60.0
#: Reasons remembered at most (a store raising ever-new messages cannot grow this for ever).
MAX_REASONS = 64

_NUMBER = re.compile(r"\d+")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def failure_reason(exc: BaseException) -> str:
    """What makes two failures the same: ``OSError[ENOSPC]``, or the type and message shape.

    Numbers and quoted names (paths, keys, ports) are blanked out of the message, so the
    same failure for different pages or connections counts as one reason.
    """
    name = type(exc).__name__
    code = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and isinstance(code, int):
        return f"{name}[{errno.errorcode.get(code, code)}]"
    shape = _NUMBER.sub("#", _QUOTED.sub("…", str(exc)))
    shape = " ".join(shape.split())[:80]
    return f"{name}: {shape}" if shape else name


@dataclass
class Incident:
    """One reason's record: how often, when last, what it said and about which key."""

    count: int
    last_at: float
    message: str
    key: str
    logged_at: float
    unlogged: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "last_at": self.last_at, "message": self.message, "key": self.key}


class Incidents:
    """Failures of one kind (``what``: "store", "render") per reason, on ``clock``."""

    def __init__(
        self, clock: Callable[[], float], what: str, *, on_record: Callable[[str], None] | None = None
    ) -> None:
        self._clock = clock
        self.what = what
        #: Told the operation of every failure recorded (the metrics' ``op`` label).
        self._on_record = on_record
        self._by_reason: dict[str, Incident] = {}

    def record(
        self, exc: BaseException, key: str, doing: str, reason: str | None = None, *, op: str = "other"
    ) -> None:
        """Count ``exc`` (met while ``doing`` something for ``key``); log it unless logged lately.

        ``reason`` groups failures the caller knows are one (else :func:`failure_reason`);
        ``op`` names the operation in a word (``set``, ``lock``), for the metrics.
        """
        if self._on_record is not None:
            self._on_record(op)
        reason = reason or failure_reason(exc)
        now = self._clock()
        message = str(exc) or type(exc).__name__
        found = self._by_reason.get(reason)
        if found is None:
            if len(self._by_reason) >= MAX_REASONS:
                del self._by_reason[next(iter(self._by_reason))]
            self._by_reason[reason] = Incident(1, now, message, key, logged_at=now)
            self._log(key, doing, reason, message, 0)
            return
        found.count += 1
        found.last_at, found.message, found.key = now, message, key
        if now - found.logged_at >= LOG_EVERY:
            self._log(key, doing, reason, message, found.unlogged)
            found.logged_at, found.unlogged = now, 0
        else:
            found.unlogged += 1

    def _log(self, key: str, doing: str, reason: str, message: str, unlogged: int) -> None:
        more = f"; {unlogged} more since the last line" if unlogged else ""
        logger.error(
            "%s %s FAILED %s: %s (%s; logged at most once a minute per reason%s)",
            key,
            self.what.upper(),
            reason,
            message,
            doing,
            more,
            extra=log_fields(
                f"{self.what.upper()}_FAILED",  # STORE_FAILED, RENDER_FAILED
                key,
                reason=reason,
                message=message,
                details=doing,
                unlogged=unlogged or None,
            ),
        )

    def report(self) -> dict[str, dict[str, Any]]:
        """Every remembered reason, JSON-able."""
        return {reason: incident.to_json() for reason, incident in self._by_reason.items()}

    def recent(self, within: float = LOG_EVERY) -> dict[str, Incident]:
        """Reasons that failed in the last ``within`` seconds."""
        now = self._clock()
        return {r: i for r, i in self._by_reason.items() if now - i.last_at < within}
