"""The relay to Kafka, against real PostgreSQL and a real Kafka broker (KRaft).

The broker is one on 127.0.0.1:9092 if it answers, else one started from Apache
Kafka's own artifacts (``kafka_server.py``: fetched through Maven, cached); the fault
tests start their own, so that they can kill it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from typing import TYPE_CHECKING, Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from pgbus_relay import Relay
from relay_helpers import TIMEOUT, dead_letters, free_port, order_type, wait_for_status

try:
    from kafka_server import running_kafka, start_kafka
except ImportError:  # kafka_server.py (how the tests get and start Kafka) is a file of its own
    pytest.skip("tests/kafka_server.py is not there", allow_module_level=True)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator
    from pathlib import Path

    from aiokafka.structs import ConsumerRecord

    import pgbus


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Kafka bootstrap address: 127.0.0.1:9092 if a broker answers, else one of our own."""
    found = running_kafka()
    if found is not None:
        yield found
        return
    server = start_kafka(tmp_path_factory.mktemp("kafka"))
    try:
        yield server.bootstrap
    finally:
        server.stop()


@pytest.fixture
def topic() -> str:
    """A topic name no other test uses."""
    return f"relay-t-{uuid.uuid4().hex[:10]}"


class TopicReader:
    """Every record of a topic, from the beginning, as it arrives."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
        )
        self.records: list[ConsumerRecord[bytes, bytes]] = []
        self._started = False

    async def take(self, count: int, timeout: float = TIMEOUT) -> list[ConsumerRecord[Any, Any]]:
        """Wait until ``count`` records came (in all), and return them all."""
        if not self._started:
            await self.consumer.start()
            self._started = True

        async def fill() -> None:
            while len(self.records) < count:
                batches = await self.consumer.getmany(timeout_ms=1000)
                for records in batches.values():
                    self.records.extend(records)

        await asyncio.wait_for(fill(), timeout)
        return self.records

    async def close(self) -> None:
        if self._started:
            await self.consumer.stop()


@pytest.fixture
async def reader(kafka: str, topic: str) -> AsyncIterator[TopicReader]:
    """A reader of ``topic`` on the shared broker."""
    found = TopicReader(kafka, topic)
    try:
        yield found
    finally:
        await found.close()


def headers_of(record: ConsumerRecord[Any, Any]) -> dict[str, str]:
    return {name: value.decode() for name, value in record.headers}


async def test_records_carry_the_key_the_event_id_and_the_type(
    durable_bus: Callable[..., pgbus.Bus],
    kafka: str,
    topic: str,
    reader: TopicReader,
    pgbus_channel: str,
) -> None:
    """Each event is one record: data as value, --key field as key, id and type as headers."""
    order = order_type(pgbus_channel)
    bus = durable_bus()
    relay = Relay(bus, to=f"kafka://{kafka}", channels=[pgbus_channel], topic=topic, key="order_id")
    events = [order(order_id=n % 3, seq=n) for n in range(60)]
    async with bus:
        await bus.publish_many(events, headers={"tenant": "acme"})
        records = await reader.take(60)
    assert relay.relayed == 60
    first = records[0]
    headers = headers_of(first)
    body = json.loads(first.value)
    assert first.key == str(body["order_id"]).encode()
    assert headers["pgbus-type"] == "OrderPlaced"
    assert headers["pgbus-channel"] == pgbus_channel
    assert headers["tenant"] == "acme"
    assert len({headers_of(r)["pgbus-id"] for r in records}) == 60
    seqs: dict[int, list[int]] = {}
    for record in records:
        body = json.loads(record.value)
        seqs.setdefault(body["order_id"], []).append(body["seq"])
    for key, got in seqs.items():
        assert got == sorted(got), key


async def test_a_record_larger_than_the_topic_takes_is_dead_lettered_with_kafkas_error(
    durable_bus: Callable[..., pgbus.Bus],
    pgbus_dsn: str,
    schema: str,
    kafka: str,
    topic: str,
    reader: TopicReader,
    pgbus_channel: str,
) -> None:
    """The broker's MESSAGE_TOO_LARGE dead-letters the event; the ones behind it go on."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        config = {"max.message.bytes": "4096"}
        await admin.create_topics([NewTopic(topic, 1, 1, topic_configs=config)])
    finally:
        await admin.close()
    order = order_type(pgbus_channel)
    bus = durable_bus()
    Relay(bus, to=f"kafka://{kafka}", channels=[pgbus_channel], topic=topic, key="order_id")
    async with bus:
        await bus.publish(order(order_id=1, seq=1))
        poison = await bus.publish(order(order_id=1, seq=2, note="x" * 20_000))
        await bus.publish(order(order_id=1, seq=3))
        records = await reader.take(2)
    assert [json.loads(r.value)["seq"] for r in records] == [1, 3]
    rows = await dead_letters(pgbus_dsn, schema)
    assert [r["event_id"] for r in rows] == [poison]
    assert "MessageSizeTooLarge" in rows[0]["error"]


async def test_kafka_down_at_start_and_killed_in_the_middle_loses_nothing(
    durable_bus: Callable[..., pgbus.Bus],
    pgbus_dsn: str,
    schema: str,
    topic: str,
    pgbus_channel: str,
    tmp_path: Path,
) -> None:
    """The relay waits for a broker not started yet, and for one killed mid-stream."""
    port = free_port()
    order = order_type(pgbus_channel)
    bus = durable_bus()
    to = f"kafka://127.0.0.1:{port}?timeout=5"
    Relay(bus, to=to, channels=[pgbus_channel], topic=topic)
    server = None
    try:
        async with bus:
            first = [await bus.publish(order(order_id=n)) for n in range(20)]
            await wait_for_status(pgbus_dsn, schema, lambda row: row.failing and row.lag == 20)
            server = await asyncio.to_thread(start_kafka, tmp_path / "kafka", port)
            reader = TopicReader(server.bootstrap, topic)
            try:
                await reader.take(20)
                await asyncio.to_thread(server.kill)
                second = [await bus.publish(order(order_id=n)) for n in range(20, 40)]
                await wait_for_status(pgbus_dsn, schema, lambda row: row.failing)
                await asyncio.to_thread(server.start)
                await wait_for_status(
                    pgbus_dsn, schema, lambda row: not row.failing and not row.lag
                )
                records = await reader.take(40)
            finally:
                await reader.close()
    finally:
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(server.stop)
    got = {headers_of(r)["pgbus-id"] for r in records}
    assert got == set(first + second)  # at least once: every event, maybe some twice
