"""A local stand-in for a CDN's purge API: a threaded HTTP server on 127.0.0.1 that records
every request, checks it against the provider's published format, and answers as told.

No request leaves the machine: adapters are pointed at it with ``api=`` (Fastly,
Cloudflare), as a webhook URL, or as the Varnish host. Tests tell it to fail the next
N requests (with a status, or by hanging past the adapter's timeout) and read back what
arrived. Reusable by any test that needs to see purges (the Varnish tests too).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Recorded:
    """One request as it arrived."""

    method: str
    path: str
    query: dict[str, list[str]]
    #: Lower-case names; a repeated header keeps its last value.
    headers: dict[str, str]
    body: bytes
    #: When it arrived (``time.monotonic()``).
    at: float = 0.0
    #: What the format check found wrong (empty: the request is as the provider documents).
    problems: list[str] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def keys(self) -> list[str]:
        """The keys this purge named, whichever provider's format it used."""
        for name in ("xkey-purge", "xkey-softpurge"):
            if name in self.headers:
                return self.headers[name].split()
        try:
            data = self.json()
        except ValueError:
            return []
        for field_name in ("surrogate_keys", "tags", "keys"):
            if isinstance(data, dict) and isinstance(data.get(field_name), list):
                return list(data[field_name])
        return []


#: Checks a request; returns what is wrong with it.
Check = Callable[[Recorded], list[str]]
#: What to answer: status, headers, body.
Answer = tuple[int, Mapping[str, str], bytes]


def check_varnish(secret: str | None = None) -> Check:
    """The protocol of deploy/varnish/pyisr.vcl: ``PURGE /`` with ``xkey-purge`` or
    ``xkey-softpurge`` (space-separated keys) and the secret header when one is set."""

    def check(req: Recorded) -> list[str]:
        problems = []
        if req.method != "PURGE" or req.path != "/":
            problems.append(f"expected PURGE /, got {req.method} {req.path}")
        named = [h for h in ("xkey-purge", "xkey-softpurge") if h in req.headers]
        if len(named) != 1:
            problems.append(f"expected exactly one of xkey-purge / xkey-softpurge, got {named}")
        elif not req.headers[named[0]].strip() or "," in req.headers[named[0]]:
            problems.append(f"{named[0]} must be space-separated keys: {req.headers[named[0]]!r}")
        if secret is not None and req.headers.get("x-pyisr-purge-secret") != secret:
            problems.append("missing or wrong x-pyisr-purge-secret")
        if len(req.headers.get("xkey-purge", req.headers.get("xkey-softpurge", ""))) > 8000:
            problems.append("the key header is over 8000 bytes: Varnish would refuse it")
        return problems

    return check


def varnish_answer(req: Recorded) -> Answer:
    """What the shipped VCL answers: 200 with the number of objects purged."""
    return 200, {"x-pyisr-purged": str(len(req.keys))}, b""


def check_fastly(service_id: str, token: str) -> Check:
    """Fastly's bulk surrogate-key purge: ``POST /service/{id}/purge``, ``Fastly-Key``, keys
    in a JSON ``surrogate_keys`` list (256 at most) or a ``Surrogate-Key`` header,
    ``Fastly-Soft-Purge: 1`` for a soft purge."""

    def check(req: Recorded) -> list[str]:
        problems = []
        if req.method != "POST" or req.path != f"/service/{service_id}/purge":
            problems.append(f"expected POST /service/{service_id}/purge, got {req.method} {req.path}")
        if req.headers.get("fastly-key") != token:
            problems.append("missing or wrong Fastly-Key")
        soft = req.headers.get("fastly-soft-purge")
        if soft is not None and soft != "1":
            problems.append(f"Fastly-Soft-Purge must be 1 when present, not {soft!r}")
        if "surrogate-key" not in req.headers:
            problems += _json_list(req, "surrogate_keys", 256)
        return problems

    return check


def fastly_answer(req: Recorded) -> Answer:
    """Fastly's answer: each key and the id of its purge."""
    body = {key: f"purge-{i}" for i, key in enumerate(req.keys)}
    return 200, {"content-type": "application/json"}, json.dumps(body).encode()


def check_cloudflare(zone_id: str, token: str) -> Check:
    """Cloudflare's purge by tags: ``POST /client/v4/zones/{zone}/purge_cache``, a bearer
    token, ``{"tags": [...]}`` (30 at most, and nothing else to purge in the same call)."""

    def check(req: Recorded) -> list[str]:
        problems = []
        if req.method != "POST" or req.path != f"/client/v4/zones/{zone_id}/purge_cache":
            problems.append(f"expected POST /client/v4/zones/{zone_id}/purge_cache, got {req.path}")
        if req.headers.get("authorization") != f"Bearer {token}":
            problems.append("missing or wrong Authorization: Bearer")
        problems += _json_list(req, "tags", 30)
        try:
            data = req.json()
        except ValueError:
            return problems
        if isinstance(data, dict) and set(data) - {"tags"}:
            problems.append(f"only tags may be purged in one call, got {sorted(data)}")
        return problems

    return check


def cloudflare_answer(req: Recorded) -> Answer:
    body = {"success": True, "errors": [], "messages": [], "result": {"id": "0123456789abcdef"}}
    return 200, {"content-type": "application/json"}, json.dumps(body).encode()


def check_webhook(token: str | None = None) -> Check:
    """pyisr's webhook: ``POST`` with ``{"keys": [...], "soft": bool}``, a bearer token when set."""

    def check(req: Recorded) -> list[str]:
        problems = []
        if req.method != "POST":
            problems.append(f"expected POST, got {req.method}")
        if token is not None and req.headers.get("authorization") != f"Bearer {token}":
            problems.append("missing or wrong Authorization: Bearer")
        problems += _json_list(req, "keys", None)
        try:
            data = req.json()
            if not isinstance(data.get("soft"), bool):
                problems.append("soft must be true or false")
        except (ValueError, AttributeError):
            pass
        return problems

    return check


def _json_list(req: Recorded, name: str, limit: int | None) -> list[str]:
    if not req.headers.get("content-type", "").startswith("application/json"):
        return ["the body must be JSON (Content-Type: application/json)"]
    try:
        data = req.json()
    except ValueError:
        return ["the body is not JSON"]
    keys = data.get(name) if isinstance(data, dict) else None
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k for k in keys):
        return [f"{name} must be a non-empty list of strings"]
    if limit is not None and len(keys) > limit:
        return [f"{len(keys)} {name} in one call; the limit is {limit}"]
    if len(set(keys)) != len(keys):
        return [f"{name} repeats a key"]
    return []


class PurgeServer:
    """The recording server. ``check`` validates each request (a request with problems is
    answered 400 with them); ``answer`` makes the normal answer."""

    def __init__(self, check: Check, answer: Callable[[Recorded], Answer] | None = None) -> None:
        self.check = check
        self.answer = answer or (lambda req: (200, {}, b"{}"))
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        #: Answers for the next requests, taken in order: a status, or "hang" (no answer
        #: until :meth:`release` or the server stops).
        self._next: list[int | str] = []
        self._released = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                owner._serve(self)

            do_GET = do_POST = do_PURGE = _handle  # noqa: N815 - http.server's naming

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> PurgeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._released.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- what to answer ------------------------------------------------------------------------

    def fail(self, times: int = 1, status: int = 500) -> None:
        """Answer the next ``times`` requests with ``status``."""
        with self._lock:
            self._next += [status] * times

    def hang(self, times: int = 1) -> None:
        """Leave the next ``times`` requests unanswered (until :meth:`release`)."""
        with self._lock:
            self._next += ["hang"] * times

    def release(self) -> None:
        self._released.set()

    # -- what arrived --------------------------------------------------------------------------

    def wait_for(self, n: int, timeout: float = 5.0) -> list[Recorded]:
        """The requests, once at least ``n`` arrived (AssertionError after ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(self.requests) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(self.requests)} purge requests arrived, expected {n}")
                self._arrived.wait(left)
            return list(self.requests)

    def keys(self) -> list[str]:
        """Every key named so far, in order."""
        with self._lock:
            return [key for req in self.requests for key in req.keys]

    def problems(self) -> list[str]:
        with self._lock:
            return [p for req in self.requests for p in req.problems]

    # -- the handler ---------------------------------------------------------------------------

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("content-length") or 0)
        body = handler.rfile.read(length) if length else b""
        parts = urlsplit(handler.path)
        req = Recorded(
            handler.command,
            parts.path,
            parse_qs(parts.query),
            {k.lower(): v for k, v in handler.headers.items()},
            body,
            time.monotonic(),
        )
        req.problems = self.check(req)
        with self._arrived:
            self.requests.append(req)
            planned = self._next.pop(0) if self._next else None
            self._arrived.notify_all()
        if planned == "hang":
            self._released.wait(30)
            handler.close_connection = True  # nothing is answered: the client sees the connection end
            return
        if req.problems:
            status, headers, out = (
                400,
                {"content-type": "application/json"},
                json.dumps(req.problems).encode(),
            )
        elif isinstance(planned, int):
            status, headers, out = planned, {}, f"failing as told ({planned})".encode()
        else:
            status, headers, out = self.answer(req)
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("content-length", str(len(out)))
        handler.end_headers()
        handler.wfile.write(out)
