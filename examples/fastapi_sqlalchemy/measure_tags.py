"""What automatic tags cost a render, per row loaded and per query.

    python examples/fastapi_sqlalchemy/measure_tags.py

Loads the same rows inside a pyisr render context through a tracked and an untracked
session factory (SQLite in memory, so the ORM's own cost dominates, not the network), and
prints the difference. Tags are only collected while a page renders: requests answered
from the cache, and code outside renders, pay one context-variable read per event.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import String, create_engine, insert, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from pyisr import context
from pyisr.integrations.sqlalchemy import track

ROWS = 5000
LOOKUPS = 500


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


def best_of(fn: Callable[[], None], runs: int = 7) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def in_render(make: Callable[[], Session], work: Callable[[Session], None]) -> Callable[[], None]:
    def run() -> None:
        token = context.enter(context.RenderContext(key="/measure"))
        try:
            with make() as session:
                work(session)
        finally:
            context.leave(token)

    return run


def main() -> None:
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(Item), [{"name": f"item {i}"} for i in range(ROWS)])
    plain = sessionmaker(engine)
    tracked = track(sessionmaker(engine))
    many = track(sessionmaker(engine), max_row_tags=ROWS + 10)

    def load_all(session: Session) -> None:
        session.scalars(select(Item)).all()

    def lookups(session: Session) -> None:
        for i in range(1, LOOKUPS + 1):
            session.get(Item, i)
            session.expunge_all()

    cases = (("rows of one SELECT", load_all, ROWS), ("session.get lookups", lookups, LOOKUPS))
    for name, work, count in cases:
        base = best_of(in_render(plain, work))
        rows = [
            ("tracked (default max_row_tags=100)", best_of(in_render(tracked, work))),
            (f"tracked (max_row_tags={ROWS + 10})", best_of(in_render(many, work))),
        ]
        print(f"{name}: untracked {base / count * 1e6:.2f} µs each")
        for label, spent in rows:
            each, extra, share = spent / count * 1e6, (spent - base) / count * 1e6, (spent / base - 1) * 100
            print(f"  {label}: {each:.2f} µs each, +{extra:.2f} µs ({share:.0f}%)")
    print("(best of 7 runs)")


if __name__ == "__main__":
    main()
