"""pgbus metrics for Prometheus, through ``prometheus-client``.

A custom collector reads ``bus.metrics.snapshot()`` (the built-in ``metrics`` plugin's
counters and histograms) each time Prometheus scrapes, so the hot path pays nothing
more than the built-in counters. It exports, with the ``pgbus_`` prefix:

=====================================  =========  ================================
metric                                 type       labels
=====================================  =========  ================================
``published_total``                    counter    ``channel``
``received_total``                     counter    ``channel``
``decoded_total``                      counter    ``channel``
``decode_failures_total``              counter    ``channel``
``channel_dead_letters_total``         counter    ``channel``
``subscription_received_total``        counter    ``subscription``
``handled_total``                      counter    ``subscription``
``handler_failures_total``             counter    ``subscription`` (failed attempts)
``retries_total``                      counter    ``subscription``
``subscription_dead_letters_total``    counter    ``subscription``
``dropped_total``                      counter    ``subscription``
``nacked_total``                       counter    ``subscription`` (``pgbus.Nack``)
``rejected_total``                     counter    ``subscription`` (``pgbus.Reject``)
``subscription_pending``               gauge      ``subscription``
``subscription_running``               gauge      ``subscription``
``subscription_delayed``               gauge      ``subscription`` (retries waiting)
``handler_duration_seconds``           histogram  ``subscription`` (per attempt)
``lag_seconds``                        histogram  ``subscription`` (publish to receive)
``connects_total``                     counter
``disconnects_total``                  counter
``reconnects_total``                   counter
``notification_queue_usage``           gauge      (when sampled)
``scheduled``                          gauge      (durable: published for later,
                                                  not yet due)
=====================================  =========  ================================

``scheduled`` is one of the gauges plugins report to the metrics plugin
(``bus.metrics.gauge(name, value)``); each becomes ``pgbus_<name>``, the largest value
of the buses (they count the same database tables).

Label values are bounded: past ``max_label_values`` distinct channels (or
subscriptions) per collector, new ones are added up under the value ``__other__``, so a
process that notifies on per-user channels cannot blow up the time-series count.

Use it from its entry point (installed = registered on every bus, into
``prometheus_client.REGISTRY``; ``PGBUS_PROMETHEUS_PORT`` also serves ``/metrics``) or in
code: ``pgbus.Bus(dsn, plugins=[PrometheusPlugin(port=9464)])`` or
``PrometheusPlugin(registry=my_registry)`` to add pgbus to a registry you already serve.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any, Final

import prometheus_client
from prometheus_client import utils as _prometheus_utils
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

import pgbus
from pgbus import hookimpl

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from wsgiref.simple_server import WSGIServer

    from prometheus_client.registry import CollectorRegistry

#: How the exposition format writes a bucket bound (``prometheus_client``'s own helper).
_go_string: Callable[[float], str] = _prometheus_utils.floatToGoString

__all__ = ["PgbusCollector", "PrometheusPlugin", "collector_for", "plugin"]

logger = logging.getLogger(__name__)

#: The label value that stands for every channel or subscription past the bound.
OTHER: Final = "__other__"
#: Seconds a scrape waits for ``pg_notification_queue_usage()`` before it goes on.
QUEUE_USAGE_TIMEOUT: Final = 1.0
#: Distinct channels (and, separately, subscriptions) a collector labels by default.
DEFAULT_MAX_LABEL_VALUES: Final = 100

# (snapshot field, metric name, help) per channel and per subscription; fields missing
# from the snapshot of the pgbus version at hand are skipped.
_CHANNEL_COUNTERS: Final = (
    ("published", "published", "Events and raw payloads published."),
    ("received", "received", "Notifications received by the listener."),
    ("decoded", "decoded", "Notifications decoded."),
    ("decode_failures", "decode_failures", "Notifications that could not be decoded."),
    ("dead_lettered", "channel_dead_letters", "Dead letters (decode failures and give-ups)."),
)
_SUBSCRIPTION_COUNTERS: Final = (
    ("received", "subscription_received", "Deliveries a handler started on."),
    ("handled", "handled", "Deliveries handled successfully."),
    ("failed", "handler_failures", "Handler attempts that raised."),
    ("retried", "retries", "Handler attempts followed by a retry."),
    ("dead_lettered", "subscription_dead_letters", "Deliveries given up on."),
    ("dropped", "dropped", "Deliveries dropped by the overflow policy."),
    ("nacked", "nacked", "Handler attempts that raised pgbus.Nack."),
    ("rejected", "rejected", "Deliveries whose handler raised pgbus.Reject."),
)
_SUBSCRIPTION_GAUGES: Final = (
    ("pending", "subscription_pending", "Deliveries waiting in the queue."),
    ("running", "subscription_running", "Deliveries being handled."),
    ("delayed", "subscription_delayed", "Deliveries waiting out a nack's delay."),
)
_SUBSCRIPTION_HISTOGRAMS: Final = (
    ("duration", "handler_duration_seconds", "Handler duration per attempt."),
    ("lag", "lag_seconds", "Receive time minus publish time."),
)
#: The help text of the gauges plugins report that pgbus knows of.
_GAUGE_HELP: Final = {
    "scheduled": "Events published for later (durable delayed delivery), not yet due.",
}
_BUS_COUNTERS: Final = (
    ("connects", "connects", "LISTEN connections established."),
    ("disconnects", "disconnects", "LISTEN connections lost."),
    ("reconnects", "reconnects", "LISTEN connections established after the first."),
)


class _Bounded:
    """Admits the first ``limit`` label values it sees; later ones become ``__other__``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.admitted: set[str] = set()
        self.lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self.admitted:
            return value
        with self.lock:
            if len(self.admitted) < self.limit:
                self.admitted.add(value)
                return value
        return OTHER


class _Hist:
    """A histogram added up over label values and buses."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...], counts: Iterable[int], total: float) -> None:
        self.bounds = bounds
        self.counts = list(counts)
        self.sum = total

    def add(self, other: Any) -> None:
        if tuple(other.bounds) != self.bounds:  # pragma: no cover - one pgbus, one set of bounds
            return
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.sum += other.sum

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            out.append((_go_string(bound), running))
        out.append(("+Inf", sum(self.counts)))
        return out


class PgbusCollector(Collector):
    """A Prometheus collector over the metrics snapshots of one or more buses.

    Buses are held weakly; their counters are added up. Each scrape calls
    ``bus.metrics.snapshot()`` once per bus. For a bus added with its event loop, a
    scrape from another thread (the HTTP server's) first samples
    ``pg_notification_queue_usage()`` on that loop, waiting at most
    :data:`QUEUE_USAGE_TIMEOUT` seconds; a scrape on the loop itself uses the last sample.

    :param max_label_values: how many distinct channels, and how many distinct
        subscriptions, get their own label value; the rest are added up as ``__other__``.
    :param namespace: the metric name prefix.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self, *, max_label_values: int = DEFAULT_MAX_LABEL_VALUES, namespace: str = "pgbus"
    ) -> None:
        if max_label_values < 1:
            raise pgbus.ConfigError(f"max_label_values must be 1 or more, not {max_label_values}")
        self.namespace = namespace
        self._buses: weakref.WeakSet[pgbus.Bus] = weakref.WeakSet()
        self._loops: weakref.WeakKeyDictionary[pgbus.Bus, asyncio.AbstractEventLoop] = (
            weakref.WeakKeyDictionary()
        )
        self._channels = _Bounded(max_label_values)
        self._subscriptions = _Bounded(max_label_values)

    def add(self, bus: pgbus.Bus, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Include ``bus`` in what is collected.

        :param bus: a bus with the built-in ``metrics`` plugin.
        :param loop: the loop the bus runs on, to sample the notification queue's usage
            at each scrape; ``None`` exports only samples taken by someone else.
        """
        self._buses.add(bus)
        if loop is not None:
            self._loops[bus] = loop

    def remove(self, bus: pgbus.Bus) -> None:
        """Stop including ``bus``.

        :param bus: a bus added before (others are ignored).
        """
        self._buses.discard(bus)
        self._loops.pop(bus, None)

    @property
    def buses(self) -> list[pgbus.Bus]:
        """The buses collected, alive and not removed."""
        return list(self._buses)

    def _name(self, name: str) -> str:
        return f"{self.namespace}_{name}" if self.namespace else name

    def describe(self) -> list[Metric]:
        """The metric families this collector yields (for the registry's name checks).

        :returns: families without samples.
        """
        families: list[Metric] = []
        for _, name, doc in _CHANNEL_COUNTERS:
            families.append(CounterMetricFamily(self._name(name), doc, labels=["channel"]))
        for _, name, doc in _SUBSCRIPTION_COUNTERS:
            families.append(CounterMetricFamily(self._name(name), doc, labels=["subscription"]))
        for _, name, doc in _SUBSCRIPTION_GAUGES:
            families.append(GaugeMetricFamily(self._name(name), doc, labels=["subscription"]))
        for _, name, doc in _SUBSCRIPTION_HISTOGRAMS:
            families.append(HistogramMetricFamily(self._name(name), doc, labels=["subscription"]))
        families.extend(CounterMetricFamily(self._name(n), d) for _, n, d in _BUS_COUNTERS)
        families.append(
            GaugeMetricFamily(
                self._name("notification_queue_usage"),
                "Last sample of pg_notification_queue_usage() (0 to 1).",
            )
        )
        return families

    def _sample_queue_usage(self, bus: pgbus.Bus) -> None:
        loop = self._loops.get(bus)
        if loop is None or loop.is_closed():
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # a thread without a loop: safe to wait for the bus's
            pass
        else:  # waiting here would block a loop (maybe the bus's own): use the last sample
            return
        future = asyncio.run_coroutine_threadsafe(bus.metrics.sample_queue_usage(), loop)
        try:
            future.result(QUEUE_USAGE_TIMEOUT)
        except Exception as exc:  # a scrape must not fail for this
            future.cancel()
            logger.debug("pgbus-prometheus: could not sample the queue usage: %r", exc)

    def _snapshots(self) -> list[Any]:
        snapshots = []
        for bus in self.buses:
            try:
                self._sample_queue_usage(bus)
                snapshots.append(bus.metrics.snapshot())
            except pgbus.ConfigError:  # the metrics plugin is disabled on that bus
                continue
        return snapshots

    def collect(self) -> Iterator[Metric]:
        """Read every bus's snapshot and yield the metric families.

        :returns: an iterator of families, each with its samples.
        """
        snapshots = self._snapshots()
        per_channel: dict[str, dict[str, float]] = {f: {} for f, _, _ in _CHANNEL_COUNTERS}
        per_sub: dict[str, dict[str, float]] = {
            f: {} for f, _, _ in (*_SUBSCRIPTION_COUNTERS, *_SUBSCRIPTION_GAUGES)
        }
        hists: dict[str, dict[str, _Hist]] = {f: {} for f, _, _ in _SUBSCRIPTION_HISTOGRAMS}
        totals: dict[str, float] = {f: 0 for f, _, _ in _BUS_COUNTERS}
        usage: float | None = None
        gauges: dict[str, float] = {}
        for snap in snapshots:
            for name, value in (getattr(snap, "gauges", None) or {}).items():
                gauges[name] = max(value, gauges.get(name, value))
            _add_up(getattr(snap, "channels", {}), self._channels, per_channel)
            subs = getattr(snap, "subscriptions", {})
            _add_up(subs, self._subscriptions, per_sub)
            for name, stats in subs.items():
                label = self._subscriptions(name)
                for field, by_label in hists.items():
                    hist = getattr(stats, field, None)
                    if hist is None:
                        continue
                    if label in by_label:
                        by_label[label].add(hist)
                    else:
                        by_label[label] = _Hist(tuple(hist.bounds), hist.counts, hist.sum)
            for field in totals:
                totals[field] += getattr(snap, field, 0) or 0
            sampled = getattr(snap, "queue_usage", None)
            if sampled is not None:
                usage = sampled if usage is None else max(usage, sampled)
        yield from self._families(per_channel, per_sub, hists, totals, usage)
        for name, value in sorted(gauges.items()):
            yield GaugeMetricFamily(
                self._name(name), _GAUGE_HELP.get(name, "A pgbus gauge."), value=value
            )

    def _families(
        self,
        per_channel: dict[str, dict[str, float]],
        per_sub: dict[str, dict[str, float]],
        hists: dict[str, dict[str, _Hist]],
        totals: dict[str, float],
        usage: float | None,
    ) -> Iterator[Metric]:
        kinds = (
            (_CHANNEL_COUNTERS, CounterMetricFamily, "channel", per_channel),
            (_SUBSCRIPTION_COUNTERS, CounterMetricFamily, "subscription", per_sub),
            (_SUBSCRIPTION_GAUGES, GaugeMetricFamily, "subscription", per_sub),
        )
        for specs, family_type, label_name, values in kinds:
            for field, name, doc in specs:
                family = family_type(self._name(name), doc, labels=[label_name])
                for label, value in sorted(values[field].items()):
                    family.add_metric([label], value)
                yield family
        for field, name, doc in _SUBSCRIPTION_HISTOGRAMS:
            histogram = HistogramMetricFamily(self._name(name), doc, labels=["subscription"])
            for label, hist in sorted(hists[field].items()):
                histogram.add_metric([label], hist.buckets(), hist.sum)
            yield histogram
        for field, name, doc in _BUS_COUNTERS:
            yield CounterMetricFamily(self._name(name), doc, value=totals[field])
        if usage is not None:
            yield GaugeMetricFamily(
                self._name("notification_queue_usage"),
                "Last sample of pg_notification_queue_usage() (0 to 1).",
                value=usage,
            )


def _add_up(
    stats_by_name: dict[str, Any], bound: _Bounded, into: dict[str, dict[str, float]]
) -> None:
    for name, stats in stats_by_name.items():
        label = bound(name)
        for field, by_label in into.items():
            value = getattr(stats, field, None)
            if value is not None:
                by_label[label] = by_label.get(label, 0) + value


_collectors: weakref.WeakKeyDictionary[CollectorRegistry, PgbusCollector] = (
    weakref.WeakKeyDictionary()
)
_collectors_lock = threading.Lock()


def collector_for(
    registry: CollectorRegistry | None = None,
    *,
    max_label_values: int = DEFAULT_MAX_LABEL_VALUES,
) -> PgbusCollector:
    """Return the pgbus collector of ``registry``, registering one the first time.

    Every plugin and bus that exports into one registry shares its collector, so two
    buses in one process never register the same metric names twice.

    :param registry: a ``prometheus_client`` registry (default: the global ``REGISTRY``).
    :param max_label_values: the label bound, used when the collector is created.
    :returns: the collector.

    .. versionadded:: 0.1.0
    """
    registry = prometheus_client.REGISTRY if registry is None else registry
    with _collectors_lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = PgbusCollector(max_label_values=max_label_values)
            registry.register(collector)
            _collectors[registry] = collector
    return collector


def _env_int(name: str) -> int | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise pgbus.ConfigError(f"{name} must be an integer, not {text!r}") from None


class PrometheusPlugin:
    """Export a bus's metrics to Prometheus, optionally serving ``/metrics`` on a port.

    :param registry: the ``prometheus_client`` registry to add pgbus's collector to
        (default: the global ``REGISTRY``).
    :param port: serve the registry over HTTP on this port while a bus with the plugin
        runs (``0`` picks a free port, see :attr:`server_address`). Default:
        ``PGBUS_PROMETHEUS_PORT``, else no server.
    :param addr: the address to bind (default: ``PGBUS_PROMETHEUS_ADDR``, else
        ``0.0.0.0``, as ``prometheus_client`` does).
    :param max_label_values: the label bound (default:
        ``PGBUS_PROMETHEUS_MAX_LABEL_VALUES``, else 100).
    :param sample_queue_usage: at each scrape from another thread (as the HTTP server
        does), sample ``pg_notification_queue_usage()`` with one query on the bus's pool.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        port: int | None = None,
        addr: str | None = None,
        max_label_values: int | None = None,
        sample_queue_usage: bool = True,
    ) -> None:
        self.registry = registry
        self.sample_queue_usage = sample_queue_usage
        self._explicit = (port, addr, max_label_values)
        self.port = port
        self.addr = addr or "0.0.0.0"  # noqa: S104 - prometheus_client's default; set addr
        self.max_label_values = max_label_values or DEFAULT_MAX_LABEL_VALUES
        self._running: weakref.WeakSet[pgbus.Bus] = weakref.WeakSet()
        self._server: tuple[WSGIServer, threading.Thread] | None = None
        self._collector: PgbusCollector | None = None

    def _read_env(self) -> None:
        port, addr, max_label_values = self._explicit
        self.port = port if port is not None else _env_int("PGBUS_PROMETHEUS_PORT")
        self.addr = addr or os.environ.get("PGBUS_PROMETHEUS_ADDR") or "0.0.0.0"  # noqa: S104
        self.max_label_values = (
            max_label_values
            or _env_int("PGBUS_PROMETHEUS_MAX_LABEL_VALUES")
            or DEFAULT_MAX_LABEL_VALUES
        )

    @property
    def collector(self) -> PgbusCollector:
        """The collector of :attr:`registry` this plugin adds its buses to."""
        if self._collector is None:
            self._collector = collector_for(self.registry, max_label_values=self.max_label_values)
        return self._collector

    @property
    def server_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the ``/metrics`` server while it runs, else ``None``."""
        if self._server is None:
            return None
        host, port = self._server[0].server_address[:2]
        return str(host), int(port)

    @hookimpl
    def pgbus_configure(self, bus: pgbus.Bus) -> None:
        """Read the environment; replace an entry-point twin with this instance."""
        self._read_env()
        if self is plugin:
            return
        for name, other, origin, _hooks in bus.plugins.list():
            if (
                other is not self
                and origin == "entry point"
                and isinstance(other, PrometheusPlugin)
            ):
                bus.plugins.unregister(name)
                logger.info("pgbus-prometheus: the plugin passed in code replaces %r", name)

    @hookimpl
    def pgbus_on_start(self, bus: pgbus.Bus) -> None:
        """Add the bus to the collector; start the HTTP server if a port is set."""
        loop = asyncio.get_running_loop() if self.sample_queue_usage else None
        self.collector.add(bus, loop)
        self._running.add(bus)
        if self.port is not None and self._server is None:
            self._server = prometheus_client.start_http_server(
                self.port, addr=self.addr, registry=self.registry or prometheus_client.REGISTRY
            )
            logger.info("pgbus-prometheus: serving /metrics on %s:%d", *self.server_address or ())

    @hookimpl
    async def pgbus_on_stop(self, bus: pgbus.Bus) -> None:
        """Remove the bus; stop the HTTP server when no bus with this plugin runs."""
        self.collector.remove(bus)
        self._running.discard(bus)
        if not self._running:
            await self.close()

    async def close(self) -> None:
        """Stop the HTTP server, if it runs (buses stopping do it for you)."""
        server, self._server = self._server, None
        if server is not None:
            httpd, thread = server
            await asyncio.to_thread(httpd.shutdown)
            httpd.server_close()
            await asyncio.to_thread(thread.join, 5.0)


#: The instance the ``pgbus`` entry point registers (configured from the environment).
plugin = PrometheusPlugin()
