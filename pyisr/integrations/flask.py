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

from pyisr.engine import Engine, Rendered, RenderPolicy
from pyisr.http import private_cache_control
from pyisr.integrations import (
    DEFAULT_ALLOW_HEADERS,
    SESSION_REASON,
    FailedResponse,
    allow_list,
    cacheable,
    check_options,
    key_for_decoded_path,
    page_policy,
    path_info_for,
    pattern_from_rule,
    serve_page,
)
from pyisr.lifetimes import Lifetime
from pyisr.origin import CanonicalOrigin, Origin
from pyisr.paths import normalize_path
from pyisr.runtime import get_engine, run_sync

View = Callable[..., Any]

#: Set while pyisr dispatches a render, so the decorated view runs instead of re-entering.
_rendering: ContextVar[bool] = ContextVar("pyisr_flask_rendering", default=False)


def isr(
    revalidate: object = False,
    *,
    expire: int | None = None,
    tags: Iterable[str] | None = None,
    engine: Engine | None = None,
    allow_headers: Iterable[str] = DEFAULT_ALLOW_HEADERS,
    site_url: str | None = None,
    allowed_hosts: Iterable[str] = (),
) -> Callable[[View], View]:
    """Cache a Flask view's GET/HEAD responses with ISR.

    ``revalidate``: seconds, ``False``/``None`` (until invalidated), a profile name
    (``"hours"``, or one of ``pyisr.toml``'s) or ``0`` (never cached). ``expire``: seconds
    after which a page is never served (else the profile's, or one year). ``tags``:
    explicit tags for ``revalidate_tag``. Each page also carries its
    path's implicit tags and its URL rule's (``revalidate_path("/blog/[id]", "page")``).

    One render is served to every visitor, so the render is a request context built
    from nothing: a GET for the same path with no query string, no body, no cookies (an
    empty session), no client address and only the ``allow_headers`` (none by default).
    Its host is ``site_url`` (default ``PYISR_SITE_URL``), else the request's host when
    it is the app's ``SERVER_NAME``, in its ``TRUSTED_HOSTS`` or in ``allowed_hosts``,
    else ``localhost``. It is dispatched through the app (``before_request`` /
    ``after_request`` hooks and error handlers run, so ``abort(404)`` caches a 404) in
    one of pyisr's render threads, with a fresh ``g``. A render that sets a cookie, says
    ``private``/``no-store``/``Vary: *`` or touches ``session`` is never stored: the view
    answers each visitor itself (``no-store``) and a shared render is tried again a
    minute later. Async views work as Flask runs them (``ensure_sync``). A 5xx or an
    exception is a failed render, never cached.
    """
    lifetime, tag_tuple = check_options(revalidate, tags, "@isr", expire)
    options = _Options(
        lifetime,
        tag_tuple,
        engine,
        allow_list(allow_headers),
        CanonicalOrigin(site_url, allowed_hosts, where="@isr site_url"),
    )

    def decorate(view: View) -> View:
        # revalidate(path) can reach this view now (and from every engine it later serves with).
        (engine if engine is not None else get_engine()).add_resolver(_resolve)

        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            app: Any = flask.current_app._get_current_object()  # type: ignore[attr-defined]
            request = flask.request
            if _rendering.get() or not cacheable(request.method, request.script_root + request.path):
                return app.ensure_sync(view)(*args, **kwargs)
            _remember_site(app, request.environ)
            eng = engine if engine is not None else get_engine()
            eng.add_resolver(_resolve)
            key, policy = _key_and_policy(request, lifetime, tag_tuple)
            failed = FailedResponse()
            origin = options.origin_for(app, request.scheme, request.host)
            environ = _shared_environ(request.path, request.script_root, origin, request.environ, options)
            render = _render(app, environ, failed)
            # HEAD keeps its body here: werkzeug drops it and keeps the Content-Length.
            if_none_match = request.headers.get("If-None-Match")
            answer = run_sync(
                serve_page(eng, key, render, policy, failed, if_none_match=if_none_match, head=False)
            )
            if answer is None:
                # The page belongs to its visitor: the view answers this one itself.
                response = app.make_response(app.ensure_sync(view)(*args, **kwargs))
                own = response.headers.get("Cache-Control")
                response.headers["Cache-Control"] = private_cache_control(own)
                return response
            headers = answer.text_headers()
            response = flask.Response(answer.body, status=answer.status, headers=headers)
            if not any(k == "content-type" for k, _ in headers):
                del response.headers["Content-Type"]
            return response

        wrapper.__pyisr_isr__ = options  # type: ignore[attr-defined]
        return wrapper

    return decorate


@dataclass(frozen=True)
class _Options:
    """What ``@isr`` was given, kept on the wrapper so ``revalidate(path)`` can render it."""

    lifetime: Lifetime
    tags: tuple[str, ...]
    engine: Engine | None
    allowed: frozenset[str]
    origin: CanonicalOrigin

    def origin_for(self, app: Any, scheme: str | None, host: str | None) -> Origin:
        """The canonical origin, or the request's host when the app vouches for it."""
        hosts = [h for h in (app.config.get("SERVER_NAME"),) if h]
        hosts += list(app.config.get("TRUSTED_HOSTS") or ())
        if scheme is None:
            return self.origin.default(hosts)
        return self.origin.for_request(scheme, host, hosts)


def _shared_environ(
    path: str, script_root: str, origin: Origin, visitor: dict[str, Any], options: _Options
) -> dict[str, Any]:
    """The WSGI environ of a shared render: built from nothing but the path and the origin."""
    from werkzeug.test import EnvironBuilder

    headers = [
        (k[5:].replace("_", "-"), str(v))
        for k, v in visitor.items()
        if k.startswith("HTTP_") and k != "HTTP_HOST" and k[5:].replace("_", "-").lower() in options.allowed
    ]
    builder = EnvironBuilder(path=path, base_url=f"{origin.url}{script_root}", method="GET", headers=headers)
    try:
        environ: dict[str, Any] = builder.get_environ()
    finally:
        builder.close()
    environ.pop("REMOTE_ADDR", None)
    return environ


def _render(app: Any, environ: dict[str, Any], failed: FailedResponse) -> Callable[[], Rendered]:
    """The render: a fresh request context for ``environ``, dispatched through the app."""

    def render() -> Rendered:
        import io

        with app.request_context({**environ, "wsgi.input": io.BytesIO(b"")}):
            token = _rendering.set(True)
            try:
                response = app.full_dispatch_request()
            finally:
                _rendering.reset(token)
            touched = _session_touched(app)
        return _rendered(response, failed, SESSION_REASON if touched else None)

    return render


def _session_touched(app: Any) -> bool:
    """Whether the render read or wrote ``session`` (without touching it ourselves).

    Flask >= 3.1.3 marks the session accessed when the context's ``session`` property is
    read, so the object is taken from the context's attributes instead. With no secret
    key there is no session to read (a NullSession says "accessed" regardless).
    """
    ctx = flask.globals.request_ctx._get_current_object()  # type: ignore[attr-defined]
    attrs = vars(ctx)
    session = attrs.get("_session", attrs.get("session"))
    if session is None or app.session_interface.is_null_session(session):
        return False
    return bool(getattr(session, "accessed", False) or getattr(session, "modified", False))


# -- revalidate(path): regenerate a page of an @isr view now ---------------------------------

#: The app and the script root of the last request an @isr view served: where
#: ``revalidate(path)`` outside a request dispatches (nothing of the visitor's).
_site: dict[str, Any] = {}


def _remember_site(app: Any, environ: dict[str, Any]) -> None:
    _site["app"] = weakref.ref(app)
    _site["script"] = str(environ.get("SCRIPT_NAME", "")).rstrip("/")


def _current_app() -> Any:
    if flask.has_app_context():
        return flask.current_app._get_current_object()  # type: ignore[attr-defined]
    ref = _site.get("app")
    return ref() if ref is not None else None


async def _resolve(key: str) -> tuple[str, Any, RenderPolicy] | None:
    """``pyisr.revalidate(path)`` for Flask: the @isr view the app routes ``key`` to."""
    app = _current_app()
    if app is None:
        return None
    script = _site.get("script", "")
    path = path_info_for(key, script)
    if path is None:
        return None
    options = _view_options(app, path, script)
    if options is None:
        return None
    environ = _shared_environ(path, script, options.origin_for(app, None, None), {}, options)
    with app.request_context(environ):
        resolved, policy = _key_and_policy(flask.request, options.lifetime, options.tags)
    return resolved, _render(app, environ, FailedResponse()), policy


def _view_options(app: Any, path: str, script: str) -> _Options | None:
    """The ``@isr`` options of the view ``path`` routes to, if it is one of this engine's."""
    from werkzeug.exceptions import HTTPException

    adapter = app.url_map.bind("localhost", script_name=script or None)
    try:
        endpoint, _ = adapter.match(path, method="GET")
    except (HTTPException, Exception):  # noqa: BLE001 - no route, a redirect, or 405
        return None
    options = getattr(app.view_functions.get(endpoint), "__pyisr_isr__", None)
    if not isinstance(options, _Options) or options.engine not in (None, get_engine()):
        return None  # not an @isr view, or one caching in an engine of its own
    return options


def _key_and_policy(request: Any, lifetime: Lifetime, tags: tuple[str, ...]) -> tuple[str, RenderPolicy]:
    key = key_for_decoded_path(request.script_root + request.path)
    pattern = None
    rule = getattr(request.url_rule, "rule", None)
    if isinstance(rule, str):
        found = pattern_from_rule(rule)
        if found is not None:
            root = key_for_decoded_path(request.script_root).rstrip("/")
            pattern = normalize_path(root + found)
    return key, page_policy(key, pattern, lifetime, tags)


def _rendered(response: Any, failed: FailedResponse, private: str | None) -> Rendered:
    """A Flask response as the engine's render result."""
    body = response.get_data()
    status = int(response.status_code)
    headers = list(response.headers.items())
    if status >= 500:
        failed.response = (status, headers, body)
    return Rendered(body, status=status, headers=headers, private=private)


__all__ = ["isr"]
