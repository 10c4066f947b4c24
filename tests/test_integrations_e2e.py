"""The integrations on real servers and PostgreSQL: uvicorn (2 workers) running
``examples/fastapi_sqlalchemy``, and gunicorn (2 workers) running the Flask app below.

Each test speaks HTTP to the server on 127.0.0.1 with a fresh connection per request,
so both workers answer; they share one file-system cache (``PYISR_CACHE``), as a
deployment does. PostgreSQL: ``PYISR_TEST_POSTGRES_URL``, else the local server
(``postgresql://postgres@127.0.0.1:5432/postgres``); each server gets a database made for
this run and dropped after it. Without PostgreSQL the tests are skipped, except under
``CI=true``, where that fails the run. Every process started here is stopped by its PID.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_support import free_port, stop_group

pytestmark = pytest.mark.slow

pytest.importorskip("sqlalchemy")
pytest.importorskip("flask")

from sqlalchemy import String, create_engine, insert, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker  # noqa: E402

from pyisr.http import NOSTORE  # noqa: E402

EXAMPLE = Path(__file__).parent.parent / "examples" / "fastapi_sqlalchemy"
POSTGRES = os.environ.get("PYISR_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
#: Other workers' memory tiers reread the tag log every 0.5 s: a change reaches them within 1 s.
SETTLE = 3.0


# -- PostgreSQL and servers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres() -> Iterator[Callable[[], str]]:
    """Makes throwaway databases (SQLAlchemy URLs, psycopg 3); drops them at the end."""
    psycopg = pytest.importorskip("psycopg")
    admin_url = make_url(POSTGRES).set(drivername="postgresql")
    try:
        admin = psycopg.connect(
            admin_url.render_as_string(hide_password=False), autocommit=True, connect_timeout=3
        )
    except psycopg.OperationalError as exc:
        reason = (
            f"PostgreSQL is not reachable at {admin_url!r} ({str(exc).strip()}); set PYISR_TEST_POSTGRES_URL"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    made: list[str] = []

    def make() -> str:
        name = f"pyisr_e2e_{os.getpid()}_{secrets.token_hex(3)}"
        admin.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        url = make_url(POSTGRES).set(drivername="postgresql+psycopg", database=name)
        return url.render_as_string(hide_password=False)

    yield make
    for name in made:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


class Running:
    """A server process (its own session, stopped by its PID) and a client that opens a
    new connection per request, so the kernel hands requests to either worker."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = cwd / f"server-{self.port}.log"
        args = [a.replace("{port}", str(self.port)) for a in args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                args,
                cwd=cwd,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.client = httpx.Client(
            base_url=self.url, timeout=20, limits=httpx.Limits(max_keepalive_connections=0)
        )
        self.pids: set[int] = set()
        deadline = time.monotonic() + 30
        while len(self.pids) < 2:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start two workers:\n{self.log()}")
            try:
                self.pids.add(self.client.get("/healthz").json()["pid"])
            except httpx.HTTPError:
                time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.client.close()
        stop_group(self.proc)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.get(path, **kwargs)

    def settled(
        self, path: str, check: Callable[[httpx.Response], bool], rounds: int = 16
    ) -> list[httpx.Response]:
        """Wait (at most ``SETTLE`` s) until ``rounds`` answers in a row for ``path``, from
        either worker, pass ``check``; returns them."""
        deadline = time.monotonic() + SETTLE
        answers: list[httpx.Response] = []
        while len(answers) < rounds:
            answer = self.get(path)
            answers = [*answers, answer] if check(answer) else []
            if not answers:
                assert time.monotonic() < deadline, f"{path}: {answer.status_code} {answer.text[:200]}"
                time.sleep(0.05)
        return answers


# -- FastAPI: the example on uvicorn -----------------------------------------------------------


@pytest.fixture(scope="module")
def fastapi_server(
    postgres: Callable[[], str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Running]:
    pytest.importorskip("fastapi")
    home = tmp_path_factory.mktemp("fastapi")
    env = {
        "DATABASE_URL": postgres(),
        "PYISR_CACHE": f"file://{home / 'cache'}",
        "PYISR_DRAFT_SECRET": "preview",
        "PYISR_SITE_URL": "https://blog.example.com",
    }
    args = [sys.executable, "-m", "uvicorn", "--app-dir", str(EXAMPLE), "posts_app:app", "--workers", "2"]
    server = Running([*args, "--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning"], env, home)
    yield server
    server.stop()


def test_fastapi_an_edit_refreshes_the_detail_and_the_list_in_every_worker(fastapi_server: Running) -> None:
    server = fastapi_server
    for _ in range(8):  # both workers hold both pages in their memory tier
        assert server.get("/posts/1").status_code == 200 and server.get("/posts").status_code == 200
    assert server.get("/posts/1").headers["x-pyisr-cache"] == "HIT"
    edit = server.client.put("/posts/1", json={"title": "Edited through the API", "body": "new"})
    assert edit.status_code == 200
    server.settled("/posts/1", lambda r: "Edited through the API" in r.text)
    server.settled("/posts", lambda r: "Edited through the API" in r.text)


def test_fastapi_a_deleted_post_is_a_cached_404(fastapi_server: Running) -> None:
    server = fastapi_server
    assert server.get("/posts/3").status_code == 200
    assert server.client.delete("/posts/3").status_code == 204
    answers = server.settled("/posts/3", lambda r: r.status_code == 404)
    assert {r.headers["x-pyisr-cache"] for r in answers} <= {"HIT", "MISS"}
    assert answers[-1].headers["cache-control"].startswith("s-maxage=3600"), "the view's own revalidate"
    server.settled("/posts", lambda r: "Edits refresh pages" not in r.text)


def test_fastapi_editors_and_draft_mode_bypass_the_cache(fastapi_server: Running) -> None:
    server = fastapi_server
    editor = server.get("/posts/2", headers={"cookie": "editor=1"})
    assert editor.headers["x-pyisr-cache"] == "BYPASS"
    assert editor.headers.get_list("cache-control") == [NOSTORE]
    draft = server.get("/draft", params={"secret": "preview", "path": "/posts/2"}, follow_redirects=False)
    assert draft.status_code == 303
    cookie = draft.headers["set-cookie"].split(";", 1)[0]
    assert server.get("/posts/2", headers={"cookie": cookie}).headers["x-pyisr-cache"] == "BYPASS"
    assert server.get("/draft", params={"secret": "wrong"}).status_code == 401


# -- Flask on gunicorn ----------------------------------------------------------------------------


class Docs(DeclarativeBase):
    pass


class Doc(Docs):
    __tablename__ = "docs"
    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    title: Mapped[str] = mapped_column(String(200))


def flask_e2e_app() -> Any:
    """The Flask app gunicorn runs (``test_integrations_e2e:flask_e2e_app()``)."""
    from flask import Flask, abort, request

    import pyisr
    from pyisr.integrations.flask import init_app, isr
    from pyisr.integrations.sqlalchemy import track

    sessions = track(sessionmaker(create_engine(os.environ["DATABASE_URL"])))
    app = init_app(Flask("pyisr_e2e"))

    @app.get("/docs/<name>/")
    @isr(revalidate=3600, bypass=lambda r: r.cookies.get("editor") == "1")
    def doc(name: str) -> str:
        with sessions() as session:
            found = session.get(Doc, name)
            if found is None:
                abort(404)
            return found.title

    @app.post("/docs/<name>/")
    def edit(name: str) -> str:
        with sessions() as session:
            found = session.get(Doc, name)
            if found is None:
                abort(404)
            found.title = request.get_data(as_text=True)
            session.flush()  # the row is changed; others still read the old one
            time.sleep(float(request.args.get("pause", 0)))
            session.commit()
        return "saved"

    @app.post("/revalidate")
    def revalidate() -> Any:
        try:
            pyisr.revalidate_sync(request.args["path"])
        except pyisr.RevalidationError as exc:
            return str(exc), exc.status
        return "regenerated"

    @app.get("/healthz")
    def healthz() -> dict[str, int]:
        return {"pid": os.getpid()}

    return app


@pytest.fixture(scope="module")
def flask_server(postgres: Callable[[], str], tmp_path_factory: Any) -> Iterator[Running]:
    pytest.importorskip("gunicorn")
    home = tmp_path_factory.mktemp("flask")
    url = postgres()
    database = create_engine(url)
    Docs.metadata.create_all(database)
    with database.begin() as conn:
        conn.execute(insert(Doc), [{"name": n, "title": n.title()} for n in ("intro", "race", "guide")])
    database.dispose()
    env = {
        "DATABASE_URL": url,
        "PYISR_CACHE": f"file://{home / 'cache'}",
        "PYISR_SITE_URL": "https://docs.example",
    }
    tests = str(Path(__file__).parent)
    args = [
        sys.executable,
        "-m",
        "gunicorn",
        "--workers",
        "2",
        "--bind",
        "127.0.0.1:{port}",
        "--pythonpath",
        tests,
    ]
    server = Running([*args, "--log-level", "warning", "test_integrations_e2e:flask_e2e_app()"], env, home)
    server.database_url = url  # type: ignore[attr-defined]
    yield server
    server.stop()


def test_flask_revalidate_with_and_without_the_trailing_slash(flask_server: Running) -> None:
    server = flask_server
    assert server.get("/docs/intro/").text == "Intro"
    assert server.get("/docs/intro/").headers["x-pyisr-cache"] in ("HIT", "MISS")
    database = create_engine(server.database_url)  # type: ignore[attr-defined]
    for path, title in (("/docs/intro", "Intro, revised"), ("/docs/intro/", "Intro, again")):
        with database.begin() as conn:  # behind the app's back: nothing is revalidated
            conn.execute(text("UPDATE docs SET title = :t WHERE name = 'intro'"), {"t": title})
        assert server.get("/docs/intro/").headers["x-pyisr-cache"] == "HIT"
        assert server.client.post("/revalidate", params={"path": path}).text == "regenerated"
        server.settled("/docs/intro/", lambda r, title=title: r.text == title)  # type: ignore[misc]
    database.dispose()
    assert server.client.post("/revalidate", params={"path": "/nowhere"}).status_code == 404


def test_flask_a_render_during_an_uncommitted_edit_never_outlives_the_commit(flask_server: Running) -> None:
    server = flask_server
    done: list[httpx.Response] = []
    writer = threading.Thread(
        target=lambda: done.append(
            server.client.post("/docs/race/", params={"pause": "1.5"}, content=b"Race, won")
        )
    )
    writer.start()
    time.sleep(0.5)  # the edit is flushed, not committed
    during = server.get("/docs/race/")
    assert (during.headers["x-pyisr-cache"], during.text) == ("MISS", "Race"), "rendered from the old row"
    writer.join(10)
    assert done and done[0].text == "saved"
    server.settled("/docs/race/", lambda r: r.text == "Race, won")


def test_flask_editors_bypass_and_edits_refresh_every_worker(flask_server: Running) -> None:
    server = flask_server
    for _ in range(6):
        assert server.get("/docs/guide/").text == "Guide"
    editor = server.get("/docs/guide/", headers={"cookie": "editor=1"})
    assert (editor.headers["x-pyisr-cache"], editor.headers["cache-control"]) == ("BYPASS", NOSTORE)
    assert server.client.post("/docs/guide/", content=b"Guide, edited").text == "saved"
    server.settled("/docs/guide/", lambda r: r.text == "Guide, edited")
