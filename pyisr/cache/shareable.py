"""What of a rendered response may be stored and served to everyone.

A cached page is one response served to every visitor, so the rule is strict: a
response that sets a cookie, says ``Cache-Control: private`` or ``no-store``, or
varies on everything (``Vary: *``) belongs to the visitor it was made for. It is
answered to that visitor and never stored (DESIGN.md, "What may be stored"). The
engine asks :func:`unshareable_reason` of every page and route render, whichever way
in (site, Starlette, Django, Flask) produced it; framework adapters add their own
reasons (a CSRF token, a session read) through ``Rendered.private``.

Of a shareable response, the headers pyisr writes itself (``Cache-Control``, ``ETag``,
``Age``...) and per-hop ones are never stored, so every response pyisr sends carries
exactly one of each.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

#: Headers pyisr writes itself, or that belong to one hop: never taken from a render.
WRITTEN_BY_PYISR = frozenset(
    {
        "cache-control",
        "etag",
        "age",
        "content-length",
        "x-pyisr-cache",
        "cache-status",
        "pragma",
        "expires",
        "transfer-encoding",
        "connection",
        "keep-alive",
    }
)

#: Headers about one response or one visitor: answered to that visitor, never stored.
#: (A response that sets a cookie is not stored at all; see :func:`unshareable_reason`.)
PER_RESPONSE = frozenset({"set-cookie", "vary", "date", "server"})

_PRIVATE_DIRECTIVES = ("private", "no-store")


def _pairs(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> Iterable[tuple[str, str]]:
    return headers.items() if isinstance(headers, Mapping) else headers


def _private_directive(cache_control: str) -> str | None:
    """``private`` or ``no-store`` when the ``Cache-Control`` value has one of them."""
    directives = {d.strip().split("=", 1)[0].lower() for d in cache_control.split(",")}
    return next((d for d in _PRIVATE_DIRECTIVES if d in directives), None)


def keeps_out_of_shared_caches(cache_control: str | None) -> bool:
    """Whether a response's own ``Cache-Control`` already forbids shared caches to keep it."""
    return cache_control is not None and _private_directive(cache_control) is not None


def unshareable_reason(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> str | None:
    """Why a response with these headers may not be shared, or ``None`` if it may.

    The reason reads after a route name: ``"/account sets a cookie"``.
    """
    for name, value in _pairs(headers):
        lower = name.lower()
        if lower == "set-cookie":
            return "sets a cookie"
        if lower == "cache-control":
            directive = _private_directive(value)
            if directive is not None:
                return f"says Cache-Control: {directive}"
        elif lower == "vary" and "*" in (v.strip() for v in value.split(",")):
            return "says Vary: *"
    return None


def storable_headers(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str]:
    """The headers of a shareable response worth storing with it, names lower-cased.

    Repeated headers are joined with ``", "``.
    """
    out: dict[str, str] = {}
    for name, value in _pairs(headers):
        lower = name.lower()
        if lower in WRITTEN_BY_PYISR or lower in PER_RESPONSE:
            continue
        out[lower] = f"{out[lower]}, {value}" if lower in out else value
    return out


#: Joins repeated ``Set-Cookie`` values in one mapping value (they cannot be joined with
#: commas); a header value never holds a newline, so the split back is exact.
COOKIE_SEPARATOR = "\n"


def visitor_headers(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str]:
    """The headers of a response answered to its own visitor only: all but pyisr's own.

    Its ``Cache-Control`` is kept: one that says ``private`` or ``no-store`` is sent as it
    is (``pyisr.http.private_cache_control``). Repeated ``Set-Cookie`` headers are kept,
    joined by :data:`COOKIE_SEPARATOR`.
    """
    out: dict[str, str] = {}
    for name, value in _pairs(headers):
        lower = name.lower()
        if lower in WRITTEN_BY_PYISR and lower != "cache-control":
            continue
        if lower in out:
            value = out[lower] + (COOKIE_SEPARATOR if lower == "set-cookie" else ", ") + value
        out[lower] = value
    return out
