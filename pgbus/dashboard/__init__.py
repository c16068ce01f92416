"""``pgbus dashboard``: an operator's web page for the buses of a database.

Install the extra (``pip install 'pgbus[dashboard]'``: Starlette, uvicorn and Jinja2),
then run ``pgbus dashboard`` or serve :func:`create_app` with any ASGI server::

    app = pgbus.dashboard.create_app(dsn, token=os.environ["PGBUS_DASHBOARD_TOKEN"])

Pages are rendered on the server (every value escaped) and refreshed by a few lines
of JavaScript shipped in the package; plots are SVG drawn on the server. Nothing is
fetched from elsewhere. See ``docs/dashboard.md``.

.. versionadded:: 0.3.0
"""

from __future__ import annotations

from pgbus.dashboard._app import create_app

__all__ = ["create_app"]
