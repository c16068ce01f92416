"""Fault 5: handlers that raise, hang, or block the event loop; the listener is unharmed."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import asyncpg
from _faults import Receiver

import pgbus

if TYPE_CHECKING:
    from pgbus.server import TempCluster


class Errors:
    """Collects what pgbus_on_handler_error reports."""

    def __init__(self) -> None:
        self.errors: list[BaseException] = []

    @pgbus.hookimpl
    def pgbus_on_handler_error(
        self,
        subscription: pgbus.Subscription,
        delivery: pgbus.Delivery,
        error: BaseException,
    ) -> None:
        self.errors.append(error)


async def test_a_raising_handler_loses_nothing(cluster: TempCluster, channel: str) -> None:
    """A handler that raises on every event is reported; the other handler gets all events."""
    errors = Errors()
    receiver = Receiver(cluster.dsn, channel, plugins=[errors], disable_plugins=["retry"])

    @receiver.bus.subscribe(channel, name="raises")
    async def raises(_message: pgbus.Message) -> None:
        raise RuntimeError("boom")

    async with receiver.bus:
        for seq in range(100):
            await receiver.bus.notify(channel, str(seq))
        await receiver.bus.notify(channel, "end")
        await receiver.marker("end")
        assert receiver.received == list(range(100))
        assert receiver.bus.reconnects == 0
        assert receiver.bus.ready
    assert len(errors.errors) == 101
    assert all(isinstance(e, RuntimeError) for e in errors.errors)


async def test_a_hanging_handler_does_not_stop_the_others(
    cluster: TempCluster, channel: str
) -> None:
    """A handler that never returns holds only its own queue; the listener keeps receiving."""
    receiver = Receiver(cluster.dsn, channel, stop_timeout=0.2, health_check_interval=0.1)
    hanging = asyncio.Event()

    @receiver.bus.subscribe(channel, name="hangs")
    async def hangs(_message: pgbus.Message) -> None:
        hanging.set()
        await asyncio.Event().wait()

    async with receiver.bus:
        await receiver.bus.notify(channel, "first")
        await asyncio.wait_for(hanging.wait(), 5)
        for seq in range(100):
            await receiver.bus.notify(channel, str(seq))
        await receiver.bus.notify(channel, "end")
        await receiver.marker("end")
        assert receiver.received == list(range(100))
        assert receiver.bus.reconnects == 0
        hangs_sub = next(s for s in receiver.bus.subscriptions if s.name == "hangs")
        assert hangs_sub.pending == 101


async def test_a_handler_blocking_the_loop_for_a_second(cluster: TempCluster, channel: str) -> None:
    """Events that arrive while a handler blocks the loop for 1 s are all received afterwards."""
    receiver = Receiver(cluster.dsn, channel, health_check_interval=0.1, health_check_timeout=3)
    blocked = asyncio.Event()

    @receiver.bus.subscribe(channel, name="blocks")
    async def blocks(message: pgbus.Message) -> None:
        if message.payload == "block":
            blocked.set()
            time.sleep(1.0)  # noqa: ASYNC251 - the fault under test

    publisher = await asyncpg.connect(cluster.dsn)
    try:
        async with receiver.bus:
            # The server sends these while the loop is blocked (pg_sleep, then commit).
            burst = asyncio.create_task(
                publisher.execute(
                    f"""DO $$ BEGIN PERFORM pg_sleep(0.3);
                    PERFORM pg_notify('{channel}', g::text) FROM generate_series(0, 199) g;
                    END $$"""
                )
            )
            await receiver.bus.notify(channel, "block")
            await asyncio.wait_for(blocked.wait(), 5)
            await asyncio.wait_for(burst, 10)
            await receiver.bus.notify(channel, "end")
            await receiver.marker("end")
            assert receiver.received == list(range(200))
            assert receiver.bus.reconnects == 0
    finally:
        await publisher.close()
