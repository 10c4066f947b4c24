"""Tags from the ORM: what a render read from the database tags its page by itself.

Two hooks watch a render (outside one they return at once: a query pays a
context-variable lookup, a row Django's ``post_init`` dispatch, about 1.3 µs; see
``examples/django_blog/measure_orm_tags.py``):

- every SQL ``SELECT`` run during it (an execute wrapper on each connection): the tables
  it reads name the models, whatever the query returned, empty results included;
- every model instance made during it (``post_init``): its primary key.

Three tags per model (``blog.post`` for ``Post`` in the ``blog`` app), named as the
SQLAlchemy integration names its tables' tags:

==================  =============================================================
``blog.post``       the page ran a query over posts (a list, a filter, a count, a
                    lookup by anything but the pk): which posts match may change
``blog.post:5``     the page read post 5 (a row it showed, or a lookup by pk)
``blog.post:*``     the page read posts in any way
==================  =============================================================

Saving or deleting post 5 revalidates ``blog.post:5`` and ``blog.post``
(:mod:`~pyisr.integrations.django.invalidation`): the pages that showed post 5 and the
pages whose query it may now match, not the detail pages of other posts;
``revalidate_model(Post)`` (a bulk change) revalidates ``blog.post`` and ``blog.post:*``.
A page keeps at most ``orm_tags_max_rows`` (100) row tags; past it, the models with the
most rows are tagged as queried (``blog.post``) instead, which every save of them
revalidates.

Reads made by a ``cached()`` function inside the view tag that data entry (as a whole
model: ``blog.post`` and ``blog.post:*``), so every page reading it inherits them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any

from pyisr.cache.tags import MAX_TAG_LENGTH
from pyisr.context import RenderContext, current_render

#: The tag of "read this model in any way" is its label with this suffix (``blog.post:*``).
ANY_SUFFIX = ":*"


@dataclass(slots=True)
class _Model:
    """What one render read of one model."""

    pks: dict[str, None] = field(default_factory=dict)
    query: bool = False
    #: More rows than a page keeps tags for: tagged as a query instead.
    overflow: bool = False


@dataclass(slots=True)
class Reads:
    """The database reads of one render of an ``@isr`` view."""

    ctx: RenderContext | None
    enabled: bool
    max_rows: int
    models: dict[str, _Model] = field(default_factory=dict)

    def _model(self, label: str) -> _Model:
        found = self.models.get(label)
        if found is None:
            found = self.models[label] = _Model()
        return found

    def row(self, label: str, pk: object) -> None:
        """An instance of ``label`` with primary key ``pk`` was made."""
        model = self._model(label)
        if model.overflow:
            return
        text = str(pk)
        if len(label) + 1 + len(text) > MAX_TAG_LENGTH:
            model.overflow = True
            return
        model.pks[text] = None
        if len(model.pks) > self.max_rows:
            model.overflow = True
            model.pks.clear()

    def query(self, label: str) -> None:
        self._model(label).query = True

    def touched(self, label: str) -> None:
        self._model(label)

    def tags(self) -> list[str]:
        """The page's tags: every model read, queries, and row tags within the budget."""
        out: list[str] = []
        budget = self.max_rows
        for label, model in sorted(self.models.items(), key=lambda item: len(item[1].pks)):
            out.append(label + ANY_SUFFIX)
            if model.query or model.overflow or len(model.pks) > budget:
                out.append(label)  # as queried: every save of the model revalidates it
            if not model.overflow and len(model.pks) <= budget:
                out.extend(f"{label}:{pk}" for pk in model.pks)
                budget -= len(model.pks)
        return out


_reads: ContextVar[Reads | None] = ContextVar("pyisr_django_reads", default=None)


def start(enabled: bool, max_rows: int) -> tuple[Reads, Token[Reads | None]]:
    """Collect the reads of the render running now (call in the render's context)."""
    reads = Reads(current_render(), enabled, max_rows)
    return reads, _reads.set(reads)


def finish(reads: Reads, token: Token[Reads | None]) -> None:
    """Stop collecting and give the render its tags."""
    _reads.reset(token)
    if reads.enabled and reads.ctx is not None and reads.models:
        # ``record`` with no revalidate of its own: tags only, the lifetime is untouched.
        reads.ctx.record(reads.tags(), None)


def _target() -> tuple[Reads | None, RenderContext | None]:
    """Where a read goes: this render's collector, or (another render's) context directly."""
    ctx = current_render()
    if ctx is None:
        return None, None
    reads = _reads.get()
    if reads is not None and reads.ctx is ctx:
        return (reads, None) if reads.enabled else (None, None)
    if reads is not None and not reads.enabled:
        return None, None
    return None, ctx  # a data compute inside the view, or a render pyisr's site started


# -- the instances made ---------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def label_of(model: type) -> str:
    """``app_label.model_name`` of the table ``model`` lives in (a proxy's is its concrete model's)."""
    return str(model._meta.concrete_model._meta.label_lower)  # type: ignore[attr-defined]


def on_post_init(sender: type, instance: Any, **_: Any) -> None:
    """``post_init``: a row of ``sender`` read during a render tags its page."""
    reads, ctx = _target()
    if reads is not None:
        pk = instance.pk
        if pk is not None:
            reads.row(label_of(sender), pk)
    elif ctx is not None:
        label = label_of(sender)
        ctx.record((label, label + ANY_SUFFIX), None)


# -- the queries run ----------------------------------------------------------------------

#: The identifier after ``FROM`` or ``JOIN`` (quoted or not; a subquery's ``(SELECT`` is no table).
_IDENTIFIER = re.compile(r"\s+[\"`\[]?([A-Za-z_][\w$]*)")
_PK_TAIL = re.compile(
    r"\(?[\"`]?(\w+)[\"`]?\.[\"`]?(\w+)[\"`]?\s*=\s*%s\)?"
    r"(?:\s+LIMIT\s+\d+|\s+FETCH\s+FIRST\s+\d+\s+ROWS\s+ONLY)?\s*",
    re.IGNORECASE,
)


def table_names(sql: str) -> list[str]:
    """The tables a statement names after ``FROM`` and ``JOIN``, in order.

    A scan with ``str.find`` rather than one regular expression over the whole
    statement: this runs for every query of a render, and costs a few microseconds.
    """
    upper = sql.upper()
    found: list[tuple[int, str]] = []
    for word in ("FROM", "JOIN"):
        at = upper.find(word)
        while at != -1:
            if at == 0 or not (upper[at - 1].isalnum() or upper[at - 1] in '_"`'):
                name = _IDENTIFIER.match(sql, at + 4)
                if name is not None:
                    found.append((at, name.group(1)))
            at = upper.find(word, at + 4)
    found.sort()
    return [name for _, name in found]


@dataclass(frozen=True, slots=True)
class _Table:
    label: str
    pk_column: str
    to_python: Callable[[Any], Any]


@functools.lru_cache(maxsize=4)
def tables(ignored: frozenset[str]) -> dict[str, _Table]:
    """Table name (lower-case) -> its model, for every model not ignored."""
    from django.apps import apps

    found: dict[str, _Table] = {}
    for model in apps.get_models(include_auto_created=True):
        meta = model._meta
        if meta.label_lower in ignored or meta.proxy:
            continue  # a proxy's table is its concrete model's
        pk = meta.pk
        found[meta.db_table.lower()] = _Table(meta.label_lower, pk.column.lower(), pk.to_python)
    return found


def _pk_table(sql: str, main: str, known: dict[str, _Table]) -> _Table | None:
    """The table of a ``SELECT ... FROM <main> ... WHERE <main>.<pk> = %s``, or ``None``:
    anything else (more conditions, a subquery, grouping) is a query over its tables."""
    if sql.count("%s") != 1 or sql.count("SELECT") != 1 or sql.count(" WHERE ") != 1:
        return None
    match = _PK_TAIL.fullmatch(sql.partition(" WHERE ")[2])
    if match is None or main.lower() != match.group(1).lower():
        return None
    table = known.get(main.lower())
    if table is None or match.group(2).lower() != table.pk_column:
        return None
    return table


@functools.lru_cache(maxsize=2048)
def classify(sql: str, ignored: frozenset[str]) -> tuple[tuple[str, ...], _Table | None]:
    """The models a statement reads, and its table when it looks one row up by primary key.

    Memoised by statement: Django sends the same SQL (values apart) again and again, so
    a query costs a dictionary lookup once it has been seen.
    """
    head = sql.lstrip()[:6].upper()
    if head != "SELECT" and not head.startswith("WITH"):
        return (), None
    known = tables(ignored)
    names = table_names(sql)
    labels = tuple(dict.fromkeys(t.label for name in names if (t := known.get(name.lower())) is not None))
    if not labels:
        return (), None
    return labels, _pk_table(sql, names[0], known)


def note_query(sql: str, params: Any, reads: Reads | None, ctx: RenderContext | None) -> None:
    """Tag the render with the models a ``SELECT`` read."""
    from pyisr.integrations.django import conf

    labels, pk_table = classify(sql, conf.get().orm_tags_ignore)
    if not labels:
        return
    if ctx is not None:
        ctx.record([tag for label in labels for tag in (label, label + ANY_SUFFIX)], None)
        return
    assert reads is not None
    pk = _pk_value(pk_table, params) if pk_table is not None else None
    if pk_table is None or pk is None:
        for label in labels:
            reads.query(label)
        return
    reads.row(pk_table.label, pk)
    for label in labels:  # the rows select_related() joins are tagged by their instances
        reads.touched(label)


def _pk_value(table: _Table, params: Any) -> object:
    """The primary key a lookup asked for, as the model's field reads it (``None``: unknown)."""
    value = params[0] if isinstance(params, list | tuple) and params else None
    if value is None:
        return None
    try:
        return table.to_python(value)
    except Exception:  # noqa: BLE001 - a value the field cannot read: treat it as a query
        return None


def sql_hook(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
    """The execute wrapper every connection carries: reads during a render tag its page."""
    if not many and current_render() is not None:
        reads, ctx = _target()
        if reads is not None or ctx is not None:
            try:
                note_query(sql, params, reads, ctx)
            except Exception:  # noqa: BLE001 - tagging must never break a query
                pass
    return execute(sql, params, many, context)


def install(connection: Any, **_: Any) -> None:
    """Put :func:`sql_hook` on a connection (``connection_created``; idempotent).

    First in the list: Django's ``execute_wrapper()`` context manager removes the last
    wrapper when it exits, which must stay the one it added.
    """
    wrappers = connection.execute_wrappers
    if sql_hook not in wrappers:
        wrappers.insert(0, sql_hook)


def connect(models: Iterable[type]) -> None:
    """Watch reads of ``models`` (the ones not ignored) on every connection."""
    from django.db import connections
    from django.db.backends.signals import connection_created
    from django.db.models.signals import post_init

    for model in models:
        post_init.connect(on_post_init, sender=model, weak=False, dispatch_uid=f"pyisr-{label_of(model)}")
    connection_created.connect(install, weak=False, dispatch_uid="pyisr-sql")
    for connection in connections.all(initialized_only=True):
        install(connection)
