"""ISR for Flask views: ``@isr(revalidate=60, tags=["posts"])``.

::

    from flask import Flask, render_template
    from pyisr.integrations.flask import isr

    app = Flask(__name__)

    @app.get("/blog/<int:id>")
    @isr(revalidate=60, tags=["posts"])
    def post(id):
        return render_template("post.html", post=load_post(id))

GET and HEAD requests are served from the cache by normalised path (the query string
never makes a new entry), with stale-while-revalidate, single-flight renders and
keep-last-good; other methods call the view as usual. Put ``@isr`` *below* the route
decorator. ``pyisr.revalidate(path)`` regenerates the page of an ``@isr`` view now,
dispatched through the current app (or the last one that served an ``@isr`` view). Needs
the ``flask`` extra: ``pip install 'pyisr[flask]'``.
"""

from __future__ import annotations

import functools
import io
import weakref
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

try:
    import flask
except ImportError as exc:  # pragma: no cover - exercised only without Flask
    raise ImportError(
        "pyisr.integrations.flask needs Flask: pip install 'pyisr[flask]' (or 'flask>=3')"
    ) from exc

from pyisr.cache.entry import Revalidate
from pyisr.engine import Engine, Rendered, RenderPolicy
from pyisr.integrations import (
    DEFAULT_ALLOW_HEADERS,
    FailedResponse,
    allow_list,
    check_options,
    key_for_decoded_path,
    no_store,
    page_policy,
    path_info_for,
    pattern_from_rule,
    response_parts,
    storable_headers,
)
from pyisr.paths import normalize_path
from pyisr.revalidation import register_view_resolver
from pyisr.runtime import get_engine, run_sync

View = Callable[..., Any]

#: Set while pyisr dispatches a render, so the decorated view runs instead of re-entering.
_rendering: ContextVar[bool] = ContextVar("pyisr_flask_rendering", default=False)


def isr(
    revalidate: object = False,
    *,
    tags: Iterable[str] | None = None,
    engine: Engine | None = None,
    allow_headers: Iterable[str] = DEFAULT_ALLOW_HEADERS,
) -> Callable[[View], View]:
    """Cache a Flask view's GET/HEAD responses with ISR.

    ``revalidate``: seconds, ``False``/``None`` (until invalidated) or ``0`` (never
    cached). ``tags``: explicit tags for ``revalidate_tag``. Each page also carries its
    path's implicit tags and its URL rule's (``revalidate_path("/blog/[id]", "page")``).

    One render is served to every visitor, so the render is a fresh request context
    that identifies no one: a GET for the same path with no query string, no body, no
    cookies (an empty session) and only the ``allow_headers`` (default ``host``). It is
    dispatched through the app (``before_request``/``after_request`` hooks and error
    handlers run, so ``abort(404)`` caches a 404) in one of pyisr's render threads, with
    a fresh ``g``. Cookies the render sets are not stored. Async views work as Flask
    runs them (``ensure_sync``). A 5xx or an exception is a failed render, never cached.
    """
    seconds, tag_tuple = check_options(revalidate, tags, "@isr")
    allowed = allow_list(allow_headers)

    def decorate(view: View) -> View:
        register_view_resolver(_resolve)  # revalidate(path) can reach this view now
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            app: Any = flask.current_app._get_current_object()  # type: ignore[attr-defined]
            request = flask.request
            if _rendering.get() or request.method not in ("GET", "HEAD"):
                return app.ensure_sync(view)(*args, **kwargs)
            _remember_site(app, request.environ)
            eng = engine if engine is not None else get_engine()
            key, policy = _key_and_policy(request, seconds, tag_tuple)
            failed = FailedResponse()
            render = _render(app, _anonymous_environ(request.environ, allowed), failed)
            try:
                served = run_sync(eng.get(key, render, policy))
            except Exception:
                if failed.response is None:
                    raise
                status, headers, body = failed.response
                return flask.Response(body, status=status, headers=no_store(headers))
            status, headers, body = response_parts(
                served, eng.clock(), request.headers.get("If-None-Match"), head=False
            )
            response = flask.Response(body, status=status, headers=headers)
            if not any(k == "content-type" for k, _ in headers):
                del response.headers["Content-Type"]
            return response

        wrapper.__pyisr_isr__ = _Options(seconds, tag_tuple, engine, allowed)  # type: ignore[attr-defined]
        return wrapper

    return decorate


@dataclass(frozen=True)
class _Options:
    """What ``@isr`` was given, kept on the wrapper so ``revalidate(path)`` can render it."""

    seconds: Revalidate
    tags: tuple[str, ...]
    engine: Engine | None
    allowed: frozenset[str]


def _render(app: Any, environ: dict[str, Any], failed: FailedResponse) -> Callable[[], Rendered]:
    """The render: a fresh request context for ``environ``, dispatched through the app."""

    def render() -> Rendered:
        fresh = {**environ, "wsgi.input": io.BytesIO(b"")}
        with app.request_context(fresh):
            token = _rendering.set(True)
            try:
                response = app.full_dispatch_request()
            finally:
                _rendering.reset(token)
        return _rendered(response, failed)

    return render


# -- revalidate(path): regenerate a page of an @isr view now ---------------------------------

#: The app and the environ (host, scheme, script root) of the last request an @isr view
#: served: what a page regenerated by ``revalidate(path)`` outside a request sees.
_site: dict[str, Any] = {}


def _remember_site(app: Any, environ: dict[str, Any]) -> None:
    _site["app"] = weakref.ref(app)
    _site["base"] = {
        k: environ[k]
        for k in ("HTTP_HOST", "SERVER_NAME", "SERVER_PORT", "SCRIPT_NAME", "wsgi.url_scheme")
        if k in environ
    }


def _current_app() -> Any:
    if flask.has_app_context():
        return flask.current_app._get_current_object()  # type: ignore[attr-defined]
    ref = _site.get("app")
    return ref() if ref is not None else None


async def _resolve(key: str) -> tuple[str, Any, RenderPolicy] | None:
    """``pyisr.revalidate(path)`` for Flask: the @isr view the app routes ``key`` to."""
    from werkzeug.test import EnvironBuilder

    app = _current_app()
    if app is None:
        return None
    base = _site.get("base", {})
    script = str(base.get("SCRIPT_NAME", "")).rstrip("/")
    path = path_info_for(key, script)
    if path is None:
        return None
    host = base.get("HTTP_HOST") or base.get("SERVER_NAME") or "localhost"
    scheme = base.get("wsgi.url_scheme", "http")
    environ = EnvironBuilder(path=path, base_url=f"{scheme}://{host}{script}", method="GET").get_environ()
    with app.request_context(environ):
        request = flask.request
        if request.routing_exception is not None or request.url_rule is None:
            return None
        options = getattr(app.view_functions.get(request.url_rule.endpoint), "__pyisr_isr__", None)
        if not isinstance(options, _Options) or options.engine not in (None, get_engine()):
            return None  # not an @isr view, or one caching in an engine of its own
        resolved, policy = _key_and_policy(request, options.seconds, options.tags)
    render = _render(app, _anonymous_environ(environ, options.allowed), FailedResponse())
    return resolved, render, policy



def _key_and_policy(request: Any, seconds: Revalidate, tags: tuple[str, ...]) -> tuple[str, RenderPolicy]:
    key = key_for_decoded_path(request.script_root + request.path)
    pattern = None
    rule = getattr(request.url_rule, "rule", None)
    if isinstance(rule, str):
        found = pattern_from_rule(rule)
        if found is not None:
            root = key_for_decoded_path(request.script_root).rstrip("/")
            pattern = normalize_path(root + found)
    return key, page_policy(key, pattern, seconds, tags)


def _anonymous_environ(environ: dict[str, Any], allowed: frozenset[str]) -> dict[str, Any]:
    """The request's WSGI environ minus the query, body and every header not allowed."""
    out = {
        k: v
        for k, v in environ.items()
        if not (k.startswith("HTTP_") and k[5:].replace("_", "-").lower() not in allowed)
        and not k.startswith(("werkzeug.", "flask."))
    }
    for name in ("CONTENT_LENGTH", "CONTENT_TYPE"):
        out.pop(name, None)
    out.update({"REQUEST_METHOD": "GET", "QUERY_STRING": "", "wsgi.input": io.BytesIO(b"")})
    return out


def _rendered(response: Any, failed: FailedResponse) -> Rendered:
    """A Flask response as the engine's render result."""
    body = response.get_data()
    status = int(response.status_code)
    headers = list(response.headers.items())
    if status >= 500:
        failed.response = (status, headers, body)
    return Rendered(body, status=status, headers=storable_headers(headers))


__all__ = ["isr"]
