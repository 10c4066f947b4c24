"""Pages follow the database: a change revalidates the ORM tags of what it changed.

``post_save`` and ``post_delete`` of post 5 revalidate ``blog.post:5`` and ``blog.post``
(:mod:`~pyisr.integrations.django.orm_reads` says which pages carry them);
``m2m_changed`` revalidates the link table's tag and the rows on both sides.
What sends no signal (``QuerySet.update()``, ``bulk_create``, raw SQL) is covered by
:func:`revalidate_model`.

Always after the transaction commits (``transaction.on_commit``): revalidating before
would let a request that arrives in between render the old rows and store them as a
fresh page. After commit, a render that started before the commit made its entry before
the invalidation, and the engine's fencing rule (an entry made before an invalidation of
one of its tags is invalid) keeps that page from being served: the race is gone.

The automatic path never raises: a cache that is down must not make a save fail (the
admin would answer 500 after the row was committed). It logs instead. Several changes in
one transaction are revalidated in one write at its commit, recorded as done by the
signals that asked (``Django post_save blog.Post``), for ``pyisr cache explain``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

from pyisr.integrations.django.orm_reads import ANY_SUFFIX, label_of
from pyisr.provenance import current_source
from pyisr.runtime import get_engine, run_sync

logger = logging.getLogger("pyisr.django")

_M2M_ACTIONS = frozenset({"post_add", "post_remove", "post_clear"})
#: Causes named in one commit's record (``Django post_save blog.Post, ...``); the rest counted.
_MAX_CAUSES = 3


def model_tags(model: Any, pk: object = None) -> list[str]:
    """The tags a change of ``model`` (a class, an instance or ``"app.model"``) revalidates.

    With ``pk``: that row's and its model's queries' (``blog.post:5``, ``blog.post``),
    for it and the models it inherits from (multi-table inheritance shares the row).
    Without (any row may have changed): the queries' and every read's (``blog.post``,
    ``blog.post:*``).
    """
    labels = _labels(model)
    if pk is None:
        return [tag for label in labels for tag in (label, label + ANY_SUFFIX)]
    return [tag for label in labels for tag in (f"{label}:{pk}", label)]


def _labels(model: Any) -> list[str]:
    if isinstance(model, str):
        from django.apps import apps

        model = apps.get_model(model)
    cls: Any = model if isinstance(model, type) else type(model)
    meta = cls._meta
    return [label_of(cls)] + [label_of(parent) for parent in meta.get_parent_list()]


def revalidate_model(model: Any, pk: object = None, *, using: str | None = None) -> None:
    """Revalidate the pages that read ``model`` (or its row ``pk``), after the transaction commits.

    For changes Django sends no signal for: ``QuerySet.update()``, ``bulk_create()``,
    raw SQL, another program writing the database. ``model`` is a class, an instance (its
    pk is used when ``pk`` is not given) or a label (``"blog.post"``). Outside a
    transaction it runs now and raises if the cache refuses; inside one it runs at the
    commit and logs a failure instead (the data is committed by then).
    """
    from django.db import transaction

    if pk is None and not isinstance(model, type | str):
        pk = model.pk
    tags = model_tags(model, pk)
    by = current_source()
    if transaction.get_connection(using).in_atomic_block:
        after_commit(tags, using, by=by)
    else:
        _revalidate(tags, by)


async def arevalidate_model(model: Any, pk: object = None) -> None:
    """Async form of :func:`revalidate_model`, always immediate (no transaction to wait for)."""
    if pk is None and not isinstance(model, type | str):
        pk = model.pk
    from asgiref.sync import sync_to_async

    tags = await sync_to_async(model_tags)(model, pk)
    by = current_source()
    for engine in _engines():
        await engine.revalidate_tags(tags, by=by)


# -- one write per transaction, after its commit ----------------------------------------------

_pending = threading.local()


def after_commit(tags: Iterable[str], using: str | None, *, by: str | None = None) -> None:
    """Revalidate ``tags`` once the transaction of ``using`` commits (now, outside one).

    ``by`` names the cause for the store's record (else the calling code).
    """
    from django.db import DEFAULT_DB_ALIAS, transaction

    alias = using or DEFAULT_DB_ALIAS
    waiting: dict[str, dict[str, None]] = getattr(_pending, "tags", None) or {}
    _pending.tags = waiting
    waiting.setdefault(alias, {}).update(dict.fromkeys(tags))
    causes: dict[str, dict[str, None]] = getattr(_pending, "causes", None) or {}
    _pending.causes = causes
    causes.setdefault(alias, {})[by or current_source()] = None
    # One callback per change: a callback of a rolled-back savepoint is dropped, so every
    # change keeps its own; the first to run takes the tags of all, the rest find none.
    transaction.on_commit(lambda: _flush(alias), using=alias)


def _flush(alias: str) -> None:
    waiting: dict[str, dict[str, None]] = getattr(_pending, "tags", None) or {}
    tags = waiting.pop(alias, None)
    causes = list((getattr(_pending, "causes", None) or {}).pop(alias, None) or ())
    if not tags:
        return
    by = ", ".join(causes[:_MAX_CAUSES]) or "Django commit"
    if len(causes) > _MAX_CAUSES:
        by += f" and {len(causes) - _MAX_CAUSES} more"
    try:
        _revalidate(list(tags), by)
    except Exception:
        logger.exception("pyisr: revalidating %s after a commit failed; those pages stay cached", list(tags))


def _revalidate(tags: list[str], by: str) -> None:
    for engine in _engines():
        run_sync(engine.revalidate_tags(tags, by=by))


#: Engines of @isr views given their own (``@isr(engine=...)``): they are revalidated too.
_view_engines: dict[int, Any] = {}


def remember_engine(engine: Any) -> None:
    _view_engines[id(engine)] = engine


def _engines() -> list[Any]:
    default = get_engine()
    return [default, *(e for e in _view_engines.values() if e is not default)]


# -- the signals -------------------------------------------------------------------------------


def _signal_label(signal: Any, sender: type) -> str:
    """``Django post_save blog.Post``: the signal and the model, as the record shows them."""
    from django.db.models import signals

    names = {id(signals.post_save): "post_save", id(signals.post_delete): "post_delete"}
    names[id(signals.m2m_changed)] = "m2m_changed"
    return f"Django {names.get(id(signal), 'signal')} {sender._meta.label}"  # type: ignore[attr-defined]


def on_change(sender: type, instance: Any, using: str | None = None, signal: Any = None, **_: Any) -> None:
    """``post_save`` and ``post_delete``: the row's pages and its model's queries."""
    if instance.pk is not None:
        after_commit(model_tags(sender, instance.pk), using, by=_signal_label(signal, sender))


def on_m2m(
    sender: type,
    instance: Any,
    action: str,
    model: type,
    pk_set: set[Any] | None,
    using: str | None = None,
    reverse: bool = False,
    signal: Any = None,
    **_: Any,
) -> None:
    """``m2m_changed``: the link table's queries and the rows on both sides."""
    if action not in _M2M_ACTIONS:
        return
    tags = [label_of(sender)]
    if instance.pk is not None:
        tags += model_tags(type(instance), instance.pk)
    if pk_set is None or len(pk_set) > 100:
        tags += [label_of(model)]
    else:
        tags += [tag for pk in pk_set for tag in model_tags(model, pk)]
    after_commit(tags, using, by=_signal_label(signal, sender))


def connect(models: Iterable[type]) -> None:
    """Revalidate on changes of ``models`` (the ones not ignored)."""
    from django.db.models.signals import m2m_changed, post_delete, post_save

    for model in models:
        uid = f"pyisr-{model._meta.label_lower}"  # type: ignore[attr-defined]
        post_save.connect(on_change, sender=model, weak=False, dispatch_uid=uid)
        post_delete.connect(on_change, sender=model, weak=False, dispatch_uid=uid)
        # Any model can be a many-to-many's link table (auto-created, or through=).
        m2m_changed.connect(on_m2m, sender=model, weak=False, dispatch_uid=uid)
