"""Settings: pyisr.toml, then PYISR_* variables, then command-line flags, each overriding the last."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyisr.config import Config, ConfigError, load_config

TOML = """
cache = "memory://"
memory_tier = "10MB"
revalidate_secret = "from-toml"
debug_cache = false
render_timeout = 5
render_concurrency = 4
trailing_slash = false
"""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "pyisr.toml").write_text(TOML)
    return tmp_path


def test_defaults_without_any_source(tmp_path: Path) -> None:
    assert load_config(tmp_path, environ={}) == Config()


def test_the_file_sets_every_key(site: Path) -> None:
    config = load_config(site, environ={})
    assert config.cache == "memory://"
    assert config.memory_tier == 10 * 1024 * 1024
    assert config.revalidate_secret == "from-toml"
    assert config.render_timeout == 5 and config.render_concurrency == 4
    assert config.debug_cache is False and config.trailing_slash is False


def test_environment_overrides_the_file_and_flags_override_both(site: Path) -> None:
    environ = {
        "PYISR_CACHE": "file:///tmp/elsewhere",
        "PYISR_MEMORY_TIER": "20MB",
        "PYISR_REVALIDATE_SECRET": "from-env",
        "PYISR_DEBUG_CACHE": "1",
        "PYISR_RENDER_TIMEOUT": "7",
        "PYISR_RENDER_CONCURRENCY": "8",
        "PYISR_TRAILING_SLASH": "true",
    }
    from_env = load_config(site, environ=environ)
    assert from_env.cache == "file:///tmp/elsewhere"
    assert from_env.memory_tier == 20 * 1024 * 1024
    assert from_env.revalidate_secret == "from-env"
    assert from_env.debug_cache is True and from_env.trailing_slash is True
    assert from_env.render_timeout == 7 and from_env.render_concurrency == 8

    flags = {
        "cache": "redis://127.0.0.1:6379/0",
        "memory_tier": "0",
        "debug_cache": False,
        "render_timeout": 9.5,
        "render_concurrency": 2,
        "trailing_slash": False,
    }
    from_flags = load_config(site, flags, environ=environ)
    assert from_flags.cache == "redis://127.0.0.1:6379/0"
    assert from_flags.memory_tier == 0
    assert from_flags.revalidate_secret == "from-env"  # no flag for secrets
    assert from_flags.debug_cache is False and from_flags.trailing_slash is False
    assert from_flags.render_timeout == 9.5 and from_flags.render_concurrency == 2


def test_flags_left_out_change_nothing(site: Path) -> None:
    unset = dict.fromkeys(("cache", "memory_tier", "debug_cache", "render_timeout", "trailing_slash"))
    assert load_config(site, unset, environ={}) == load_config(site, environ={})


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("toml", "pyisr.toml, key 'render_concurrency'"),
        ("env", "environment variable PYISR_RENDER_CONCURRENCY"),
        ("flag", "option --render-concurrency"),
    ],
)
def test_a_bad_value_names_its_source_key_and_an_example(tmp_path: Path, source: str, expected: str) -> None:
    environ: dict[str, str] = {}
    flags: dict[str, object] = {}
    if source == "toml":
        (tmp_path / "pyisr.toml").write_text("render_concurrency = 0\n")
    elif source == "env":
        environ["PYISR_RENDER_CONCURRENCY"] = "none"
    else:
        flags["render_concurrency"] = -1
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path, flags, environ=environ)
    message = str(caught.value)
    assert expected in message and "render_concurrency = 16" in message


def test_an_unknown_key_in_the_file_lists_the_known_ones(tmp_path: Path) -> None:
    (tmp_path / "pyisr.toml").write_text('cahce = "memory://"\n')
    with pytest.raises(ConfigError, match=r"unknown setting 'cahce'; known settings: cache, memory_tier"):
        load_config(tmp_path, environ={})
