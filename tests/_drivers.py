"""The caller's transactions of every async driver pgbus joins, behind one test interface.

``ASYNC_DRIVERS`` names each; ``open_driver(name, dsn)`` yields a :class:`Tx` whose
``block()`` is the driver's own transaction block (commits on exit, rolls back when the
block raises), ``begin()``/``rollback()`` a transaction ended by hand, ``run(sql)`` a
statement of the caller's, and ``target`` what the caller passes as ``connection=``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import asyncpg
import psycopg
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

ASYNC_DRIVERS = (
    "asyncpg",
    "sqlalchemy-asyncpg-connection",
    "sqlalchemy-asyncpg-session",
    "sqlalchemy-psycopg-connection",
    "sqlalchemy-psycopg-session",
    "psycopg",
)


class BlockError(Exception):
    """What a test raises inside the caller's transaction block."""


class Tx:
    """One open connection (or session) of a driver, for one test."""

    def __init__(self, name: str, handle: Any) -> None:
        self.name = name
        self.target = handle

    async def run(self, sql: str) -> None:
        h = self.target
        if isinstance(h, AsyncSession):
            await h.execute(text(sql))
        elif self.name.startswith("sqlalchemy"):
            await h.exec_driver_sql(sql)
        else:
            await h.execute(sql)

    async def in_transaction(self) -> bool:
        h = self.target
        if isinstance(h, asyncpg.Connection):
            return h.is_in_transaction()
        if isinstance(h, psycopg.AsyncConnection):
            return h.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        return bool(h.in_transaction())

    async def begin(self) -> None:
        h = self.target
        if isinstance(h, asyncpg.Connection):
            self._tx = h.transaction()
            await self._tx.start()
        elif self.name.startswith("sqlalchemy"):
            await h.begin()
        # psycopg (autocommit off) begins with the first statement, like any DB-API driver

    async def rollback(self) -> None:
        if isinstance(self.target, asyncpg.Connection):
            await self._tx.rollback()
        else:
            await self.target.rollback()

    def block(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """The driver's own transaction block."""
        h = self.target
        if isinstance(h, asyncpg.Connection | psycopg.AsyncConnection):
            return h.transaction()
        return h.begin()

    async def fail_in_block(self, body: Callable[[], Awaitable[object]]) -> None:
        """Run ``body`` in the driver's own block, then raise :class:`BlockError` in it."""
        async with self.block():
            await body()
            raise BlockError


@contextlib.asynccontextmanager
async def open_driver(name: str, dsn: str) -> AsyncIterator[Tx]:
    """A fresh connection of driver ``name`` to ``dsn``, closed afterwards."""
    if name == "asyncpg":
        conn = await asyncpg.connect(dsn)
        try:
            yield Tx(name, conn)
        finally:
            await conn.close()
    elif name == "psycopg":
        async with await psycopg.AsyncConnection.connect(dsn) as pconn:
            yield Tx(name, pconn)
    else:
        _, dialect, kind = name.split("-")
        engine = create_async_engine(make_url(dsn).set(drivername=f"postgresql+{dialect}"))
        try:
            if kind == "session":
                async with AsyncSession(engine) as session:
                    yield Tx(name, session)
            else:
                async with engine.connect() as sconn:
                    yield Tx(name, sconn)
        finally:
            await engine.dispose()
