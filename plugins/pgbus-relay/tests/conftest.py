"""Fixtures of the relay's tests: real PostgreSQL (pgbus's pytest plugin), real NATS.

A fresh migrated durable schema per test; JetStream from 127.0.0.1:4222 if it answers
with JetStream, else a ``nats-server -js`` of the session's own; fault tests take a
server of their own (``own_nats``) that they may stop and kill.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import TYPE_CHECKING, Any

import asyncpg
import nats
import pytest
from nats_server import NatsServer, StreamReader, running_nats
from pgbus_relay import Relay

import pgbus
from pgbus.durable import DurablePlugin, migrate

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator
    from pathlib import Path

    from nats.aio.client import Client


@pytest.fixture
async def schema(pgbus_dsn: str) -> AsyncIterator[str]:
    """A migrated durable schema no other test uses, dropped after the test."""
    name = f"relay_t_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(pgbus_dsn)
    try:
        await migrate(conn, name)
        yield name
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        await conn.close()


@pytest.fixture
async def durable_bus(pgbus_dsn: str, schema: str) -> AsyncIterator[Callable[..., pgbus.Bus]]:
    """Build durable buses on the test's schema; all are stopped at teardown."""
    buses: list[pgbus.Bus] = []

    def make(**options: Any) -> pgbus.Bus:
        plugin = DurablePlugin(schema, poll_interval=1.0, prune_interval=None)
        options.setdefault("load_entrypoints", False)
        options.setdefault("stop_timeout", 5.0)
        bus = pgbus.Bus(pgbus_dsn, plugins=[plugin], **options)
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        await bus.stop()


@pytest.fixture(scope="session")
def jetstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A NATS URL with JetStream: 127.0.0.1:4222 if it has it, else a server of our own."""
    found = running_nats()
    if found is not None:
        yield found
        return
    server = NatsServer(tmp_path_factory.mktemp("nats")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A NATS server of this test's own (not started: the test starts, stops, kills it)."""
    server = NatsServer(tmp_path)
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def stream() -> str:
    """A JetStream stream name no other test uses."""
    return f"RELAY_{uuid.uuid4().hex[:10].upper()}"


@pytest.fixture
async def nats_client(jetstream: str, stream: str) -> AsyncIterator[Client]:
    """A client of the shared server, for reading what the relay stored; drops ``stream``."""
    nc = await nats.connect(jetstream)
    try:
        yield nc
    finally:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await nc.jetstream().delete_stream(stream)
        await nc.close()


@pytest.fixture
def to_jetstream(jetstream: str, stream: str) -> str:
    """The relay's URL for ``stream`` on the shared server."""
    return f"{jetstream}?stream={stream}"


@pytest.fixture
def relay_to_stream(
    durable_bus: Callable[..., pgbus.Bus], to_jetstream: str, pgbus_channel: str
) -> Callable[..., Relay]:
    """Build a Relay of the test channel to ``stream`` on the shared server, each on a new
    durable bus (``relay.bus``); Relay's other options pass through, ``channels`` too."""

    def make(**options: Any) -> Relay:
        options.setdefault("channels", [pgbus_channel])
        return Relay(durable_bus(), to=to_jetstream, **options)

    return make


@pytest.fixture
def reader(nats_client: Client, stream: str, pgbus_channel: str) -> StreamReader:
    """A reader of the test channel's subject in ``stream``, from its first message."""
    return StreamReader(nats_client, stream, pgbus_channel)
