"""The relay to NATS JetStream, against real PostgreSQL and real nats-server processes."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import TYPE_CHECKING

import nats
import pytest
from nats.js.api import StreamConfig
from nats_server import NatsServer, StreamReader
from pgbus_relay import Relay, RelayCollector
from prometheus_client import CollectorRegistry
from relay_helpers import TIMEOUT, dead_letters, order_type, wait_for_status

import pgbus

if TYPE_CHECKING:
    from collections.abc import Callable


async def test_events_reach_jetstream_with_their_id_type_and_headers(
    relay_to_stream: Callable[..., Relay], reader: StreamReader, pgbus_channel: str
) -> None:
    """Each event is one stream message: the data as body, id as Nats-Msg-Id, type in headers."""
    order = order_type(pgbus_channel)
    relay = relay_to_stream()
    bus = relay.bus
    async with bus:
        events = [order(order_id=n) for n in range(3)]
        ids = [await bus.publish(e, headers={"tenant": "acme"}) for e in events]
        messages = await reader.take(3, TIMEOUT)
    assert relay.relayed == 3
    assert sorted(m.headers["Nats-Msg-Id"] for m in messages) == sorted(ids)
    by_id = {m.headers["Nats-Msg-Id"]: m for m in messages}
    first = by_id[ids[0]]
    assert first.subject == pgbus_channel
    assert json.loads(first.data) == {"order_id": 0, "seq": 0, "note": ""}
    assert first.headers["pgbus-id"] == ids[0]
    assert first.headers["pgbus-type"] == "OrderPlaced"
    assert first.headers["pgbus-channel"] == pgbus_channel
    assert first.headers["tenant"] == "acme"
    assert first.headers["content-type"] == "application/json"
    assert float(first.headers["pgbus-published-at"]) > 0


async def test_events_with_the_same_key_keep_their_order(
    relay_to_stream: Callable[..., Relay], reader: StreamReader, pgbus_channel: str
) -> None:
    """With key=, each key's events are stored in publish order, while keys run in parallel."""
    order = order_type(pgbus_channel)
    bus = relay_to_stream(channels=pgbus_channel, key="order_id", concurrency=16).bus
    events = [order(order_id=n % 5, seq=n) for n in range(200)]
    async with bus:
        await bus.publish_many(events)
        messages = await reader.take(200, TIMEOUT)
    seqs: dict[int, list[int]] = {}
    for m in messages:
        body = json.loads(m.data)
        seqs.setdefault(body["order_id"], []).append(body["seq"])
    assert sorted(seqs) == [0, 1, 2, 3, 4]
    for key, got in seqs.items():
        assert got == sorted(got), key


async def test_a_poison_event_is_dead_lettered_with_the_brokers_error_and_the_rest_go_on(
    relay_to_stream: Callable[..., Relay],
    pgbus_dsn: str,
    schema: str,
    reader: StreamReader,
    pgbus_channel: str,
) -> None:
    """An event larger than the stream accepts lands in dead_letters with JetStream's error."""
    config = StreamConfig(name=reader.stream, subjects=[pgbus_channel], max_msg_size=4096)
    await reader.js.add_stream(config)
    order = order_type(pgbus_channel)
    relay = relay_to_stream(key="order_id")
    bus = relay.bus
    async with bus:
        await bus.publish(order(order_id=1, seq=1))
        poison = await bus.publish(order(order_id=1, seq=2, note="x" * 20_000))
        await bus.publish(order(order_id=1, seq=3))
        messages = await reader.take(2, TIMEOUT)
    assert [json.loads(m.data)["seq"] for m in messages] == [1, 3]
    assert relay.dead_lettered == 1
    rows = await dead_letters(pgbus_dsn, schema)
    assert len(rows) == 1
    assert rows[0]["event_id"] == poison
    assert rows[0]["subscription"] == f"relay:{pgbus_channel}"
    assert "maximum" in rows[0]["error"]
    assert "10054" in rows[0]["error"]
    assert await reader.count() == 2


async def test_a_broker_down_at_start_and_in_the_middle_loses_nothing_and_duplicates_nothing(
    durable_bus: Callable[..., pgbus.Bus],
    pgbus_dsn: str,
    schema: str,
    own_nats: NatsServer,
    stream: str,
    pgbus_channel: str,
) -> None:
    """The relay waits (backoff) while NATS is down, shows it in its status, then resumes."""
    order = order_type(pgbus_channel)
    bus = durable_bus()
    relay = Relay(bus, to=f"{own_nats.url}?stream={stream}", channels=[pgbus_channel])
    async with bus:
        first = [await bus.publish(order(order_id=n)) for n in range(20)]
        failing = await wait_for_status(pgbus_dsn, schema, lambda row: row.failing)
        assert failing.lag == 20
        assert failing.behind is not None
        assert "NATS" in (failing.last_error or "")
        own_nats.start()
        nc = await nats.connect(own_nats.url)
        try:
            reader = StreamReader(nc, stream, pgbus_channel)
            await reader.take(20, TIMEOUT)
            own_nats.kill()  # in the middle: the relay has sent, the server dies
            second = [await bus.publish(order(order_id=n)) for n in range(20, 40)]
            await wait_for_status(pgbus_dsn, schema, lambda row: row.failing)
            own_nats.start()
            messages = await reader.take(40, TIMEOUT)
            assert sorted(m.headers["Nats-Msg-Id"] for m in messages) == sorted(first + second)
            assert await reader.count() == 40
        finally:
            await nc.close()
        ok = await wait_for_status(pgbus_dsn, schema, lambda row: not row.failing and not row.lag)
    assert ok.last_error is not None  # the last error stays visible, with its time
    assert relay.relayed == 40


async def test_relays_with_one_name_share_the_work(
    relay_to_stream: Callable[..., Relay], reader: StreamReader, pgbus_channel: str
) -> None:
    """Two relay processes (buses) with one name are one consumer group: each event once."""
    order = order_type(pgbus_channel)
    relays = [relay_to_stream(), relay_to_stream()]
    buses = [relay.bus for relay in relays]
    async with buses[0], buses[1]:
        publisher = buses[0]
        for start in range(0, 600, 100):
            await publisher.publish_many([order(order_id=n) for n in range(start, start + 100)])
        messages = await reader.take(600, TIMEOUT)
    assert len({m.headers["Nats-Msg-Id"] for m in messages}) == 600
    assert sum(r.relayed for r in relays) >= 600
    assert all(r.relayed for r in relays), [r.relayed for r in relays]


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("amqp://127.0.0.1", "the supported brokers are kafka://, nats://"),
        ("nats://127.0.0.1:4222", "?stream=NAME"),
        ("kafka://", "names no host"),
    ],
)
def test_an_unsupported_url_is_refused_before_anything_starts(
    durable_bus: Callable[..., pgbus.Bus], url: str, error: str
) -> None:
    """A URL the relay cannot use is a ConfigError naming what would work."""
    with pytest.raises(pgbus.ConfigError, match=error.replace("?", r"\?")):
        Relay(durable_bus(), to=url, channels=["orders"])


def test_a_topic_template_takes_channel_and_type_only(
    durable_bus: Callable[..., pgbus.Bus], jetstream: str
) -> None:
    """A template field other than {channel} and {type} is refused."""
    with pytest.raises(pgbus.ConfigError, match="tenant"):
        Relay(durable_bus(), to=f"{jetstream}?stream=X", channels=["a"], topic="{tenant}.x")


def test_a_relay_needs_a_durable_bus(pgbus_dsn: str, jetstream: str) -> None:
    """Without the durable plugin there is no journal to relay."""
    bus = pgbus.Bus(pgbus_dsn, load_entrypoints=False)
    with pytest.raises(pgbus.ConfigError, match="durable"):
        Relay(bus, to=f"{jetstream}?stream=X", channels=[f"c_{uuid.uuid4().hex[:8]}"])


async def test_prometheus_exports_the_lag_and_the_counters(
    durable_bus: Callable[..., pgbus.Bus],
    own_nats: NatsServer,
    stream: str,
    pgbus_channel: str,
) -> None:
    """RelayCollector exports lag, seconds behind and failing per channel, and the counters."""
    registry = CollectorRegistry()
    order = order_type(pgbus_channel)
    bus = durable_bus()
    relay = Relay(
        bus, to=f"{own_nats.url}?stream={stream}", channels=[pgbus_channel], status_interval=0.1
    )
    registry.register(RelayCollector(relay))
    labels = {"relay": "relay", "channel": pgbus_channel}
    async with bus:
        await bus.publish_many([order(order_id=n) for n in range(5)])
        await _until(lambda: registry.get_sample_value("pgbus_relay_failing", labels) == 1)
        assert registry.get_sample_value("pgbus_relay_lag_events", labels) == 5
        assert (registry.get_sample_value("pgbus_relay_behind_seconds", labels) or 0) > 0
        own_nats.start()
        await _until(lambda: registry.get_sample_value("pgbus_relay_lag_events", labels) == 0)
    assert registry.get_sample_value("pgbus_relay_relayed_total", {"relay": "relay"}) == 5
    assert registry.get_sample_value("pgbus_relay_dead_lettered_total", {"relay": "relay"}) == 0


async def _until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Wait until ``condition()`` holds (the collector's status is refreshed every 0.1 s)."""

    async def look() -> None:
        while True:
            if condition():
                return
            await asyncio.sleep(0.05)

    await asyncio.wait_for(look(), timeout)
