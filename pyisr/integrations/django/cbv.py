"""Class-based views: ``ISRMixin``, or ``isr(...)(MyView.as_view())`` in the URLconf.

::

    class PostDetail(ISRMixin, DetailView):
        model = Post
        isr_revalidate = 3600
        isr_tags = ["posts"]

The mixin wraps the function ``as_view()`` returns, so each shared render builds its
own view instance for the request built from nothing, exactly as a function view gets
it. (Decorating ``dispatch`` with ``method_decorator`` cannot work: the render would
run with the visitor's instance, whose ``self.request`` is the visitor's; ``@isr``
refuses it.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

from pyisr.integrations.django.decorator import isr
from pyisr.integrations.django.render import DEFAULT


class ISRMixin:
    """Cache a class-based view with ISR; the ``isr_*`` attributes are ``@isr``'s arguments."""

    isr_revalidate: object = DEFAULT
    isr_expire: int | None = None
    isr_tags: Iterable[str] | None = None
    isr_allow_headers: Iterable[str] = ()
    isr_site_url: str | None = None
    isr_bypass: Callable[[Any], bool] | None = DEFAULT
    isr_orm_tags: bool | None = None

    @classmethod
    def as_view(cls, **initkwargs: Any) -> Callable[..., Any]:
        view = cast(Any, super()).as_view(**initkwargs)
        decorate = isr(
            cls.isr_revalidate,
            expire=cls.isr_expire,
            tags=cls.isr_tags,
            allow_headers=cls.isr_allow_headers,
            site_url=cls.isr_site_url,
            bypass=cls.isr_bypass,
            orm_tags=cls.isr_orm_tags,
        )
        return decorate(view)
