"""pyisr in a Django project, in process: the app, ORM tags, exceptions, i18n, bypass, commands.

Django's settings can be configured once per process, so this module configures them
when it is imported (collection comes before any test runs): a superset of what
``test_integrations`` needs, plus pyisr's app, a SQLite database in a temporary
directory and the example blog's app (``examples/django_blog``), whose models and views
the tests drive. Each test gets an empty cache (``isolated_cache``) and empty tables.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pyisr
from pyisr import Engine, MemoryCache
from pyisr.draft import COOKIE
from pyisr.http import NOSTORE
from pyisr.runtime import run_sync

django = pytest.importorskip("django")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "django_blog"
APP = "pyisr.integrations.django"


def configure_django() -> None:
    """Settings every Django test module of this suite can share (first caller wins)."""
    from django.conf import settings

    if settings.configured:
        return
    sys.path.insert(0, str(EXAMPLE))
    data = Path(tempfile.mkdtemp(prefix="pyisr-django-"))
    atexit.register(shutil.rmtree, data, True)
    settings.configure(
        DEBUG=False,
        SECRET_KEY="pyisr-tests",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=None,
        BASE_DIR=data,
        INSTALLED_APPS=[
            "django.contrib.contenttypes",
            "django.contrib.auth",
            "django.contrib.sessions",
            APP,
            "blog",
        ],
        MIDDLEWARE=[
            "django.contrib.sessions.middleware.SessionMiddleware",
            "django.contrib.auth.middleware.AuthenticationMiddleware",
        ],
        SESSION_ENGINE="django.contrib.sessions.backends.signed_cookies",
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(data / "db.sqlite3")}},
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        USE_TZ=True,
        TEMPLATES=[
            {
                "BACKEND": "django.template.backends.django.DjangoTemplates",
                "DIRS": [str(EXAMPLE / "templates")],
                "OPTIONS": {
                    "context_processors": ["django.contrib.auth.context_processors.auth"],
                    "loaders": [
                        (
                            "django.template.loaders.locmem.Loader",
                            {"post.html": "<p>{{ name }} user={{ user.is_authenticated }}</p>"},
                        ),
                        "django.template.loaders.filesystem.Loader",
                        "django.template.loaders.app_directories.Loader",
                    ],
                },
            }
        ],
        PYISR={"cache": "memory://", "draft_secret": "test-draft-secret"},
    )
    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


configure_django()
from django.apps import apps  # noqa: E402

if not apps.is_installed(APP):  # pragma: no cover - another module configured Django first
    pytest.skip("Django was configured without pyisr's app by another module", allow_module_level=True)

from blog.models import Post, Tag  # noqa: E402
from django.contrib.auth.models import User  # noqa: E402
from django.core.exceptions import ImproperlyConfigured, PermissionDenied, SuspiciousOperation  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.core.management.base import CommandError  # noqa: E402
from django.db import transaction  # noqa: E402
from django.http import Http404, HttpResponse  # noqa: E402
from django.test import Client, RequestFactory, override_settings  # noqa: E402
from django.urls import path  # noqa: E402

from pyisr.integrations.django import ISRMixin, isr, revalidate_model  # noqa: E402
from pyisr.integrations.django.checks import check_settings  # noqa: E402
from pyisr.integrations.django.testing import isolated_cache  # noqa: E402


@pytest.fixture(autouse=True)
def cache() -> Iterator[Engine]:
    with isolated_cache() as engine:
        yield engine


@pytest.fixture(autouse=True)
def tables() -> Iterator[None]:
    yield
    Post.objects.all().delete()
    Tag.objects.all().delete()
    User.objects.all().delete()


@pytest.fixture
def blog() -> Iterator[Client]:
    with override_settings(ROOT_URLCONF="blog.urls"):
        yield Client()


def tags_of(engine: Engine, key: str) -> set[str]:
    entry = run_sync(engine.inspect(key))
    assert entry is not None, f"{key} is not cached"
    return {t for t in entry.tags if not t.startswith("_pyisr:")}


def urlconf(*patterns: Any) -> Any:
    """A URLconf of ``patterns``, then the blog's (its templates reverse its URL names)."""
    from django.urls import include

    return type("URLs", (), {"urlpatterns": [*patterns, path("", include("blog.urls"))]})


# -- automatic ORM tags ----------------------------------------------------------------------------


def test_pages_are_tagged_with_the_rows_and_queries_they_read(blog: Client, cache: Engine) -> None:
    author = User.objects.create_user("ada")
    first = Post.objects.create(title="First", author=author)
    first.tags.add(Tag.objects.create(name="Python", slug="python"))
    second = Post.objects.create(title="Second")
    detail = blog.get(f"/blog/{first.pk}/")
    assert (detail.status_code, detail["x-pyisr-cache"]) == (200, "MISS")
    assert b"First" in detail.content and b"#Python" in detail.content
    tags = tags_of(cache, f"/blog/{first.pk}")
    # A lookup by primary key: this post and its author, not the posts' queries.
    assert {"blog.post:*", f"blog.post:{first.pk}", "auth.user:*", f"auth.user:{author.pk}"} <= tags
    assert "blog.post" not in tags and f"blog.post:{second.pk}" not in tags
    assert {"blog.tag", "blog.post_tags"} <= tags  # post.tags.all() is a query
    blog.get("/")
    assert {"blog.post", "blog.post:*", f"blog.post:{first.pk}", f"blog.post:{second.pk}"} <= tags_of(
        cache, "/"
    )


def test_saving_a_post_refreshes_its_pages_and_lists_not_the_others(blog: Client) -> None:
    first, second = Post.objects.create(title="First"), Post.objects.create(title="Second")
    for url in (f"/blog/{first.pk}/", f"/blog/{second.pk}/", "/"):
        assert blog.get(url)["x-pyisr-cache"] == "MISS"
    first.title = "First, edited"
    first.save()  # autocommit: revalidated at once (after the commit)
    edited = blog.get(f"/blog/{first.pk}/")
    assert (edited["x-pyisr-cache"], b"First, edited" in edited.content) == ("MISS", True)
    listing = blog.get("/")
    assert (listing["x-pyisr-cache"], b"First, edited" in listing.content) == ("MISS", True)
    assert blog.get(f"/blog/{second.pk}/")["x-pyisr-cache"] == "HIT", "another post's page is untouched"
    Post.objects.create(title="Third")  # a new row matches the list's query
    assert b"Third" in blog.get("/").content


def test_a_deleted_post_is_a_cached_404_until_its_row_exists_again(blog: Client) -> None:
    post = Post.objects.create(title="Doomed")
    url, pk = f"/blog/{post.pk}/", post.pk
    assert blog.get(url).status_code == 200
    post.delete()
    gone = blog.get(url)
    assert (gone.status_code, gone["x-pyisr-cache"]) == (404, "MISS")
    assert b"No page here" in gone.content, "the project's own 404.html"
    assert (blog.get(url).status_code, blog.get(url)["x-pyisr-cache"]) == (404, "HIT")
    Post.objects.create(pk=pk, title="Back")
    back = blog.get(url)
    assert (back.status_code, back["x-pyisr-cache"], b"Back" in back.content) == (200, "MISS", True)


def test_many_to_many_changes_refresh_the_pages_showing_them(blog: Client) -> None:
    post = Post.objects.create(title="Tagged")
    url = f"/blog/{post.pk}/"
    blog.get(url)
    post.tags.add(Tag.objects.create(name="Django", slug="django"))
    assert b"#Django" in blog.get(url).content
    post.tags.clear()
    assert b"#Django" not in blog.get(url).content


def test_revalidate_model_covers_what_sends_no_signal(blog: Client) -> None:
    post = Post.objects.create(title="Old")
    blog.get("/")
    blog.get(f"/blog/{post.pk}/")
    Post.objects.bulk_create([Post(title="Bulk")])
    Post.objects.filter(pk=post.pk).update(title="Updated")
    assert blog.get("/")["x-pyisr-cache"] == "HIT", "no signal: nothing knows yet"
    with transaction.atomic():
        revalidate_model(Post)
        assert blog.get("/")["x-pyisr-cache"] == "HIT", "not before the commit"
    listing = blog.get("/")
    assert listing["x-pyisr-cache"] == "MISS" and b"Bulk" in listing.content and b"Updated" in listing.content
    Post.objects.filter(pk=post.pk).update(title="Again")
    revalidate_model(Post, pk=post.pk)
    assert b"Again" in blog.get(f"/blog/{post.pk}/").content


def test_reads_of_more_rows_than_the_limit_tag_the_model_as_a_query(blog: Client, cache: Engine) -> None:
    posts = [Post.objects.create(title=f"P{i}") for i in range(5)]
    with override_settings(PYISR={"cache": "memory://", "orm_tags_max_rows": 3}):
        blog.get("/")
        tags = tags_of(cache, "/")
        assert {"blog.post", "blog.post:*"} <= tags
        assert not any(t.startswith("blog.post:") and t != "blog.post:*" for t in tags)
        blog.get(f"/blog/{posts[0].pk}/")  # one row: within the limit
        assert f"blog.post:{posts[0].pk}" in tags_of(cache, f"/blog/{posts[0].pk}")


def test_orm_tags_can_be_turned_off_per_view_and_in_settings(cache: Engine) -> None:
    Post.objects.create(title="x")

    @isr(orm_tags=False)
    def untagged(request: Any) -> Any:
        return HttpResponse(str(Post.objects.count()))

    @isr()
    def tagged(request: Any) -> Any:
        return HttpResponse(str(Post.objects.count()))

    with override_settings(ROOT_URLCONF=urlconf(path("off", untagged), path("on", tagged))):
        client = Client()
        client.get("/off")
        client.get("/on")
        assert not any(t.startswith("blog.") for t in tags_of(cache, "/off"))
        assert {"blog.post", "blog.post:*"} <= tags_of(cache, "/on"), "a count is a query"
        with override_settings(PYISR={"cache": "memory://", "orm_tags": False}):
            run_sync(cache.revalidate_tags(["blog.post"]))
            client.get("/on")
            assert not any(t.startswith("blog.") for t in tags_of(cache, "/on"))


def test_cached_data_read_inside_a_view_carries_its_model_tags(cache: Engine) -> None:
    Post.objects.create(title="x")

    @pyisr.cached
    def titles() -> list[str]:
        return [p.title for p in Post.objects.all()]

    @isr()
    def page(request: Any) -> Any:
        return HttpResponse(", ".join(titles()))

    with override_settings(ROOT_URLCONF=urlconf(path("titles", page))):
        client = Client()
        assert client.get("/titles").content == b"x"
        assert {"blog.post", "blog.post:*"} <= tags_of(cache, "/titles"), "inherited from the data entry"
        Post.objects.create(title="y")
        assert client.get("/titles").content in (b"y, x", b"x, y")


def test_a_render_before_the_commit_never_outlives_it(blog: Client) -> None:
    """The transaction race: a GET during an uncommitted edit renders the old title and
    stores it; the invalidation sent after the commit is newer, so the page is not served."""
    post = Post.objects.create(title="Before")
    url = f"/blog/{post.pk}/"
    saved, rendered = threading.Event(), threading.Event()

    def editor() -> None:
        from django.db import connection

        try:
            with transaction.atomic():
                Post.objects.filter(pk=post.pk).update(title="After")
                revalidate_model(Post, pk=post.pk)  # as post_save would: at the commit
                saved.set()
                assert rendered.wait(10)
        finally:
            connection.close()

    thread = threading.Thread(target=editor)
    thread.start()
    assert saved.wait(10)
    raced = blog.get(url)
    assert raced["x-pyisr-cache"] == "MISS" and b"Before" in raced.content, "rendered before the commit"
    rendered.set()
    thread.join(10)
    after = blog.get(url)
    assert (after["x-pyisr-cache"], b"After" in after.content) == ("MISS", True)


def test_the_record_names_the_signals_that_invalidated(cache: Engine) -> None:
    """``pyisr cache explain`` says "Django post_save blog.Post", one record per commit."""
    from django.db import transaction

    post = Post.objects.create(title="One")
    with transaction.atomic():
        post.title = "Two"
        post.save()
        post.tags.add(Tag.objects.create(name="Django", slug="django"))
        Post.objects.create(title="Three").delete()
    line = sys._getframe().f_lineno + 1
    revalidate_model(Post)
    found = run_sync(cache.handler.activity(time.time())).invalidations
    assert [i.by for i in found] == [
        f"code at tests/test_django_integration.py:{line}",
        "Django post_save blog.Post, Django post_save blog.Tag, Django m2m_changed blog.Post_tags and 1 more",
        "Django post_save blog.Post",
    ]
    assert f"blog.post:{post.pk}" in found[1].tags and "blog.post_tags" in found[1].tags


def test_a_failing_cache_never_fails_a_save(blog: Client, caplog: pytest.LogCaptureFixture) -> None:
    class DiskFull(MemoryCache):
        async def revalidate_tags(self, tags: Any, at: float) -> None:
            raise OSError(28, "No space left on device")

    with isolated_cache(Engine(DiskFull())):
        caplog.set_level(logging.ERROR, logger="pyisr.django")
        post = Post.objects.create(title="Saved anyway")  # post_save's revalidation fails
        assert Post.objects.get(pk=post.pk).title == "Saved anyway"
        assert any("revalidating" in r.getMessage() for r in caplog.records)
        with pytest.raises(OSError):
            revalidate_model(Post)  # called by hand, outside a transaction: it says so


# -- exceptions become Django's own responses -----------------------------------------------------


def test_exceptions_become_the_projects_responses(cache: Engine) -> None:
    calls: dict[str, int] = {}

    def counted(name: str, exc: Exception) -> Any:
        @isr(revalidate=60)
        def view(request: Any) -> Any:
            calls[name] = calls.get(name, 0) + 1
            raise exc

        return path(name, view)

    def missing(request: Any) -> Any:
        calls["missing"] = calls.get("missing", 0) + 1
        return Post.objects.get(pk=10**9)

    urls = urlconf(
        counted("http404", Http404("nope")),
        counted("forbidden", PermissionDenied()),
        counted("suspicious", SuspiciousOperation("bad")),
        path("missing", isr(revalidate=60)(missing)),
    )
    with override_settings(ROOT_URLCONF=urls):
        client = Client()
        for name, status in (("http404", 404), ("missing", 404)):
            first, second = client.get(f"/{name}"), client.get(f"/{name}")
            assert (first.status_code, first["x-pyisr-cache"]) == (status, "MISS")
            assert (second.status_code, second["x-pyisr-cache"]) == (status, "HIT"), "a 404 is cached"
            assert b"No page here" in first.content
            assert calls[name] == 1
        assert "blog.post:1000000000" in tags_of(cache, "/missing"), "creating that row refreshes it"
        for name, status in (("forbidden", 403), ("suspicious", 400)):
            for _ in range(2):
                refused = client.get(f"/{name}")
                assert refused.status_code == status and refused["cache-control"] == NOSTORE
            assert calls[name] == 2, "never stored"


def test_a_page_that_becomes_forbidden_is_never_served_again(cache: Engine) -> None:
    state = {"public": True}

    @isr(revalidate=60, tags=["secret"])
    def page(request: Any) -> Any:
        if not state["public"]:
            raise PermissionDenied()
        return HttpResponse("public")

    with override_settings(ROOT_URLCONF=urlconf(path("page", page))):
        client = Client()
        assert client.get("/page").content == b"public"
        state["public"] = False
        pyisr.revalidate_tag("secret", stale=True)
        stale = client.get("/page")
        assert (stale.content, stale["x-pyisr-cache"]) == (b"public", "STALE")
        run_sync(cache.drain())  # the regeneration was refused: the old copy goes
        assert client.get("/page").status_code == 403
        assert client.get("/page").status_code == 403


# -- revalidate(path) -------------------------------------------------------------------------------


def test_revalidate_with_and_without_trailing_slash(blog: Client) -> None:
    post = Post.objects.create(title="One")
    url = f"/blog/{post.pk}/"
    blog.get(url)
    Post.objects.filter(pk=post.pk).update(title="Two")
    pyisr.revalidate_sync(url)
    hit = blog.get(url)
    assert (hit["x-pyisr-cache"], b"Two" in hit.content) == ("HIT", True)
    Post.objects.filter(pk=post.pk).update(title="Three")
    pyisr.revalidate_sync(url.rstrip("/"))
    assert b"Three" in blog.get(url).content
    with pytest.raises(pyisr.RevalidationError, match="no page at this path"):
        pyisr.revalidate_sync("/blog/new/")  # a view, but not an @isr one


# -- the request's thread, and Django's TestCase --------------------------------------------------


def test_a_miss_renders_in_the_requests_thread_and_transaction(blog: Client) -> None:
    with transaction.atomic():
        post = Post.objects.create(title="Uncommitted")
        page = blog.get(f"/blog/{post.pk}/")
        assert (page.status_code, b"Uncommitted" in page.content) == (200, True)
        transaction.set_rollback(True)


def test_stale_regenerations_run_on_pyisr_threads(cache: Engine) -> None:
    threads: list[str] = []

    @isr(revalidate=60, tags=["t"])
    def page(request: Any) -> Any:
        threads.append(threading.current_thread().name)
        return HttpResponse("x")

    with override_settings(ROOT_URLCONF=urlconf(path("t", page))):
        client = Client()
        client.get("/t")
        pyisr.revalidate_tag("t", stale=True)
        assert client.get("/t")["x-pyisr-cache"] == "STALE"
        run_sync(cache.drain())
    assert threads[0] == threading.current_thread().name
    assert threads[1].startswith("pyisr-render")


def test_djangos_testcase_sees_its_own_data() -> None:
    """The example's TestCase suite (``manage.py test blog``), in a process of its own."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLE / "manage.py"), "test", "blog", "-v", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYISR_CACHE": "memory://"},
    )
    assert done.returncode == 0, done.stderr
    assert "test_a_miss_sees_the_tests_data" in done.stderr and "OK" in done.stderr


# -- class-based views ------------------------------------------------------------------------------


def test_class_based_views(cache: Engine) -> None:
    from django.views import View
    from django.views.generic import TemplateView

    class Hello(View):
        def get(self, request: Any) -> Any:
            return HttpResponse(f"hello {request.user.is_authenticated}")

    class AsyncCount(View):
        async def get(self, request: Any) -> Any:
            return HttpResponse(str(await Post.objects.acount()))

    class Mixed(ISRMixin, TemplateView):
        isr_revalidate = 60
        isr_tags = ["mixed"]
        template_name = "post.html"

    urls = urlconf(
        path("hello", isr(revalidate=60)(Hello.as_view())),
        path("count", isr()(AsyncCount.as_view())),
        path("mixed", Mixed.as_view(extra_context={"name": "cbv"})),
    )
    with override_settings(ROOT_URLCONF=urls):
        client = Client()
        for url, body in (("/hello", b"hello False"), ("/count", b"0"), ("/mixed", b"<p>cbv user=False</p>")):
            assert (client.get(url).content, client.get(url)["x-pyisr-cache"]) == (body, "HIT")
        assert {"blog.post", "blog.post:*"} <= tags_of(cache, "/count"), "async views are tagged too"
        assert "mixed" in tags_of(cache, "/mixed")
        Post.objects.create(title="x")
        assert client.get("/count").content == b"1"
        pyisr.revalidate_sync("/mixed")  # revalidate(path) finds class-based views
    from django.utils.decorators import method_decorator

    with pytest.raises(TypeError, match="ISRMixin"):
        method_decorator(isr(revalidate=60), name="dispatch")(Hello).as_view()(RequestFactory().get("/"))


# -- who bypasses the cache ---------------------------------------------------------------------------


def test_logged_in_users_and_custom_rules_bypass_the_cache(cache: Engine) -> None:
    seen: list[str] = []

    def body(request: Any) -> Any:
        seen.append(request.user.get_username())
        return HttpResponse(f"for {request.user.get_username() or 'anyone'}")

    urls = urlconf(
        path("default", isr(revalidate=60)(body)),
        path("everyone", isr(revalidate=60, bypass=None)(body)),
        path("custom", isr(revalidate=60, bypass=lambda r: "preview" in r.GET)(body)),
    )
    with override_settings(ROOT_URLCONF=urls):
        anonymous, editor = Client(), Client()
        editor.force_login(User.objects.create_user("editor"))
        assert anonymous.get("/default")["x-pyisr-cache"] == "MISS"
        mine = editor.get("/default")
        assert (mine.content, mine["x-pyisr-cache"], mine["cache-control"]) == (
            b"for editor",
            "BYPASS",
            NOSTORE,
        )
        assert anonymous.get("/default").content == b"for anyone", "never stored"
        assert editor.get("/everyone").content == b"for anyone", "bypass=None: the cached page"
        assert anonymous.get("/custom?preview=1")["x-pyisr-cache"] == "BYPASS"
        assert anonymous.get("/custom")["x-pyisr-cache"] == "MISS"


def test_draft_mode_bypasses_with_the_projects_secret(cache: Engine) -> None:
    from pyisr.integrations.django import disable_draft_mode, enable_draft_mode

    @isr(revalidate=60)
    def page(request: Any) -> Any:
        return HttpResponse("page")

    def preview(request: Any) -> Any:
        return enable_draft_mode(request, HttpResponse("on"))

    def leave(request: Any) -> Any:
        return disable_draft_mode(HttpResponse("off"))

    with override_settings(ROOT_URLCONF=urlconf(path("page", page), path("on", preview), path("off", leave))):
        client = Client()
        assert client.get("/page")["x-pyisr-cache"] == "MISS"
        client.get("/on")
        assert client.cookies[COOKIE]["secure"] == "" and client.cookies[COOKIE]["httponly"]
        assert client.get("/page")["x-pyisr-cache"] == "BYPASS"
        client.get("/off")
        assert client.get("/page")["x-pyisr-cache"] == "HIT"
        forged = Client()
        forged.cookies[COOKIE] = "9999999999.forged"
        assert forged.get("/page")["x-pyisr-cache"] == "HIT"
        with override_settings(PYISR={"cache": "memory://"}), pytest.raises(ImproperlyConfigured):
            client.get("/on")


# -- i18n ------------------------------------------------------------------------------------------


def test_i18n_patterns_render_in_the_urls_language() -> None:
    from django.conf.urls.i18n import i18n_patterns
    from django.urls import reverse
    from django.utils import translation

    @isr(revalidate=60)
    def hello(request: Any) -> Any:
        return HttpResponse(f"{translation.get_language()} {reverse('hello')}")

    urls = urlconf(*i18n_patterns(path("hello/", hello, name="hello")))
    middleware = [
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.locale.LocaleMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
    ]
    with override_settings(ROOT_URLCONF=urls, MIDDLEWARE=middleware, LANGUAGES=[("en", "E"), ("fr", "F")]):
        client = Client()
        assert client.get("/fr/hello/").content == b"fr /fr/hello/"
        assert client.get("/en/hello/").content == b"en /en/hello/"
        assert client.get("/fr/hello/")["x-pyisr-cache"] == "HIT"
        pyisr.revalidate_sync("/fr/hello")
        assert client.get("/fr/hello/").content == b"fr /fr/hello/"


def test_locale_middleware_without_prefixes_keys_each_language(cache: Engine) -> None:
    from django.utils import translation

    @isr(revalidate=60)
    def hello(request: Any) -> Any:
        return HttpResponse(f"{translation.get_language()} {request.LANGUAGE_CODE}")

    middleware = [
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.locale.LocaleMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
    ]
    languages = [("en", "E"), ("fr", "F")]
    with override_settings(
        ROOT_URLCONF=urlconf(path("hello", hello)), MIDDLEWARE=middleware, LANGUAGES=languages
    ):
        client = Client()
        french = client.get("/hello", headers={"accept-language": "fr"})
        assert (french.content, french["x-pyisr-cache"]) == (b"fr fr", "MISS")
        assert client.get("/hello").content == b"en en"
        assert client.get("/hello", headers={"accept-language": "fr"})["x-pyisr-cache"] == "HIT"
        assert run_sync(cache.inspect("/~fr/hello")) is not None
        pyisr.revalidate_path("/hello")  # every language of the path
        assert client.get("/hello", headers={"accept-language": "fr"})["x-pyisr-cache"] == "MISS"
        assert client.get("/hello")["x-pyisr-cache"] == "MISS"
        pyisr.revalidate_sync("/~fr/hello")  # a language's own key, as `cache list` shows it


# -- settings, checks and commands --------------------------------------------------------------------


def test_checks_report_bad_settings_with_ids(tmp_path: Path) -> None:
    from pyisr.integrations.django import conf

    bad = {
        "revalidte": 60,
        "cache": "ftp://x",
        "revalidate": "soon",
        "draft_mode": True,
        "render_timeout": -1,
        "bypass": "no.such.callable",
        "orm_tags_ignore": ["blog.nothing"],
    }
    with override_settings(PYISR=bad):
        found = {m.id: m for m in check_settings()}
        assert {"pyisr.E002", "pyisr.E003", "pyisr.E005", "pyisr.E006", "pyisr.E007", "pyisr.E009"} <= set(
            found
        )
        assert "pyisr.W002" in found
        assert found["pyisr.E002"].hint == "Did you mean 'revalidate'?"
        with pytest.raises(ImproperlyConfigured, match="pyisr.E002"):
            with override_settings(ROOT_URLCONF=urlconf(path("x", isr()(lambda r: HttpResponse())))):
                Client().get("/x")
        from django.core.management.base import SystemCheckError

        with pytest.raises(SystemCheckError, match="pyisr.E003"):
            call_command("check")
    with override_settings(PYISR={}, BASE_DIR=tmp_path):
        assert conf.get().cache == str(tmp_path.resolve() / ".pyisr" / "cache"), "absolute, under BASE_DIR"
        assert check_settings() == []
    with override_settings(PYISR={"cache": "pages"}, BASE_DIR=None):
        assert [m.id for m in check_settings()] == ["pyisr.E004"]
    with override_settings(PYISR={"cache": "memory://"}):
        assert [m.id for m in check_settings()] == ["pyisr.W001"]


def test_management_commands(blog: Client, cache: Engine, capsys: pytest.CaptureFixture[str]) -> None:
    post = Post.objects.create(title="Listed")
    url = f"/blog/{post.pk}/"
    call_command("pyisr", "revalidate", "--path", url)
    assert capsys.readouterr().out == f"regenerated {url}\n"
    assert blog.get(url)["x-pyisr-cache"] == "HIT", "regenerated by the command"
    call_command("pyisr", "cache", "list", "--prefix", "/blog", "--json")
    assert [row["key"] for row in json.loads(capsys.readouterr().out)] == [f"/blog/{post.pk}"]
    call_command("pyisr", "cache", "list", "--prefix", "/blog")
    table = capsys.readouterr().out
    assert f"/blog/{post.pk}" in table and "fresh" in table and "1 entry in" in table
    call_command("pyisr", "cache", "inspect", url, "--json")
    assert f'"blog.post:{post.pk}"' in capsys.readouterr().out
    call_command("pyisr", "cache", "purge", url)
    capsys.readouterr()
    call_command("pyisr", "cache", "explain", url)
    assert "invalidated" in (said := capsys.readouterr().out) and "by manage.py pyisr cache purge" in said
    assert blog.get(url)["x-pyisr-cache"] == "MISS"
    call_command("pyisr", "revalidate", "--model", "blog.post", "--pk", str(post.pk))
    assert blog.get(url)["x-pyisr-cache"] == "MISS"
    call_command("pyisr", "revalidate", "--tag", f"blog.post:{post.pk}", "--stale")
    assert blog.get(url)["x-pyisr-cache"] == "STALE"
    run_sync(cache.drain())
    with pytest.raises(CommandError, match="no page"):
        call_command("pyisr", "revalidate", "--path", "/nothing/here")
    with pytest.raises(CommandError, match="nothing is cached"):
        call_command("pyisr", "cache", "inspect", "/nothing")


def test_async_views_raise_into_responses_too(cache: Engine) -> None:
    @isr(revalidate=60)
    async def missing(request: Any) -> Any:
        await asyncio.sleep(0)
        return await Post.objects.aget(pk=10**9)

    with override_settings(ROOT_URLCONF=urlconf(path("gone", missing))):
        client = Client()
        assert (client.get("/gone").status_code, client.get("/gone")["x-pyisr-cache"]) == (404, "HIT")


# -- how pages are served: re-warm, compression, tag headers -------------------------------------


def until(check: Any, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.02)


def test_hot_pages_are_rewarmed_in_the_background_after_a_wide_invalidation() -> None:
    from pyisr.rewarm import background_rewarmer

    renders: list[str] = []

    @isr(revalidate=False, tags=["posts"])
    def post(request: Any, id: str) -> HttpResponse:
        renders.append(id)
        return HttpResponse(f"post {id}, render {len(renders)}")

    hot = Engine(MemoryCache(), rewarm_rate=100, max_concurrent_renders=4)
    with isolated_cache(hot), override_settings(ROOT_URLCONF=urlconf(path("p/<id>", post))):
        client = Client()
        for id, visits in (("1", 5), ("2", 3), ("3", 1)):  # the first visit of each is its MISS
            for _ in range(visits):
                assert client.get(f"/p/{id}").status_code == 200
        assert renders == ["1", "2", "3"]
        rewarmer = background_rewarmer(hot)
        assert rewarmer is not None, "the first @isr request started it"
        pyisr.revalidate_tag("posts")
        until(lambda: len(renders) == 5)  # no visitor asked
        run_sync(rewarmer.idle())
        assert renders == ["1", "2", "3", "1", "2"], "the hottest first; the cold one stays lazy"
        fresh = client.get("/p/1")
        assert (fresh["x-pyisr-cache"], fresh.content) == ("HIT", b"post 1, render 4")
        assert client.get("/p/3")["x-pyisr-cache"] == "MISS"
    assert background_rewarmer(hot) is None, "isolated_cache stops it with its engine"


def test_an_engine_made_by_hand_never_rewarms(cache: Engine) -> None:
    from pyisr.rewarm import background_rewarmer

    @isr(revalidate=False, tags=["posts"])
    def page(request: Any) -> HttpResponse:
        return HttpResponse("page")

    with override_settings(ROOT_URLCONF=urlconf(path("page", page))):
        assert Client().get("/page").status_code == 200
    assert cache.rewarm_rate == 0 and background_rewarmer(cache) is None


def test_serving_settings_reach_the_engine_and_bad_ones_are_named() -> None:
    from pyisr.integrations.django import conf
    from pyisr.integrations.django.apps import configure_engine
    from pyisr.runtime import get_engine, set_engine

    project = get_engine()
    chosen = {"cache": "memory://", "compress": False, "cdn_tag_headers": "none", "rewarm_rate": 2.5}
    try:
        with override_settings(PYISR={"cache": "memory://"}):
            configure_engine(conf.get())
            engine = get_engine()
            assert (engine.compress, engine.rewarm_rate) == (True, 20.0), "the defaults"
            assert engine.cdn_tag_headers == ("surrogate-key", "cache-tag")
        with override_settings(PYISR=chosen):
            settings = conf.get()
            assert (settings.compress, settings.cdn_tag_headers, settings.rewarm_rate) == (False, (), 2.5)
            configure_engine(settings)
            engine = get_engine()
            assert (engine.compress, engine.cdn_tag_headers, engine.rewarm_rate) == (False, (), 2.5)
    finally:
        set_engine(project)
    bad = {"compress": "false", "rewarm_rate": -1, "cdn_tag_headers": ["X-Tags"]}
    with override_settings(PYISR=bad):
        found = [m.msg for m in check_settings() if m.id == "pyisr.E007"]
        assert len(found) == 3
        assert any("PYISR['compress']" in m and "'false'" in m for m in found)
        assert any("PYISR['rewarm_rate']" in m for m in found)
        assert any("PYISR['cdn_tag_headers']" in m and "x-tags" in m for m in found)


def test_a_build_id_gives_the_deploy_a_cache_of_its_own_and_an_edge_key(tmp_path: Path) -> None:
    from pyisr.integrations.django import conf
    from pyisr.integrations.django.apps import configure_engine
    from pyisr.runtime import get_engine, set_engine

    @isr(revalidate=False)
    def home(request: Any) -> HttpResponse:
        return HttpResponse("home")

    project = get_engine()
    try:
        with override_settings(
            PYISR={"cache": str(tmp_path / "cache"), "build_id": "release-42", "rewarm_rate": 0},
            ROOT_URLCONF=urlconf(path("", home)),
        ):
            configure_engine(conf.get())
            answer = Client().get("/")
            assert answer["x-pyisr-cache"] == "MISS"
            assert "_b/release-42" in answer["surrogate-key"].split(" ")
            assert (tmp_path / "cache" / "release-42").is_dir()
            assert get_engine().app_build is not None
    finally:
        set_engine(project)
    for bad, why in (("../up", "must be 1 to 64 letters"), (42, "must be 1 to 64 letters")):
        with override_settings(PYISR={"build_id": bad}):
            [found] = [m for m in check_settings() if m.id == "pyisr.E012"]
            assert why in found.msg and "PYISR['build_id']" in found.msg
    with override_settings(PYISR={"cache": "redis://127.0.0.1:6379/0?build_id=x", "build_id": "y"}):
        [found] = [m for m in check_settings() if m.id == "pyisr.E012"]
        assert "in one place" in found.msg


def test_manage_py_revalidate_fails_when_redis_never_got_the_invalidation() -> None:
    """A deploy script runs ``manage.py pyisr revalidate --tag posts`` during a Redis
    outage: it must fail, not say "invalidated" while no other process will ever know."""
    from django.core.management.base import CommandError
    from redis_support import free_port

    from pyisr.integrations.django import conf
    from pyisr.integrations.django.apps import configure_engine
    from pyisr.runtime import get_engine, set_engine

    project = get_engine()
    dead = f"redis://127.0.0.1:{free_port()}/0?prefix=outage"
    try:
        with override_settings(PYISR={"cache": dead, "rewarm_rate": 0}):
            configure_engine(conf.get())
            outage = get_engine()
            try:
                with pytest.raises(CommandError, match="the invalidation of tag posts was not written"):
                    call_command("pyisr", "revalidate", "--tag", "posts")
            finally:
                run_sync(outage.handler.close())  # names the lost tag now, not at the run's exit
    finally:
        set_engine(project)


def test_compress_false_serves_and_stores_no_encoding() -> None:
    @isr(revalidate=60)
    def big(request: Any) -> HttpResponse:
        return HttpResponse("<p>" + "words " * 2000 + "</p>")

    plain = Engine(MemoryCache(), compress=False, cdn_tag_headers=())
    with isolated_cache(plain), override_settings(ROOT_URLCONF=urlconf(path("big", big))):
        client = Client()
        for _ in range(2):
            answer = client.get("/big", headers={"accept-encoding": "br, gzip"})
            assert answer.status_code == 200 and "content-encoding" not in answer
            assert "surrogate-key" not in answer and "cache-tag" not in answer
        entry = run_sync(plain.inspect("/big"))
        assert entry is not None and not entry.encodings
