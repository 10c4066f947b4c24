"""Request paths become cache keys, and keys become the implicit tags ``revalidate_path`` hits."""

from __future__ import annotations

import pytest

from pyisr.cache.tags import (
    LAYOUT_TAG,
    MAX_TAG_LENGTH,
    MAX_TAGS_PER_ENTRY,
    PAGE_TAG,
    PATH_TAG,
    implicit_tags,
    merge_tags,
    tags_for_revalidate_path,
    validate_tags,
)
from pyisr.paths import BadPath, normalize_path, split_key, validate_revalidate_target

# -- normalize_path ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "path,key",
    [
        ("/", "/"),
        ("", "/"),
        ("/blog/1", "/blog/1"),
        ("/blog/1/", "/blog/1"),
        ("//blog//1//", "/blog/1"),
        ("/blog/./1", "/blog/1"),
        ("/blog/x/../1", "/blog/1"),
        ("/blog/%2e%2E/1", "/1"),  # an encoded dot segment is still a dot segment
        ("/../../etc/passwd", "/etc/passwd"),  # never above the root
        ("/index", "/"),
        ("/index/", "/"),
        ("/blog/1?foo=bar", "/blog/1"),  # S-10: the query string never makes a new key
        ("/blog/1#top", "/blog/1"),
        ("/blog/A1", "/blog/A1"),  # keys are case-sensitive
    ],
)
def test_normalize_path(path, key):
    assert normalize_path(path) == key


def test_S26_percent_encoded_utf8_decodes_to_one_key():
    assert normalize_path("/blog/%E3%81%82") == "/blog/あ"
    assert normalize_path("/blog/あ") == "/blog/あ"
    assert normalize_path("/blog/a%20b") == "/blog/a b"


@pytest.mark.parametrize("path", ["/blog/%ZZ", "/blog/%", "/blog/%4", "/blog/ok%G1", "/blog/%FF%FE"])
def test_S27_malformed_percent_encoding_is_a_bad_path(path):
    with pytest.raises(BadPath):
        normalize_path(path)


def test_bad_path_is_a_value_error_naming_the_segment():
    with pytest.raises(ValueError, match="%ZZ"):
        normalize_path("/blog/%ZZ")


@pytest.mark.parametrize(
    "path,key",
    [
        ("/blog/a%2Fb", "/blog/a%2Fb"),  # an encoded slash stays inside its segment
        ("/blog/a%2fb", "/blog/a%2Fb"),
        ("/blog/what%3F", "/blog/what%3F"),
        ("/blog/c%23", "/blog/c%23"),
        ("/blog/100%25", "/blog/100%25"),
    ],
)
def test_path_delimiters_stay_encoded(path, key):
    assert normalize_path(path) == key
    assert normalize_path(key) == key
    assert len(split_key(key)) == 2


def test_split_key_gives_decoded_segments():
    assert split_key("/blog/a%2Fb") == ["blog", "a/b"]
    assert split_key("/blog/100%25") == ["blog", "100%"]
    assert split_key("/") == []


def test_index_is_only_dropped_at_the_root():
    """Next.js maps only ``/index`` to ``/``; a post whose id is "index" keeps its own key.

    Dropping every trailing ``index`` would make ``/blog/index`` (the ``[id]`` page for
    id "index") share the cache entry of the ``/blog`` listing page.
    """
    assert normalize_path("/blog/index") == "/blog/index"
    assert normalize_path("/blog/index") != normalize_path("/blog")
    assert normalize_path("/index/index") == normalize_path(normalize_path("/index/index"))


def test_validate_revalidate_target():
    assert validate_revalidate_target("/blog/1/") == "/blog/1"
    with pytest.raises(ValueError, match=r"'blog/1'.*e\.g\. '/blog/post-1'"):
        validate_revalidate_target("blog/1")
    with pytest.raises(ValueError, match="None"):
        validate_revalidate_target(None)


# -- implicit tags ----------------------------------------------------------------------


def test_implicit_tags_of_a_dynamic_page():
    tags = implicit_tags("/blog/1", "/blog/[id]")
    for layout in ("/", "/blog", "/blog/[id]"):
        assert LAYOUT_TAG + layout in tags
    assert PAGE_TAG + "/blog/[id]" in tags
    assert PATH_TAG + "/blog/1" in tags
    # pyisr also tags the concrete ancestors, so revalidate_path("/blog/1", "layout")
    # reaches the page (Next.js would only match the pattern's layouts).
    assert tags == (
        LAYOUT_TAG + "/",
        LAYOUT_TAG + "/blog",
        LAYOUT_TAG + "/blog/[id]",
        LAYOUT_TAG + "/blog/1",
        PAGE_TAG + "/blog/[id]",
        PATH_TAG + "/blog/1",
    )


def test_implicit_tags_of_a_static_page_and_the_root():
    assert implicit_tags("/about") == (
        LAYOUT_TAG + "/",
        LAYOUT_TAG + "/about",
        PAGE_TAG + "/about",
        PATH_TAG + "/about",
    )
    assert implicit_tags("/") == (LAYOUT_TAG + "/", PAGE_TAG + "/", PATH_TAG + "/")


def test_implicit_tags_of_a_catch_all_page():
    tags = implicit_tags("/docs/a/b", "/docs/[...slug]")
    assert PAGE_TAG + "/docs/[...slug]" in tags and PATH_TAG + "/docs/a/b" in tags
    assert LAYOUT_TAG + "/docs" in tags


@pytest.mark.parametrize(
    "path,kind,expected",
    [
        ("/blog/1", None, (PATH_TAG + "/blog/1",)),
        ("/blog/1/", None, (PATH_TAG + "/blog/1",)),
        ("/blog/%E3%81%82", None, (PATH_TAG + "/blog/あ",)),
        ("/blog/[id]", "page", (PAGE_TAG + "/blog/[id]",)),
        ("/about", "page", (PAGE_TAG + "/about", PATH_TAG + "/about")),
        ("/blog", "layout", (LAYOUT_TAG + "/blog",)),
        ("/blog/[id]", "layout", (LAYOUT_TAG + "/blog/[id]",)),
        ("/", "layout", (LAYOUT_TAG + "/",)),
        ("/", None, (PATH_TAG + "/",)),
    ],
)
def test_tags_for_revalidate_path(path, kind, expected):
    assert tags_for_revalidate_path(path, kind) == expected


@pytest.mark.parametrize(
    "path,kind",
    [
        ("/blog/1", None),
        ("/blog/[id]", "page"),
        ("/blog/[id]", "layout"),
        ("/blog", "layout"),
        ("/", "layout"),
        ("/blog/1", "layout"),
    ],
)
def test_revalidate_path_tags_reach_the_page(path, kind):
    """Every form of revalidate_path that should hit ``/blog/1`` shares a tag with it."""
    assert set(tags_for_revalidate_path(path, kind)) & set(implicit_tags("/blog/1", "/blog/[id]"))


@pytest.mark.parametrize(
    "path,kind",
    [("/blog/2", None), ("/shop", "layout"), ("/shop/[id]", "page"), ("/blog/[id]/x", "layout")],
)
def test_revalidate_path_tags_miss_other_pages(path, kind):
    assert not set(tags_for_revalidate_path(path, kind)) & set(implicit_tags("/blog/1", "/blog/[id]"))


def test_revalidate_path_errors():
    with pytest.raises(ValueError, match="'blog/1'"):
        tags_for_revalidate_path("blog/1", None)
    with pytest.raises(ValueError, match="type='page'"):
        tags_for_revalidate_path("/blog/[id]", None)
    with pytest.raises(ValueError, match="'pages'"):
        tags_for_revalidate_path("/blog", "pages")
    with pytest.raises(ValueError, match="1025 characters; the limit is 1024"):
        tags_for_revalidate_path("/" + "a" * 1024, None)


# -- validate_tags ----------------------------------------------------------------------


def test_validate_tags_dedupes_in_order():
    assert validate_tags(["b", "a", "b"]) == ("b", "a")
    assert validate_tags(None) == ()
    assert validate_tags(("x",)) == ("x",)


def test_validate_tags_errors_say_what_to_do():
    with pytest.raises(ValueError, match=r"single string 'posts': write tags=\['posts'\]"):
        validate_tags("posts")
    with pytest.raises(ValueError, match="must be a string, not int"):
        validate_tags([1])
    with pytest.raises(ValueError, match=f"257 characters; the limit is {MAX_TAG_LENGTH}"):
        validate_tags(["x" * 257])
    assert validate_tags(["x" * 256]) == ("x" * 256,)
    with pytest.raises(ValueError, match=f"129 tags given; an entry may carry at most {MAX_TAGS_PER_ENTRY}"):
        validate_tags([f"t{i}" for i in range(129)])
    assert len(validate_tags([f"t{i}" for i in range(128)])) == 128
    with pytest.raises(ValueError, match="empty"):
        validate_tags([""])
    with pytest.raises(ValueError, match="reserved prefix"):
        validate_tags([PATH_TAG + "/blog/1"])


def test_merge_tags_keeps_first_position():
    assert merge_tags(["t1"], ["a", "t1"], ("b",)) == ("t1", "a", "b")
