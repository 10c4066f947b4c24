"""Flask: request hooks run once per request, ``revalidate(path)`` with and without a
trailing slash, bypass and draft mode, and automatic tags with Flask + SQLAlchemy.

Real Flask apps driven by Flask's test client over an engine with a fake clock.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

flask = pytest.importorskip("flask")
pytest.importorskip("sqlalchemy")

from flask import Flask, abort, g, request, session  # noqa: E402
from sqlalchemy import String, create_engine, insert  # noqa: E402
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker  # noqa: E402

import pyisr  # noqa: E402
from pyisr import Engine  # noqa: E402
from pyisr.draft import COOKIE, enable_draft_mode  # noqa: E402
from pyisr.http import NOSTORE  # noqa: E402
from pyisr.integrations.flask import init_app, isr, visitor_session  # noqa: E402
from pyisr.integrations.sqlalchemy import track  # noqa: E402
from pyisr.runtime import run_sync  # noqa: E402


class Pages(DeclarativeBase):
    pass


class PageRow(Pages):
    __tablename__ = "pages"
    slug: Mapped[str] = mapped_column(String(50), primary_key=True)
    text: Mapped[str] = mapped_column(String(200))


def hooked_app(name: str, counts: Counter[str]) -> Flask:
    """An app whose hooks count themselves and set ``g`` from who the visitor says they are.

    (A hook that reads ``session`` would make every render private: see the identity tests.)
    """
    app = Flask(name)
    app.secret_key = "k"

    @app.before_request
    def load_user() -> None:
        counts["before_request"] += 1
        if "X-User" in request.headers:
            g.user = request.headers["X-User"]

    @app.after_request
    def stamp(response: Any) -> Any:
        counts["after_request"] += 1
        response.headers["X-Frame-Options"] = "DENY"
        return response

    @app.teardown_request
    def close(exc: BaseException | None) -> None:
        counts["teardown_request"] += 1

    @app.get("/login/<name>")
    def login(name: str) -> str:
        session["user"] = name
        return "ok"

    @app.route("/docs/<name>/", methods=["GET", "POST"])
    @isr(revalidate=60, bypass=lambda r: "user" in visitor_session(r))
    def doc(name: str) -> str:
        counts["view"] += 1
        if name == "missing":
            abort(404)
        return f"{name} for {g.get('user', 'anonymous')} #{counts['view']}"

    @app.get("/preview")
    def preview() -> Any:
        return enable_draft_mode(flask.make_response("draft on"), secret="preview", secure=False)

    return app


def hooks(counts: Counter[str]) -> dict[str, int]:
    return {k: counts[k] for k in ("before_request", "after_request", "teardown_request")}


ONCE = {"before_request": 1, "after_request": 1, "teardown_request": 1}
NONE = {"before_request": 0, "after_request": 0, "teardown_request": 0}


def test_each_request_hook_runs_once_per_request(sync_engine: Engine) -> None:
    counts: Counter[str] = Counter()
    app = init_app(hooked_app("pyisr_hooks", counts))
    client = app.test_client()
    steps = [
        ("GET", "/docs/intro/", "MISS", ONCE),  # the render is the one dispatch
        ("GET", "/docs/intro/", "HIT", NONE),  # answered before Flask dispatches
        ("GET", "/docs/missing/", "MISS", ONCE),
        ("POST", "/docs/intro/", None, ONCE),  # not cached: the app as usual
    ]
    for method, path, status, expected in steps:
        counts.clear()
        response = client.open(path, method=method)
        assert response.headers.get("x-pyisr-cache") == status, path
        assert hooks(counts) == expected, (method, path, status)
    assert client.get("/docs/intro/").headers["X-Frame-Options"] == "DENY", "after_request's headers are kept"
    assert client.get("/docs/missing/").status_code == 404


def test_without_init_app_it_installs_itself_at_the_first_request(sync_engine: Engine) -> None:
    counts: Counter[str] = Counter()
    app = hooked_app("pyisr_lazy", counts)
    client = app.test_client()
    client.get("/docs/a/")  # Flask dispatched this one before pyisr was in place
    for path, status, expected in (("/docs/b/", "MISS", ONCE), ("/docs/b/", "HIT", NONE)):
        counts.clear()
        assert client.get(path).headers["x-pyisr-cache"] == status
        assert hooks(counts) == expected
    assert "pyisr" in app.extensions


def test_the_render_never_sees_the_visitors_g(sync_engine: Engine) -> None:
    counts: Counter[str] = Counter()
    app = hooked_app("pyisr_g", counts)  # no init_app: the first request is dispatched for alice
    client = app.test_client()
    first = client.get("/docs/intro/", headers={"X-User": "alice"})
    assert (first.headers["x-pyisr-cache"], first.get_data(as_text=True)) == (
        "MISS",
        "intro for anonymous #1",
    )
    assert (
        client.get("/docs/other/", headers={"X-User": "bob"}).get_data(as_text=True).endswith("anonymous #2")
    )


def test_logged_in_visitors_bypass_the_cache(sync_engine: Engine) -> None:
    counts: Counter[str] = Counter()
    app = init_app(hooked_app("pyisr_bypass", counts))
    client = app.test_client()
    client.get("/login/alice")
    counts.clear()
    mine = client.get("/docs/intro/", headers={"X-User": "alice"})
    assert (mine.headers["x-pyisr-cache"], mine.get_data(as_text=True)) == ("BYPASS", "intro for alice #1")
    assert mine.headers.get_all("Cache-Control") == [NOSTORE]
    assert hooks(counts) == ONCE, "the visitor's own request, dispatched once"
    assert run_sync(sync_engine.inspect("/docs/intro")) is None, "a bypassed render is never stored"
    anonymous = app.test_client().get("/docs/intro/")
    assert anonymous.get_data(as_text=True) == "intro for anonymous #2"


def test_draft_mode_bypasses_the_cache(sync_engine: Engine) -> None:
    counts: Counter[str] = Counter()
    app = init_app(hooked_app("pyisr_draft", counts))
    client = app.test_client()
    assert client.get("/docs/intro/").headers["x-pyisr-cache"] == "MISS"
    client.get("/preview")
    assert client.get_cookie(COOKIE) is not None
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYISR_DRAFT_SECRET", "preview")
        drafted = client.get("/docs/intro/")
    assert drafted.headers["x-pyisr-cache"] == "BYPASS"
    assert drafted.get_data(as_text=True).endswith("#2"), "rendered fresh"


def test_revalidate_with_and_without_the_trailing_slash(sync_engine: Engine) -> None:
    counts: Counter[str] = Counter()
    app = init_app(hooked_app("pyisr_slash", counts))
    client = app.test_client()
    assert client.get("/docs/intro/").get_data(as_text=True) == "intro for anonymous #1"
    assert client.get("/docs/intro").status_code == 308, "Flask's own redirect, never cached"
    with app.app_context():
        pyisr.revalidate_sync("/docs/intro")
        pyisr.revalidate_sync("/docs/intro/")
        with pytest.raises(pyisr.RevalidationError, match="404"):
            pyisr.revalidate_sync("/nowhere")
    again = client.get("/docs/intro/")
    assert (again.headers["x-pyisr-cache"], again.get_data(as_text=True)) == ("HIT", "intro for anonymous #3")


def test_init_app_goes_inside_wsgi_middleware(sync_engine: Engine) -> None:
    from werkzeug.middleware.proxy_fix import ProxyFix

    counts: Counter[str] = Counter()
    app = hooked_app("pyisr_proxy", counts)
    app.config["SERVER_NAME"] = "www.example.com"
    app.wsgi_app = ProxyFix(app.wsgi_app, x_host=1)  # type: ignore[method-assign]
    init_app(app)
    assert isinstance(app.wsgi_app, ProxyFix), "ProxyFix still sees the request first"

    @app.get("/where")
    @isr(revalidate=60)
    def where() -> str:
        return request.host_url

    client = app.test_client()
    proxied = client.get("/where", headers={"X-Forwarded-Host": "www.example.com"})
    assert (proxied.headers["x-pyisr-cache"], proxied.get_data(as_text=True)) == (
        "MISS",
        "http://www.example.com/",
    )


def test_flask_and_sqlalchemy_pages_refresh_after_an_edit(
    sync_engine: Engine, tmp_path: Path, clock: Any
) -> None:
    database = create_engine(f"sqlite:///{tmp_path / 'pages.db'}")
    Pages.metadata.create_all(database)
    with database.begin() as conn:
        conn.execute(insert(PageRow), [{"slug": "home", "text": "welcome"}])
    sessions = track(sessionmaker(database))
    app = init_app(Flask("pyisr_sqlalchemy"))

    def db() -> Session:
        if "db" not in g:
            g.db = sessions()
        return g.db  # type: ignore[no-any-return]

    @app.teardown_appcontext
    def close_db(exc: BaseException | None) -> None:
        found = g.pop("db", None)
        if found is not None:
            found.close()

    @app.get("/p/<slug>/")
    @isr(revalidate=False)
    def show(slug: str) -> str:
        row = db().get(PageRow, slug)
        if row is None:
            abort(404)
        return row.text

    @app.post("/p/<slug>/")
    def edit(slug: str) -> str:
        row = db().get(PageRow, slug)
        assert row is not None
        row.text = request.get_data(as_text=True)
        db().commit()
        return "saved"

    client = app.test_client()
    assert client.get("/p/home/").get_data(as_text=True) == "welcome"
    assert client.get("/p/home/").headers["x-pyisr-cache"] == "HIT"
    clock.advance(1)
    assert client.post("/p/home/", data="hello again").get_data(as_text=True) == "saved"
    clock.advance(1)
    after = client.get("/p/home/")
    assert (after.headers["x-pyisr-cache"], after.get_data(as_text=True)) == ("MISS", "hello again")
    assert {"pages:home", "pages:*"} <= set(run_sync(sync_engine.inspect("/p/home")).tags)  # type: ignore[union-attr]


def test_views_with_an_engine_of_their_own_are_rewarmed_and_revalidated() -> None:
    """``@isr(engine=...)``: re-warms and ``revalidate(path)`` asked of that engine find the
    view (and the default engine's do not)."""
    import time

    from pyisr.rewarm import background_rewarmer, stop_rewarm_in_background

    engine = Engine(pyisr.MemoryCache(), rewarm_rate=100, max_concurrent_renders=4)
    renders: list[str] = []
    app = Flask("pyisr_rewarm")

    @app.get("/p/<id>")
    @isr(revalidate=False, tags=["posts"], engine=engine)
    def post(id: str) -> str:
        renders.append(id)
        return f"post {id}, render {len(renders)}"

    client = init_app(app).test_client()
    try:
        for id, visits in (("1", 5), ("2", 3), ("3", 1)):  # the first visit of each is its MISS
            for _ in range(visits):
                assert client.get(f"/p/{id}").status_code == 200
        rewarmer = background_rewarmer(engine)
        assert rewarmer is not None and renders == ["1", "2", "3"]
        run_sync(engine.revalidate_tag("posts"))
        deadline = time.monotonic() + 10
        while len(renders) < 5:  # no visitor asks
            assert time.monotonic() < deadline, renders
            time.sleep(0.02)
        run_sync(rewarmer.idle())
        assert renders == ["1", "2", "3", "1", "2"], "the hottest first; the cold one stays lazy"
        fresh = client.get("/p/1")
        assert (fresh.headers["x-pyisr-cache"], fresh.get_data(as_text=True)) == ("HIT", "post 1, render 4")
        assert client.get("/p/3").headers["x-pyisr-cache"] == "MISS"

        from pyisr.integrations import flask as flask_integration
        from pyisr.revalidation import revalidate

        run_sync(revalidate("/p/2", engine=engine))  # rendered now, through the app
        again = client.get("/p/2")
        assert (again.headers["x-pyisr-cache"], again.get_data(as_text=True)) == ("HIT", "post 2, render 7")
        default = Engine(pyisr.MemoryCache())  # the default engine's views are others
        default.add_resolver(flask_integration._resolve)
        with pytest.raises(pyisr.RevalidationError, match="/p/2"):
            run_sync(revalidate("/p/2", engine=default))
    finally:
        stop_rewarm_in_background(engine)
        run_sync(engine.drain())
