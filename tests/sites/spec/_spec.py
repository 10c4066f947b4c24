"""Shared helpers of the SPEC.md test site (not a route: the name starts with '_')."""

import os
import time
from pathlib import Path

REVALIDATE = int(os.environ.get("SPEC_REVALIDATE", "2"))


def count(name: str) -> int:
    """Record one render of ``name`` in the counts folder; returns this render's number."""
    folder = Path(os.environ.get("SPEC_COUNTS", "/tmp/pyisr-spec-counts"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name.strip("/").replace("/", "_") or "index")
    with open(path, "a") as fh:
        fh.write("x\n")
    return len(path.read_text().splitlines())


def stamp(name: str) -> str:
    return f"{name} render={count(name)} at={time.time():.6f}"


def flag_on() -> bool:
    flag = os.environ.get("SPEC_FLAG")
    return bool(flag) and Path(flag).exists()
