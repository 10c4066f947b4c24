"""The ``pyisr`` command: build, start, dev, revalidate, cache."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pyisr.config import Config, ConfigError, load_config
from pyisr.explain import SORTS, EntryState
from pyisr.site.loader import SiteLoadError

console = Console(stderr=True, soft_wrap=True)
T = TypeVar("T")
#: Who the store's record says asked, for an invalidation made by ``pyisr revalidate``.
REVALIDATE_BY = "pyisr revalidate (CLI)"
#: Seconds ``pyisr cache purge`` waits for the CDNs to take the purge.
EDGE_WAIT = 10.0


def _config(site: Path, **overrides: Any) -> Config:
    try:
        return load_config(site, overrides)
    except ConfigError as exc:
        console.print(f"[red]Configuration error:[/red] {escape(str(exc))}")
        sys.exit(2)


def _check_cdn(config: Config) -> None:
    """Stop a server before it starts when a CDN it must purge has no token (the variable to set)."""
    from pyisr.cdn.urls import purger_from_url

    for url in config.cdn:
        try:
            purger_from_url(url)
        except ValueError as exc:
            console.print(f"[red]Configuration error:[/red] cdn: {escape(str(exc))}")
            sys.exit(2)


def settings_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The settings a command line may give: they override pyisr.toml and PYISR_* variables.

    (The revalidation secret is deliberately not among them: a flag would show it in the
    process list. Set it in pyisr.toml or PYISR_REVALIDATE_SECRET.)
    """
    options = [
        click.option("--cache", help="Cache handler URL (file://, memory://, redis://...)."),
        click.option("--memory-tier", help="Memory tier in front of the cache, e.g. 50MB; 0 turns it off."),
        click.option("--cache-max-bytes", help="Disk the file-system cache may use, e.g. 5GB (default 1GB)."),
        click.option("--debug-cache", is_flag=True, default=None, help="Log every cache decision."),
        click.option("--render-timeout", type=float, help="Seconds a render may take."),
        click.option("--render-concurrency", type=int, help="Renders at once in one process."),
        click.option(
            "--trailing-slash/--no-trailing-slash",
            default=None,
            help="Redirect /a to /a/ (or, by default, /a/ to /a).",
        ),
        click.option("--site-url", help="Scheme and host of pages rendered for the cache (https://...)."),
        click.option("--allowed-hosts", help="Comma-separated hosts that may lend their Host to a render."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _export(settings: dict[str, Any]) -> None:
    """Hand command-line settings to the server's worker processes, which read PYISR_*."""
    for key, value in settings.items():
        if value is not None:
            text = ("1" if value else "0") if isinstance(value, bool) else str(value)
            os.environ[f"PYISR_{key.upper()}"] = text


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


@click.group()
@click.version_option(package_name="pyisr")
def main() -> None:
    """pyisr: Incremental Static Regeneration for Python sites."""


@main.command()
@click.argument("site", type=click.Path(file_okay=False, path_type=Path), default=".")
@click.option(
    "--rollback", is_flag=True, help="Make the previous build current again instead (twice: forward again)."
)
@settings_options
def build(site: Path, rollback: bool, **settings: Any) -> None:
    """Prerender every known page of SITE into its cache."""
    from pyisr.build import BuildInProgress, build_site

    config = _config(site, **settings)
    if rollback:
        _rollback(site)
        return
    with Progress(
        TextColumn("Prerendering"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("pages", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            result = asyncio.run(build_site(site, config, progress=progress))
        except (SiteLoadError, BuildInProgress) as exc:
            bar.stop()
            console.print(f"[red]Build failed:[/red] {escape(str(exc))}")
            sys.exit(1)
    if result.errors:
        console.print(f"[red]Build failed:[/red] {len(result.errors)} page(s) could not be prerendered:")
        for key, message in result.errors:
            console.print(f"  Error occurred prerendering page [bold]{escape(key)}[/bold]: {escape(message)}")
        sys.exit(1)
    table = Table(title=f"pyisr build {result.build_id}", title_justify="left")
    table.add_column("Route")
    table.add_column("Kind")
    table.add_column("Pages", justify="right")
    table.add_column("Size", justify="right")
    for report in sorted(result.reports, key=lambda r: r.route.pattern):
        kind = report.route.describe_kind()
        if report.revalidates:
            # What the pages really got: data calls can lower a route's own revalidate.
            values = sorted(v for v in report.revalidates if v is not None)
            kind = f"ISR {values[0]}s" if values else "static"
        table.add_row(escape(report.route.pattern), kind, str(len(report.keys)), _human(report.bytes))
    Console().print(table)
    console.print(result.summary(), markup=False, highlight=False)


def _rollback(site: Path) -> None:
    """``pyisr build --rollback``: the previous build (kept on disk) becomes current."""
    from pyisr.deploys import NoPreviousBuild, rollback

    try:
        left, current = rollback(site)
    except NoPreviousBuild as exc:
        console.print(f"[red]Cannot roll back:[/red] {escape(str(exc))}")
        sys.exit(1)
    console.print(
        f"Build {current} is current again (was {left}). Running servers keep their build: "
        "`kill -HUP <pid of pyisr start>` starts workers on it, or restart."
    )


def _serve(
    site: Path,
    host: str,
    port: int,
    workers: int,
    dev: bool,
    server: str,
    limits: Any = None,
    graceful_timeout: float = 30.0,
) -> None:
    """Run the server: ``pyisr dev`` under uvicorn's reloader, ``pyisr start`` under pyisr's
    supervisor (one shared socket, workers replaced on SIGHUP without losing a request;
    see pyisr/server/supervisor.py)."""
    os.environ["PYISR_SITE"] = str(site.resolve())
    os.environ["PYISR_DEV"] = "1" if dev else "0"
    if dev:
        import uvicorn

        uvicorn.run(
            "pyisr.server.entry:create_app",
            factory=True,
            host=host,
            port=port,
            reload=True,
            reload_dirs=[str(site.resolve())],
            reload_includes=["*.py", "*.html", "*.toml", "*.css"],
            log_level="info",
        )
        return
    import dataclasses
    import threading

    from pyisr.server.limits import HTTPLimits
    from pyisr.server.supervisor import bind, exec_supervisor
    from pyisr.server.worker import WorkerSpec, fork_workers

    if server == "granian":
        try:
            import granian  # noqa: F401 - a dependency; checked here for a clear message
        except ImportError:
            console.print("[red]granian is not installed:[/red] pip install granian, or --server uvicorn")
            sys.exit(2)
    spec = WorkerSpec(
        server=server,
        listen_fd=-1,
        ready_fd=-1,
        limits=limits or HTTPLimits(),
        graceful_timeout=graceful_timeout,
    )
    try:
        sock = bind(host, port, spec.backlog)
    except OSError as exc:  # the address is taken, or not ours to bind
        console.print(f"[red]Cannot listen on {host}:{port}:[/red] {escape(str(exc))}")
        sys.exit(1)
    spec = dataclasses.replace(spec, listen_fd=sock.fileno())
    # The first workers start from what this process loaded (a fork, when it is safe);
    # then it becomes the supervisor (same PID: the one to `kill -HUP`), a fresh
    # interpreter that holds none of it.
    started = fork_workers(spec, workers) if threading.active_count() == 1 else None
    exec_supervisor(host, port, workers, spec.to_dict(), sock=sock, started=started)


def _size(ctx: click.Context, param: click.Parameter, value: str) -> int:
    """A size flag (``32KB``, ``65536``) in bytes."""
    from pyisr.cache.urls import parse_size

    try:
        return parse_size(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a size such as 32KB") from None


@main.command()
@click.argument("site", type=click.Path(file_okay=False, path_type=Path), default=".")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=3000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--server",
    type=click.Choice(["granian", "uvicorn"]),
    default="granian",
    show_default=True,
    help="granian (RSGI) is the faster (README, Performance); uvicorn runs pyisr over ASGI.",
)
@click.option(
    "--max-header-bytes",
    default="32KB",
    show_default=True,
    callback=_size,
    help="Longest request head (request line and headers); longer is answered 431.",
)
@click.option(
    "--header-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds a request's head may take, from the connection's opening or last response.",
)
@click.option(
    "--keep-alive-timeout",
    default=5.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds an idle connection is kept open.",
)
@click.option(
    "--max-connections",
    default=1024,
    show_default=True,
    type=click.IntRange(min=1),
    help="Connections one worker holds at once.",
)
@click.option(
    "--graceful-timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds stopping or replaced workers get to finish their requests.",
)
@settings_options
def start(
    site: Path,
    host: str,
    port: int,
    workers: int,
    server: str,
    max_header_bytes: int,
    header_timeout: float,
    keep_alive_timeout: float,
    max_connections: int,
    graceful_timeout: float,
    **settings: Any,
) -> None:
    """Serve the build of SITE with stale-while-revalidate."""
    _check_cdn(_config(site, **settings))
    _export(settings)
    from pyisr.deploys import START_PID_ENV, current_manifest_path
    from pyisr.rewarm import WORKERS_ENV

    if current_manifest_path(site) is None:  # BUILD_ID and that build's own manifest
        console.print(f"[red]No build found in {site / '.pyisr'}.[/red] Run `pyisr build {site}` first.")
        sys.exit(1)
    os.environ[START_PID_ENV] = str(os.getpid())  # whom a worker tells to `kill -HUP` for a new build
    os.environ[WORKERS_ENV] = str(workers)  # they share the instance's rewarm_rate
    try:
        from pyisr.site.site import Site

        Site.load(site)
    except SiteLoadError as exc:
        console.print(f"[red]Cannot start:[/red] {escape(str(exc))}")
        sys.exit(1)
    from pyisr.server.limits import HTTPLimits

    try:
        limits = HTTPLimits(
            max_header_bytes=max_header_bytes,
            header_timeout=header_timeout,
            keep_alive_timeout=keep_alive_timeout,
            max_connections=max_connections,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    console.print(f"pyisr serving {site} on http://{host}:{port} ({workers} worker(s), {server})")
    _serve(site, host, port, workers, False, server, limits=limits, graceful_timeout=graceful_timeout)


@main.command()
@click.argument("site", type=click.Path(file_okay=False, path_type=Path), default=".")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=3000, show_default=True, type=int)
@settings_options
def dev(site: Path, host: str, port: int, **settings: Any) -> None:
    """Serve SITE for development: reload on change, never cache."""
    _config(site, **settings)
    _export(settings)
    console.print(f"pyisr dev server for {site} on http://{host}:{port} (reloads on change, no cache)")
    _serve(site, host, port, 1, dev=True, server="uvicorn")


@main.command()
@click.option("--path", "path", help="Regenerate this path now (e.g. /blog/1).")
@click.option("--tag", help="Invalidate every entry with this tag.")
@click.option(
    "--type", "kind", type=click.Choice(["page", "layout"]), help="With --path: mark a route or subtree."
)
@click.option(
    "--stale",
    is_flag=True,
    help="Mark stale instead: pages are answered at once while they regenerate in the background.",
)
@click.option("--url", default="http://127.0.0.1:3000", show_default=True, help="The running server.")
@click.option("--secret", envvar="PYISR_REVALIDATE_SECRET", help="Defaults to $PYISR_REVALIDATE_SECRET.")
def revalidate(
    path: str | None, tag: str | None, kind: str | None, stale: bool, url: str, secret: str | None
) -> None:
    """Ask a running server to revalidate a path or a tag."""
    import httpx

    from pyisr.server.endpoints import BY_HEADER

    if not path and not tag:
        raise click.UsageError("give --path or --tag")
    if not secret:
        raise click.UsageError("no secret: set PYISR_REVALIDATE_SECRET or pass --secret")
    fields = {"path": path, "tag": tag, "type": kind, "stale": "true" if stale else None}
    params = {k: v for k, v in fields.items() if v}
    try:
        response = httpx.post(
            url.rstrip("/") + "/_pyisr/revalidate",
            params=params,
            headers={"authorization": f"Bearer {secret}", BY_HEADER: REVALIDATE_BY},
            timeout=60,
        )
    except httpx.HTTPError as exc:
        console.print(f"[red]Cannot reach {url}:[/red] {exc}")
        sys.exit(1)
    click.echo(response.text)
    sys.exit(0 if response.status_code == 200 else 1)


@main.group()
def cache() -> None:
    """Look at and clear the cache of a built site (the store and build its server uses)."""


def _site_option(command: Callable[..., Any]) -> Callable[..., Any]:
    site = click.option(
        "--site",
        type=click.Path(file_okay=False, path_type=Path),
        default=".",
        show_default=True,
        help="The site's folder.",
    )
    as_json = click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")
    return site(as_json(command))


def _fail(message: str, as_json: bool, code: int = 2, **details: Any) -> NoReturn:
    """Say what went wrong (on stderr, or as a JSON error object on stdout) and exit."""
    if as_json:
        click.echo(json.dumps({"error": message, **details}))
    else:
        console.print(f"[red]{escape(message)}[/red]")
    sys.exit(code)


def _run_on_site(
    site: Path, as_json: bool, work: Callable[[Any], Awaitable[T]], *, purge_edge: bool = False
) -> tuple[T, Any]:
    """Run ``work(engine)`` over the site's cache, exactly the store and build its server uses;
    no site, no build or no cache there ends the command with what was looked for, and where.

    ``purge_edge``: the site's CDNs (``cdn``) are purged of what ``work`` invalidates, and
    the command waits for them (a few seconds at most) before it ends.
    """
    from pyisr import cache_tools
    from pyisr.cdn import attach_cdn
    from pyisr.cdn.queue import EXIT_WAIT
    from pyisr.engine import Engine

    config = _config(site)
    try:
        handler = cache_tools.open_site(site, config)
    except cache_tools.NoCache as exc:
        _fail(str(exc), as_json, **exc.details)
    engine = Engine(handler, debug=False)
    if purge_edge:
        try:
            attach_cdn(engine, config.cdn)
        except ValueError as exc:
            _fail(f"Configuration error: cdn: {exc}", as_json)

    async def run() -> T:
        try:
            return await work(engine)
        finally:
            if engine.cdn is not None:
                await engine.cdn.aclose(EXIT_WAIT)
            await engine.handler.close()

    try:
        return asyncio.run(run()), handler
    except Exception as exc:  # noqa: BLE001 - a store that cannot be read (Redis down): say so
        _fail(f"cannot read the cache at {cache_tools.where(handler)}: {exc}", as_json, code=1)


def _cache_key(path: str) -> str:
    """The key a command line names: a page's path, or a data key as ``cache list`` prints it."""
    from pyisr.cache_tools import cache_key
    from pyisr.paths import BadPath

    try:
        return cache_key(path)
    except BadPath as exc:
        raise click.BadParameter(f"{path!r}: {exc}") from None


def _print(renderable: Any) -> None:
    from pyisr.cache_tools import render_text

    click.echo(render_text(renderable, color=sys.stdout.isatty()), nl=False)


@cache.command("list")
@_site_option
@click.option("--state", type=click.Choice([s.value for s in EntryState]), help="Only entries in this state.")
@click.option("--tag", help="Only entries with this tag.")
@click.option("--route", help="Only pages of this route pattern (/blog/[id]), or keys under this path.")
@click.option("--prefix", default="", help="Only keys starting with this.")
@click.option("--sort", type=click.Choice(list(SORTS)), default="age", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), help="At most this many rows.")
def cache_list(
    site: Path,
    as_json: bool,
    state: str | None,
    tag: str | None,
    route: str | None,
    prefix: str,
    sort: str,
    limit: int | None,
) -> None:
    """List cached entries: key, state, age, revalidate, size, tags, hits."""
    from pyisr import cache_tools

    now = time.time()

    async def work(engine: Any) -> list[Any]:
        found = await cache_tools.rows(engine, now, state=state, tag=tag, route=route, sort=sort)
        return [row for row in found if row.key.startswith(prefix)]

    every, handler = _run_on_site(site, as_json, work)
    found = every[:limit] if limit else every
    if as_json:
        click.echo(json.dumps([row.to_json() for row in found], indent=2))
        return
    _print(cache_tools.rows_table(found, title=cache_tools.list_title(found, handler, len(every))))


@cache.command("inspect")
@click.argument("path")
@_site_option
def cache_inspect(path: str, site: Path, as_json: bool) -> None:
    """Show what is cached for PATH (or a data key): state, age, revalidate, tags, last failure."""
    from pyisr import cache_tools

    key = _cache_key(path)
    now = time.time()

    async def work(engine: Any) -> tuple[Any, Any]:
        return await cache_tools.inspect(engine, key, now), await cache_tools.explain_key(engine, key, now)

    (info, why), handler = _run_on_site(site, as_json, work)
    if as_json:
        click.echo(json.dumps(info or {"key": key, "cached": False, "explain": why.text}, indent=2))
    else:
        _print(cache_tools.entry_block(why, info, now))
    if info is None:
        if not as_json:
            console.print(f"(looked in {escape(cache_tools.where(handler))})")
        sys.exit(1)


@cache.command("explain")
@click.argument("path")
@_site_option
def cache_explain(path: str, site: Path, as_json: bool) -> None:
    """Say why PATH (or a data key) is in its state: since when, who invalidated it, what is served."""
    from pyisr import cache_tools

    key = _cache_key(path)

    async def work(engine: Any) -> Any:
        return await cache_tools.explain_key(engine, key, time.time())

    why, handler = _run_on_site(site, as_json, work)
    if as_json:
        click.echo(json.dumps(why.to_json(), indent=2))
    else:
        click.echo(f"{key}: {why.state.value if why.state else 'not cached'}")
        for sentence in why.sentences:
            click.echo(f"  {sentence}")
    if why.state is None:
        if not as_json:
            console.print(f"(looked in {escape(cache_tools.where(handler))})")
        sys.exit(1)


@cache.command("purge")
@click.argument("path")
@_site_option
def cache_purge(path: str, site: Path, as_json: bool) -> None:
    """Invalidate the entry for PATH (or a data key) in every running server.

    An invalidation, not a file delete: servers holding the page in memory learn of it
    through the cache's tag manifest (within a second), and the next request for it
    renders afresh. Purging a data key also invalidates the pages that read it.
    """
    from pyisr import cache_tools

    key = _cache_key(path)

    edge: dict[str, Any] = {}

    async def work(engine: Any) -> None:
        await cache_tools.purge(engine, key, by=cache_tools.CLI_PURGE_BY)
        if engine.cdn is not None:
            await engine.cdn.aflush(EDGE_WAIT)
            edge.update(engine.cdn.health())

    _, handler = _run_on_site(site, as_json, work, purge_edge=True)
    if as_json:
        where = cache_tools.where(handler)
        click.echo(json.dumps({"key": key, "purged": True, "cache": where, "edge": edge}))
        return
    click.echo(f"purged {key}: the next request renders it afresh")
    for name, state in edge.items():
        if state["sent"] and not (state["pending"] or state["failed"]):
            click.echo(f"purged at {name}")
        else:
            why = state["last_error"] or f"no answer within {EDGE_WAIT:g}s"
            console.print(f"[red]not purged at {escape(name)}:[/red] {escape(why)}")


if __name__ == "__main__":
    main()
