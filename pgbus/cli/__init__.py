"""The ``pgbus`` command line: run, listen, publish, plugins, doctor, top, schema, demo, ….

Every command takes ``--help``. The database comes from ``--dsn`` (before or after the
command's name), else ``$PGBUS_DSN``, else libpq's ``PGHOST``/``PGDATABASE``/``PGSERVICE``
environment (see :func:`pgbus.resolve_dsn`).
Bad input (no database, a wrong DSN, an unknown model, invalid JSON, a channel name
PostgreSQL would refuse) prints one line on stderr and exits with status 1 (2 for a
usage error), never a traceback. Commands whose output a script would read take
``--json``.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

from pgbus.cli._main import cli, main

__all__ = ["cli", "main"]
