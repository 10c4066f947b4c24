"""The dashboard in a Flask app: a blueprint serving the same views as ``/_pyisr/``::

    from pyisr.integrations.flask_dashboard import dashboard_blueprint

    app.register_blueprint(dashboard_blueprint(secret=os.environ["PYISR_DASHBOARD_SECRET"]))

Flask is WSGI: each request is answered by the dashboard's async views on pyisr's sync
bridge (:func:`pyisr.runtime.run_sync`), the loop Flask's ``@isr`` views use too. With
no secret (neither ``secret=`` nor ``PYISR_DASHBOARD_SECRET``) the blueprint has no
routes and its paths answer 404.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Blueprint, Response, request

from pyisr.dashboard.views import Dashboard, EngineSource
from pyisr.dashboard.web import MAX_FORM_BYTES, DashboardRequest
from pyisr.runtime import run_sync

METHODS = ["GET", "HEAD", "POST"]


def dashboard_blueprint(
    secret: str | None = None,
    *,
    engine: EngineSource = None,
    url_prefix: str = "/_pyisr",
    secure: bool | None = None,
    name: str = "pyisr_dashboard",
) -> Blueprint:
    """A blueprint serving the dashboard at ``url_prefix`` (register it on the app).

    ``engine`` defaults to pyisr's process engine (the one ``@isr`` views use);
    ``secure`` forces the cookie's ``Secure`` flag (default: on over https). A secret
    shorter than 16 characters is refused with ``ValueError``.
    """
    secret = secret or os.environ.get("PYISR_DASHBOARD_SECRET") or None
    blueprint = Blueprint(name, __name__, url_prefix=url_prefix.rstrip("/"))
    if secret is None:
        return blueprint
    dashboard = Dashboard(engine, secret=secret, secure=secure)

    def serve(rest: str = "") -> Any:
        if (request.content_length or 0) > MAX_FORM_BYTES:
            return Response("Payload Too Large", status=413, mimetype="text/plain")
        answer = run_sync(
            dashboard.handle(
                DashboardRequest(
                    method=request.method,
                    path="/" + rest,
                    mount=request.script_root + url_prefix.rstrip("/"),
                    query=request.args.to_dict(),
                    headers={k.lower(): v for k, v in request.headers.items()},
                    client=request.remote_addr or "unknown",
                    host=request.host,
                    secure=request.is_secure,
                    body=request.get_data(cache=False) if request.method == "POST" else b"",
                    cookies=request.cookies.to_dict(),
                )
            )
        )
        return Response(answer.body, status=answer.status, headers=answer.all_headers())

    blueprint.add_url_rule("/", "index", serve, methods=METHODS)
    blueprint.add_url_rule("/<path:rest>", "page", serve, methods=METHODS)
    return blueprint
