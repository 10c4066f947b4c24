"""ISR for Flask views: ``@isr(revalidate=60, tags=["posts"])``.

::

    from flask import Flask, render_template
    from pyisr.integrations.flask import init_app, isr

    app = Flask(__name__)
    init_app(app)            # optional: see "Request hooks" below

    @app.get("/blog/<int:id>")
    @isr(revalidate=60, tags=["posts"])
    def post(id):
        return render_template("post.html", post=load_post(id))

GET and HEAD requests are served from the cache by normalised path (the query string
never makes a new entry), with stale-while-revalidate, single-flight renders and
keep-last-good; other methods call the view as usual. Put ``@isr`` *below* the route
decorator. ``pyisr.revalidate(path)`` regenerates the page of an ``@isr`` view now,
dispatched through the current app (or the last one that served an ``@isr`` view), with
or without the rule's trailing slash. Needs the ``flask`` extra: ``pip install 'pyisr[flask]'``.

Request hooks. A cached page is answered before Flask dispatches the request, as a cache
in front of the app would: a HIT runs no view and no hook. The render that makes a page
is one dispatch of the app (``before_request``, the view, error handlers,
``after_request``, ``teardown_request``), so on a MISS each hook runs once. pyisr sets
this up on the app (it wraps ``app.wsgi_app``, innermost) at the first request an
``@isr`` view gets; until then that one request runs the hooks for the visitor and again
for the render. :func:`init_app` sets it up at once.
"""

from __future__ import annotations

import functools
import io
import threading
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

from pyisr.app_builds import begin_serving
from pyisr.engine import Engine, Rendered, RenderPolicy
from pyisr.http import private_cache_control
from pyisr.integrations import (
    BYPASS_HEADERS,
    DEFAULT_ALLOW_HEADERS,
    SESSION_REASON,
    Bypass,
    FailedResponse,
    allow_list,
    cacheable,
    check_options,
    is_bypassed,
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
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

#: Set while pyisr dispatches a render, so the decorated view runs instead of re-entering.
_rendering: ContextVar[bool] = ContextVar("pyisr_flask_rendering", default=False)

#: The environ key where the interceptor tells the view how to answer a request it let
#: through: ``"bypass"`` or ``"private"``.
_OUTCOME = "pyisr.outcome"


def isr(
    revalidate: object = False,
    *,
    expire: int | None = None,
    tags: Iterable[str] | None = None,
    engine: Engine | None = None,
    allow_headers: Iterable[str] = DEFAULT_ALLOW_HEADERS,
    site_url: str | None = None,
    allowed_hosts: Iterable[str] = (),
    bypass: Bypass | None = None,
) -> Callable[[View], View]:
    """Cache a Flask view's GET/HEAD responses with ISR.

    ``revalidate``: seconds, ``False``/``None`` (until invalidated), a profile name
    (``"hours"``, or one of ``pyisr.toml``'s) or ``0`` (never cached). ``expire``: seconds
    after which a page is never served (else the profile's, or one year). ``tags``:
    explicit tags for ``revalidate_tag``. Each page also carries its
    path's implicit tags and its URL rule's (``revalidate_path("/blog/[id]", "page")``).

    ``bypass``: a callable of the visitor's request (a ``flask.Request``, called before
    Flask dispatches it, so read cookies and headers, or :func:`visitor_session`) that
    returns true for a visitor who must get a fresh page of their own (logged-in users,
    editors). Requests in draft mode (``pyisr.draft``) always bypass. A bypassed request
    is dispatched as usual, never stored, and answered ``x-pyisr-cache: BYPASS`` with
    ``Cache-Control: no-store``.

    One render is served to every visitor, so the render is a request context built
    from nothing: a GET for the same path with no query string, no body, no cookies (an
    empty session), no client address and only the ``allow_headers`` (none by default).
    Its host is ``site_url`` (default ``PYISR_SITE_URL``), else the request's host when
    it is the app's ``SERVER_NAME``, in its ``TRUSTED_HOSTS`` or in ``allowed_hosts``,
    else ``localhost``. It is dispatched through the app (request hooks and error
    handlers run, so ``abort(404)`` caches a 404) in one of pyisr's render threads, in an
    application context of its own (a fresh ``g``). A render that sets a cookie, says
    ``private``/``no-store``/``Vary: *`` or touches ``session`` is never stored: the view
    answers each visitor itself (``no-store``) and a shared render is tried again a
    minute later. Async views work as Flask runs them (``ensure_sync``). A 5xx or an
    exception is a failed render, never cached.
    """
    lifetime, tag_tuple = check_options(revalidate, tags, "@isr", expire)
    if bypass is not None and not callable(bypass):
        raise ValueError(f"@isr bypass must be a callable of the request, not {bypass!r}")
    options = _Options(
        lifetime,
        tag_tuple,
        engine,
        allow_list(allow_headers),
        CanonicalOrigin(site_url, allowed_hosts, where="@isr site_url"),
        bypass,
    )

    def decorate(view: View) -> View:
        # revalidate(path) can reach this view now (and from every engine it later serves with).
        (engine if engine is not None else get_engine()).add_resolver(_resolver_for(engine))

        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            app: Any = flask.current_app._get_current_object()  # type: ignore[attr-defined]
            environ = flask.request.environ
            outcome = environ.get(_OUTCOME)
            if _rendering.get() or (outcome is None and flask.request.method not in ("GET", "HEAD")):
                return app.ensure_sync(view)(*args, **kwargs)
            if outcome is None:
                # The interceptor is not in place yet (this app's first @isr request):
                # install it for the next requests and answer this one from here.
                init_app(app)
                answer = _answer(app, environ)
                if answer is None:
                    return app.ensure_sync(view)(*args, **kwargs)
                if not isinstance(answer, str):
                    return answer
                outcome = answer
            response = app.make_response(app.ensure_sync(view)(*args, **kwargs))
            if outcome == "bypass":
                for name, value in BYPASS_HEADERS:
                    response.headers[name] = value
            else:  # the page belongs to its visitor: the view answers this one itself
                response.headers["Cache-Control"] = private_cache_control(
                    response.headers.get("Cache-Control")
                )
            return response

        wrapper.__pyisr_isr__ = options  # type: ignore[attr-defined]
        return wrapper

    return decorate


def init_app(app: Any) -> Any:
    """Answer the app's ``@isr`` pages before Flask dispatches their requests; returns ``app``.

    Optional (``@isr`` does it at its first request), but then the first request of an
    ``@isr`` view already runs the hooks once more. It wraps the innermost
    ``app.wsgi_app`` (inside ``ProxyFix`` and other WSGI middleware, which must see the
    request first). Calling it again does nothing.
    """
    with _install_lock:
        if "pyisr" in app.extensions:
            return app
        holder, attr, inner = _innermost(app)
        setattr(holder, attr, _Interceptor(app, inner))
        app.extensions["pyisr"] = True
    return app


_install_lock = threading.Lock()


def _innermost(app: Any) -> tuple[Any, str, WSGIApp]:
    """Where Flask's own ``wsgi_app`` is called: its holder, the attribute and the callable.

    WSGI middleware (``app.wsgi_app = ProxyFix(app.wsgi_app)``) keeps the app it wraps as
    ``.app``; the chain is followed down to Flask's bound method. A chain that cannot be
    followed gets the interceptor outermost.
    """
    holder: Any = app
    attr = "wsgi_app"
    current: Any = app.wsgi_app
    flask_wsgi = getattr(type(app), "wsgi_app", None)
    for _ in range(32):
        if getattr(current, "__self__", None) is app and getattr(current, "__func__", None) is flask_wsgi:
            return holder, attr, current
        inner = getattr(current, "app", None)
        if not callable(inner):
            break
        holder, attr, current = current, "app", inner
    return app, "wsgi_app", app.wsgi_app


class _Interceptor:
    """The WSGI layer that answers ``@isr`` pages; everything else goes to Flask untouched."""

    def __init__(self, app: Any, inner: WSGIApp) -> None:
        self.flask_app = app
        self.app = inner  # ``.app``, as werkzeug's middleware names it: _innermost follows it

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        answer = _answer(self.flask_app, environ)
        if answer is None:
            return self.app(environ, start_response)
        if isinstance(answer, str):
            environ[_OUTCOME] = answer
            return self.app(environ, start_response)
        result: Iterable[bytes] = answer(environ, start_response)
        return result


def visitor_session(request: Any) -> Any:
    """The visitor's session, opened read-only through the app's session interface.

    For ``bypass=`` callables, which run before Flask dispatches the request (so
    ``flask.session`` is not there yet): ``bypass=lambda r: "user_id" in visitor_session(r)``.
    """
    app = request.environ.get("pyisr.app")
    if app is None:
        app = flask.current_app._get_current_object()  # type: ignore[attr-defined]
    session = app.session_interface.open_session(app, request)
    return session if session is not None else {}


def _answer(app: Any, environ: dict[str, Any]) -> Any:
    """A response for an ``@isr`` page, ``"bypass"``/``"private"`` for a request the view
    must answer itself, or ``None`` when no ``@isr`` view routes this request."""
    from werkzeug.exceptions import HTTPException
    from werkzeug.routing import RequestRedirect

    method = environ.get("REQUEST_METHOD", "GET")
    if method not in ("GET", "HEAD"):
        return None
    request = app.request_class(environ)
    try:
        adapter = app.create_url_adapter(request)
        rule, _ = adapter.match(return_rule=True)
    except (HTTPException, RequestRedirect, Exception):  # noqa: BLE001 - Flask answers it
        return None
    options = getattr(app.view_functions.get(rule.endpoint), "__pyisr_isr__", None)
    if not isinstance(options, _Options) or not cacheable(method, request.script_root + request.path):
        return None
    environ["pyisr.app"] = app
    if is_bypassed(request, options.bypass, request.cookies):
        return "bypass"
    _remember_site(app, environ)
    eng = options.engine if options.engine is not None else get_engine()
    eng.add_resolver(_resolver_for(options.engine))
    begin_serving(eng)
    key, policy = _key_and_policy(request.script_root, request.path, rule.rule, options)
    failed = FailedResponse()
    origin = options.origin_for(app, request.scheme, request.host)
    shared = _shared_environ(request.path, request.script_root, origin, environ, options)
    # HEAD keeps its body here: werkzeug drops it and keeps the Content-Length.
    if_none_match = request.headers.get("If-None-Match")
    answer = run_sync(
        serve_page(
            eng,
            key,
            _render(app, shared, failed),
            policy,
            failed,
            if_none_match=if_none_match,
            head=False,
            accept_encoding=request.headers.get("Accept-Encoding"),
        )
    )
    if answer is None:
        return "private"
    headers = answer.text_headers()
    response = app.response_class(answer.body, status=answer.status, headers=headers)
    if not any(k == "content-type" for k, _ in headers):
        del response.headers["Content-Type"]
    return response


@dataclass(frozen=True)
class _Options:
    """What ``@isr`` was given, kept on the wrapper so ``revalidate(path)`` can render it."""

    lifetime: Lifetime
    tags: tuple[str, ...]
    engine: Engine | None
    allowed: frozenset[str]
    origin: CanonicalOrigin
    bypass: Bypass | None = None

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
    """The render: one dispatch of the app for ``environ``, as ``Flask.wsgi_app`` does it,
    in an application context of its own (never the visitor's ``g``)."""

    def render() -> Rendered:
        app_ctx = app.app_context()
        ctx = app.request_context({**environ, "wsgi.input": io.BytesIO(b"")})
        error: BaseException | None = None
        app_ctx.push()
        try:
            ctx.push()
            token = _rendering.set(True)
            try:
                try:
                    response = app.full_dispatch_request()
                except Exception as exc:
                    error = exc
                    response = app.handle_exception(exc)
            finally:
                _rendering.reset(token)
            touched = _session_touched(app)
        finally:
            ctx.pop(error)
            app_ctx.pop(error)
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


#: The resolver of the views caching in an engine of their own (``@isr(engine=...)``), by
#: engine: ``revalidate(path)`` and re-warms asked of that engine find them, and only them.
_own_engine_resolvers: weakref.WeakKeyDictionary[Engine, Callable[[str], Any]] = weakref.WeakKeyDictionary()


def _resolver_for(engine: Engine | None) -> Callable[[str], Any]:
    """The resolver to register on ``engine`` (``None``: the default engine's views)."""
    if engine is None:
        return _resolve
    found = _own_engine_resolvers.get(engine)
    if found is None:
        owner = weakref.ref(engine)

        async def resolve_own(key: str) -> tuple[str, Any, RenderPolicy] | None:
            return await _resolve(key, owner())

        found = _own_engine_resolvers[engine] = resolve_own
    return found


async def _resolve(key: str, engine: Engine | None = None) -> tuple[str, Any, RenderPolicy] | None:
    """``pyisr.revalidate(path)`` for Flask: the @isr view the app routes ``key`` to, if
    it caches in ``engine`` (``None``: the default engine).

    Keys have no trailing slash; a rule that has one (``/docs/<name>/``) is found with it.
    """
    app = _current_app()
    if app is None:
        return None
    script = _site.get("script", "")
    path = path_info_for(key, script)
    if path is None:
        return None
    found = _view_options(app, path, script, engine)
    if found is None and not path.endswith("/"):
        path += "/"
        found = _view_options(app, path, script, engine)
    if found is None:
        return None
    options, rule = found
    environ = _shared_environ(path, script, options.origin_for(app, None, None), {}, options)
    resolved, policy = _key_and_policy(script, path, rule, options)
    return resolved, _render(app, environ, FailedResponse()), policy


def _view_options(app: Any, path: str, script: str, engine: Engine | None) -> tuple[_Options, str] | None:
    """The ``@isr`` options and URL rule of the view ``path`` routes to (exactly: a
    redirect to the slashed rule is no match), if it caches in ``engine``."""
    from werkzeug.exceptions import HTTPException

    adapter = app.url_map.bind("localhost", script_name=script or None)
    try:
        rule, _ = adapter.match(path, method="GET", return_rule=True)
    except (HTTPException, Exception):  # noqa: BLE001 - no route, a redirect, or 405
        return None
    options = getattr(app.view_functions.get(rule.endpoint), "__pyisr_isr__", None)
    if not isinstance(options, _Options) or options.engine is not engine:
        return None  # not an @isr view, or one caching in another engine
    return options, rule.rule


def _key_and_policy(script_root: str, path: str, rule: str, options: _Options) -> tuple[str, RenderPolicy]:
    key = key_for_decoded_path(script_root + path)
    pattern = None
    found = pattern_from_rule(rule)
    if found is not None:
        root = key_for_decoded_path(script_root).rstrip("/")
        pattern = normalize_path(root + found)
    return key, page_policy(key, pattern, options.lifetime, options.tags)


def _rendered(response: Any, failed: FailedResponse, private: str | None) -> Rendered:
    """A Flask response as the engine's render result."""
    body = response.get_data()
    status = int(response.status_code)
    headers = list(response.headers.items())
    if status >= 500:
        failed.response = (status, headers, body)
    return Rendered(body, status=status, headers=headers, private=private)


__all__ = ["init_app", "isr", "visitor_session"]
