"""The Django example on real servers and PostgreSQL: what a Django developer does.

gunicorn with two workers and ``runserver`` serve the example blog
(``examples/django_blog``) from one throwaway PostgreSQL database and one file-system
cache. The tests log in through the admin's own login form, edit and delete posts in
the admin, and check that every worker answers the new page with no revalidation call
anywhere; that logged-in users bypass the cache; that ``manage.py pyisr revalidate``
takes Django's trailing-slash paths; and that a page rendered during an uncommitted
edit never outlives the commit.

PostgreSQL: ``PYISR_TEST_POSTGRES_URL``, else the local server (127.0.0.1:5432, user
postgres, trust auth). Without one the module is skipped, except under ``CI=true``,
where it fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

import httpx
import pytest

pytest.importorskip("django")
pytest.importorskip("gunicorn")
psycopg = pytest.importorskip("psycopg")

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "django_blog"
ADMIN_PASSWORD = "e2e-" + secrets.token_hex(8)


# -- PostgreSQL: a database of this run's own -------------------------------------------------------


def _server_url() -> str:
    return os.environ.get("PYISR_TEST_POSTGRES_URL") or "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    server = _server_url()
    try:
        admin = psycopg.connect(server, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        where = urlparse(server)
        reason = f"no PostgreSQL at {where.hostname}:{where.port or 5432} ({exc})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs PostgreSQL for the Django end-to-end tests: {reason}")
        pytest.skip(reason)
    name = f"pyisr_e2e_{secrets.token_hex(4)}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield urlunparse(urlparse(server)._replace(path="/" + name))
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- the site: migrated, seeded, served twice ---------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _manage(env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE / "manage.py"), *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"manage.py {' '.join(args)}: {done.stderr}"
    return done.stdout


def _shell(env: dict[str, str], code: str) -> str:
    return _manage(env, "shell", "-c", code)


class Site:
    """The example served by gunicorn (two workers) and runserver, over one database and cache."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.gunicorn = f"http://127.0.0.1:{_free_port()}"
        self.runserver = f"http://127.0.0.1:{_free_port()}"
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        port = urlparse(self.gunicorn).port
        self._spawn(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "mysite.wsgi:application",
                "-w",
                "2",
                "-b",
                f"127.0.0.1:{port}",
            ]
        )
        self._spawn([sys.executable, "manage.py", "runserver", "--noreload", self.runserver.split("//")[1]])
        for base in (self.gunicorn, self.runserver):
            self._wait(base)

    def _spawn(self, command: list[str]) -> None:
        self.processes.append(
            subprocess.Popen(
                command, cwd=EXAMPLE, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        )

    def _wait(self, base: str) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError(f"{base} did not start")

    def stop(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()

    def post(self, title: str, **fields: Any) -> int:
        extra = ", ".join(f"{k}={v!r}" for k, v in fields.items())
        out = _shell(
            self.env, f"from blog.models import Post; print(Post.objects.create(title={title!r}, {extra}).pk)"
        )
        return int(out.strip().splitlines()[-1])  # after Django 5.2's auto-import notice


@pytest.fixture(scope="module")
def site(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "PYISR_CACHE": str(tmp_path_factory.mktemp("cache")),
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": secrets.token_hex(16),
        "PYISR_DRAFT_SECRET": secrets.token_hex(16),
        "DJANGO_SUPERUSER_PASSWORD": ADMIN_PASSWORD,
    }
    _manage(env, "migrate", "--noinput", "-v", "0")
    _manage(env, "createsuperuser", "--noinput", "--username", "admin", "--email", "admin@example.com")
    served = Site(env)
    served.start()
    try:
        yield served
    finally:
        served.stop()


# -- helpers --------------------------------------------------------------------------------------------


def _every_worker(url: str, want: int = 2, tries: int = 80) -> list[httpx.Response]:
    """GET ``url`` (a new connection each time) until ``want`` processes answered; their answers."""
    seen: dict[str, httpx.Response] = {}
    for _ in range(tries):
        response = httpx.get(url, timeout=10, headers={"connection": "close"})
        seen.setdefault(response.headers["x-served-by"], response)
        if len(seen) >= want:
            return list(seen.values())
    raise AssertionError(f"only {len(seen)} worker(s) answered {url} in {tries} requests")


#: How soon every worker answers the new page: other processes' invalidations reach a
#: worker's memory tier within its tag refresh (0.5 s); the worker that saved, at once.
PROPAGATION = 2.0


def _until_every_worker(url: str, fresh: Callable[[httpx.Response], bool], want: int = 2) -> float:
    """Seconds until the last answer of each of ``want`` processes is ``fresh`` (at most PROPAGATION)."""
    start = time.monotonic()
    latest: dict[str, bool] = {}
    while time.monotonic() - start < PROPAGATION + 5:
        response = httpx.get(url, timeout=10, headers={"connection": "close"})
        latest[response.headers["x-served-by"]] = fresh(response)
        if len(latest) >= want and all(latest.values()):
            took = time.monotonic() - start
            assert took < PROPAGATION, f"{url} took {took:.2f}s to be fresh in every worker"
            return took
        time.sleep(0.02)
    raise AssertionError(f"{url} is not fresh in every worker: {latest}")


def _line(stream: Any, expected: str) -> bool:
    """Read ``stream`` until the line ``expected`` (Django 5.2's shell prints a notice first)."""
    for line in stream:
        if line.strip() == expected:
            return True
    return False


def _csrf(page: httpx.Response) -> str:
    found = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert found, page.text[:500]
    return found.group(1)


@contextlib.contextmanager
def _admin(base: str) -> Iterator[httpx.Client]:
    """A browser logged in through the admin's own login form."""
    with httpx.Client(base_url=base, timeout=15) as client:
        yield _log_in(client, base)


def _log_in(client: httpx.Client, base: str) -> httpx.Client:
    form = client.get("/admin/login/?next=/admin/")
    done = client.post(
        "/admin/login/?next=/admin/",
        data={
            "username": "admin",
            "password": ADMIN_PASSWORD,
            "csrfmiddlewaretoken": _csrf(form),
            "next": "/admin/",
        },
        headers={"referer": base + "/admin/login/"},
    )
    assert done.status_code == 302 and done.headers["location"] == "/admin/", done.text[:500]
    return client


# -- the tests ------------------------------------------------------------------------------------------


def test_an_admin_edit_refreshes_every_worker_with_no_revalidate_call(site: Site) -> None:
    pk = site.post("Original title", body="Hello")
    detail, listing = f"{site.gunicorn}/blog/{pk}/", f"{site.gunicorn}/"
    for url in (detail, listing):
        for answer in _every_worker(url):  # each worker has served (and holds) the old page
            assert "Original title" in answer.text
            assert answer.headers["x-pyisr-cache"] in ("MISS", "HIT")
    with _admin(site.gunicorn) as admin:
        assert admin.get("/").headers["x-pyisr-cache"] == "BYPASS", "a logged-in user gets a fresh render"
        change = admin.get(f"/admin/blog/post/{pk}/change/")
        saved = admin.post(
            f"/admin/blog/post/{pk}/change/",
            data={
                "csrfmiddlewaretoken": _csrf(change),
                "title": "Edited in the admin",
                "body": "Hello",
                "published": "on",
                "author": "",
                "_save": "Save",
            },
            headers={"referer": f"{site.gunicorn}/admin/blog/post/{pk}/change/"},
        )
        assert saved.status_code == 302, saved.text[:1000]
    for url in (detail, listing, f"{site.runserver}/blog/{pk}/"):
        want = 1 if url.startswith(site.runserver) else 2
        _until_every_worker(url, lambda r: "Edited in the admin" in r.text and "Original" not in r.text, want)


def test_deleting_in_the_admin_answers_404(site: Site) -> None:
    pk = site.post("Soon deleted")
    url = f"{site.gunicorn}/blog/{pk}/"
    assert all(a.status_code == 200 for a in _every_worker(url))
    with _admin(site.gunicorn) as admin:
        confirm = admin.get(f"/admin/blog/post/{pk}/delete/")
        deleted = admin.post(
            f"/admin/blog/post/{pk}/delete/",
            data={"csrfmiddlewaretoken": _csrf(confirm), "post": "yes"},
            headers={"referer": f"{site.gunicorn}/admin/blog/post/{pk}/delete/"},
        )
        assert deleted.status_code == 302
    _until_every_worker(url, lambda r: r.status_code == 404 and "Not found" in r.text)
    # runserver too, within the same propagation (its memory tier may hold the list,
    # re-warmed after the post was created, until its next look at the tag times).
    _until_every_worker(f"{site.runserver}/", lambda r: "Soon deleted" not in r.text, 1)


def test_manage_py_revalidate_takes_trailing_slash_paths(site: Site) -> None:
    pk = site.post("Before raw SQL")
    url = f"{site.runserver}/blog/{pk}/"
    assert "Before raw SQL" in httpx.get(url).text
    with psycopg.connect(site.env["DATABASE_URL"], autocommit=True) as db:  # no signal: Django never knows
        db.execute("UPDATE blog_post SET title = 'After raw SQL' WHERE id = %s", (pk,))
    assert "Before raw SQL" in httpx.get(url).text
    _manage(site.env, "pyisr", "revalidate", "--path", f"/blog/{pk}/")
    # The regenerated page, as a HIT: the server's memory tier sees another process's
    # write within its tag refresh (PROPAGATION), not necessarily at once.
    _until_every_worker(url, lambda r: r.headers["x-pyisr-cache"] == "HIT" and "After raw SQL" in r.text, 1)
    with psycopg.connect(site.env["DATABASE_URL"], autocommit=True) as db:
        db.execute("UPDATE blog_post SET title = 'Without the slash' WHERE id = %s", (pk,))
    _shell(site.env, f"import pyisr; pyisr.revalidate_sync('/blog/{pk}')")
    _until_every_worker(f"{site.gunicorn}/blog/{pk}/", lambda r: "Without the slash" in r.text)


def test_workers_render_a_hot_page_again_after_an_edit_before_anyone_asks(site: Site) -> None:
    pk = site.post("Warm: before")
    url = f"{site.gunicorn}/blog/{pk}/"
    for _ in range(6):  # a popular page, in both workers' counts
        assert "Warm: before" in httpx.get(url, headers={"connection": "close"}).text
    stored = next(Path(site.env["PYISR_CACHE"]).glob(f"**/entries/blog/{pk}.*"))
    _shell(
        site.env,
        f"from blog.models import Post; p = Post.objects.get(pk={pk}); p.title = 'Warm: after'; p.save()",
    )
    deadline = time.monotonic() + 20
    while b"Warm: after" not in stored.read_bytes():  # nobody asks for the page meanwhile
        assert time.monotonic() < deadline, "no worker rendered the page again"
        time.sleep(0.05)
    first = httpx.get(url)
    assert (first.headers["x-pyisr-cache"], "Warm: after" in first.text) == ("HIT", True)


def test_a_page_rendered_during_an_uncommitted_edit_never_outlives_the_commit(site: Site) -> None:
    pk = site.post("Race: old title")
    editor = subprocess.Popen(
        [
            sys.executable,
            str(EXAMPLE / "manage.py"),
            "shell",
            "-c",
            "import sys\n"
            "from django.db import transaction\n"
            "from blog.models import Post\n"
            "with transaction.atomic():\n"
            f"    post = Post.objects.get(pk={pk}); post.title = 'Race: new title'; post.save()\n"
            "    print('saved', flush=True)\n"
            "    sys.stdin.readline()\n"
            "print('committed', flush=True)\n",
        ],
        env=site.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert editor.stdout is not None and editor.stdin is not None
    try:
        assert _line(editor.stdout, "saved")
        raced = httpx.get(f"{site.gunicorn}/blog/{pk}/")
        assert raced.headers["x-pyisr-cache"] == "MISS" and "Race: old title" in raced.text
        editor.stdin.write("\n")
        editor.stdin.flush()
        assert _line(editor.stdout, "committed")
        assert editor.wait(30) == 0
    finally:
        editor.kill()
    _until_every_worker(f"{site.gunicorn}/blog/{pk}/", lambda r: "Race: new title" in r.text)


def test_draft_mode_from_a_staff_preview_link(site: Site) -> None:
    with _admin(site.runserver) as admin:
        turned_on = admin.get("/preview/?next=/")
        assert turned_on.status_code == 302
        cookie = admin.cookies["__pyisr_draft"]
    visitor = httpx.Client(base_url=site.runserver, cookies={"__pyisr_draft": cookie})
    assert visitor.get("/").headers["x-pyisr-cache"] == "BYPASS"
    assert httpx.get(f"{site.runserver}/").headers["x-pyisr-cache"] in ("MISS", "HIT")


def test_a_deploy_with_a_build_id_serves_its_own_templates_at_once(database_url: str, tmp_path: Path) -> None:
    """gunicorn serves build a1 and caches its pages for good (``revalidate=False``); a
    deploy edits the base template and starts build b2 over the same cache: its visitors
    get the new template, never a1's cached pages."""
    import shutil

    project = tmp_path / "project"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("__pycache__", ".pyisr", "*.sqlite3"))
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "PYISR_CACHE": str(tmp_path / "cache"),
        "PYISR_REWARM_RATE": "0",
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": secrets.token_hex(16),
    }
    done = subprocess.run(  # a deploy's migration runs with its build id too
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=project,
        env={**env, "PYISR_BUILD_ID": "a1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr

    @contextlib.contextmanager
    def deployed(build: str) -> Iterator[str]:
        base = f"http://127.0.0.1:{_free_port()}"
        command = [sys.executable, "-m", "gunicorn", "mysite.wsgi:application", "-w", "2", "-b", base[7:]]
        process = subprocess.Popen(
            command,
            cwd=project,
            env={**env, "PYISR_BUILD_ID": build},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    httpx.get(base + "/no-page-here/", timeout=2)  # any answer: up (and no page cached)
                    break
                except httpx.HTTPError:
                    assert time.monotonic() < deadline, f"gunicorn of {build} did not start"
                    time.sleep(0.1)
            yield base
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(10)

    with deployed("a1") as base:
        answers = [httpx.get(base + "/") for _ in range(6)]
        assert "HIT" in {a.headers["x-pyisr-cache"] for a in answers}
        assert "_b/a1" in answers[-1].headers["surrogate-key"].split(" ")
    base_html = project / "templates" / "base.html"
    base_html.write_text(base_html.read_text().replace("</body>", "<p>deployed b2</p>\n</body>"))
    with deployed("b2") as base:
        first = httpx.get(base + "/")
        assert first.headers["x-pyisr-cache"] == "MISS" and "deployed b2" in first.text
        assert "_b/b2" in first.headers["surrogate-key"].split(" ")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".builds", "a1", "b2"]
