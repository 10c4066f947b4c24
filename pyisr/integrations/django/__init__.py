"""pyisr in a Django project: ``@isr`` views whose pages follow the database by themselves.

::

    # settings.py
    INSTALLED_APPS = [..., "pyisr.integrations.django"]
    PYISR = {"revalidate": 3600}          # cache: BASE_DIR / ".pyisr" / "cache"

    # views.py
    from pyisr.integrations.django import isr

    @isr()
    def post(request, pk):
        return render(request, "post.html", {"post": get_object_or_404(Post, pk=pk)})

GET and HEAD are answered from the cache by path, with stale-while-revalidate,
single-flight renders and keep-last-good; other methods call the view as usual. The page
is tagged with what it read (``blog.post:5``...), and saving or deleting post 5 in the
admin revalidates exactly the pages that showed it and the queries it may now match,
after the transaction commits. Logged-in users and draft mode bypass the cache.

The modules, one job each: ``decorator`` (``@isr``), ``cbv`` (``ISRMixin``), ``render``
(one shared render), ``shared_request``, ``responses``, ``page`` (key and tags),
``resolver`` (``revalidate(path)``), ``request_thread``, ``i18n``, ``orm_reads`` and
``invalidation`` (ORM tags), ``draft_mode``, ``conf``, ``checks``, ``apps``, ``testing``,
and the ``manage.py pyisr`` command. Needs the ``django`` extra: ``pip install 'pyisr[django]'``.
"""

from __future__ import annotations

try:
    import django  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without Django
    raise ImportError(
        "pyisr.integrations.django needs Django: pip install 'pyisr[django]' (or 'django>=4.2')"
    ) from exc

from pyisr.integrations.django.cbv import ISRMixin
from pyisr.integrations.django.decorator import isr
from pyisr.integrations.django.draft_mode import disable_draft_mode, enable_draft_mode, is_draft_mode
from pyisr.integrations.django.invalidation import arevalidate_model, model_tags, revalidate_model

__all__ = [
    "ISRMixin",
    "arevalidate_model",
    "disable_draft_mode",
    "enable_draft_mode",
    "is_draft_mode",
    "isr",
    "model_tags",
    "revalidate_model",
]
