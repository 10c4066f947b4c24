"""pyisr's benchmark suite: ``python -m bench all`` (see bench/README.md)."""
