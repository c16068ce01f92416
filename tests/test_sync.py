"""pgbus.sync.publish: no event loop, the caller's sync transaction, the async path's envelope."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from typing import TYPE_CHECKING

import psycopg
import pytest
from _helpers import Collector, event_on
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

import pgbus
import pgbus.sync

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

SYNC_DRIVERS = ("psycopg", "sqlalchemy-connection", "sqlalchemy-session")


class SyncTx:
    """A sync driver's connection: ``target`` for ``connection=``, its own block and statements."""

    def __init__(self, name: str, target: object) -> None:
        self.name = name
        self.target: object = target

    def run(self, sql: str) -> None:
        t = self.target
        if isinstance(t, Session):
            t.execute(text(sql))
        elif isinstance(t, psycopg.Connection):
            t.execute(sql)  # type: ignore[arg-type]
        else:
            t.exec_driver_sql(sql)  # type: ignore[attr-defined]

    def block(self) -> object:
        t = self.target
        return t.transaction() if isinstance(t, psycopg.Connection) else t.begin()  # type: ignore[attr-defined]

    def rollback(self) -> None:
        self.target.rollback()  # type: ignore[attr-defined]


@pytest.fixture(params=SYNC_DRIVERS)
def stx(request, pg_dsn) -> Iterator[SyncTx]:
    name = request.param
    if name == "psycopg":
        with psycopg.connect(pg_dsn) as conn:
            yield SyncTx(name, conn)
        return
    engine = create_engine(make_url(pg_dsn).set(drivername="postgresql+psycopg"))
    try:
        if name == "sqlalchemy-session":
            with Session(engine) as session:
                yield SyncTx(name, session)
        else:
            with engine.connect() as conn:
                yield SyncTx(name, conn)
    finally:
        engine.dispose()


class BlockError(Exception):
    """Raised inside the caller's block by a test."""


def fail_in_block(stx: SyncTx, body: Callable[[], object]) -> None:
    with stx.block():  # type: ignore[attr-defined]
        body()
        raise BlockError


async def test_commit_delivers_to_async_subscribers(make_bus, stx, channel, pg_conn):
    """Events published in a committed sync transaction reach an async bus, with the rows."""
    Ping = event_on(channel)
    seen, raw = Collector(), Collector()
    bus = make_bus()
    bus.subscribe(Ping)(seen)
    bus.subscribe(channel)(raw)
    await pg_conn.execute(f"CREATE TABLE t_{channel} (n int)")
    async with bus:
        with stx.block():  # type: ignore[attr-defined]
            stx.run(f"INSERT INTO t_{channel} VALUES (1)")
            first = pgbus.sync.publish(Ping(n=1), connection=stx.target, headers={"k": "v"})
            ids = pgbus.sync.publish_many([Ping(n=2), Ping(n=3)], connection=stx.target)
            stx.run(f"INSERT INTO t_{channel} VALUES (2)")
        await seen.wait_for(3)
        await raw.wait_for(3)
    assert [e.n for e in seen.items] == [1, 2, 3]
    envelopes = [json.loads(m.payload) for m in raw.items]
    assert [e["id"] for e in envelopes] == [first, *ids]
    # the caller's headers travel; installed plugins may add their own (a traceparent)
    assert envelopes[0]["headers"]["k"] == "v"
    assert await pg_conn.fetchval(f"SELECT count(*) FROM t_{channel}") == 2
    await pg_conn.execute(f"DROP TABLE t_{channel}")


async def test_rollback_and_exception_deliver_nothing(make_bus, stx, channel):
    """Sync publishes in a rolled-back transaction, or a block that raised, never arrive."""
    Ping = event_on(channel)
    seen = Collector()
    bus = make_bus()
    bus.subscribe(Ping)(seen)
    async with bus:
        pgbus.sync.publish(Ping(n=1), connection=stx.target)  # begins, as any statement
        stx.rollback()
        with pytest.raises(BlockError):
            fail_in_block(stx, lambda: pgbus.sync.publish(Ping(n=2), connection=stx.target))
        await bus.publish(Ping(n=3))
        await seen.wait_for(1)
    assert [e.n for e in seen.items] == [3]


def test_size_and_connection_are_checked_before_sending(pg_dsn, channel):
    """An oversized event raises PayloadTooLarge; a connection of no sync driver ConfigError."""
    Big = type("Big", (pgbus.Event,), {"__annotations__": {"s": str}}, channel=channel)
    with psycopg.connect(pg_dsn) as conn:
        with pytest.raises(pgbus.PayloadTooLarge):
            pgbus.sync.publish(Big(s="x" * 9000), connection=conn)
        assert pgbus.sync.publish_many([], connection=conn) == []
    with pytest.raises(pgbus.ConfigError, match="a psycopg Connection, a SQLAlchemy"):
        pgbus.sync.publish(Big(s=""), connection=object())


async def test_an_async_connection_is_pointed_to_the_async_api(pg_dsn, channel):
    """A sync publish given an async connection says to use bus.publish instead."""
    Ping = event_on(channel)
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        with pytest.raises(pgbus.ConfigError, match="a psycopg Connection"):
            pgbus.sync.publish(Ping(n=1), connection=conn)


DJANGO_TEST = """
import json, os, sys
from urllib.parse import urlsplit

import django
from django.conf import settings

dsn = urlsplit(os.environ["PGBUS_DSN"])
settings.configure(
    DATABASES={"default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": dsn.path.lstrip("/") or "postgres",
        "USER": dsn.username or "postgres",
        "PASSWORD": dsn.password or "",
        "HOST": dsn.hostname,
        "PORT": dsn.port or 5432,
        "TEST": {"NAME": os.environ["TEST_DB"]},
    }},
    INSTALLED_APPS=[],
)
django.setup()

import psycopg
from django.db import connection, transaction
from django.test import TransactionTestCase
from django.test.utils import get_runner

import pgbus
import pgbus.sync


class Ping(pgbus.Event, channel="django_sync"):
    n: int


class SyncPublishTest(TransactionTestCase):
    def listen(self):
        conn = psycopg.connect(
            dbname=connection.settings_dict["NAME"], user=connection.settings_dict["USER"],
            host=connection.settings_dict["HOST"], port=connection.settings_dict["PORT"],
            password=connection.settings_dict["PASSWORD"], autocommit=True,
        )
        conn.execute("LISTEN django_sync")
        self.addCleanup(conn.close)
        return conn

    def test_commit_delivers_rollback_does_not(self):
        listener = self.listen()
        with self.assertRaises(ZeroDivisionError):
            with transaction.atomic():
                pgbus.sync.publish(Ping(n=1), connection=connection)
                1 / 0
        with transaction.atomic():
            sent = pgbus.sync.publish(Ping(n=2), connection=connection)
            self.assertTrue(connection.in_atomic_block)
        got = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
        self.assertEqual([json.loads(p)["id"] for p in got], [sent])
        self.assertEqual(list(listener.notifies(timeout=0.2)), [])  # n=1 never came


runner = get_runner(settings)(verbosity=1)
sys.exit(runner.run_tests(["__main__"]))
"""


def test_django_connection_publishes_in_its_transaction(pg_dsn, tmp_path):
    """django.db.connection: atomic() commits deliver, a raising atomic() block does not."""
    script = tmp_path / "django_sync.py"
    script.write_text(textwrap.dedent(DJANGO_TEST))
    env = {**os.environ, "PGBUS_DSN": pg_dsn, "TEST_DB": f"test_pgbus_{uuid.uuid4().hex[:10]}"}
    result = subprocess.run(
        [sys.executable, str(script)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Ran 1 test" in result.stderr
