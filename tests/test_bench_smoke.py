"""Smoke test of the benchmark suite: ``python -m bench herd --quick`` runs and writes its JSON.

herd needs no wrk and no nginx, so this never skips. It checks the shape of the
results, not the numbers: the suite reports targets, it does not assert them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_herd_quick_writes_json(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "herd", "--quick", "--no-install", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((tmp_path / "herd.json").read_text())
    assert data["scenario"] == "herd"
    assert data["quick"] is True
    assert data["skipped"] is None
    assert data["machine"]["cores"] and data["machine"]["python"]
    assert {row["page"] for row in data["rows"]} == {"missing", "stale"}
    for row in data["rows"]:
        assert row["answered"] + row["failed"] == data["params"]["concurrency"]
        assert isinstance(row["renders"], int)
    assert len(data["targets"]) == 2
    assert all(t["met"] in (True, False) for t in data["targets"])
    summary = (tmp_path / "summary.md").read_text()
    assert "herd" in summary and "| target |" in summary
    assert "herd" in done.stdout  # the table is printed too


@pytest.mark.slow
def test_bench_abuse_quick_writes_json(tmp_path: Path) -> None:
    """The abuse scenario runs under both servers and reports what its targets need."""
    done = subprocess.run(
        [sys.executable, "-m", "bench", "abuse", "--quick", "--no-install", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((tmp_path / "abuse.json").read_text())
    assert data["scenario"] == "abuse" and data["skipped"] is None
    cases = [row for row in data["rows"] if row["table"] == "abuse"]
    assert {row["case"] for row in cases} == {"pyisr granian", "pyisr uvicorn"}
    for row in cases:
        assert row["hit_answers"] > 0 and row["hit_p99_ms"] is not None
        assert row["rss_max_mb"] > 0 and row["cache_max_mb"] > 0
    samples = [row for row in data["rows"] if row["table"] == "samples"]
    assert len(samples) >= 4
    assert {t["target"].split(":")[0] for t in data["targets"]} == {"abuse granian", "abuse uvicorn"}
    assert all(t["met"] in (True, False) for t in data["targets"])
    assert "abuse" in (tmp_path / "summary.md").read_text()


@pytest.mark.slow
def test_bench_edge_quick_writes_json(tmp_path: Path) -> None:
    """The edge scenario drives a real Varnish: every part reports, whatever the numbers."""
    from varnish_support import require_varnish

    require_varnish()
    done = subprocess.run(
        [sys.executable, "-m", "bench", "edge", "--quick", "--no-install", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((tmp_path / "edge.json").read_text())
    assert data["scenario"] == "edge" and data["skipped"] is None, data["skipped"]
    tables = {row["table"] for row in data["rows"]}
    assert {"purge", "rewarm"} <= tables
    purge = next(row for row in data["rows"] if row["table"] == "purge")
    assert purge["trials"] == data["params"]["purge_trials"] and purge["p99_ms"] > 0
    rewarm = [row for row in data["rows"] if row["table"] == "rewarm"]
    assert len(rewarm) == 4
    if "hit" in tables:  # needs wrk (and nginx for its row)
        assert any(row["case"] == "varnish br" for row in data["rows"])
    assert any("purge reaches Varnish" in t["target"] for t in data["targets"])
    assert "edge" in (tmp_path / "summary.md").read_text()
