"""Where the database is: a DSN argument, ``$PGBUS_DSN``, or libpq's environment and files.

:func:`resolve_dsn` is what :meth:`pgbus.Bus.start` and the command line use. It accepts
URLs (``postgresql://user@host/db``) and libpq keyword DSNs (``host=db dbname=app``,
``service=mysvc``) and returns a URL asyncpg takes. Services are looked up as libpq does
(``$PGSERVICEFILE`` or ``~/.pg_service.conf``, then ``$PGSYSCONFDIR/pg_service.conf``);
passwords from ``$PGPASSWORD`` and ``~/.pgpass`` (``$PGPASSFILE``) and ``$PGSSLMODE``
are read by asyncpg when it connects, as libpq would.
"""

from __future__ import annotations

import configparser
import os
import re
from pathlib import Path
from urllib.parse import quote, urlencode

from pgbus.errors import ConfigError

__all__ = ["LIBPQ_ENV", "resolve_dsn"]

#: The libpq variables that name a database on their own (``$PGPASSWORD`` and
#: ``$PGSSLMODE`` only complete one).
LIBPQ_ENV = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE")

#: libpq keyword -> environment variable, for the parts a URL carries.
_ENV_KEYWORDS = {
    "host": "PGHOST",
    "hostaddr": "PGHOSTADDR",
    "port": "PGPORT",
    "user": "PGUSER",
    "dbname": "PGDATABASE",
    "sslmode": "PGSSLMODE",
}

_PAIR = re.compile(
    r"""\s*(?P<key>[A-Za-z_][A-Za-z0-9_]*)\s*=\s*
        (?:'(?P<quoted>(?:[^'\\]|\\.)*)'|(?P<bare>(?:[^\s'\\]|\\.)*))""",
    re.VERBOSE,
)
_ESCAPE = re.compile(r"\\(.)")


def resolve_dsn(dsn: str | None = None, *, argument: str = "a DSN to Bus()") -> str:
    """The database to connect to, as a URL asyncpg accepts.

    Looked for in this order: ``dsn``, then ``$PGBUS_DSN``, then the libpq environment
    (``PGHOST``, ``PGPORT``, ``PGUSER``, ``PGDATABASE``, ``PGSERVICE``, with
    ``PGPASSWORD``, ``PGSSLMODE`` and ``~/.pgpass`` read when connecting).

    :param dsn: a URL or a libpq keyword DSN; ``None`` or ``""`` to look further.
    :param argument: how the caller's user passes a DSN, for the error message.
    :raises ConfigError: when nothing names a database, or a keyword DSN is malformed
        or names a service that no service file defines.

    .. versionadded:: 0.2.0
    """
    for candidate in (dsn, os.environ.get("PGBUS_DSN")):
        if candidate and candidate.strip():
            return _as_url(candidate.strip())
    params = {key: os.environ[var] for key, var in _ENV_KEYWORDS.items() if os.environ.get(var)}
    service = os.environ.get("PGSERVICE")
    if service:
        params = {**params, **_service(service)}
    if not any(os.environ.get(var) for var in LIBPQ_ENV):
        raise ConfigError(
            f"no database: pass {argument}, set PGBUS_DSN, or set the libpq variables"
            " (PGHOST, PGPORT, PGUSER, PGDATABASE or PGSERVICE)"
        )
    return _url(params)


def _as_url(dsn: str) -> str:
    if "://" in dsn or "=" not in dsn:
        return dsn  # a URL, or something asyncpg explains better ("invalid DSN")
    params = parse_keywords(dsn)
    service = params.pop("service", None)
    if service is not None:
        params = {**_service(service), **params}
    return _url(params)


def parse_keywords(dsn: str) -> dict[str, str]:
    """The ``key=value`` pairs of a libpq keyword DSN (values may be single-quoted).

    :raises ConfigError: for text that is not ``key=value`` pairs.
    """
    params: dict[str, str] = {}
    pos = 0
    while pos < len(dsn.rstrip()):
        match = _PAIR.match(dsn, pos)
        if match is None or (match.end() < len(dsn) and not dsn[match.end()].isspace()):
            raise ConfigError(f"malformed keyword DSN near {dsn[pos:].strip()[:20]!r}")
        value = match["quoted"] if match["quoted"] is not None else match["bare"]
        params[match["key"]] = _ESCAPE.sub(r"\1", value)
        pos = match.end()
    return params


def _service_files() -> list[Path]:
    user = os.environ.get("PGSERVICEFILE")
    files = [Path(user) if user else Path.home() / ".pg_service.conf"]
    sysconf = os.environ.get("PGSYSCONFDIR")
    if sysconf:
        files.append(Path(sysconf) / "pg_service.conf")
    return files


def _service(name: str) -> dict[str, str]:
    """The parameters of service ``name``: from the first service file that defines it."""
    for path in _service_files():
        parser = configparser.ConfigParser(interpolation=None)
        parser.optionxform = str  # type: ignore[assignment, method-assign] # keep case
        try:
            parser.read(path, encoding="utf-8")
        except configparser.Error as exc:
            raise ConfigError(f"cannot read the service file {path}: {exc}") from exc
        if parser.has_section(name):
            return dict(parser.items(name))
    where = " or ".join(str(p) for p in _service_files())
    raise ConfigError(f"service {name!r} is not defined in {where}")


def _url(params: dict[str, str]) -> str:
    """A ``postgresql://`` URL of libpq parameters (asyncpg reads the rest from libpq's env).

    A host that is a socket directory or a list of hosts goes into the query, where
    asyncpg reads it unchanged; so does a password without a user.
    """
    rest = dict(params)
    host = rest.pop("host", None) or rest.pop("hostaddr", None)
    rest.pop("hostaddr", None)
    netloc = ""
    if "user" in rest:
        netloc = quote(rest.pop("user"), safe="")
        if "password" in rest:
            netloc += ":" + quote(rest.pop("password"), safe="")
        netloc += "@"
    if host is not None and (host.startswith("/") or "," in host):
        rest = {"host": host, **rest}
    elif host is not None:
        netloc += f"[{host}]" if ":" in host else quote(host, safe="")
        if "port" in rest:
            netloc += ":" + rest.pop("port")
    path = "/" + quote(rest.pop("dbname"), safe="") if "dbname" in rest else ""
    query = "?" + urlencode(rest) if rest else ""
    return f"postgresql://{netloc}{path}{query}"
