"""Parity with the seed (pglm, a Go LISTEN/NOTIFY manager): its README flow and stress test."""

from __future__ import annotations

import asyncio

import pgbus


async def test_seed_readme_flow(make_bus, channel):
    """Listen, notify, the handler runs within 3 s, unlisten, shut down."""
    got: asyncio.Queue[pgbus.Message] = asyncio.Queue()
    bus = make_bus()
    await bus.start()  # StartListening
    await bus.listen(channel, got.put)  # Listen(channel, handler)
    await bus.notify(channel, "Hello, World!")  # Notify(channel, payload)
    msg = await asyncio.wait_for(got.get(), 3)
    assert (msg.channel, msg.payload) == (channel, "Hello, World!")
    await bus.unlisten(channel)  # Unlisten(channel)
    assert bus.channels == ()
    await bus.stop()  # Shutdown()
    assert bus.state is pgbus.BusState.STOPPED


async def test_seed_stress_100_channels(make_bus, channel):
    """100 channels each with a handler, 100 notifies: all 100 are received."""
    received: dict[str, str] = {}
    all_in = asyncio.Event()
    bus = make_bus()

    def handler_for(name: str):
        async def handler(msg: pgbus.Message) -> None:
            received[name] = msg.payload
            if len(received) == 100:
                all_in.set()

        return handler

    names = [f"{channel}_{i}" for i in range(100)]
    for name in names:
        bus.subscribe(name)(handler_for(name))
    async with bus:
        assert len(bus.channels) == 100
        for i, name in enumerate(names):
            await bus.notify(name, f"message {i}")
        await asyncio.wait_for(all_in.wait(), 10)
    assert received == {name: f"message {i}" for i, name in enumerate(names)}


async def test_100_buses_all_receive_one_broadcast(pg_cluster, channel):
    """100 Bus instances, each with its own LISTEN connection, all get one broadcast."""
    Broadcast = type(
        "Broadcast", (pgbus.Event,), {"__annotations__": {"text": str}}, channel=channel
    )
    inboxes = [asyncio.Queue() for _ in range(100)]
    buses = []
    for inbox in inboxes:
        bus = pgbus.Bus(pg_cluster.dsn, load_entrypoints=False)
        bus.subscribe(Broadcast)(inbox.put)
        buses.append(bus)
    publisher = pgbus.Bus(pg_cluster.dsn, load_entrypoints=False)
    try:
        await asyncio.gather(*(bus.start() for bus in buses))
        pids = {bus.listener_pid for bus in buses}
        assert len(pids) == 100  # one LISTEN connection each
        await publisher.publish(Broadcast(text="to everyone"))
        got = await asyncio.wait_for(asyncio.gather(*(q.get() for q in inboxes)), 10)
    finally:
        await asyncio.gather(*(bus.stop() for bus in [*buses, publisher]))
    assert got == [Broadcast(text="to everyone")] * 100
