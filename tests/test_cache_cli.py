"""``pyisr cache list / inspect / explain / purge`` on a built site, through click's runner.

The table's columns, the filters and the sort, ``--json`` on every command, the
sentences of ``explain``, data keys that ``list`` prints and ``inspect`` opens, and a
clear error (with a non-zero exit) from a folder that is no site, or a site never built.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from pyisr.cli import main

PAGES = {
    "app/blog/[id]/page.py": """
        from pyisr import cached

        revalidate = 60
        tags = ["posts"]

        def load(id):
            return {"id": id}

        get_post = cached(load, ["post"], tags=["posts"], revalidate=3600)

        def generate_static_params():
            return [{"id": str(i)} for i in range(1, 4)]

        def page(params):
            return "<p>post " + str(get_post(params["id"])["id"]) + "</p>"
        """,
    "app/about/page.py": """
        revalidate = False

        def page(params):
            return "<p>" + "about " * 500 + "</p>"
        """,
}


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "site"
    for rel, text in PAGES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    built = invoke("build", str(root))
    assert built.exit_code == 0, built.output
    return root


def rows(site: Path, *args: str) -> list[dict[str, object]]:
    result = invoke("cache", "list", "--site", str(site), "--json", *args)
    assert result.exit_code == 0, result.output
    found: list[dict[str, object]] = json.loads(result.stdout)
    return found


def test_list_prints_a_table_with_every_column(site: Path) -> None:
    result = invoke("cache", "list", "--site", str(site))
    assert result.exit_code == 0, result.output
    header = result.stdout.splitlines()[1:4]
    for column in ("key", "state", "age", "revalidate", "size", "tags", "hits"):
        assert any(column in line for line in header), (column, result.stdout)
    assert "entries in " in result.stdout and str(site.resolve()) in result.stdout
    for key in ("/blog/1", "/blog/3", "/about"):
        assert key in result.stdout
    assert "fresh" in result.stdout and "60 s" in result.stdout and "never" in result.stdout


def test_list_filters_and_sorts(site: Path) -> None:
    every = rows(site)
    keys = {str(r["key"]) for r in every}
    assert {"/blog/1", "/blog/2", "/blog/3", "/about"} <= keys and any(k.startswith("data:") for k in keys)
    assert {r["key"] for r in rows(site, "--route", "/blog/[id]")} == {"/blog/1", "/blog/2", "/blog/3"}
    assert {r["key"] for r in rows(site, "--tag", "posts")} == keys - {"/about"}
    assert [r["key"] for r in rows(site, "--sort", "size", "--limit", "1")] == ["/about"]
    assert [r["key"] for r in rows(site, "--sort", "key", "--limit", "2")] == sorted(keys)[:2]
    assert rows(site, "--state", "failing") == []
    assert len(rows(site, "--state", "fresh")) == len(every)
    row = next(r for r in every if r["key"] == "/blog/2")
    assert (row["state"], row["route"], row["revalidate"], row["tags"], row["hits"]) == (
        "fresh",
        "/blog/[id]",
        60,
        ["posts"],
        0,
    )
    bad = CliRunner().invoke(main, ["cache", "list", "--site", str(site), "--sort", "colour"])
    assert bad.exit_code == 2 and "hits" in bad.output


def test_every_listed_key_opens_in_inspect_and_explain(site: Path) -> None:
    for row in rows(site):
        key = str(row["key"])
        inspected = invoke("cache", "inspect", key, "--site", str(site), "--json")
        assert inspected.exit_code == 0, inspected.output
        info = json.loads(inspected.stdout)
        assert info["cached"] and info["key"] == key and info["state"] == "fresh"
        explained = invoke("cache", "explain", key, "--site", str(site), "--json")
        assert json.loads(explained.stdout)["text"].startswith("Fresh until")


def test_inspect_prints_a_readable_block(site: Path) -> None:
    result = invoke("cache", "inspect", "/blog/1", "--site", str(site))
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "/blog/1  (page, route /blog/[id])" in text
    for label in ("state", "status", "rendered", "revalidate", "expire", "size", "tags", "hits", "why"):
        assert any(line.startswith(label) for line in text.splitlines()), (label, text)
    assert ("ago)" in text or "(just now)" in text) and "Fresh until" in text and '"created_at"' not in text


def test_purge_then_explain_says_who_and_when(site: Path) -> None:
    purged = invoke("cache", "purge", "/blog/3", "--site", str(site), "--json")
    assert purged.exit_code == 0, purged.output
    assert json.loads(purged.stdout)["purged"] is True
    explained = invoke("cache", "explain", "/blog/3", "--site", str(site))
    assert explained.exit_code == 0, explained.output
    first, *said = explained.stdout.splitlines()
    assert first == "/blog/3: invalidated"
    assert said[0].strip().startswith("Invalidated since") and "(just now)" in said[0]
    assert "path /blog/3 was revalidated at" in said[0] and "by pyisr cache purge (CLI)" in said[0]
    assert [r["state"] for r in rows(site, "--state", "invalidated")] == ["invalidated"]


def test_a_key_not_cached_is_said_so(site: Path) -> None:
    result = CliRunner().invoke(main, ["cache", "explain", "/blog/99", "--site", str(site)])
    assert result.exit_code == 1
    assert "Nothing is cached for /blog/99." in result.stdout and "looked in" in result.output
    inspected = CliRunner().invoke(main, ["cache", "inspect", "/blog/99", "--site", str(site), "--json"])
    assert inspected.exit_code == 1 and json.loads(inspected.stdout)["cached"] is False


@pytest.mark.parametrize("command", [["list"], ["inspect", "/x"], ["explain", "/x"], ["purge", "/x"]])
def test_no_site_and_no_build_are_said_clearly(tmp_path: Path, command: list[str]) -> None:
    nowhere = tmp_path / "nowhere"
    nowhere.mkdir()
    result = CliRunner().invoke(main, ["cache", *command, "--site", str(nowhere)])
    assert result.exit_code == 2
    assert f"no pyisr site in {nowhere.resolve()}" in result.output and "app/ or pages/" in result.output
    as_json = CliRunner().invoke(main, ["cache", *command, "--site", str(nowhere), "--json"])
    assert as_json.exit_code == 2 and "no pyisr site" in json.loads(as_json.stdout)["error"]
    assert not (nowhere / ".pyisr").exists(), "looking made no cache"

    unbuilt = tmp_path / "unbuilt"
    (unbuilt / "app").mkdir(parents=True)
    result = CliRunner().invoke(main, ["cache", *command, "--site", str(unbuilt)])
    assert result.exit_code == 2 and "was never built" in result.output and "pyisr build" in result.output
    assert not (unbuilt / ".pyisr").exists()


def test_a_purge_redis_never_took_fails_instead_of_saying_purged(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """During a Redis outage the handler queues an invalidation for later; a command ends
    before any later comes, so it must fail rather than report a purge nobody will see."""
    from redis_support import free_port

    monkeypatch.setenv("PYISR_CACHE", f"redis://127.0.0.1:{free_port()}/0?prefix=outage")
    result = CliRunner().invoke(main, ["cache", "purge", "/about", "--site", str(site), "--json"])
    assert result.exit_code == 1, result.output
    assert "the invalidation of /about was not written" in result.output
    assert '"purged": true' not in result.output
