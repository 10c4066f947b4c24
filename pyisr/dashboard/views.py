"""The dashboard's pages and actions, over one engine.

:class:`Dashboard` answers a :class:`~pyisr.dashboard.web.DashboardRequest`: the sign-in
form, the summary (entries by state, the last hour's hit ratio and renders, the store's
health), the table of entries, one entry (``explain``'s sentences, its headers, the
invalidations that touched it) and the revalidate actions. Actions answer with a
redirect (POST-redirect-GET); their result rides in a cookie signed for the session and
is shown once. Nothing the store holds is trusted: keys, tags and messages reach the
page only through Jinja2's autoescaping.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any
from urllib.parse import quote, urlencode

import jinja2

from pyisr.config import as_dashboard_secret
from pyisr.dashboard import summary
from pyisr.dashboard.auth import (
    SESSION_SECONDS,
    Session,
    Sessions,
    SignInLimiter,
    origin_problem,
    secret_matches,
)
from pyisr.dashboard.web import DashboardRequest, DashboardResponse, set_cookie
from pyisr.engine import CacheStatus, Engine
from pyisr.explain import SORTS, EntryRow, EntryState, clock_time, duration, explain, list_rows
from pyisr.http import entry_headers
from pyisr.provenance import invalidated_by
from pyisr.render import RevalidationError
from pyisr.revalidation import revalidate

logger = logging.getLogger("pyisr.dashboard")

SESSION_COOKIE = "pyisr_dashboard"
RESULT_COOKIE = "pyisr_dashboard_result"
#: Rows on one page of the table, and on the summary.
PAGE_ROWS = 50
SUMMARY_ROWS = 20
#: The revalidate actions, as the forms name them.
ACTIONS = {
    "path": "Revalidate a path",
    "page": "Revalidate a route pattern (type=page)",
    "layout": "Revalidate a layout (type=layout)",
    "tag": "Revalidate a tag",
    "regenerate": "Regenerate a path now",
}
_STATIC = {"dashboard.css": "text/css; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8"}
_MAX_TARGET = 2048

EngineSource = Engine | Callable[[], Engine] | None


def _size(n: int | None) -> str:
    if n is None:
        return "–"
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("kB", "MB"):
        value /= 1000
        if value < 1000:
            return f"{value:.1f} {unit}"
    return f"{value / 1000:.1f} GB"


def _lifetime(value: object) -> str:
    if value is None:
        return "–"
    if value is False:
        return "never"
    if isinstance(value, int | float):
        return duration(value)
    return str(value)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("pyisr.dashboard", "templates"),
        autoescape=True,  # every template: keys, tags and messages come from the store
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(duration=duration, size=_size, lifetime=_lifetime)
    env.globals.update(urlencode=urlencode, quote=quote)
    return env


class Dashboard:
    """The dashboard for one engine (``None``: the process's default, looked up per request)."""

    def __init__(self, engine: EngineSource = None, *, secret: str, secure: bool | None = None) -> None:
        self._engine = engine
        self.secret = as_dashboard_secret(secret)
        self.sessions = Sessions(self.secret)
        self.limiter = SignInLimiter()
        self.secure = secure
        self.templates = _environment()

    def engine(self) -> Engine:
        if isinstance(self._engine, Engine):
            return self._engine
        if self._engine is not None:
            return self._engine()
        from pyisr.runtime import get_engine

        return get_engine()

    # -- dispatch -----------------------------------------------------------------------

    async def handle(self, request: DashboardRequest) -> DashboardResponse:
        path, method = request.path or "/", request.method
        if path.startswith("/static/") and method in ("GET", "HEAD"):
            return self._static(path[len("/static/") :])
        if path == "/login":
            if method == "POST":
                return self._sign_in(request)
            if method in ("GET", "HEAD"):
                if self._session(request) is not None:
                    return self._redirect(request, "/")
                return self._login_page(request)
            return self._not_allowed()
        session = self._session(request)
        if method == "POST":
            if session is None:
                return self._page(
                    request,
                    None,
                    "message.html",
                    403,
                    title="Sign in first",
                    message="Your session has ended: sign in again.",
                )
            refused = self._refuse_post(request, session)
            if refused is not None:
                return refused
            if path == "/logout":
                return self._sign_out(request)
            if path == "/action":
                return await self._revalidate(request, session)
            return self._page(
                request, session, "message.html", 404, title="Not found", message="No such action."
            )
        if method not in ("GET", "HEAD"):
            return self._not_allowed()
        if session is None:
            return self._redirect(request, "/login")
        if path == "/":
            return await self._summary(request, session)
        if path == "/entries":
            return await self._entries(request, session)
        if path == "/entry":
            return await self._entry(request, session)
        return self._page(
            request,
            session,
            "message.html",
            404,
            title="Not found",
            message="There is no dashboard page at this address.",
        )

    # -- sign-in ------------------------------------------------------------------------

    def _session(self, request: DashboardRequest) -> Session | None:
        return self.sessions.read(request.cookies.get(SESSION_COOKIE))

    def _secure(self, request: DashboardRequest) -> bool:
        return request.secure if self.secure is None else self.secure

    def _login_page(
        self,
        request: DashboardRequest,
        status: int = 200,
        error: str | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> DashboardResponse:
        response = self._page(request, None, "login.html", status, title="Sign in", error=error)
        response.headers.extend(headers or [])
        return response

    def _sign_in(self, request: DashboardRequest) -> DashboardResponse:
        problem = origin_problem(
            request.headers.get("origin"), request.headers.get("sec-fetch-site"), request.host
        )
        if problem is not None:
            return self._login_page(request, 403, problem)
        wait = self.limiter.retry_after(request.client)
        if wait:
            return self._login_page(
                request,
                429,
                f"Too many wrong secrets from your address: try again in {wait} s.",
                [("retry-after", str(wait))],
            )
        given = request.form().get("secret", "")
        if not secret_matches(given, self.secret):
            self.limiter.failed(request.client)
            logger.warning("dashboard: a wrong secret was sent from %s", request.client)
            return self._login_page(request, 403, "That is not the dashboard's secret.")
        cookie, _ = self.sessions.new()
        response = self._redirect(request, "/")
        response.headers.append(
            set_cookie(
                SESSION_COOKIE,
                cookie,
                path=request.mount or "/",
                max_age=SESSION_SECONDS,
                secure=self._secure(request),
            )
        )
        return response

    def _sign_out(self, request: DashboardRequest) -> DashboardResponse:
        response = self._redirect(request, "/login")
        response.headers.append(
            set_cookie(SESSION_COOKIE, "", path=request.mount or "/", max_age=0, secure=self._secure(request))
        )
        return response

    def _refuse_post(self, request: DashboardRequest, session: Session) -> DashboardResponse | None:
        """A POST not sent by this session's own form: from another site, or without its token."""
        problem = origin_problem(
            request.headers.get("origin"), request.headers.get("sec-fetch-site"), request.host
        )
        if problem is None and not self.sessions.csrf_ok(session, request.form().get("csrf")):
            problem = "This form's security token is missing or out of date: reload the page and try again."
        if problem is None:
            return None
        return self._page(request, session, "message.html", 403, title="Refused", message=problem)

    # -- pages --------------------------------------------------------------------------

    async def _summary(self, request: DashboardRequest, session: Session) -> DashboardResponse:
        engine = self.engine()
        now = engine.clock()
        handler = engine.handler
        rows = await list_rows(handler, now, sort="hits")
        activity = await handler.activity(now)
        table = _table(rows[:SUMMARY_ROWS], len(rows), {**_NO_FILTERS, "sort": "hits"}, 1, 1)
        reasons = list(engine.degraded_reasons())
        described = handler.describe()
        if described.get("degraded"):
            reasons.insert(0, "the cache store is unreachable")
        return self._page(
            request,
            session,
            "summary.html",
            title="Summary",
            states=summary.by_state(rows),
            entry_count=len(rows),
            entry_bytes=sum(r.size for r in rows),
            totals=summary.totals(activity.minutes, now),
            chart=summary.chart(activity.minutes, now),
            reasons=reasons,
            store=_flatten(described),
            engine_health=_flatten(engine.health()),
            invalidations=[(clock_time(inv.at, now), inv) for inv in activity.invalidations[:10]],
            table=table,
            actions=ACTIONS,
        )

    async def _entries(self, request: DashboardRequest, session: Session) -> DashboardResponse:
        """The table: filtered and sorted by the store (``q``, ``state``, ``sort``, ``tag``,
        ``route``), :data:`PAGE_ROWS` to a page (``page``)."""
        engine = self.engine()
        query = request.query
        problems: list[str] = []
        state = query.get("state", "")
        if state and state not in {s.value for s in EntryState}:
            problems.append(f"There is no state {state!r}: showing every state.")
            state = ""
        sort = query.get("sort", "age")
        if sort not in SORTS:
            problems.append(f"Entries cannot be sorted by {sort!r}: sorted by age.")
            sort = "age"
        filters = {
            "q": query.get("q", "")[:200],
            "state": state,
            "sort": sort,
            "tag": query.get("tag", "")[:200],
            "route": query.get("route", "")[:200],
        }
        rows = await list_rows(
            engine.handler,
            engine.clock(),
            state=state or None,
            tag=filters["tag"] or None,
            route=filters["route"] or None,
            search=filters["q"] or None,
            sort=sort,
        )
        pages = max(1, -(-len(rows) // PAGE_ROWS))
        page = min(_page_number(query.get("page")), pages)
        shown = rows[(page - 1) * PAGE_ROWS : page * PAGE_ROWS]
        table = _table(shown, len(rows), filters, page, pages)
        return self._page(request, session, "entries.html", title="Entries", table=table, problems=problems)

    async def _entry(self, request: DashboardRequest, session: Session) -> DashboardResponse:
        key = request.query.get("key", "")
        if not key:
            return self._redirect(request, "/entries")
        engine = self.engine()
        now = engine.clock()
        explanation = await explain(engine.handler, key[:_MAX_TARGET], now)
        entry = await engine.inspect(explanation.key)
        headers = (
            [
                (n.decode("latin-1"), v.decode("latin-1"))
                for n, v in entry_headers(
                    entry, CacheStatus.HIT, cdn_tag_headers=engine.cdn_tag_headers, build=engine.edge_build
                )
            ]
            if entry is not None
            else []
        )
        row = explanation.row
        preview = row is not None and row.kind != "data" and key.startswith("/") and not key.startswith("//")
        return self._page(
            request,
            session,
            "entry.html",
            200 if row is not None else 404,
            title=key,
            key=key,
            explanation=explanation,
            row=row,
            headers=headers,
            preview=preview,
            invalidations=[(clock_time(inv.at, now), inv) for inv in explanation.invalidations[:20]],
            created=clock_time(row.created_at, now) if row else None,
            next_path="/entry?" + urlencode({"key": key}),
        )

    # -- actions ------------------------------------------------------------------------

    async def _revalidate(self, request: DashboardRequest, session: Session) -> DashboardResponse:
        form = request.form()
        kind, target = form.get("kind", ""), form.get("target", "").strip()
        stale = form.get("stale", "") in ("on", "1", "true")
        back = _local_next(form.get("next"))
        ok, text = await self._act(kind, target, stale, request.client)
        response = self._redirect(request, back)
        payload = base64.urlsafe_b64encode(json.dumps({"ok": ok, "text": text[:500]}).encode()).decode()
        response.headers.append(
            set_cookie(
                RESULT_COOKIE,
                self.sessions.sign_flash(session, payload),
                path=request.mount or "/",
                max_age=60,
                secure=self._secure(request),
            )
        )
        return response

    async def _act(self, kind: str, target: str, stale: bool, client: str) -> tuple[bool, str]:
        """Run one action; ``(True, what was done)`` or ``(False, why not)``."""
        if kind not in ACTIONS:
            return False, f"Unknown action {kind!r}."
        if not target:
            return False, "Give a path, a route pattern or a tag."
        if len(target) > _MAX_TARGET:
            return False, f"That is {len(target)} characters long; at most {_MAX_TARGET}."
        engine = self.engine()
        by = f"dashboard (signed in from {client})"
        marked = (
            "marked stale (served while it regenerates at its next request)"
            if stale
            else ("invalidated (its next request renders it afresh)")
        )
        try:
            with invalidated_by(by):
                if kind == "tag":
                    await engine.revalidate_tag(target, stale=stale, by=by)
                    return True, f"Tag {target} {marked}."
                if kind == "regenerate":
                    await revalidate(target, engine=engine, by=by)
                    return True, f"Regenerated {target}: the new page is stored."
                await engine.revalidate_path(target, None if kind == "path" else kind, stale=stale, by=by)
        except (ValueError, RevalidationError) as exc:
            return False, str(exc)
        except Exception as exc:  # noqa: BLE001 - shown to the operator, logged with its traceback
            logger.exception("dashboard: %s %s failed", kind, target)
            return False, f"{kind} {target} failed: {type(exc).__name__}: {exc}"
        what = {
            "path": f"Path {target}",
            "page": f"Every page of {target}",
            "layout": f"Everything under {target}",
        }
        return True, f"{what[kind]} {marked}."

    # -- responses ----------------------------------------------------------------------

    def _page(
        self,
        request: DashboardRequest,
        session: Session | None,
        template: str,
        status: int = 200,
        **context: Any,
    ) -> DashboardResponse:
        headers: list[tuple[str, str]] = []
        result = None
        if session is not None and request.method != "POST":
            result = self._result(session, request.cookies.get(RESULT_COOKIE))
            if RESULT_COOKIE in request.cookies:
                headers.append(
                    set_cookie(
                        RESULT_COOKIE, "", path=request.mount or "/", max_age=0, secure=self._secure(request)
                    )
                )
        context.setdefault("error", None)
        context.setdefault("next_path", _here(request))
        html = self.templates.get_template(template).render(
            mount=request.mount,
            signed_in=session is not None,
            csrf=self.sessions.csrf_token(session) if session is not None else "",
            result=result,
            **context,
        )
        body = b"" if request.method == "HEAD" else html.encode()
        return DashboardResponse(status, body, headers=headers)

    def _result(self, session: Session, value: str | None) -> dict[str, Any] | None:
        payload = self.sessions.read_flash(session, value)
        if payload is None:
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(payload.encode()))
        except (ValueError, binascii.Error):
            return None
        return {"ok": bool(data.get("ok")), "text": str(data.get("text", ""))}

    def _redirect(self, request: DashboardRequest, to: str) -> DashboardResponse:
        location = quote((request.mount or "") + to, safe="/?&=%:@!$'()*+,;~-._")
        return DashboardResponse(303, b"", headers=[("location", location)])

    def _not_allowed(self) -> DashboardResponse:
        return DashboardResponse(
            405, b"Method Not Allowed", "text/plain; charset=utf-8", [("allow", "GET, HEAD, POST")]
        )

    def _static(self, name: str) -> DashboardResponse:
        if name not in _STATIC:
            return DashboardResponse(404, b"Not Found", "text/plain; charset=utf-8")
        data = resources.files("pyisr.dashboard").joinpath("static", name).read_bytes()
        return DashboardResponse(200, data, _STATIC[name])


_NO_FILTERS = {"q": "", "state": "", "sort": "age", "tag": "", "route": ""}


def _table(
    rows: list[EntryRow], total: int, filters: dict[str, str], page: int, pages: int
) -> dict[str, Any]:
    """What the table template needs: the rows shown, the filters, and the pager's links."""
    active = {k: v for k, v in filters.items() if v and not (k == "sort" and v == "age")}
    return {
        "rows": rows,
        "total": total,
        "filters": filters,
        "page": page,
        "pages": pages,
        "query": active,
        "states": [s.value for s in EntryState],
        "sorts": SORTS,
    }


def _page_number(value: str | None) -> int:
    return int(value) if value and value.isdigit() and 0 < int(value) < 1_000_000 else 1


def _here(request: DashboardRequest) -> str:
    """This page's address below the mount, for an action to come back to."""
    query = urlencode(dict(request.query))
    return request.path + ("?" + query if query else "")


def _local_next(value: str | None) -> str:
    """Where an action goes back to: a page of the dashboard, never another site."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value or len(value) > 4000:
        return "/"
    if any(ord(c) < 0x20 for c in value):
        return "/"
    return value


def _flatten(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """A nested JSON-able mapping as ``(dotted name, text)`` pairs, for a definition list."""
    out: list[tuple[str, str]] = []
    for name, value in data.items():
        label = f"{prefix}{name}"
        if isinstance(value, Mapping):
            out.extend(_flatten(value, label + ".") if value else [(label, "none")])
        elif isinstance(value, list | tuple):
            out.append(
                (label, ", ".join(json.dumps(v) if isinstance(v, dict) else str(v) for v in value) or "none")
            )
        else:
            out.append((label, "–" if value is None else str(value)))
    return out
