"""pgbus-prometheus against a real PostgreSQL: scrape /metrics over HTTP and parse it."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from pgbus_prometheus import OTHER, PrometheusPlugin, collector_for
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import pgbus

TIMEOUT = 10.0


class Handled:
    """Counts handled deliveries, as a plugin (called after the metrics are updated)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[pgbus.Delivery] = asyncio.Queue()

    @pgbus.hookimpl
    def pgbus_on_handled(self, delivery) -> None:
        self.queue.put_nowait(delivery)

    async def take(self, n: int) -> None:
        for _ in range(n):
            await asyncio.wait_for(self.queue.get(), TIMEOUT)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:  # noqa: S310 - our own http URL
        assert response.status == 200
        return response.read().decode()


def model(channel: str) -> type[pgbus.Event]:
    class Tick(pgbus.Event, channel=channel):
        n: int

    return Tick


async def test_metrics_are_served_over_http_and_parse(pg_dsn, channel):
    """/metrics on 127.0.0.1 shows per-channel and per-subscription counters and histograms."""
    tick = model(channel)
    handled = Handled()
    exporter = PrometheusPlugin(registry=CollectorRegistry(), port=0, addr="127.0.0.1")
    bus = pgbus.Bus(pg_dsn, load_entrypoints=False, plugins=[exporter, handled])

    @bus.subscribe(tick, name="ticker")
    async def on_tick(event: pgbus.Event) -> None:
        pass

    async with bus:
        for n in range(3):
            await bus.publish(tick(n=n))
        await bus.notify(channel, "not json")
        await handled.take(3)
        assert exporter.server_address is not None
        host, port = exporter.server_address
        text = await asyncio.to_thread(scrape, f"http://{host}:{port}/metrics")
    got = samples(text)
    ch = (("channel", channel),)
    sub = (("subscription", "ticker"),)
    assert got["pgbus_published_total", ch] == 4
    assert got["pgbus_received_total", ch] == 4
    assert got["pgbus_decoded_total", ch] == 3
    assert got["pgbus_decode_failures_total", ch] == 1
    assert got["pgbus_channel_dead_letters_total", ch] == 1
    assert got["pgbus_handled_total", sub] == 3
    assert got["pgbus_subscription_received_total", sub] == 3
    assert got["pgbus_handler_failures_total", sub] == 0
    assert got["pgbus_handler_duration_seconds_count", sub] == 3
    assert got["pgbus_handler_duration_seconds_bucket", (("le", "+Inf"), *sub)] == 3
    assert got["pgbus_lag_seconds_count", sub] == 3
    assert got["pgbus_lag_seconds_sum", sub] >= 0
    assert got["pgbus_connects_total", ()] == 1
    assert got["pgbus_subscription_pending", sub] == 0
    assert 0 <= got["pgbus_notification_queue_usage", ()] < 1


async def test_the_server_stops_with_the_bus(pg_dsn, channel):
    """Once the last bus with the plugin stops, its port no longer answers."""
    exporter = PrometheusPlugin(registry=CollectorRegistry(), port=0, addr="127.0.0.1")
    bus = pgbus.Bus(pg_dsn, load_entrypoints=False, plugins=[exporter])
    bus.subscribe(channel)(lambda _: None)
    async with bus:
        assert exporter.server_address is not None
        url = "http://{}:{}/metrics".format(*exporter.server_address)
        assert "pgbus_connects_total 1.0" in await asyncio.to_thread(scrape, url)
    assert exporter.server_address is None
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(scrape, url)


async def test_the_collector_joins_an_existing_registry_and_adds_buses_up(pg_dsn, channel):
    """Two buses exporting into one registry share one collector; their counters add up."""
    registry = CollectorRegistry()
    first = pgbus.Bus(pg_dsn, load_entrypoints=False, plugins=[PrometheusPlugin(registry=registry)])
    second = pgbus.Bus(
        pg_dsn, load_entrypoints=False, plugins=[PrometheusPlugin(registry=registry)]
    )
    for bus in (first, second):
        bus.subscribe(channel)(lambda _: None)
    async with first, second:
        await first.notify(channel, "a")
        await second.notify(channel, "b")
        await second.notify(channel, "c")
        got = samples(generate_latest(registry).decode())
        assert collector_for(registry).buses != []
        assert ("pgbus_notification_queue_usage", ()) not in got  # not sampled on the loop
    assert got["pgbus_published_total", (("channel", channel),)] == 3
    assert got["pgbus_connects_total", ()] == 2
    assert collector_for(registry).buses == []


class Outcomes:
    """Sets ``nacked`` at a retry and ``dead`` at a dead letter."""

    def __init__(self) -> None:
        self.nacked = asyncio.Event()
        self.dead = asyncio.Event()

    @pgbus.hookimpl
    def pgbus_on_retry(self) -> None:
        self.nacked.set()

    @pgbus.hookimpl
    def pgbus_on_dead_letter(self) -> None:
        self.dead.set()


async def test_nacks_rejects_retries_waiting_and_plugin_gauges_are_exported(pg_dsn, channel):
    """Nacks and rejects are counters, retries waiting a gauge, and a plugin's gauge (the
    durable plugin's `scheduled`) becomes `pgbus_<name>`, the largest of the buses."""
    tick = model(channel)
    outcomes = Outcomes()
    registry = CollectorRegistry()
    buses = [
        pgbus.Bus(pg_dsn, load_entrypoints=False, plugins=[PrometheusPlugin(registry=registry)])
        for _ in range(2)
    ]
    buses[0].plugins.register(outcomes)

    @buses[0].subscribe(tick, name="outcomes")
    async def decide(event: pgbus.Event) -> None:
        if event.n == 1:  # type: ignore[attr-defined]
            raise pgbus.Nack(delay=60)
        raise pgbus.Reject("never")

    async with buses[0], buses[1]:
        await buses[0].publish_many([tick(n=1), tick(n=2)])
        await asyncio.wait_for(outcomes.nacked.wait(), TIMEOUT)
        await asyncio.wait_for(outcomes.dead.wait(), TIMEOUT)
        buses[0].metrics.gauge("scheduled", 2)
        buses[1].metrics.gauge("scheduled", 3)
        got = samples(generate_latest(registry).decode())
    sub = (("subscription", "outcomes"),)
    assert got["pgbus_nacked_total", sub] == 1
    assert got["pgbus_rejected_total", sub] == 1
    assert got["pgbus_subscription_delayed", sub] == 1
    assert got["pgbus_scheduled", ()] == 3


async def test_label_values_are_bounded(pg_dsn):
    """Past max_label_values channels, the rest are added up under __other__."""
    registry = CollectorRegistry()
    plugin = PrometheusPlugin(registry=registry, max_label_values=2)
    bus = pgbus.Bus(pg_dsn, load_entrypoints=False, plugins=[plugin])
    names = [f"card_{n}" for n in range(5)]
    async with bus:
        for name in names:
            await bus.notify(name, "x")
        got = samples(generate_latest(registry).decode())
        again = samples(generate_latest(registry).decode())
    published = {
        dict(labels)["channel"]: value
        for (name, labels), value in got.items()
        if name == "pgbus_published_total"
    }
    assert published == {"card_0": 1, "card_1": 1, OTHER: 3}
    assert got == again


async def test_the_environment_configures_the_port(pg_dsn, channel, monkeypatch):
    """PGBUS_PROMETHEUS_PORT and _ADDR make a plugin built without arguments serve /metrics."""
    monkeypatch.setenv("PGBUS_PROMETHEUS_PORT", "0")
    monkeypatch.setenv("PGBUS_PROMETHEUS_ADDR", "127.0.0.1")
    exporter = PrometheusPlugin(registry=CollectorRegistry())
    bus = pgbus.Bus(pg_dsn, load_entrypoints=False, plugins=[exporter])
    bus.subscribe(channel)(lambda _: None)
    async with bus:
        address = exporter.server_address
    assert address is not None
    assert address[0] == "127.0.0.1"


def test_bad_configuration_is_refused(monkeypatch):
    """A non-integer PGBUS_PROMETHEUS_PORT and a zero label bound are refused."""
    monkeypatch.setenv("PGBUS_PROMETHEUS_PORT", "ninety")
    with pytest.raises(pgbus.ConfigError, match="PGBUS_PROMETHEUS_PORT"):
        pgbus.Bus("postgresql://u@h/db", load_entrypoints=False, plugins=[PrometheusPlugin()])
    with pytest.raises(pgbus.ConfigError, match="max_label_values"):
        collector_for(CollectorRegistry(), max_label_values=0)


def _installed() -> bool:
    return bool(importlib.metadata.entry_points(group="pgbus", name="prometheus"))


@pytest.mark.skipif(
    not _installed() and not os.environ.get("CI"),
    reason="needs `pip install ./plugins/pgbus-prometheus` (CI installs it)",
)
def test_the_entry_point_is_listed_and_replaced_by_an_explicit_instance(pg_dsn, monkeypatch):
    """pip-installed, it loads from the entry point; one passed in code takes its place."""
    monkeypatch.delenv("PGBUS_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("PGBUS_PROMETHEUS_PORT", raising=False)
    listed = subprocess.run(
        [sys.executable, "-m", "pgbus", "plugins", "--json"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["prometheus"]["source"] == "entry point"
    assert rows["prometheus"]["distribution"].startswith("pgbus-prometheus")
    explicit = PrometheusPlugin(registry=CollectorRegistry())
    bus = pgbus.Bus(pg_dsn, plugins=[explicit])
    found = [p for _, p, _, _ in bus.plugins.list() if isinstance(p, PrometheusPlugin)]
    assert found == [explicit]
