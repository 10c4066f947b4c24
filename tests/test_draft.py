"""Draft mode's cookie: only the secret makes one, it expires, and a forged one never works."""

from __future__ import annotations

import pytest

from pyisr.draft import COOKIE, cookie_from_header, draft_cookie_value, is_draft_request, is_valid
from pyisr.integrations import BYPASS_HEADERS, is_bypassed


def test_a_cookie_made_with_the_secret_is_valid_until_it_expires() -> None:
    value = draft_cookie_value("s3cret", max_age=60, now=lambda: 1000.0)
    assert is_valid(value, "s3cret", now=lambda: 1059.0)
    assert not is_valid(value, "s3cret", now=lambda: 1060.0)
    assert not is_valid(value, "another secret", now=lambda: 1001.0)


@pytest.mark.parametrize("forged", ["", "1", "abc.def", "9999999999.", "9999999999.00", "x.y.z"])
def test_forged_cookies_never_turn_draft_mode_on(forged: str) -> None:
    assert not is_valid(forged, "s3cret")


def test_an_attacker_cannot_extend_a_stolen_cookie() -> None:
    value = draft_cookie_value("s3cret", max_age=60)
    expiry, signature = value.split(".")
    assert not is_valid(f"{int(expiry) + 3600}.{signature}", "s3cret")


def test_without_any_secret_nothing_is_a_draft(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYISR_DRAFT_SECRET", raising=False)
    monkeypatch.delenv("PYISR_REVALIDATE_SECRET", raising=False)
    assert not is_draft_request({COOKIE: "9999999999.abc"})


def test_requests_carry_it_as_a_header_or_a_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYISR_DRAFT_SECRET", "s3cret")
    value = draft_cookie_value()
    header = f"theme=dark; {COOKIE}={value}; other=1"
    assert cookie_from_header(header) == value
    assert is_draft_request(header) and is_draft_request({COOKIE: value})
    assert is_bypassed(object(), None, header)
    assert not is_bypassed(object(), None, "theme=dark")
    assert is_bypassed(object(), lambda request: True, None)
    assert dict(BYPASS_HEADERS)["x-pyisr-cache"] == "BYPASS"
