"""Fixtures of the durable tests: a fresh, migrated schema per test, and durable buses."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest

import pgbus
from pgbus.durable import DurablePlugin, MemoryDurablePlugin, migrate

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable


@pytest.fixture
def schema_name() -> str:
    """A schema name no other test uses."""
    return f"pgbus_t_{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def schema(pg_dsn: str, schema_name: str, bus_kind: str) -> AsyncIterator[str]:
    """A migrated durable schema, dropped after the test (none for a memory:// bus)."""
    if bus_kind == "memory":
        yield schema_name
        return
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, schema_name)
        yield schema_name
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema_name}" CASCADE')
        await conn.close()


@pytest.fixture
def spawn(schema: str, spawn: Any) -> Any:
    """The root ``spawn``, set up after the test schema: its processes are killed before
    the schema is dropped (one still in a statement on it made the drop deadlock)."""
    return spawn


@pytest.fixture
async def durable_bus(
    bus_dsn: str, bus_kind: str, schema: str
) -> AsyncIterator[Callable[..., pgbus.Bus]]:
    """Build durable buses on the test schema; all are stopped at teardown.

    ``durable_bus(dsn=None, plugin=dict(...), **bus_options)``. The safety-net poll is
    off (60 s) unless asked for, so tests exercise NOTIFY and resync wake-ups. In a
    ``both_buses`` test, also on one ``memory://`` broker per test, with
    :class:`~pgbus.durable.MemoryDurablePlugin` (its journal shared by those buses).
    """
    buses: list[pgbus.Bus] = []
    memory = bus_kind == "memory"

    def make(
        dsn: str | None = None, plugin: dict[str, Any] | None = None, **options: Any
    ) -> pgbus.Bus:
        settings: dict[str, Any] = {"poll_interval": 60.0, "prune_interval": None}
        settings.update(plugin or {})
        options.setdefault("load_entrypoints", False)
        options.setdefault("stop_timeout", 5.0)
        if memory:
            del settings["prune_interval"]  # nothing to prune in memory
            durable: DurablePlugin = MemoryDurablePlugin(**settings)
        else:
            durable = DurablePlugin(schema, **settings)
        bus = pgbus.Bus(dsn or bus_dsn, plugins=[durable], **options)
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        await bus.stop()


@pytest.fixture
def sql(pg_conn: asyncpg.Connection) -> asyncpg.Connection:
    """A plain connection for SQL the test runs itself (the suite's pg_conn)."""
    return pg_conn
