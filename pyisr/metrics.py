"""Prometheus metrics of an engine, and how to expose them.

:class:`MetricsSink` is a sink of :mod:`pyisr.events`: every report (each
:data:`~pyisr.events.REPORT_EVERY` seconds, and just before a scrape) it adds the report's
counts to ``prometheus_client`` metrics and sets its gauges from the engine's state:

========================================  ===========================================================
``pyisr_requests_total{cache, route}``     answers by cache status (HIT, STALE, MISS, BYPASS,
                                           PRIVATE, NOT_ALLOWED, FALLBACK), the fast path's included
``pyisr_regenerations_total{result,        renders and their outcome (:data:`pyisr.events.RESULTS`)
route}``
``pyisr_regeneration_seconds{route}``      histogram of the renders that ran (not ``skipped``,
                                           ``adopted`` or ``refused``: no render ran)
``pyisr_invalidations_total{kind}``        tag, path, page, layout, regenerate
``pyisr_store_errors_total{op}``           set, lock, unlock, record, activity, …
``pyisr_cdn_purges_total{cdn, result}``    keys purged at each CDN (pyisr.cdn.queue): ``sent``,
                                           ``failed`` (refused for good), ``retried``, ``dropped``
                                           (given up after the retries, or at shutdown)
``pyisr_renders_in_flight``                render slots held now (sum over workers)
``pyisr_renders_stuck``                    renders past their timeout whose thread still runs (sum)
``pyisr_store_degraded``                   1 while the store is down or failing, or every render
                                           slot is stuck (:meth:`Engine.degraded_reasons`; max)
``pyisr_tier_bytes``                       bytes of the memory tier (or of a ``memory://`` store;
                                           sum over workers: each has its own)
``pyisr_entries``                          entries the store holds, where that is cheap to know:
                                           the file-system cache's index (its cap's count) or a
                                           ``memory://`` store's; absent for Redis (max over workers)
========================================  ===========================================================

Labels are few by construction: ``route`` is a route pattern (``/blog/[id]``, ``data`` for
the data cache, ``other``), never a path, and at most :data:`MAX_ROUTES` distinct ones are
kept (the rest are counted as ``other``).

**Several workers.** Under ``pyisr start --workers N`` each worker is a process with its
own counters: ``prometheus_client``'s multi-process mode adds them up. The supervisor
makes a private directory for the run and exports it as ``PROMETHEUS_MULTIPROC_DIR``
before any worker starts (pyisr/server/supervisor.py); each worker writes its values
there, the worker answering a scrape reads them all (``MultiProcessCollector``), and the
gauges of a worker that exited are dropped when the supervisor reaps it. Without that
variable (an ``App`` run directly, tests, the integrations under one process) the metrics
live in a registry of the sink's own.

**Fresh at scrape.** The worker answering a scrape reports its own counts first; the others'
are at most one report interval old.

**Exposing them.** The site server answers ``GET /_pyisr/metrics`` (``metrics_secret`` /
``metrics_allow``: :class:`MetricsAccess`). In a Starlette or FastAPI app, mount
:func:`metrics_app`; in Django or Flask, call :func:`enable` at start-up and answer a
view with :func:`render_latest` (README, Metrics).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyisr.config import IPNetwork, as_networks
from pyisr.events import Delta

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

    from pyisr.engine import Engine

logger = logging.getLogger("pyisr.server")

#: prometheus_client's variable naming its multi-process directory.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: The text exposition format :func:`prometheus_client.generate_latest` writes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Distinct ``route`` label values kept; further routes are counted as ``other``.
MAX_ROUTES = 200
#: Render durations, from a template render (milliseconds) to the default render timeout (30 s).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Results of regenerations in which a render ran (and so was timed).
_RENDERED = frozenset({"ok", "failed", "timeout", "uncached", "unstored", "fenced", "private"})


def multiprocess_dir() -> str | None:
    """The multi-process directory, when this process is one of several workers."""
    return os.environ.get(MULTIPROC_ENV) or None


def _use_multiprocess_values() -> None:
    """Make metrics created from now on write to the multi-process directory.

    prometheus_client picks how values are kept when it is first imported; a process that
    imported it before the variable was set (a worker forked from a process that had) would
    otherwise keep them in memory, where no other worker's scrape sees them.
    """
    from prometheus_client import values

    if values.ValueClass is values.MutexValue:
        values.ValueClass = values.get_value_class()


class RouteLabels:
    """The ``route`` label of a pattern: itself, while fewer than ``limit`` were seen."""

    def __init__(self, limit: int = MAX_ROUTES) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, route: str) -> str:
        if route in self._seen:
            return route
        if len(self._seen) >= self.limit:
            return "other"
        self._seen.add(route)
        return route


class MetricsSink:
    """The metrics of one engine (a :class:`pyisr.events.Sink`); see the module's doc."""

    def __init__(self, engine: Engine) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.engine = engine
        self.multiprocess = multiprocess_dir() is not None
        if self.multiprocess:
            _use_multiprocess_values()
        #: The sink's own registry (one process); in multi-process mode values go to files.
        self.registry: Any = None if self.multiprocess else CollectorRegistry()
        self.routes = RouteLabels()
        registry = self.registry
        self.requests = Counter(
            "pyisr_requests",
            "Answers by cache status and route pattern.",
            ["cache", "route"],
            registry=registry,
        )
        self.regenerations = Counter(
            "pyisr_regenerations",
            "Regenerations by result and route pattern.",
            ["result", "route"],
            registry=registry,
        )
        self.regeneration_seconds = Histogram(
            "pyisr_regeneration_seconds",
            "Seconds a render took (renders that ran), by route pattern.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.invalidations = Counter(
            "pyisr_invalidations", "Invalidations by kind.", ["kind"], registry=registry
        )
        self.store_errors = Counter(
            "pyisr_store_errors", "Store operations that failed, by operation.", ["op"], registry=registry
        )
        self.cdn_purges = Counter(
            "pyisr_cdn_purges",
            "Keys purged at each CDN, by result (sent, failed, retried, dropped).",
            ["cdn", "result"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "pyisr_renders_in_flight",
            "Render slots held now.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.stuck = Gauge(
            "pyisr_renders_stuck",
            "Renders past their timeout whose thread still runs.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.degraded = Gauge(
            "pyisr_store_degraded",
            "1 while the store is down or failing, or every render slot is stuck.",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.tier_bytes = Gauge(
            "pyisr_tier_bytes",
            "Bytes held by the memory tier (or a memory:// store).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        #: Only for a store that counts its entries: a gauge never set would say 0.
        self.entries = (
            Gauge(
                "pyisr_entries",
                "Entries in the store, as the file-system cache's index (or a memory:// store) counts them.",
                registry=registry,
                multiprocess_mode="livemax",
            )
            if counts_entries(engine.handler.describe())
            else None
        )
        self.set_gauges()

    def report(self, delta: Delta) -> None:
        routes = self.routes
        for (status, route), n in delta.requests.items():
            self.requests.labels(cache=status, route=routes(route)).inc(n)
        for regeneration in delta.regenerations:
            route = routes(regeneration.route)
            self.regenerations.labels(result=regeneration.result, route=route).inc()
            if regeneration.result in _RENDERED:
                self.regeneration_seconds.labels(route=route).observe(regeneration.seconds)
        for (route, result), n in delta.untimed.items():
            self.regenerations.labels(result=result, route=routes(route)).inc(n)
        for kind, n in delta.invalidations.items():
            self.invalidations.labels(kind=kind).inc(n)
        for op, n in delta.store_errors.items():
            self.store_errors.labels(op=op).inc(n)
        for (cdn, result), n in delta.cdn_purges.items():
            self.cdn_purges.labels(cdn=cdn, result=result).inc(n)
        self.set_gauges()

    def set_gauges(self) -> None:
        """The engine's state now: renders, health, the memory tier, the store's entries."""
        engine = self.engine
        self.in_flight.set(engine.slots.busy())
        self.stuck.set(len(engine.slots.stuck()))
        info = engine.handler.describe()
        self.degraded.set(1 if info.get("degraded") or engine.degraded_reasons(edge=False) else 0)
        tier = info.get("memory_tier")
        if isinstance(tier, dict):
            self.tier_bytes.set(tier.get("bytes") or 0)
        elif info.get("handler") == "memory":
            self.tier_bytes.set(info.get("bytes") or 0)
        entries = _entries(info)
        if entries is not None and self.entries is not None:
            self.entries.set(entries)


def counts_entries(info: dict[str, Any]) -> bool:
    """Whether the store described by ``info`` knows its number of entries cheaply: the
    file-system cache (its cap's index) and a memory store do; Redis would need a scan."""
    return isinstance(info.get("budget"), dict) or info.get("handler") == "memory"


def _entries(info: dict[str, Any]) -> int | None:
    """Entries in the store, from its ``describe()``: the file-system cap's index once it was
    built (its ``bytes`` is ``None`` before), a memory store's count; else unknown."""
    budget = info.get("budget")
    if isinstance(budget, dict):
        return budget.get("entries") if budget.get("bytes") is not None else None
    if info.get("handler") == "memory" and isinstance(info.get("entries"), int):
        return int(info["entries"])
    return None


def enable(engine: Engine | None = None) -> MetricsSink:
    """Count ``engine``'s events as metrics (the default engine when ``None``); idempotent.

    Call it at start-up, after :func:`pyisr.configure`: what happens before is not counted.
    The site server calls it when its metrics endpoint is configured.
    """
    if engine is None:
        from pyisr.runtime import get_engine

        engine = get_engine()
    for sink in engine.events.sinks:
        if isinstance(sink, MetricsSink):
            return sink
    sink = MetricsSink(engine)
    engine.events.sinks.append(sink)
    return sink


def exposition(sink: MetricsSink) -> bytes:
    """The metrics in the text format: this process's, or every worker's in multi-process mode."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    path = multiprocess_dir()
    if sink.multiprocess and path is not None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=path)
        return bytes(generate_latest(registry))
    return bytes(generate_latest(sink.registry))


async def scrape(engine: Engine) -> bytes:
    """What a scrape answers: this process's counts reported first, then every worker's."""
    sink = enable(engine)
    await engine.events.report()
    return exposition(sink)


def render_latest(engine: Engine | None = None) -> tuple[bytes, str]:
    """``(body, content_type)`` of the metrics, for a Django or Flask view (sync code).

    Reports this process's counts first when called outside an event loop (through pyisr's
    sync bridge); called from async code, it shows the last report (use ``await scrape``).
    """
    sink = enable(engine)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        from pyisr.runtime import run_sync

        run_sync(sink.engine.events.report())
    return exposition(sink), CONTENT_TYPE


@dataclass(frozen=True)
class MetricsAccess:
    """Who may read the metrics: a bearer ``secret``, or a client address in ``allow``.

    Neither set: nobody (404, the endpoint is off). Otherwise a request is let in with
    ``Authorization: Bearer <secret>`` (compared in constant time) or from an allowed
    address (the connection's peer: behind a proxy, that is the proxy). Refused: 401 when
    a secret exists (``WWW-Authenticate: Bearer``), else 403.
    """

    secret: str | None = None
    allow: tuple[IPNetwork, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.secret) or bool(self.allow)

    def status(self, authorization: str | None, client: str | None) -> int:
        """200 to let the request in, else the status that refuses it."""
        if not self.enabled:
            return 404
        if self.secret and authorization and authorization[:7].lower() == "bearer ":
            if hmac.compare_digest(authorization[7:].strip().encode(), self.secret.encode()):
                return 200
        if self.allow and client and _allowed(client, self.allow):
            return 200
        return 401 if self.secret else 403


def _allowed(client: str, networks: Iterable[IPNetwork]) -> bool:
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return False  # not an IP address (a Unix socket's peer, a test client's name)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:10.0.0.1 on a dual-stack socket
    return any(address in network for network in networks)


_REFUSED = {
    401: b"metrics: give Authorization: Bearer <metrics secret>\n",
    403: b"metrics: this address is not in metrics_allow\n",
    404: b"metrics are off: set metrics_secret or metrics_allow\n",
}


async def metrics_answer(
    engine: Engine, access: MetricsAccess, authorization: str | None, client: str | None
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """``(status, headers, body)`` of a metrics request: the metrics, or a refusal without them."""
    status = access.status(authorization, client)
    headers = [(b"cache-control", b"no-store")]
    if status != 200:
        headers.append((b"content-type", b"text/plain; charset=utf-8"))
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="pyisr metrics"'))
        return status, headers, _REFUSED[status]
    body = await scrape(engine)
    headers.append((b"content-type", CONTENT_TYPE.encode()))
    return 200, headers, body


def metrics_app(
    engine: Engine | None = None,
    *,
    secret: str | None = None,
    allow: Iterable[str] | str = (),
) -> Any:
    """An ASGI app answering the metrics (GET or HEAD), to mount in Starlette or FastAPI::

        app.mount("/metrics", pyisr.metrics.metrics_app(secret=os.environ["METRICS_SECRET"]))

    ``engine``: the default engine when ``None`` (looked up per request, so one installed
    later by :func:`pyisr.configure` is the one shown). ``allow``: addresses or networks
    (``["127.0.0.1", "10.0.0.0/8"]``) let in without the secret. With neither a secret nor
    an address it answers 404, as the site server does.
    """
    access = MetricsAccess(secret or None, as_networks(allow if isinstance(allow, str) else list(allow)))
    if not access.enabled:
        logger.warning("pyisr metrics_app: neither secret nor allow given, so it answers 404")
    if engine is not None:
        enable(engine)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan and websockets: nothing to do
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            await _send(send, 405, [(b"allow", b"GET, HEAD")], b"Method Not Allowed\n", method)
            return
        authorization = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                authorization = value.decode("latin-1")
        client = scope.get("client")
        target = engine
        if target is None:
            from pyisr.runtime import get_engine

            target = get_engine()
        status, headers, body = await metrics_answer(
            target, access, authorization, client[0] if client else None
        )
        await _send(send, status, headers, body, method)

    return app


async def _send(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes, method: str
) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})
