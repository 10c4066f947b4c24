"""The Django app: ``INSTALLED_APPS += ["pyisr.integrations.django"]``.

``ready()`` makes the project's ``PYISR`` settings the engine's (the cache under
``BASE_DIR`` by default), registers the system checks and, unless ``orm_tags`` is off,
connects the ORM hooks: reads during a render tag its page, and saves, deletes and
many-to-many changes revalidate those tags after commit.
"""

from __future__ import annotations

import logging
from typing import Any

from django.apps import AppConfig, apps

logger = logging.getLogger("pyisr.django")


class PyISRConfig(AppConfig):
    name = "pyisr.integrations.django"
    label = "pyisr"
    verbose_name = "pyisr (Incremental Static Regeneration)"

    def ready(self) -> None:
        from pyisr.integrations.django import checks, conf

        checks.register()
        conf.mark_installed()
        settings = conf.get()
        if settings.errors:
            logger.error("pyisr: PYISR is invalid; @isr views refuse to serve until `manage.py check` passes")
        else:
            configure_engine(settings)
        if settings.orm_tags:
            from pyisr.integrations.django import invalidation, orm_reads

            models = watched_models(settings.orm_tags_ignore)
            orm_reads.connect(models)
            invalidation.connect(models)


def configure_engine(settings: Any) -> None:
    """The process's default engine over the project's cache; ``revalidate(path)`` finds
    the URLconf's ``@isr`` views through it before any view module is imported."""
    import pyisr
    from pyisr.config import SERVING_KEYS
    from pyisr.integrations.django.resolver import resolve_page

    serving = {name: value for name in SERVING_KEYS if (value := getattr(settings, name)) is not None}
    engine = pyisr.configure(
        settings.cache,
        memory_tier_bytes=settings.memory_tier,
        render_timeout=settings.render_timeout,
        max_concurrent_renders=settings.render_concurrency,
        debug=settings.debug_cache or None,
        cdn=settings.cdn,
        build_id=settings.build_id,
        **serving,
    )
    engine.add_resolver(resolve_page)


def watched_models(ignored: frozenset[str]) -> list[type]:
    """Every model (link tables and proxies included) whose table is not ignored."""
    from pyisr.integrations.django.orm_reads import label_of

    return [m for m in apps.get_models(include_auto_created=True) if label_of(m) not in ignored]
