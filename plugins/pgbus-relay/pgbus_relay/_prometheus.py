"""Prometheus metrics of relays: what ``pgbus relay status`` shows, as gauges and counters.

Register a :class:`RelayCollector` in a ``prometheus_client`` registry; each scrape
reads the status the relays keep (refreshed every ``status_interval`` seconds while
their bus runs) and their counters, without a database round trip.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from collections.abc import Iterator

    from prometheus_client import Metric

    from pgbus_relay._relay import Relay


class RelayCollector(Collector):
    """The metrics of ``relays``, channel by channel.

    ::

        prometheus_client.REGISTRY.register(RelayCollector(relay))

    * ``pgbus_relay_lag_events``: events journaled and not yet acknowledged by the broker;
    * ``pgbus_relay_behind_seconds``: the age of the oldest of them (0 without lag);
    * ``pgbus_relay_failing``: 1 while the broker fails the relay, else 0;
    * ``pgbus_relay_relayed_total`` and ``pgbus_relay_dead_lettered_total``: events this
      process sent, and dead-lettered because the broker refused them.

    :param relays: the relays to export.

    .. versionadded:: 0.1.0
    """

    def __init__(self, *relays: Relay) -> None:
        self.relays = relays

    def collect(self) -> Iterator[Metric]:
        """One metric family per figure, labelled by relay and channel."""
        labels = ["relay", "channel"]
        lag = GaugeMetricFamily(
            "pgbus_relay_lag_events", "Events not yet acknowledged by the broker.", labels=labels
        )
        behind = GaugeMetricFamily(
            "pgbus_relay_behind_seconds", "Age of the oldest event not yet relayed.", labels=labels
        )
        failing = GaugeMetricFamily(
            "pgbus_relay_failing", "1 while the broker fails the relay.", labels=labels
        )
        relayed = CounterMetricFamily(
            "pgbus_relay_relayed", "Events the broker acknowledged.", labels=["relay"]
        )
        dead = CounterMetricFamily(
            "pgbus_relay_dead_lettered", "Events the broker refused.", labels=["relay"]
        )
        for relay in self.relays:
            for row in relay.last_status:
                values = [row.relay, row.channel]
                lag.add_metric(values, row.lag)
                behind.add_metric(values, row.behind or 0.0)
                failing.add_metric(values, 1.0 if row.failing else 0.0)
            relayed.add_metric([relay.name], relay.relayed)
            dead.add_metric([relay.name], relay.dead_lettered)
        yield from (lag, behind, failing, relayed, dead)
