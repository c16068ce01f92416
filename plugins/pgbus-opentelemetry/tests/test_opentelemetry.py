"""pgbus-opentelemetry against a real PostgreSQL, with the SDK's in-memory exporters."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, Sampler
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode
from pgbus_opentelemetry import OpenTelemetryPlugin

import pgbus

TIMEOUT = 10.0
PUBLISHER = Path(__file__).with_name("publisher.py")
PLUGIN_DIR = Path(__file__).parents[1]


class Observed:
    """Queues handled and failed deliveries, as a plugin (after the middleware ran)."""

    def __init__(self) -> None:
        self.handled: asyncio.Queue[pgbus.Delivery] = asyncio.Queue()
        self.failed: asyncio.Queue[BaseException] = asyncio.Queue()
        self.undecodable: asyncio.Queue[pgbus.Message] = asyncio.Queue()

    @pgbus.hookimpl
    def pgbus_on_handled(self, delivery) -> None:
        self.handled.put_nowait(delivery)

    @pgbus.hookimpl
    def pgbus_on_handler_error(self, error) -> None:
        self.failed.put_nowait(error)

    @pgbus.hookimpl
    def pgbus_on_decode_error(self, message) -> None:
        self.undecodable.put_nowait(message)


class NamesSampled(Sampler):
    """The SDK's default sampler, noting the name of every span it is asked about."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.inner = ParentBased(ALWAYS_ON)

    def should_sample(self, parent_context, trace_id, name, *args, **kwargs):
        self.names.append(name)
        return self.inner.should_sample(parent_context, trace_id, name, *args, **kwargs)

    def get_description(self) -> str:
        return "NamesSampled"


@pytest.fixture
def tracing():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def order_model(channel: str) -> type[pgbus.Event]:
    class Order(pgbus.Event, channel=channel):
        n: int

    return Order


async def test_one_trace_spans_the_publishing_and_the_handling_process(pg_dsn, channel, tracing):
    """A publish in another process and both handlings here are one trace, parent to children."""
    provider, exporter = tracing
    order = order_model(channel)
    observed = Observed()
    bus = pgbus.Bus(
        pg_dsn,
        load_entrypoints=False,
        plugins=[OpenTelemetryPlugin(tracer_provider=provider), observed],
    )
    bus.subscribe(order, name="fulfil")(lambda _: None)
    bus.subscribe(order, name="email")(lambda _: None)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGIN_DIR), *sys.path])}
    async with bus:
        publisher = await asyncio.create_subprocess_exec(
            sys.executable,
            str(PUBLISHER),
            pg_dsn,
            channel,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        out, err = await asyncio.wait_for(publisher.communicate(), 60)
        assert publisher.returncode == 0, err.decode()
        deliveries = [await asyncio.wait_for(observed.handled.get(), TIMEOUT) for _ in range(2)]
    published = {span["name"]: span for span in json.loads(out)}
    checkout, send = published["checkout"], published[f"send {channel}"]
    assert send["kind"] == "PRODUCER"
    assert send["trace_id"] == checkout["trace_id"]
    assert send["parent_id"] == checkout["span_id"]
    assert send["attributes"]["messaging.destination.name"] == channel
    assert all("traceparent" in d.headers for d in deliveries)
    handled = exporter.get_finished_spans()
    assert sorted(s.attributes["messaging.consumer.group.name"] for s in handled) == [
        "email",
        "fulfil",
    ]
    for span in handled:
        assert span.name == f"process {channel}"
        assert span.kind is SpanKind.CONSUMER
        assert span.context.trace_id == send["trace_id"]
        assert span.parent is not None
        assert span.parent.span_id == send["span_id"]
        assert span.parent.is_remote
        assert span.attributes["messaging.message.id"] == send["attributes"]["messaging.message.id"]


async def test_each_attempt_is_a_span_that_records_its_exception(pg_dsn, channel, tracing):
    """A retried handling is one span per attempt; a failed attempt records its exception."""
    provider, exporter = tracing
    order = order_model(channel)
    observed = Observed()
    bus = pgbus.Bus(
        pg_dsn,
        load_entrypoints=False,
        plugins=[OpenTelemetryPlugin(tracer_provider=provider), observed],
    )
    calls = {"flaky": 0}

    @bus.subscribe(order, name="flaky", retry=pgbus.Retry(attempts=2, backoff=0.001))
    async def flaky(_event: pgbus.Event) -> None:
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise ConnectionError("first attempt fails")

    @bus.subscribe(order, name="broken", retry=pgbus.Retry(attempts=1))
    async def broken(_event: pgbus.Event) -> None:
        raise ValueError("always")

    async with bus:
        await bus.publish(order(n=1))
        await asyncio.wait_for(observed.handled.get(), TIMEOUT)
        error = await asyncio.wait_for(observed.failed.get(), TIMEOUT)
    assert isinstance(error, ValueError)
    spans = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.CONSUMER]
    by_attempt = {
        (s.attributes["messaging.consumer.group.name"], s.attributes["pgbus.attempt"]): s
        for s in spans
    }
    assert sorted(by_attempt) == [("broken", 1), ("flaky", 1), ("flaky", 2)]
    first, second = by_attempt["flaky", 1], by_attempt["flaky", 2]
    assert first.status.status_code is StatusCode.ERROR
    assert [e.attributes["exception.type"] for e in first.events] == ["ConnectionError"]
    assert second.status.status_code is StatusCode.UNSET
    assert second.events == ()
    assert first.parent is not None
    assert second.parent is not None
    assert first.parent.span_id == second.parent.span_id
    failed = by_attempt["broken", 1]
    assert failed.status.status_code is StatusCode.ERROR
    assert [e.attributes["exception.type"] for e in failed.events] == ["ValueError"]


async def test_link_mode_starts_a_new_trace_linked_to_the_publish(pg_dsn, channel, tracing):
    """With consumer_parent="link", a handling is a new trace with a link to the publish span."""
    provider, exporter = tracing
    order = order_model(channel)
    observed = Observed()
    bus = pgbus.Bus(
        pg_dsn,
        load_entrypoints=False,
        plugins=[OpenTelemetryPlugin(tracer_provider=provider, consumer_parent="link"), observed],
    )
    bus.subscribe(order)(lambda _: None)
    async with bus:
        await bus.publish(order(n=1))
        await asyncio.wait_for(observed.handled.get(), TIMEOUT)
    spans = {s.kind: s for s in exporter.get_finished_spans()}
    send, process = spans[SpanKind.PRODUCER], spans[SpanKind.CONSUMER]
    assert process.parent is None
    assert process.context.trace_id != send.context.trace_id
    assert [link.context.span_id for link in process.links] == [send.context.span_id]


def _points(reader: InMemoryMetricReader) -> dict[str, list]:
    data = reader.get_metrics_data()
    assert data is not None
    return {
        metric.name: list(metric.data.data_points)
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }


async def test_metrics_are_observed_from_the_core_metrics_at_collection(pg_dsn, channel):
    """Counters and histogram buckets are read from bus.metrics when the SDK collects."""
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    order = order_model(channel)
    observed = Observed()
    bus = pgbus.Bus(
        pg_dsn,
        load_entrypoints=False,
        plugins=[OpenTelemetryPlugin(meter_provider=meters), observed],
    )
    bus.subscribe(order, name="count")(lambda _: None)
    async with bus:
        await bus.publish(order(n=1))
        await bus.publish(order(n=2))
        await bus.notify(channel, "not json")
        for _ in range(2):
            await asyncio.wait_for(observed.handled.get(), TIMEOUT)
        await asyncio.wait_for(observed.undecodable.get(), TIMEOUT)
        points = _points(reader)
    meters.shutdown()
    sent = points["messaging.client.sent.messages"]
    assert [(p.attributes["messaging.destination.name"], p.value) for p in sent] == [(channel, 3)]
    assert sum(p.value for p in points["messaging.client.consumed.messages"]) == 3
    assert sum(p.value for p in points["pgbus.decode_failures"]) == 1
    assert sum(p.value for p in points["pgbus.dead_letters"]) == 1
    assert [p.value for p in points["pgbus.handled"]] == [2]
    (count,) = points["messaging.process.duration.count"]
    assert count.value == 2
    assert count.attributes["messaging.consumer.group.name"] == "count"
    buckets = {p.attributes["le"]: p.value for p in points["messaging.process.duration.bucket"]}
    assert buckets[math.inf] == 2
    assert sorted(buckets.values()) == list(buckets.values())  # cumulative, by bound
    assert sum(p.value for p in points["pgbus.lag.count"]) == 2
    assert sum(p.value for p in points["pgbus.listener.connects"]) == 1


async def test_an_unsampled_event_makes_no_span_and_its_handler_spans_stay_unsampled(
    pg_dsn, channel
):
    """An envelope whose traceparent is unsampled gets no consumer span, nor do spans inside."""
    sampler = NamesSampled()
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    order = order_model(channel)
    observed = Observed()
    bus = pgbus.Bus(
        pg_dsn,
        load_entrypoints=False,
        plugins=[OpenTelemetryPlugin(tracer_provider=provider), observed],
    )
    inner: list[bool] = []

    @bus.subscribe(order)
    async def handle(_event: pgbus.Event) -> None:
        with provider.get_tracer("app").start_as_current_span("query") as span:
            inner.append(span.is_recording())

    unsampled = NonRecordingSpan(SpanContext(0x4BF92F35, 0xF067AA0B, is_remote=True))
    async with bus:
        with trace.use_span(unsampled):  # the publisher's trace is not sampled
            await bus.publish(order(n=1))
        delivery = await asyncio.wait_for(observed.handled.get(), TIMEOUT)
    assert delivery.headers["traceparent"].endswith("-00")
    assert inner == [False]
    assert exporter.get_finished_spans() == ()
    assert sampler.names == [f"send {channel}", "query"]  # no span was begun for the handling


async def test_without_an_sdk_nothing_is_added_to_the_envelope(pg_dsn, channel):
    """With the API's no-op default providers, envelopes carry no trace headers."""
    order = order_model(channel)
    observed = Observed()
    bus = pgbus.Bus(pg_dsn, load_entrypoints=False, plugins=[OpenTelemetryPlugin(), observed])
    bus.subscribe(order)(lambda _: None)
    async with bus:
        await bus.publish(order(n=1), headers={"tenant": "a"})
        delivery = await asyncio.wait_for(observed.handled.get(), TIMEOUT)
    assert dict(delivery.headers) == {"tenant": "a"}


def test_a_bad_consumer_parent_is_refused():
    """consumer_parent takes "child" or "link"."""
    with pytest.raises(pgbus.ConfigError, match="consumer_parent"):
        OpenTelemetryPlugin(consumer_parent="sibling")  # type: ignore[arg-type]


def _installed() -> bool:
    return bool(importlib.metadata.entry_points(group="pgbus", name="opentelemetry"))


@pytest.mark.skipif(
    not _installed() and not os.environ.get("CI"),
    reason="needs `pip install ./plugins/pgbus-opentelemetry` (CI installs it)",
)
def test_the_entry_point_is_listed_and_replaced_by_an_explicit_instance(pg_dsn, monkeypatch):
    """pip-installed, it loads from the entry point; one passed in code takes its place."""
    monkeypatch.delenv("PGBUS_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    listed = subprocess.run(
        [sys.executable, "-m", "pgbus", "plugins", "--json"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["opentelemetry"]["source"] == "entry point"
    assert rows["opentelemetry"]["distribution"].startswith("pgbus-opentelemetry")
    explicit = OpenTelemetryPlugin()
    bus = pgbus.Bus(pg_dsn, plugins=[explicit])
    found = [p for _, p, _, _ in bus.plugins.list() if isinstance(p, OpenTelemetryPlugin)]
    assert found == [explicit]


async def test_one_plugin_on_several_buses_sums_their_core_metrics(pg_dsn, channel):
    """Two buses sharing the plugin report their sum; a bus without core metrics adds nothing."""
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    shared = OpenTelemetryPlugin(meter_provider=meters)
    order = order_model(channel)
    buses = [
        pgbus.Bus(pg_dsn, load_entrypoints=False, plugins=[shared]),
        pgbus.Bus(pg_dsn, load_entrypoints=False, plugins=[shared]),
        pgbus.Bus(pg_dsn, load_entrypoints=False, plugins=[shared], disable_plugins=["metrics"]),
    ]
    async with buses[0], buses[1], buses[2]:
        for bus in buses:
            await bus.publish(order(n=1))
        points = _points(reader)
    meters.shutdown()
    sent = points["messaging.client.sent.messages"]
    assert [(p.attributes["messaging.destination.name"], p.value) for p in sent] == [(channel, 2)]
