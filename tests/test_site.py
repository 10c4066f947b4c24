"""Loading a site: routes from files, precedence, and mistakes reported with file and line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pyisr.site.loader import SiteLoadError
from pyisr.site.route import RouteKind, StaticPaths
from pyisr.site.site import Site


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


PAGE = "def page(params):\n    return 'x'\n"
PAGES_PAGE = (
    "def get_static_paths():\n    return {{'paths': [], 'fallback': {}}}\ndef page(props):\n    return 'x'\n"
)
BLOCKING = PAGES_PAGE.format("'blocking'")
STRICT = PAGES_PAGE.format("False")


def test_patterns_from_both_styles(tmp_path: Path) -> None:
    site = Site.load(
        write(
            tmp_path,
            {
                "app/page.py": PAGE,
                "app/blog/[id]/page.py": PAGE,
                "app/(marketing)/about/page.py": PAGE,
                "app/api/items/route.py": "def GET(request):\n    return {}\n",
                "pages/docs/[...slug].py": BLOCKING,
                "pages/shop/[[...path]].py": BLOCKING,
                "pages/api/hello.py": "def handler(request):\n    return {}\n",
                "pages/_helpers.py": "x = 1\n",
            },
        )
    )
    patterns = sorted(r.pattern for r in site.routes)
    assert patterns == [
        "/",
        "/about",
        "/api/hello",
        "/api/items",
        "/blog/[id]",
        "/docs/[...slug]",
        "/shop/[[...path]]",
    ]
    assert site.match("/blog/7")[1] == {"id": "7"}
    assert site.match("/docs/a/b")[1] == {"slug": ["a", "b"]}
    assert site.match("/docs") is None  # a catch-all needs one segment
    assert site.match("/shop")[1] == {"path": []}
    assert site.match("/shop/x/y")[1] == {"path": ["x", "y"]}


def test_static_segments_win_over_dynamic_ones(tmp_path: Path) -> None:
    site = Site.load(
        write(
            tmp_path,
            {
                "app/blog/[id]/page.py": PAGE,
                "app/blog/new/page.py": PAGE,
                "app/[...all]/page.py": PAGE,
            },
        )
    )
    assert site.match("/blog/new")[0].pattern == "/blog/new"
    assert site.match("/blog/3")[0].pattern == "/blog/[id]"
    assert site.match("/other/thing")[0].pattern == "/[...all]"


def test_encoded_slash_stays_inside_its_segment(tmp_path: Path) -> None:
    site = Site.load(write(tmp_path, {"app/blog/[id]/page.py": PAGE}))
    route, params = site.match("/blog/a%2Fb")
    assert route.pattern == "/blog/[id]" and params == {"id": "a/b"}


def errors_of(root: Path) -> list[str]:
    with pytest.raises(SiteLoadError) as info:
        Site.load(root)
    return [str(e) for e in info.value.errors]


def test_syntax_error_is_reported_with_file_and_line(tmp_path: Path) -> None:
    errors = errors_of(write(tmp_path, {"app/page.py": "def page(params):\n    return (\n"}))
    assert len(errors) == 1 and "app/page.py:" in errors[0] and "syntax error" in errors[0]


def test_misspelt_export_is_reported_with_the_fix(tmp_path: Path) -> None:
    errors = errors_of(write(tmp_path, {"app/page.py": "revalidat = 60\n" + PAGE}))
    assert any("app/page.py:1" in e and "did you mean 'revalidate'" in e for e in errors)


def test_nextjs_names_are_reported_with_the_python_name(tmp_path: Path) -> None:
    errors = errors_of(write(tmp_path, {"app/[id]/page.py": "dynamicParams = False\n" + PAGE}))
    assert any("'dynamicParams' is the Next.js name" in e and "dynamic_params" in e for e in errors)


@pytest.mark.parametrize("value", ["'60'", "-5", "1.5", "True"])
def test_wrong_revalidate_type_is_reported(tmp_path: Path, value: str) -> None:
    errors = errors_of(write(tmp_path, {"app/page.py": f"revalidate = {value}\n" + PAGE}))
    assert any("app/page.py:1" in e and "revalidate" in e for e in errors)


def test_missing_page_function(tmp_path: Path) -> None:
    errors = errors_of(write(tmp_path, {"app/page.py": "revalidate = 5\n"}))
    assert any("missing page()" in e for e in errors)


def test_a_path_defined_twice_names_both_files(tmp_path: Path) -> None:
    errors = errors_of(
        write(
            tmp_path,
            {
                "app/blog/[id]/page.py": PAGE,
                "pages/blog/[slug].py": STRICT,
            },
        )
    )
    assert any("app/blog/[id]/page.py" in e and "pages/blog/[slug].py" in e for e in errors)


def test_import_error_names_the_line(tmp_path: Path) -> None:
    errors = errors_of(write(tmp_path, {"app/page.py": "x = 1\nraise RuntimeError('boom')\n" + PAGE}))
    assert any("app/page.py:2" in e and "RuntimeError: boom" in e for e in errors)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    errors = errors_of(
        write(
            tmp_path,
            {
                "app/a/page.py": "revalidat = 1\n" + PAGE,
                "app/b/page.py": "def page(:\n",
            },
        )
    )
    assert len(errors) == 2


def test_no_routes_folder(tmp_path: Path) -> None:
    errors = errors_of(tmp_path)
    assert "no app/ or pages/ folder" in errors[0]


def test_each_file_becomes_the_route_kind_its_place_says(tmp_path: Path) -> None:
    site = Site.load(
        write(
            tmp_path,
            {
                "app/page.py": PAGE,
                "app/api/items/route.py": "def GET(request):\n    return {}\n",
                "pages/blog/[id].py": STRICT,
                "pages/api/hello.py": "def handler(request):\n    return {}\n",
            },
        )
    )
    kinds = {r.pattern: (type(r).__name__, r.kind) for r in site.routes}
    assert kinds == {
        "/": ("AppPage", RouteKind.APP_PAGE),
        "/api/items": ("RouteHandler", RouteKind.ROUTE_HANDLER),
        "/blog/[id]": ("PagesPage", RouteKind.PAGES_PAGE),
        "/api/hello": ("ApiRoute", RouteKind.API),
    }


async def test_static_paths_change_nothing_until_the_caller_keeps_them(tmp_path: Path) -> None:
    pages = PAGES_PAGE.replace("'paths': []", "'paths': ['/blog/1', {{'params': {{'id': '2'}}}}]")
    site = Site.load(write(tmp_path, {"pages/blog/[id].py": pages.format("False")}))
    (route,) = site.routes
    paths = await route.static_paths()
    assert paths == StaticPaths(["/blog/1", "/blog/2"], False)
    assert route.fallback == "blocking" and route.prerendered == set()
    await site.prepare()
    assert route.fallback is False and route.prerendered == {"/blog/1", "/blog/2"}


async def test_two_sites_in_one_process_render_their_own_templates(tmp_path: Path) -> None:
    """Loading a site changes nothing global: each renders with its own templates/."""
    import httpx

    from pyisr import Engine, MemoryCache, get_engine
    from pyisr.server.app import App

    page = "from pyisr import render_template\n\ndef page(params):\n    return render_template('t.html')\n"
    sites = []
    for name in ("one", "two"):
        root = write(tmp_path / name, {"app/page.py": page})
        (root / "templates").mkdir()
        (root / "templates" / "t.html").write_text(f"site {name}")
        sites.append(root)
    before = get_engine()
    apps = [App(root, engine=Engine(MemoryCache())) for root in sites]
    assert get_engine() is before, "constructing an App swaps no process-wide engine"
    for app, name in zip(apps, ("one", "two"), strict=True):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            assert (await client.get("/")).text == f"site {name}"
    # An on-demand regeneration outside any request renders with its own site's templates too.
    for app, name in zip(apps, ("one", "two"), strict=True):
        entry = await app.engine.revalidate_now("/", *(await app.engine.resolve("/"))[1:])
        assert entry.body == f"site {name}".encode()
        await app.engine.close()


def stale_bytecode(path: Path, new_text: str) -> None:
    """Cache ``path``'s code the way Python does, then change the file the way a quick
    editor save does: the same size, within the same second (the ``.pyc`` is trusted)."""
    import os
    import py_compile

    py_compile.compile(str(path), invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP, doraise=True)
    stat = path.stat()
    assert len(new_text.encode()) == stat.st_size
    path.write_text(new_text)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_quick_same_size_edit_is_loaded_not_its_cached_bytecode(tmp_path: Path) -> None:
    """``pyisr dev`` reloads after an edit; Python trusts a ``.pyc`` whose source kept
    its size and its mtime in whole seconds, so the old page and helper would run."""
    import sys
    import uuid

    helper = f"words_{uuid.uuid4().hex}"
    page = f"from {helper} import WORD\nTITLE = 'version one'\ndef page(p):\n    return TITLE\n"
    root = write(
        tmp_path,
        {
            "app/page.py": page,
            f"{helper}.py": "WORD = 'alpha'\n",
        },
    )
    stale_bytecode(root / "app" / "page.py", (root / "app" / "page.py").read_text().replace("one", "two"))
    stale_bytecode(root / f"{helper}.py", "WORD = 'omega'\n")
    try:
        (route,) = Site.load(root).routes
        assert route.module.TITLE == "version two"
        assert route.module.WORD == "omega"
    finally:
        sys.modules.pop(helper, None)


def test_packages_installed_inside_the_site_folder_keep_their_bytecode(tmp_path: Path) -> None:
    """A virtualenv kept in the site folder is not the site's code: compiling every
    installed package at each start would cost seconds."""
    from pyisr.site.loader import FreshSourceLoader, SiteSourceFinder

    packages = tmp_path / ".venv" / "lib" / "python3.11" / "site-packages"
    write(packages, {"somelib_for_test.py": "X = 1\n"})
    write(tmp_path, {"own_helper_for_test.py": "X = 2\n"})
    finder = SiteSourceFinder(tmp_path.resolve())
    assert finder.find_spec("somelib_for_test", [str(packages)]) is None
    own = finder.find_spec("own_helper_for_test", [str(tmp_path)])
    assert own is not None and isinstance(own.loader, FreshSourceLoader)
    assert finder.find_spec("json") is None
