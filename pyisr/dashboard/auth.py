"""Who may use the dashboard: the secret, the session cookie, CSRF tokens, sign-in limits.

The dashboard keeps no server-side sessions, so every worker and instance accepts the
same cookie: signing in with the secret sets ``<issued>.<expires>.<nonce>.<mac>``, the
MAC an HMAC-SHA256 under a key derived from the secret (so changing the secret signs
everybody out). A session's CSRF token is an HMAC of its nonce under another derived
key: a form carries it, and a POST without the token of the session it arrives with is
refused. Every comparison is constant-time. Wrong secrets are limited per client
address (:class:`SignInLimiter`), in each process.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

#: How long a sign-in lasts.
SESSION_SECONDS = 8 * 3600
#: Wrong secrets one address may send in :data:`WINDOW_SECONDS` before it must wait.
MAX_FAILURES = 5
WINDOW_SECONDS = 60.0
#: Addresses whose failures are remembered (the oldest are forgotten first).
MAX_ADDRESSES = 10_000
_VERSION = "v1"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def derive_key(secret: str, purpose: str) -> bytes:
    """A key for one purpose, derived from the secret (never the secret itself)."""
    return hmac.new(secret.encode(), b"pyisr-dashboard:" + purpose.encode(), hashlib.sha256).digest()


def secret_matches(given: str, secret: str) -> bool:
    return hmac.compare_digest(given.encode(), secret.encode())


@dataclass(frozen=True)
class Session:
    """A valid sign-in: when it ends, and the nonce its CSRF token is made from."""

    expires: int
    nonce: str


class Sessions:
    """Makes and checks session cookies and their CSRF tokens for one secret."""

    def __init__(self, secret: str, *, clock: Callable[[], float] = time.time) -> None:
        self._session_key = derive_key(secret, "session")
        self._csrf_key = derive_key(secret, "csrf")
        self._flash_key = derive_key(secret, "flash")
        self._clock = clock

    def _now(self) -> int:
        return int(self._clock())

    def _mac(self, key: bytes, text: str) -> str:
        return _b64(hmac.new(key, text.encode(), hashlib.sha256).digest())

    def new(self) -> tuple[str, Session]:
        """A new session's cookie value and the session."""
        issued = self._now()
        session = Session(issued + SESSION_SECONDS, secrets.token_urlsafe(18))
        payload = f"{_VERSION}.{issued}.{session.expires}.{session.nonce}"
        return f"{payload}.{self._mac(self._session_key, payload)}", session

    def read(self, cookie: str | None) -> Session | None:
        """The session of a cookie value, or ``None`` when it is missing, forged or expired."""
        if not cookie or len(cookie) > 200:
            return None
        payload, _, mac = cookie.rpartition(".")
        if not hmac.compare_digest(mac.encode(), self._mac(self._session_key, payload).encode()):
            return None
        parts = payload.split(".")
        if len(parts) != 4 or parts[0] != _VERSION or not parts[2].isdigit():
            return None
        expires = int(parts[2])
        if expires <= self._now():
            return None
        return Session(expires, parts[3])

    def csrf_token(self, session: Session) -> str:
        return self._mac(self._csrf_key, session.nonce)

    def csrf_ok(self, session: Session, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.csrf_token(session).encode())

    def sign_flash(self, session: Session, payload: str) -> str:
        """``payload`` signed for this session only (the result of an action, shown once)."""
        return f"{payload}.{self._mac(self._flash_key, session.nonce + '|' + payload)}"

    def read_flash(self, session: Session, value: str | None) -> str | None:
        if not value:
            return None
        payload, _, mac = value.rpartition(".")
        expected = self._mac(self._flash_key, session.nonce + "|" + payload)
        return payload if hmac.compare_digest(mac.encode(), expected.encode()) else None


class SignInLimiter:
    """Wrong secrets per client address: after :data:`MAX_FAILURES` in a window, wait.

    Per process (each worker counts its own), bounded by :data:`MAX_ADDRESSES`. Behind a
    proxy every visitor has the proxy's address, so they share one allowance: slower
    for an operator who mistypes, never easier for someone guessing.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._clock = clock

    def _recent(self, address: str) -> deque[float]:
        now = self._clock()
        found = self._failures.get(address)
        if found is None:
            return deque()
        while found and found[0] <= now - WINDOW_SECONDS:
            found.popleft()
        return found

    def retry_after(self, address: str) -> int:
        """Seconds ``address`` must wait before trying again; 0 when it may try now."""
        recent = self._recent(address)
        if len(recent) < MAX_FAILURES:
            return 0
        now = self._clock()
        return max(1, int(recent[0] + WINDOW_SECONDS - now + 0.999))

    def failed(self, address: str) -> None:
        recent = self._recent(address)
        recent.append(self._clock())
        self._failures[address] = recent
        self._failures.move_to_end(address)
        while len(self._failures) > MAX_ADDRESSES:
            self._failures.popitem(last=False)


def origin_problem(origin: str | None, fetch_site: str | None, host: str) -> str | None:
    """Why a POST looks sent by another site, or ``None`` when it looks like our own form.

    The ``Origin`` header, when the browser sends one, must name the host the request
    was sent to (its scheme is not compared: a proxy may end TLS in front of us); without
    it, ``Sec-Fetch-Site`` must not say ``cross-site``.
    """
    if origin is not None:
        netloc = urlsplit(origin).netloc.lower() if origin != "null" else ""
        if netloc != host.lower():
            return (
                f"this form was sent from {origin!r}, not from {host!r}: refused "
                "(behind a proxy, pass the Host header through)"
            )
        return None
    if fetch_site is not None and fetch_site.lower() in ("cross-site", "same-site"):
        return "this form was sent from another site: refused"
    return None
