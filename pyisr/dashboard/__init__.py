"""A dashboard for the cache at ``/_pyisr/``: what is cached, in which state and why, and
buttons to revalidate.

Off unless a secret is set (``dashboard_secret`` in ``pyisr.toml``,
``PYISR_DASHBOARD_SECRET``). Signing in with it sets a signed, HttpOnly, SameSite=Strict
cookie; every action is a POST carrying the session's CSRF token. The modules: ``auth``
(the secret, sessions, CSRF, the sign-in limit), ``web`` (the request and response the
views speak, the security headers), ``views`` (the pages and actions), ``summary`` (the
numbers and the chart), ``app`` (the ASGI app). Django and Flask serve the same views:
``pyisr.integrations.django.dashboard_urls``, ``pyisr.integrations.flask_dashboard``.
"""

from pyisr.dashboard.app import DashboardApp, dashboard_app
from pyisr.dashboard.views import Dashboard

__all__ = ["Dashboard", "DashboardApp", "dashboard_app"]
