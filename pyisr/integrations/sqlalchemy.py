"""Automatic tags from SQLAlchemy: a page learns what it read, a commit revalidates what it changed.

::

    from sqlalchemy.orm import sessionmaker
    from pyisr.integrations.sqlalchemy import track

    SessionLocal = sessionmaker(engine)
    track(SessionLocal)          # or an async_sessionmaker, a scoped_session, a Session class

Why: with ``@isr`` a page stays until its window ends or someone revalidates its tags.
Writing those ``revalidate_tag`` calls by hand after every edit is what gets forgotten;
the ORM already knows which rows a page read and which rows a commit changed.

**Reads.** While pyisr renders a page (``pyisr.context.current_render()`` is set), each
query a tracked session runs tags the page with what its result depends on:

- a lookup by primary key (``session.get(Post, 5)``, ``select(Post).where(Post.id == 5)``,
  a many-to-one lazy load, the reload of an expired object) depends on that one row:
  ``posts:5``, and ``posts:*`` (the mark of "looked up rows of ``posts`` by key"). A
  lookup that finds nothing (the view answers 404) is tagged alike, so creating the row
  refreshes the 404;
- any other read (lists, counts, filters, joins, collections, eager loads) depends on the
  table's rows in general: ``posts``; each row it loads adds ``posts:<pk>`` too, until the
  page carries ``max_row_tags`` tags (100 by default). Past that, reads tag their tables
  only: fewer tags, the same invalidations.

Raw SQL (``text()``) names no table pyisr can read: give such views ``tags=`` yourself.

**Writes.** Rows a tracked session inserts, updates or deletes revalidate ``<table>`` and
``<table>:<pk>``; ORM bulk statements (``session.execute(update(Post).where(...))``) and
:func:`revalidate_table` without a key revalidate ``<table>`` and ``<table>:*``. Nothing
is sent before the transaction commits, and a rollback sends nothing. The tags go to the
engine's store (the file-system tag log or Redis), so every worker and instance sharing
it sees them, as with any ``revalidate_tag``.

**The race.** A page rendered while a change is being committed may read the old rows.
The tags are revalidated after the commit, at a time later than the start of any such
render, and an entry is invalidated by a tag revalidated after its render started: that
page is replaced at its next request. A render that starts after the revalidation reads
the committed rows.

Per view, :func:`untracked` turns reads off (``with untracked():`` or ``@untracked``).
Sessions must be made per request (FastAPI dependencies, Flask-SQLAlchemy and Django do
this): an object already in a session's identity map is returned without a query, and so
without a tag. Needs the ``sqlalchemy`` extra: ``pip install 'pyisr[sqlalchemy]'``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

try:
    import sqlalchemy as sa
    from sqlalchemy import event
    from sqlalchemy.orm import Mapper, Session, scoped_session, sessionmaker
    from sqlalchemy.orm.attributes import instance_state
    from sqlalchemy.sql import operators, visitors
    from sqlalchemy.sql.expression import (
        Alias,
        BinaryExpression,
        BindParameter,
        BooleanClauseList,
        SelectBase,
    )
    from sqlalchemy.util import concurrency
except ImportError as exc:  # pragma: no cover - exercised only without SQLAlchemy
    raise ImportError(
        "pyisr.integrations.sqlalchemy needs SQLAlchemy 2: pip install 'pyisr[sqlalchemy]'"
    ) from exc

from pyisr.cache.tags import IMPLICIT_PREFIX, MAX_TAG_LENGTH
from pyisr.context import RenderContext, current_render
from pyisr.engine import Engine
from pyisr.provenance import current_source
from pyisr.runtime import get_engine, run_sync

logger = logging.getLogger("pyisr.sqlalchemy")

F = TypeVar("F", bound=Callable[..., Any])

#: How many tags a page may collect from rows before its reads tag only their tables.
DEFAULT_MAX_ROW_TAGS = 100
#: The suffix of the tag every lookup by key carries: ``posts:*``.
ANY_ROW = "*"

#: ``session.info`` keys: the tracker of a session, and the tags waiting for its commit.
_TRACKER = "pyisr.tracker"
_PENDING = "pyisr.pending_tags"

#: Set by :func:`untracked`: reads tag nothing.
_off: ContextVar[bool] = ContextVar("pyisr_sqlalchemy_off", default=False)


# -- what a statement reads ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reads:
    """What the result of one statement depends on.

    ``tables``: tables read in general (their rows as a set). ``lookups``: tables read by
    an equality on every primary-key column, with those columns' bound parameters.
    """

    tables: tuple[str, ...]
    lookups: tuple[tuple[str, tuple[BindParameter[Any], ...]], ...]


def statement_reads(statement: Any) -> Reads:
    """Which tables ``statement`` reads, and which of them only by primary key.

    A table is a lookup when the top-level ``AND`` of the WHERE clause pins every one of
    its primary-key columns to a bound value, the table is not also read under an alias,
    and the statement holds no nested SELECT (which could read it again). Anything else
    is read in general. Conservative on purpose: a general read costs a few extra
    re-renders, a lookup taken for one would be a stale page.
    """
    found: dict[str, sa.Table] = {}
    aliased: set[str] = set()
    nested = False
    for element in visitors.iterate(statement):
        if isinstance(element, sa.Table):
            found.setdefault(element.fullname, element)
        elif isinstance(element, Alias):
            inner = element.element
            if isinstance(inner, sa.Table):
                aliased.add(inner.fullname)
        elif isinstance(element, SelectBase) and element is not statement:
            nested = True
    lookups = () if nested else _pk_lookups(statement, found, aliased)
    pinned = {name for name, _ in lookups}
    return Reads(tuple(n for n in found if n not in pinned), lookups)


def _pk_lookups(
    statement: Any, found: Mapping[str, sa.Table], aliased: set[str]
) -> tuple[tuple[str, tuple[BindParameter[Any], ...]], ...]:
    where = getattr(statement, "whereclause", None)
    if where is None:
        return ()
    terms = (
        where.clauses
        if isinstance(where, BooleanClauseList) and where.operator is operators.and_
        else [where]
    )
    pinned: dict[str, dict[str, BindParameter[Any]]] = {}
    for term in terms:
        if not isinstance(term, BinaryExpression) or term.operator is not operators.eq:
            continue
        for column, value in ((term.left, term.right), (term.right, term.left)):
            table = getattr(column, "table", None)
            if (
                isinstance(value, BindParameter)
                and isinstance(column, sa.Column)
                and column.primary_key
                and isinstance(table, sa.Table)
            ):
                pinned.setdefault(table.fullname, {})[column.name] = value
    out = []
    for name, columns in pinned.items():
        table = found.get(name)
        if table is None or name in aliased:
            continue
        keys = [c.name for c in table.primary_key.columns]
        if keys and all(k in columns for k in keys):
            out.append((name, tuple(columns[k] for k in keys)))
    return tuple(out)


#: Reads by query shape: a statement's cache key (what SQLAlchemy computes anyway to find
#: its compiled form) leaves out the bound values, so each shape is walked once and a
#: lookup's values are found by their position among the statement's parameters.
_reads_by_shape: dict[Any, tuple[tuple[str, ...], tuple[tuple[str, tuple[int, ...]], ...]] | None] = {}
_MEMO_SIZE = 2048


def _reads_of(statement: Any) -> Reads:
    """:func:`statement_reads`, memoised by the statement's shape when it has one."""
    try:
        cache_key = statement._generate_cache_key()
    except Exception:  # noqa: BLE001 - an uncacheable statement: walk it every time
        cache_key = None
    if cache_key is None:
        return statement_reads(statement)
    shape = cache_key.key
    if shape in _reads_by_shape:
        known = _reads_by_shape[shape]
        if known is None:
            return statement_reads(statement)
        tables, positions = known
        binds = cache_key.bindparams
        return Reads(tables, tuple((t, tuple(binds[i] for i in idx)) for t, idx in positions))
    reads = statement_reads(statement)
    ids = {id(b): i for i, b in enumerate(cache_key.bindparams)}
    try:
        positions = tuple((t, tuple(ids[id(b)] for b in bs)) for t, bs in reads.lookups)
    except KeyError:
        entry = None  # a lookup's value is not among the parameters: never memoised
    else:
        entry = (reads.tables, positions)
    if len(_reads_by_shape) >= _MEMO_SIZE:
        _reads_by_shape.clear()
    _reads_by_shape[shape] = entry
    return reads


#: Reads of compiled ORM statements (eager joins included), by compile state: SQLAlchemy
#: caches compile states per query shape, so each shape is walked once.
_compiled_reads: dict[int, tuple[Any, Reads]] = {}


def _reads_of_compiled(compile_state: Any) -> Reads:
    known = _compiled_reads.get(id(compile_state))
    if known is not None and known[0] is compile_state:
        return known[1]
    reads = statement_reads(compile_state.statement)
    if len(_compiled_reads) >= _MEMO_SIZE:
        _compiled_reads.clear()
    _compiled_reads[id(compile_state)] = (compile_state, reads)
    return reads


# -- tag names ----------------------------------------------------------------------------------


def row_tag(table: str, key: Iterable[Any]) -> str | None:
    """``posts:5`` (composite keys joined by ``,`` in the table's key order); ``None``
    when it would be no valid tag (too long), so the caller falls back to the table's."""
    tag = f"{table}:{','.join(str(v) for v in key)}"
    return tag if len(tag) <= MAX_TAG_LENGTH else None


def _table_names(target: Any) -> tuple[str, ...]:
    """The table names of a name, a ``Table``, a mapped class or a mapper."""
    if isinstance(target, str):
        if not target or target.startswith(IMPLICIT_PREFIX):
            raise ValueError(f"revalidate_table(): {target!r} is no table name")
        return (target,)
    if isinstance(target, sa.Table):
        return (target.fullname,)
    mapper = target if isinstance(target, Mapper) else sa.inspect(target, raiseerr=False)
    if not isinstance(mapper, Mapper):
        raise TypeError(f"revalidate_table(): expected a table name, Table or mapped class, not {target!r}")
    return _mapper_tables(mapper)


@functools.lru_cache(maxsize=1024)
def _mapper_tables(mapper: Mapper[Any]) -> tuple[str, ...]:
    return tuple(t.fullname for t in mapper.tables if isinstance(t, sa.Table))


def tags_for(table: Any, pk: Any = None) -> list[str]:
    """What a change to ``table`` revalidates: ``[posts, posts:5]`` for one row, ``[posts,
    posts:*]`` when the rows are unknown (``pk=None``). ``pk`` may be a tuple (composite)."""
    tags: list[str] = []
    for name in _table_names(table):
        tags.append(name)
        if pk is None:
            tags.append(f"{name}:{ANY_ROW}")
        else:
            tag = row_tag(name, pk if isinstance(pk, tuple | list) else (pk,))
            tags.append(tag if tag is not None else f"{name}:{ANY_ROW}")
    return tags


# -- reads: tagging the page being rendered ---------------------------------------------------


def _render_to_tag() -> RenderContext | None:
    ctx = current_render()
    if ctx is None or _off.get():
        return None
    return ctx


def _tag_lookup(ctx: RenderContext, table: str, key: Iterable[Any] | None, limit: int) -> None:
    """A row read by key: its row tag and the table's lookup mark, or the table past the limit."""
    tag = row_tag(table, key) if key is not None and len(ctx.tags) < limit else None
    if tag is None:
        ctx.record((table,), None)
    else:
        ctx.record((tag, f"{table}:{ANY_ROW}"), None)


def _bound_value(bind: BindParameter[Any], params: Any) -> Any:
    if isinstance(params, Mapping) and bind.key in params:
        return params[bind.key]
    return bind.effective_value


def _tag_statement(ctx: RenderContext, statement: Any, params: Any, limit: int) -> None:
    """Tag the page with what a SELECT about to run reads (whatever rows it returns)."""
    reads = _reads_of(statement)
    if reads.tables:
        ctx.record(reads.tables, None)
    for table, binds in reads.lookups:
        values = [_bound_value(b, params) for b in binds]
        _tag_lookup(ctx, table, None if any(v is None for v in values) else values, limit)


def _on_instance(target: Any, context: Any, *_: Any) -> None:
    """``load`` / ``refresh``: tag the page with the row (and the tables of eager joins,
    which the statement did not name before it was compiled)."""
    ctx = _render_to_tag()
    if ctx is None:
        return
    session = getattr(context, "session", None)
    tracker = session.info.get(_TRACKER) if session is not None else None
    if tracker is None:
        return
    state = instance_state(target)
    key = state.identity
    compile_state = getattr(context, "compile_state", None)
    reads = _reads_of_compiled(compile_state) if compile_state is not None else None
    tags = ctx.tags
    add: list[str] = [t for t in reads.tables if t not in tags] if reads is not None else []
    limit = tracker.max_row_tags
    for table in _mapper_tables(state.mapper):
        if reads is not None and any(name == table for name, _ in reads.lookups):
            _tag_lookup(ctx, table, key, limit)
            continue
        if reads is None:
            add.append(table)  # no statement to read: the safe side
        if key is not None and len(tags) < limit:
            tag = row_tag(table, key)
            if tag is not None and tag not in tags:
                add.append(tag)
    if add:
        ctx.record(add, None)


_instance_events_on = False


def _listen_to_instances() -> None:
    """Instance events are per mapper: listen once, for all of them (cheap when no render runs)."""
    global _instance_events_on
    if not _instance_events_on:
        event.listen(Mapper, "load", _on_instance)
        event.listen(Mapper, "refresh", _on_instance)
        _instance_events_on = True


# -- writes: revalidating after commit ----------------------------------------------------------


def _changed_rows(session: Session) -> list[str]:
    """The tags of every row the flush about to finish inserted, updated or deleted."""
    tags: dict[str, None] = {}
    dirty = [o for o in session.dirty if session.is_modified(o)]
    for obj, whole in (
        [(o, True) for o in session.new] + [(o, False) for o in dirty] + [(o, True) for o in session.deleted]
    ):
        state = instance_state(obj)
        mapper = state.mapper
        key = state.identity if state.identity is not None else mapper.primary_key_from_instance(obj)
        known = key is not None and all(v is not None for v in key)
        for tag in tags_for(mapper, tuple(key) if known else None):
            tags[tag] = None
        for relationship in mapper.relationships:
            # Many-to-many rows live in a table no object stands for.
            secondary = relationship.secondary
            if isinstance(secondary, sa.Table) and (
                whole or state.attrs[relationship.key].history.has_changes()
            ):
                tags[secondary.fullname] = None
                tags[f"{secondary.fullname}:{ANY_ROW}"] = None
    return list(tags)


def _queue(session: Session, tags: Iterable[str]) -> None:
    pending = session.info.setdefault(_PENDING, {})
    for tag in tags:
        pending[tag] = None


class _Tracker:
    """The listeners of one :func:`track` call and what it was given."""

    def __init__(self, engine: Engine | None, max_row_tags: int, bind: Any = None) -> None:
        self.engine = engine
        self.max_row_tags = max_row_tags
        self.bind = bind

    def _owns(self, session: Session) -> bool:
        if self.bind is None:
            return True
        return session.bind is self.bind

    def on_execute(self, state: Any) -> None:
        session = state.session
        if not self._owns(session):
            return
        session.info[_TRACKER] = self  # load/refresh events find the tracker here
        if state.is_select:
            ctx = _render_to_tag()
            if ctx is not None:
                _tag_statement(ctx, state.statement, state.parameters, self.max_row_tags)
        elif state.is_update or state.is_delete or state.is_insert:
            # ORM bulk statements: the rows are unknown unless the WHERE names one by key.
            reads = _reads_of(state.statement)
            tags = [t for name in reads.tables for t in tags_for(name)]
            for table, binds in reads.lookups:
                values = [_bound_value(b, state.parameters) for b in binds]
                tags += tags_for(table, None if any(v is None for v in values) else tuple(values))
            _queue(session, tags)

    def after_flush(self, session: Session, flush_context: Any) -> None:
        if self._owns(session):
            _queue(session, _changed_rows(session))

    def after_commit(self, session: Session) -> None:
        if session.in_nested_transaction():
            return  # a savepoint released: the outer transaction may still roll back
        pending = session.info.pop(_PENDING, None)
        if pending:
            self.send(list(pending))

    def after_transaction_end(self, session: Session, transaction: Any) -> None:
        if transaction.parent is None:
            session.info.pop(_PENDING, None)  # after a commit already sent; after a rollback, void

    def send(self, tags: list[str]) -> None:
        """Revalidate ``tags`` now, from whatever kind of code committed.

        Inside an ``AsyncSession`` (a greenlet on the app's event loop) the write is awaited
        on that loop; elsewhere it runs on pyisr's sync bridge. A store that fails is
        logged, not raised: the data is committed already, and the caller cannot undo it.
        """
        engine = self.engine if self.engine is not None else get_engine()
        by = commit_label(tags)
        try:
            if _in_greenlet():
                _await(engine.revalidate_tags(tags, by=by))
            else:
                run_sync(engine.revalidate_tags(tags, by=by))
        except Exception:
            logger.exception("pyisr could not revalidate %s after a commit: those pages stay stale", tags)


def _in_greenlet() -> bool:
    check = getattr(concurrency, "in_greenlet", None)
    return bool(check()) if check is not None else False


def _await(coro: Any) -> Any:
    waiter = getattr(concurrency, "await_", None) or getattr(concurrency, "await_only")  # noqa: B009 - SQLAlchemy 2.0
    return waiter(coro)


_SESSION_EVENTS = ("do_orm_execute", "after_flush", "after_commit", "after_transaction_end")
_trackers: dict[tuple[int, int], tuple[Any, _Tracker]] = {}


def track(
    target: Any = None, *, engine: Engine | None = None, max_row_tags: int = DEFAULT_MAX_ROW_TAGS
) -> Any:
    """Turn automatic tags on for the sessions ``target`` makes, and return ``target``.

    ``target``: a ``sessionmaker`` or ``async_sessionmaker``, a ``scoped_session`` or
    ``async_scoped_session`` (its factory), a ``Session``/``AsyncSession`` subclass or
    instance, an ``Engine``/``AsyncEngine`` (every session bound to it), or nothing (every
    session of the process). ``engine``: the pyisr engine revalidated (the process default
    by default). ``max_row_tags``: how many tags a page may collect from rows (see the
    module's docs). Calling it again for the same target does nothing.
    """
    if max_row_tags < 0:
        raise ValueError(f"track(): max_row_tags must be >= 0, not {max_row_tags!r}")
    listen_on, bind = _event_target(target)
    key = (id(listen_on), id(bind))
    known = _trackers.get(key)
    if known is not None and known[0] is listen_on and known[1].bind is bind:
        return target
    tracker = _Tracker(engine, max_row_tags, bind)
    for name in _SESSION_EVENTS:
        event.listen(listen_on, name, getattr(tracker, "on_execute" if name == "do_orm_execute" else name))
    _trackers[key] = (listen_on, tracker)
    _listen_to_instances()
    return target


def _event_target(target: Any) -> tuple[Any, Any]:
    """Where session events go for ``target``, and the bind to filter on (engines only)."""
    from sqlalchemy.engine import Engine as SAEngine
    from sqlalchemy.ext.asyncio import (
        AsyncEngine,
        AsyncSession,
        async_scoped_session,
        async_sessionmaker,
    )

    if target is None:
        return Session, None
    if isinstance(target, AsyncEngine):
        return Session, target.sync_engine
    if isinstance(target, SAEngine):
        return Session, target
    if isinstance(target, scoped_session | async_scoped_session):
        return _event_target(target.session_factory)
    if isinstance(target, sessionmaker) or isinstance(target, Session):
        return target, None
    if isinstance(target, AsyncSession):
        return target.sync_session, None
    if isinstance(target, async_sessionmaker):
        sync_class = target.kw.get("sync_session_class") or target.class_.sync_session_class
        if sync_class is Session:
            # Listening on Session itself would track every session of the process.
            sync_class = type("TrackedSession", (Session,), {})
            target.configure(sync_session_class=sync_class)
        return sync_class, None
    if isinstance(target, type) and issubclass(target, AsyncSession):
        if target.sync_session_class is Session and target is not AsyncSession:
            target.sync_session_class = type("TrackedSession", (Session,), {})
        return target.sync_session_class, None
    if isinstance(target, type) and issubclass(target, Session):
        return target, None
    raise TypeError(
        f"track(): expected a sessionmaker, scoped_session, Session class or instance, or an engine, "
        f"not {target!r}"
    )


# -- what users call -----------------------------------------------------------------------------


@contextlib.contextmanager
def _untracked_block() -> Iterator[None]:
    token = _off.set(True)
    try:
        yield
    finally:
        _off.reset(token)


def untracked(view: F | None = None) -> Any:
    """Reads tag nothing: ``with untracked(): ...`` inside a view, or ``@untracked`` on it.

    For a page whose tags you set yourself (``tags=[...]``), or one that reads so much
    that any change would refresh it anyway. Writes are still revalidated.
    """
    if view is None:
        return _untracked_block()
    if inspect.iscoroutinefunction(view):

        @functools.wraps(view)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            with _untracked_block():
                return await view(*args, **kwargs)

        return run_async

    @functools.wraps(view)
    def run(*args: Any, **kwargs: Any) -> Any:
        with _untracked_block():
            return view(*args, **kwargs)

    return run


def commit_label(tags: Iterable[str], most: int = 3) -> str:
    """Who the store's record says asked: ``SQLAlchemy commit posts, comments`` (the tables)."""
    tables = [tag for tag in dict.fromkeys(tags) if ":" not in tag]
    named = ", ".join(tables[:most]) + (f" and {len(tables) - most} more" if len(tables) > most else "")
    return f"SQLAlchemy commit {named}".rstrip()


def revalidate_table(table: Any, pk: Any = None, *, session: Session | None = None) -> None:
    """Revalidate the pages that read ``table`` (a name, ``Table`` or mapped class).

    For changes the session cannot see: Core or raw SQL (``connection.execute(text(...))``)
    and bulk statements run outside a tracked session. With ``pk`` the pages of that row
    and the table's lists; without, every page that read the table. With ``session``
    (sync or async) the tags wait for that session's commit (and a rollback drops them);
    without, they are sent now: call it after your transaction commits.
    """
    tags = tags_for(table, pk)
    if session is not None:
        _queue(getattr(session, "sync_session", session), tags)
        return
    # Named here: the bridge's thread, where the write runs, does not know the caller.
    run_sync(get_engine().revalidate_tags(tags, by=current_source()))


async def arevalidate_table(table: Any, pk: Any = None) -> None:
    """The async form of :func:`revalidate_table` (without ``session=``: pass it to the
    sync form, which only queues)."""
    await get_engine().revalidate_tags(tags_for(table, pk), by=current_source())


__all__ = [
    "ANY_ROW",
    "DEFAULT_MAX_ROW_TAGS",
    "Reads",
    "arevalidate_table",
    "revalidate_table",
    "row_tag",
    "statement_reads",
    "tags_for",
    "track",
    "untracked",
]
