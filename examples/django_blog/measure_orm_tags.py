"""What automatic ORM tags cost per row: ``python examples/django_blog/measure_orm_tags.py``.

Loads 10,000 posts, and looks one up by pk 2,000 times (SQLite in a temporary directory),
three ways: with pyisr's hooks disconnected (Django alone), connected but outside a
render (every request that is not an @isr render), and inside a render collecting tags.
Prints microseconds per row and per lookup.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROWS = 10_000
ROUNDS = 15
LOOKUPS = 2_000


def setup(data: Path) -> None:
    import django
    from django.conf import settings

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    settings.configure(
        INSTALLED_APPS=[
            "django.contrib.contenttypes",
            "django.contrib.auth",
            "pyisr.integrations.django",
            "blog",
        ],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(data / "db.sqlite3")}},
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        PYISR={"cache": "memory://"},
        USE_TZ=True,
    )
    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        setup(Path(tmp))
        from blog.models import Post
        from django.db import connection
        from django.db.models.signals import post_init

        from pyisr import context
        from pyisr.integrations.django import orm_reads

        Post.objects.bulk_create(Post(title=f"post {i}") for i in range(ROWS))
        connection.ensure_connection()

        first = Post.objects.order_by("pk").first()
        assert first is not None

        def load() -> float:
            start = time.perf_counter()
            assert len(list(Post.objects.all())) == ROWS
            return time.perf_counter() - start

        def lookups() -> float:
            start = time.perf_counter()
            for _ in range(LOOKUPS):
                Post.objects.get(pk=first.pk)
            return time.perf_counter() - start

        def alone(work: Callable[[], float]) -> float:
            post_init.disconnect(sender=Post, dispatch_uid="pyisr-blog.post")
            connection.execute_wrappers.remove(orm_reads.sql_hook)
            try:
                return work()
            finally:
                orm_reads.connect([Post])

        def in_render(work: Callable[[], float]) -> float:
            token = context.enter(context.RenderContext(key="/measure"))
            reads, reads_token = orm_reads.start(True, 100)
            try:
                return work()
            finally:
                orm_reads.finish(reads, reads_token)
                context.leave(token)

        def outside(work: Callable[[], float]) -> float:
            return work()

        modes = {
            "Django alone (hooks disconnected)": alone,
            "hooks connected, outside a render": outside,
            "inside a render, collecting tags": in_render,
        }
        for work, count, unit in ((load, ROWS, "row of a list"), (lookups, LOOKUPS, "get(pk=...)")):
            best = dict.fromkeys(modes, float("inf"))
            for _ in range(ROUNDS):  # interleaved, best of each: other load on the machine cancels out
                for name, mode in modes.items():
                    best[name] = min(best[name], mode(work))
            base = best["Django alone (hooks disconnected)"]
            print(f"microseconds per {unit} (best of {ROUNDS} interleaved rounds of {count}):")
            for name, seconds in best.items():
                extra = f"  (+{(seconds - base) / count * 1e6:.2f})" if seconds is not base else ""
                print(f"  {name:34} {seconds / count * 1e6:7.2f}{extra}")


if __name__ == "__main__":
    main()
