"""The core hooks the durable plugin is built on: publish, start/stop, migrate."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from _helpers import OnlyOdd, ticket_type

import pgbus


async def test_hook_pgbus_publish(make_bus, channel: str):
    """A plugin that returns an awaitable from pgbus_publish sends instead of NOTIFY, any size."""
    ticket = ticket_type(channel)
    taken: list[tuple[list[pgbus.Outgoing], object]] = []

    class Sink:
        @pgbus.hookimpl
        def pgbus_publish(self, bus, outgoing, connection):
            async def send() -> None:
                taken.append((list(outgoing), connection))

            return send()

    class Decline:
        @pgbus.hookimpl
        def pgbus_publish(self, bus, outgoing, connection):
            return None

    bus: pgbus.Bus = make_bus(plugins=[Sink(), Decline()])
    event_id = await bus.publish(ticket(n=1, blob="x" * 10_000))
    ids = await bus.publish_many([ticket(n=2), ticket(n=3)])
    assert [[o.id for o in outs] for outs, _ in taken] == [[event_id], ids]
    assert taken[0][0][0].payload.startswith("{")
    assert taken[0][1] is None
    plain: pgbus.Bus = make_bus(plugins=[Decline()])
    with pytest.raises(pgbus.PayloadTooLarge):
        await plain.publish(ticket(n=1, blob="x" * 10_000))


async def test_hook_pgbus_on_start(make_bus, channel: str):
    """pgbus_on_start runs before the bus connects; raising from it fails start()."""
    calls: list[str] = []

    class Refuse:
        @pgbus.hookimpl
        async def pgbus_on_start(self, bus):
            calls.append(f"start connected={bus.connected}")
            msg = "not today"
            raise RuntimeError(msg)

        @pgbus.hookimpl
        def pgbus_on_stop(self, bus):
            calls.append("stop")

        @pgbus.hookimpl
        def pgbus_on_stopped(self, bus):
            calls.append("stopped")

    bus: pgbus.Bus = make_bus(plugins=[Refuse()])
    bus.subscribe(channel)(lambda message: None)
    with pytest.raises(RuntimeError, match="not today"):
        await bus.start()
    assert bus.state is pgbus.BusState.STOPPED
    assert calls == ["start connected=False", "stop", "stopped"]


async def test_hook_pgbus_on_stop(make_bus, channel: str):
    """pgbus_on_stop runs while stopping, after the listener closed and before handlers drain."""
    ticket = ticket_type(channel)
    release = asyncio.Event()
    started = asyncio.Event()
    seen: list[tuple[str, bool, bool]] = []

    async def slow(event: Any) -> None:
        started.set()
        await release.wait()

    class Watch:
        @pgbus.hookimpl
        async def pgbus_on_stop(self, bus):
            seen.append(("stop", bus.connected, release.is_set()))
            release.set()

    bus: pgbus.Bus = make_bus(plugins=[Watch()])
    bus.subscribe(ticket)(slow)
    async with bus:
        await bus.publish(ticket(n=1))
        await asyncio.wait_for(started.wait(), 5)
    assert seen == [("stop", False, False)]


async def test_hook_pgbus_on_stopped(make_bus, channel: str):
    """pgbus_on_stopped runs once every handler finished, also for a bus that never started."""
    ticket = ticket_type(channel)
    handled: list[int] = []
    seen: list[list[int]] = []
    started = asyncio.Event()

    async def handler(event: Any) -> None:
        started.set()
        await asyncio.sleep(0)
        handled.append(event.n)

    class Watch:
        @pgbus.hookimpl
        def pgbus_on_stopped(self, bus):
            seen.append(list(handled))

    bus: pgbus.Bus = make_bus(plugins=[Watch()])
    bus.subscribe(ticket)(handler)
    async with bus:
        await bus.publish(ticket(n=1))
        await asyncio.wait_for(started.wait(), 5)
    never: pgbus.Bus = make_bus(plugins=[Watch()])
    await never.stop()
    assert seen == [[1], [1]]


async def test_hook_pgbus_migrate(make_bus):
    """bus.migrate() runs every pgbus_migrate implementation; with none it is a ConfigError."""
    ran: list[pgbus.Bus] = []

    class Owner:
        @pgbus.hookimpl
        async def pgbus_migrate(self, bus):
            ran.append(bus)

    bus: pgbus.Bus = make_bus(plugins=[Owner()])
    await bus.migrate()
    assert ran == [bus]
    with pytest.raises(pgbus.ConfigError, match="durable=True"):
        await make_bus().migrate()


@pytest.mark.both_buses
async def test_a_plugins_router_decides_for_durable_subscriptions(durable_bus, channel: str):
    """A replaced pgbus_router routes durable deliveries too, as it does plain ones."""
    ticket = ticket_type(channel)
    got: asyncio.Queue[int] = asyncio.Queue()

    bus: pgbus.Bus = durable_bus(disable_plugins=["routing"])
    bus.plugins.register(OnlyOdd())

    @bus.subscribe(ticket, durable="odd")
    async def odd(event: Any) -> None:
        await got.put(event.n)

    async with bus:
        await bus.publish_many([ticket(n=i) for i in range(6)])
        seen = [await asyncio.wait_for(got.get(), 10) for _ in range(3)]
        await bus.publish(ticket(n=7))
        seen.append(await asyncio.wait_for(got.get(), 10))
    assert seen == [1, 3, 5, 7]
