"""Loading a site's Python modules and checking what they export.

A mistake in a page module must be reported at build time with the file, the line
and the fix, before anything is served: a typo like ``revalidat = 60`` would
otherwise silently mean "never revalidate".
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib.machinery
import importlib.util
import sys
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import CodeType, ModuleType

from pyisr import lifetimes
from pyisr.cache.tags import validate_tags
from pyisr.lifetimes import Lifetime


@dataclass
class SiteError:
    """One problem in one file, printable as ``file:line: message``."""

    file: Path
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else str(self.file)
        return f"{where}: {self.message}"


class SiteLoadError(Exception):
    """The site has mistakes; nothing of it is served."""

    def __init__(self, errors: list[SiteError]) -> None:
        self.errors = errors
        lines = "\n".join(f"  {e}" for e in errors)
        super().__init__(f"{len(errors)} problem(s) in the site:\n{lines}")


#: Next.js names people will type out of habit, and what to write instead.
NEXT_NAMES = {
    "dynamicParams": "dynamic_params",
    "generateStaticParams": "generate_static_params",
    "getStaticProps": "get_static_props",
    "getStaticPaths": "get_static_paths",
    "notFound": "not_found",
    "default": "page",
    "Page": "page",
}


class FreshSourceLoader(importlib.machinery.SourceFileLoader):
    """Compiles the file as it is now, never from a cached ``.pyc``.

    Python trusts a ``.pyc`` while the source's mtime, in whole seconds, and its size
    are unchanged: an edit saved within the second that keeps the size (``'one'`` to
    ``'two'``) would run the old code after ``pyisr dev`` reloads, or after a deploy
    that rewrites a file. A site's modules are few and compile in milliseconds.
    """

    def get_code(self, fullname: str) -> CodeType:
        path = self.get_filename(fullname)
        return self.source_to_code(self.get_data(path), path)


class SiteSourceFinder:
    """Loads the site's own helpers (``from lib.db import posts``) with
    :class:`FreshSourceLoader` too; every other import is left to Python."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        # Only the site folder is searched (a top-level name: the folder itself, first on
        # sys.path; a submodule: its package's directories inside it), so every other
        # import is not looked up on the whole sys.path twice.
        inside = [str(self.root)] if path is None else [p for p in path if Path(p).is_relative_to(self.root)]
        if not inside:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, inside, target)
        if (
            spec is None
            or spec.origin is None
            or not isinstance(spec.loader, importlib.machinery.SourceFileLoader)
        ):
            return None
        origin = Path(spec.origin)
        if not origin.is_relative_to(self.root) or _installed(origin):
            return None
        spec.loader = FreshSourceLoader(fullname, spec.origin)
        return spec


def _installed(origin: Path) -> bool:
    """A package installed in a virtualenv kept inside the site folder (``.venv/``)
    keeps its ``.pyc`` files: compiling Django at every start would cost seconds."""
    return origin.is_relative_to(sys.prefix) or bool(_PACKAGE_DIRS.intersection(origin.parts))


_PACKAGE_DIRS = frozenset({"site-packages", "dist-packages"})


def import_from_source(site_root: Path) -> None:
    """Make the site's helper modules load by :class:`FreshSourceLoader` (once per root)."""
    root = site_root.resolve()
    if not any(isinstance(f, SiteSourceFinder) and f.root == root for f in sys.meta_path):
        sys.meta_path.insert(0, SiteSourceFinder(root))


def load_module(path: Path, site_root: Path) -> ModuleType:
    """Import ``path`` under a unique private name (brackets in file names are fine)."""
    rel = path.relative_to(site_root).as_posix()
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    name = f"pyisr_site_{digest}_" + "".join(c if c.isalnum() else "_" for c in rel[:-3])
    spec = importlib.util.spec_from_file_location(name, path, loader=FreshSourceLoader(name, str(path)))
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def definition_lines(path: Path) -> dict[str, int]:
    """Line of each top-level name's definition, for error messages."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError:
        return {}
    lines: dict[str, int] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            lines.setdefault(node.name, node.lineno)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    lines.setdefault(target.id, node.lineno)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            lines.setdefault(node.target.id, node.lineno)
    return lines


def import_error(path: Path, exc: BaseException) -> SiteError:
    """Describe an exception raised while importing a site module."""
    if isinstance(exc, SyntaxError):
        return SiteError(path, exc.lineno, f"syntax error: {exc.msg}")
    line = None
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if Path(frame.filename) == path:
            line = frame.lineno
            break
    return SiteError(path, line, f"error while importing: {type(exc).__name__}: {exc}")


def unknown_exports(
    path: Path, module: ModuleType, known: Iterable[str], lines: dict[str, int]
) -> list[SiteError]:
    """Names that look like a misspelt or Next.js-style export."""
    known = list(known)
    errors: list[SiteError] = []
    for name in lines:
        if name in known or name.startswith("_"):
            continue
        if name in NEXT_NAMES and NEXT_NAMES[name] in known:
            errors.append(
                SiteError(
                    path, lines[name], f"{name!r} is the Next.js name; in pyisr write {NEXT_NAMES[name]!r}"
                )
            )
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        if close:
            errors.append(
                SiteError(path, lines[name], f"unknown export {name!r}: did you mean {close[0]!r}?")
            )
    return errors


class ExportCheck:
    """The exports of one route module, read and checked, with every problem kept.

    Each route kind reads the names it knows through one of these, so a module's
    mistakes are all reported together instead of one per build.
    """

    def __init__(self, path: Path, module: ModuleType, known: Iterable[str]) -> None:
        self.path = path
        self.module = module
        self.lines = definition_lines(path)
        self.errors = unknown_exports(path, module, known, self.lines)

    def error(self, message: str, name: str | None = None) -> None:
        """Record a problem, at the line that defines ``name`` when there is one."""
        self.errors.append(SiteError(self.path, self.lines.get(name) if name else None, message))

    def need_callable(self, name: str, required: bool = True) -> None:
        fn = getattr(self.module, name, None)
        if fn is None:
            if required:
                self.error(f"missing {name}(): define `def {name}(...)`")
        elif not callable(fn):
            self.error(f"{name} must be a function, not {type(fn).__name__}", name)

    def lifetime(self, pattern: str) -> Lifetime:
        """The module's ``revalidate`` (seconds, ``False`` or a profile name) and ``expire``;
        the default (never revalidated, the site's expire) after recording what is wrong."""
        module = self.module
        revalidate = getattr(module, "revalidate", None)
        expire = getattr(module, "expire", None)
        if isinstance(revalidate, bool) and revalidate:
            self.error("revalidate = True is not allowed: use seconds (e.g. 60) or False", "revalidate")
            return Lifetime(None)
        try:
            return lifetimes.parse(revalidate, expire, where=pattern)
        except lifetimes.UnknownProfile as exc:
            self.error(str(exc), "revalidate")
        except ValueError as exc:
            name = "expire" if "expire" in str(exc) and hasattr(module, "expire") else "revalidate"
            if name == "revalidate":
                self.error(
                    f"Invalid revalidate value {revalidate!r} on {pattern!r}, must be a non-negative "
                    "number of seconds, False or a profile name (e.g. revalidate = 60)",
                    "revalidate",
                )
            else:
                self.error(str(exc), "expire")
        return Lifetime(None)

    def dynamic_params(self) -> bool:
        """The module's ``dynamic_params``; True (render unknown paths) when absent or wrong."""
        if not hasattr(self.module, "dynamic_params"):
            return True
        value = self.module.dynamic_params
        if not isinstance(value, bool):
            self.error(f"dynamic_params must be True or False, not {value!r}", "dynamic_params")
            return True
        return value

    def tags(self) -> tuple[str, ...]:
        """The module's own cache tags, validated like every other tag."""
        if not hasattr(self.module, "tags"):
            return ()
        try:
            return validate_tags(self.module.tags, where="tags")
        except ValueError as exc:
            self.error(str(exc), "tags")
            return ()
