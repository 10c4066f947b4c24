"""System checks (``manage.py check``): what is wrong with ``PYISR``, with ids.

==============  ===============================================================
``pyisr.E001``  ``PYISR`` is not a dict
``pyisr.E002``  an unknown key (a typo: the check names the key it resembles)
``pyisr.E003``  a cache URL of an unknown scheme, or not a string
``pyisr.E004``  a relative cache location and no ``BASE_DIR`` to anchor it
``pyisr.E005``  a bad ``revalidate`` / ``expire``
``pyisr.E006``  ``draft_mode`` on without a secret
``pyisr.E007``  a bad number, size or host list
``pyisr.E008``  a bad ``site_url``
``pyisr.E009``  a ``bypass`` that cannot be imported or called
``pyisr.E010``  ``orm_tags_ignore`` is not a list of labels
``pyisr.E011``  a bad ``cdn`` URL, or a CDN whose token is not in the environment
``pyisr.E012``  a bad ``build_id``, or one named twice (also in the cache URL)
``pyisr.W001``  ``memory://``: each process has a cache of its own
``pyisr.W002``  ``orm_tags_ignore`` names a model that does not exist
``pyisr.W003``  (``--deploy``) no ``site_url``: renders see a host from ALLOWED_HOSTS
==============  ===============================================================
"""

from __future__ import annotations

from typing import Any

from django.core import checks

from pyisr.integrations.django import conf


def check_settings(app_configs: Any = None, **_: Any) -> list[checks.CheckMessage]:
    """Every problem :mod:`~pyisr.integrations.django.conf` found, plus unknown model labels."""
    from django.apps import apps

    settings = conf.get()
    found: list[checks.CheckMessage] = [
        (checks.Error if ".E" in p.id else checks.Warning)(p.msg, hint=p.hint, id=p.id)
        for p in settings.problems
    ]
    labels = {m._meta.label_lower for m in apps.get_models(include_auto_created=True)}
    for label in sorted(settings.orm_tags_ignore - labels - set(conf.DEFAULT_ORM_TAGS_IGNORE)):
        found.append(
            checks.Warning(
                f"PYISR['orm_tags_ignore'] names {label!r}, which is no installed model.",
                hint="Use 'app_label.model_name', e.g. 'blog.post'.",
                id="pyisr.W002",
            )
        )
    return found


def check_deploy(app_configs: Any = None, **_: Any) -> list[checks.CheckMessage]:
    """``manage.py check --deploy``: what a production site should set."""
    if conf.get().site_url is not None:
        return []
    return [
        checks.Warning(
            "PYISR['site_url'] is not set: pages rendered for the cache see the first concrete "
            "ALLOWED_HOSTS entry (or the visitor's Host when ALLOWED_HOSTS lists it) as their host.",
            hint="Set PYISR['site_url'] = 'https://www.example.com' so absolute URLs in cached pages "
            "are always the canonical ones.",
            id="pyisr.W003",
        )
    ]


def register() -> None:
    checks.register(check_settings, "pyisr")
    checks.register(check_deploy, "pyisr", deploy=True)
