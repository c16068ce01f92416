"""One small interface over every driver a caller may hand pgbus its transaction on.

``publish(..., connection=X)`` runs its statement on ``X``, whatever ``X`` is, so that it
commits or rolls back with the caller's own work. :func:`executor` turns an asynchronous
connection (asyncpg, SQLAlchemy ``AsyncConnection``/``AsyncSession`` with the asyncpg or
the psycopg dialect, psycopg 3 ``AsyncConnection``) and :func:`sync_executor` a
synchronous one (psycopg 3 ``Connection``, SQLAlchemy ``Connection``/``Session``, a
Django database connection) into an :class:`Executor` / :class:`SyncExecutor`:
``execute`` and ``fetch`` with asyncpg's ``$n`` placeholders, translated to the driver's
own, and any driver's error raised as :class:`DriverError`, which keeps the SQLSTATE.

Nothing here begins, commits or rolls back: a statement runs exactly as one of the
caller's own would (SQLAlchemy's autobegin included), so the caller decides its fate.
The optional drivers are never imported here: a connection of one proves it is loaded.
"""

from __future__ import annotations

import functools
import re
import sys
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import asyncpg
import asyncpg.pool

from pgbus.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Sequence

    import psycopg
    import sqlalchemy
    import sqlalchemy.ext.asyncio
    import sqlalchemy.orm

#: The asynchronous connections ``publish(..., connection=…)`` accepts.
AsyncConnection: TypeAlias = (
    "asyncpg.Connection[Any] | asyncpg.pool.PoolConnectionProxy[Any] | asyncpg.Pool[Any]"
    " | sqlalchemy.ext.asyncio.AsyncConnection | sqlalchemy.ext.asyncio.AsyncSession"
    " | psycopg.AsyncConnection[Any]"
)
#: The synchronous connections :func:`pgbus.sync.publish` accepts (Django's is untyped).
SyncConnection: TypeAlias = (
    "psycopg.Connection[Any] | sqlalchemy.Connection | sqlalchemy.orm.Session | Any"
)

ASYNC_TYPES = (
    "an asyncpg Connection, pool connection or Pool, a SQLAlchemy AsyncConnection or AsyncSession,"
    " or a psycopg AsyncConnection"
)
SYNC_TYPES = (
    "a psycopg Connection, a SQLAlchemy Connection or Session, or a Django database connection"
)

Row = tuple[Any, ...]

_PLACEHOLDER = re.compile(r"\$(\d+)")


class DriverError(Exception):
    """A statement failed in the caller's driver (the driver's error is the cause).

    :ivar sqlstate: the PostgreSQL error code, when the server answered with one.
    """

    def __init__(self, exc: BaseException) -> None:
        super().__init__(str(exc) or type(exc).__name__)
        self.sqlstate = sqlstate(exc)


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a driver's error: asyncpg's, psycopg's, or one SQLAlchemy wraps."""
    seen: BaseException | None = exc
    while seen is not None:
        code = getattr(seen, "sqlstate", None)
        if isinstance(code, str):
            return code
        orig = getattr(seen, "orig", None)  # SQLAlchemy's DBAPIError wraps the driver's
        seen = orig if isinstance(orig, BaseException) else seen.__cause__
    return None


@functools.lru_cache(maxsize=64)
def _pyformat(query: str) -> tuple[str, tuple[int, ...]]:
    """``query`` with ``%s`` placeholders, and which argument goes to each of them."""
    order: list[int] = []

    def placeholder(match: re.Match[str]) -> str:
        order.append(int(match[1]) - 1)
        return "%s"

    return _PLACEHOLDER.sub(placeholder, query.replace("%", "%%")), tuple(order)


def _translate(query: str, args: Sequence[object], style: str) -> tuple[str, tuple[object, ...]]:
    """``query`` and ``args`` for a driver whose placeholders are ``style``."""
    if style == "numeric_dollar":
        return query, tuple(args)
    text, order = _pyformat(query)
    return text, tuple(args[i] for i in order)


class Executor(Protocol):
    """Runs statements on the caller's asynchronous connection, in its transaction."""

    async def execute(self, query: str, *args: object) -> None:
        """Run ``query`` (``$n`` placeholders).

        :raises DriverError: when it failed.
        """

    async def fetch(self, query: str, *args: object) -> list[Row]:
        """Run ``query`` (``$n`` placeholders) and return its rows.

        :raises DriverError: when it failed.
        """


class SyncExecutor(Protocol):
    """Runs statements on the caller's synchronous connection, in its transaction."""

    def execute(self, query: str, *args: object) -> None:
        """Run ``query`` (``$n`` placeholders).

        :raises DriverError: when it failed.
        """

    def fetch(self, query: str, *args: object) -> list[Row]:
        """Run ``query`` (``$n`` placeholders) and return its rows.

        :raises DriverError: when it failed.
        """


# -- asynchronous ----------------------------------------------------------------------

_ASYNCPG_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class _Asyncpg:
    def __init__(
        self,
        conn: asyncpg.Connection[Any] | asyncpg.pool.PoolConnectionProxy[Any] | asyncpg.Pool[Any],
    ) -> None:
        self._conn = conn

    async def execute(self, query: str, *args: object) -> None:
        try:
            await self._conn.execute(query, *args)
        except _ASYNCPG_ERRORS as exc:
            raise DriverError(exc) from exc

    async def fetch(self, query: str, *args: object) -> list[Row]:
        try:
            return [tuple(r) for r in await self._conn.fetch(query, *args)]
        except _ASYNCPG_ERRORS as exc:
            raise DriverError(exc) from exc


class _SqlAlchemyAsync:
    """A SQLAlchemy ``AsyncConnection`` or ``AsyncSession`` (its connection is asked for late)."""

    def __init__(
        self, conn: sqlalchemy.ext.asyncio.AsyncConnection | sqlalchemy.ext.asyncio.AsyncSession
    ) -> None:
        self._conn = conn

    async def _run(self, query: str, args: Sequence[object]) -> sqlalchemy.CursorResult[Any]:
        from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415 - loaded: its connection exists
        from sqlalchemy.ext.asyncio import AsyncSession  # noqa: PLC0415 - same reason

        conn = self._conn
        try:
            # The session's connection joins (or autobegins) the session's transaction.
            if isinstance(conn, AsyncSession):
                conn = await conn.connection()
            text, params = _translate(query, args, conn.dialect.paramstyle)
            return await conn.exec_driver_sql(text, params)
        except (SQLAlchemyError, OSError) as exc:
            raise DriverError(exc) from exc

    async def execute(self, query: str, *args: object) -> None:
        (await self._run(query, args)).close()

    async def fetch(self, query: str, *args: object) -> list[Row]:
        return [tuple(r) for r in (await self._run(query, args)).all()]


class _PsycopgAsync:
    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._conn = conn

    async def _run(self, query: str, args: Sequence[object]) -> psycopg.AsyncCursor[Any]:
        import psycopg  # noqa: PLC0415 - loaded: its connection exists

        text, params = _translate(query, args, "format")
        try:
            return await self._conn.execute(text, params)
        except (psycopg.Error, OSError) as exc:
            raise DriverError(exc) from exc

    async def execute(self, query: str, *args: object) -> None:
        await (await self._run(query, args)).close()

    async def fetch(self, query: str, *args: object) -> list[Row]:
        cur = await self._run(query, args)
        try:
            return [tuple(r) for r in await cur.fetchall()]
        finally:
            await cur.close()


def executor(connection: object) -> Executor:
    """The :class:`Executor` over the caller's asynchronous ``connection``.

    :raises ConfigError: for an object none of the supported drivers made.
    """
    # A Pool is no transaction, but it always worked here: each statement autocommits.
    if isinstance(connection, asyncpg.Connection | asyncpg.pool.PoolConnectionProxy | asyncpg.Pool):
        return _Asyncpg(connection)
    sa = sys.modules.get("sqlalchemy.ext.asyncio")
    if sa is not None and isinstance(connection, sa.AsyncConnection | sa.AsyncSession):
        return _SqlAlchemyAsync(connection)
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None and isinstance(connection, psycopg.AsyncConnection):
        return _PsycopgAsync(connection)
    hint = " (use pgbus.sync.publish for a synchronous one)" if _sync(connection) else ""
    raise ConfigError(f"connection= takes {ASYNC_TYPES}, not {_name(connection)}{hint}")


# -- synchronous -----------------------------------------------------------------------


class _Cursor:
    """A DB-API connection whose cursors take ``%s`` placeholders (psycopg, Django)."""

    def __init__(self, conn: Any, errors: tuple[type[BaseException], ...]) -> None:
        self._conn = conn
        self._errors = errors

    def execute(self, query: str, *args: object) -> None:
        self._run(query, args, fetch=False)

    def fetch(self, query: str, *args: object) -> list[Row]:
        return self._run(query, args, fetch=True)

    def _run(self, query: str, args: Sequence[object], *, fetch: bool) -> list[Row]:
        text, params = _translate(query, args, "format")
        try:
            with self._conn.cursor() as cur:
                cur.execute(text, params)
                return [tuple(r) for r in cur.fetchall()] if fetch else []
        except self._errors as exc:
            raise DriverError(exc) from exc


class _SqlAlchemySync:
    def __init__(self, conn: sqlalchemy.Connection | sqlalchemy.orm.Session) -> None:
        self._conn = conn

    def _run(self, query: str, args: Sequence[object]) -> sqlalchemy.CursorResult[Any]:
        from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415 - loaded: its connection exists
        from sqlalchemy.orm import Session  # noqa: PLC0415 - same reason

        conn = self._conn
        try:
            if isinstance(conn, Session):
                conn = conn.connection()
            text, params = _translate(query, args, conn.dialect.paramstyle)
            return conn.exec_driver_sql(text, params)
        except (SQLAlchemyError, OSError) as exc:
            raise DriverError(exc) from exc

    def execute(self, query: str, *args: object) -> None:
        self._run(query, args).close()

    def fetch(self, query: str, *args: object) -> list[Row]:
        return [tuple(r) for r in self._run(query, args).all()]


def _django(connection: object) -> Any:
    """``connection`` if it is Django's (a database wrapper, or ``django.db.connection``)."""
    base = sys.modules.get("django.db.backends.base.base")
    proxy = sys.modules.get("django.utils.connection")
    if base is None or proxy is None:
        return None
    # django.db.connection is a proxy that forwards cursor() and vendor to the wrapper.
    kinds = (base.BaseDatabaseWrapper, proxy.ConnectionProxy)
    return connection if isinstance(connection, kinds) else None


def _sync(connection: object) -> SyncExecutor | None:
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None and isinstance(connection, psycopg.Connection):
        return _Cursor(connection, (psycopg.Error, OSError))
    sa = sys.modules.get("sqlalchemy")
    orm = sys.modules.get("sqlalchemy.orm")
    if sa is not None and isinstance(connection, sa.Connection):
        return _SqlAlchemySync(connection)
    if orm is not None and isinstance(connection, orm.Session):
        return _SqlAlchemySync(connection)
    wrapper = _django(connection)
    if wrapper is not None and wrapper.vendor == "postgresql":
        return _Cursor(wrapper, (sys.modules["django.db"].DatabaseError, OSError))
    return None


def sync_executor(connection: object) -> SyncExecutor:
    """The :class:`SyncExecutor` over the caller's synchronous ``connection``.

    :raises ConfigError: for an object none of the supported drivers made (or a Django
        connection to another database than PostgreSQL).
    """
    found = _sync(connection)
    if found is None:
        raise ConfigError(f"connection= takes {SYNC_TYPES}, not {_name(connection)}")
    return found


def _name(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"
