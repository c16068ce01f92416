"""An opt-in plugin that NOTIFYs a bus's metrics every second, for ``pgbus top``.

A running process registers it::

    bus = pgbus.Bus(dsn, plugins=[pgbus.MetricsPublisher()])

and every ``interval`` seconds it publishes one JSON snapshot on the channel
``pgbus.metrics``; ``pgbus top`` (or anything else that LISTENs there) shows rates, lag
and errors per channel for every bus that publishes. A snapshot (``"v": 1``) is::

    {"v": 1, "bus": "host:pid:id", "host": "...", "pid": 123, "ts": 1732530000.5,
     "interval": 1.0, "connected": true, "reconnects": 0, "scheduled": 0,
     "channels": {"orders": {"published": 10, "received": 10, "handled": 9, "failed": 1,
                             "decode_failures": 0, "nacked": 1, "rejected": 0,
                             "delayed": 1, "lag_avg": 0.0004, "lag_max": 0.001}},
     "subscriptions": {"on_order": {"handled": 9, "failed": 1, "pending": 0, ...}}}

Counters are totals since the bus started (from the built-in metrics plugin, plus the
handled and failed counts per channel); ``nacked``, ``rejected`` and ``delayed`` (retries
waiting) of a channel add up those of the subscriptions on it; ``scheduled`` is the
number of events published for later and not yet due (durable mode, else ``null``);
``lag_avg`` and ``lag_max`` are the seconds from publish to the end of handling over the
last interval (``null`` when nothing was handled). A snapshot that would not fit in a
NOTIFY payload is sent without its ``subscriptions``, with ``"truncated": true``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Any

from pgbus._channels import MAX_PAYLOAD_BYTES, check_channel
from pgbus._markers import hookimpl
from pgbus.errors import ConfigError, PgbusError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pgbus._bus import Bus
    from pgbus._events import Delivery
    from pgbus._subscription import Subscription

logger = logging.getLogger(__name__)

#: The channel metrics snapshots are published on.
METRICS_CHANNEL = "pgbus.metrics"

#: The version of the snapshot format.
SNAPSHOT_VERSION = 1

#: Counters of the subscriptions added up per channel (retries waiting: ``delayed``).
_OUTCOMES = ("nacked", "rejected", "delayed")


def _numbers(stats: object) -> dict[str, Any]:
    """The counters of a metrics dataclass (ints and floats), as a dict."""
    return {
        field.name: value
        for field in dataclasses.fields(stats)  # type: ignore[arg-type]
        if isinstance(value := getattr(stats, field.name), int | float)
    }


class MetricsPublisher:
    """Publish this bus's metrics as JSON on ``pgbus.metrics`` every ``interval`` seconds.

    Opt-in: register an instance with ``Bus(plugins=[MetricsPublisher()])``, then watch
    with ``pgbus top``. One small NOTIFY per interval; the snapshots themselves are not
    counted in the metrics.

    :param interval: seconds between snapshots.
    :param channel: the channel to publish on.
    :raises ConfigError: for an interval that is not positive or a bad channel.

    .. versionadded:: 0.1.0
    """

    def __init__(self, interval: float = 1.0, channel: str = METRICS_CHANNEL) -> None:
        if interval <= 0:
            raise ConfigError(f"interval must be positive, not {interval!r}")
        self.interval = interval
        self.channel = check_channel(channel)
        self.bus_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._handled: Counter[str] = Counter()
        self._failed: Counter[str] = Counter()
        self._lag_sum: dict[str, float] = {}
        self._lag_count: Counter[str] = Counter()
        self._lag_max: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    # -- the hooks -----------------------------------------------------------------------

    @hookimpl
    def pgbus_on_handled(
        self,
        subscription: Subscription,  # noqa: ARG002 - part of the hook's signature
        delivery: Delivery,
        duration: float,  # noqa: ARG002 - part of the hook's signature
    ) -> None:
        """Count a handled delivery and its lag on its channel."""
        channel = delivery.message.channel
        self._handled[channel] += 1
        if delivery.published_at is not None:
            lag = max(0.0, time.time() - delivery.published_at)
            self._lag_sum[channel] = self._lag_sum.get(channel, 0.0) + lag
            self._lag_count[channel] += 1
            if lag > self._lag_max.get(channel, -1.0):
                self._lag_max[channel] = lag

    @hookimpl
    def pgbus_on_handler_error(
        self,
        subscription: Subscription,  # noqa: ARG002 - part of the hook's signature
        delivery: Delivery,
        error: BaseException,  # noqa: ARG002 - part of the hook's signature
    ) -> None:
        """Count a failed delivery on its channel."""
        self._failed[delivery.message.channel] += 1

    @hookimpl
    def pgbus_on_connect(self, bus: Bus, channels: Sequence[str]) -> None:  # noqa: ARG002 - part of the hook's signature
        """Start publishing once the bus is first connected."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(bus), name="pgbus-metrics-publisher"
            )

    # -- snapshots -----------------------------------------------------------------------

    def snapshot(self, bus: Bus) -> dict[str, Any]:
        """The snapshot to publish now; resets the per-interval lag figures.

        :param bus: the bus whose metrics to take.
        :returns: a JSON-ready dict in the format described in the module docstring.
        """
        channels: dict[str, dict[str, Any]] = {}
        subscriptions: dict[str, dict[str, Any]] = {}
        connects = disconnects = 0
        scheduled = None
        metrics = bus.plugins.get("metrics")
        if metrics is not None:
            snap = metrics.snapshot()
            connects, disconnects = snap.connects, snap.disconnects
            scheduled = getattr(snap, "scheduled", None)
            channels = {name: _numbers(stats) for name, stats in snap.channels.items()}
            subscriptions = {name: _numbers(stats) for name, stats in snap.subscriptions.items()}
        for sub in bus.subscriptions:
            entry = subscriptions.setdefault(sub.name, {"handled": 0, "failed": 0})
            entry["pending"] = sub.pending
            entry["delayed"] = sub.delayed
            for name in sub.channels:
                stats = channels.setdefault(
                    name, {"published": 0, "received": 0, "decode_failures": 0}
                )
                for key in _OUTCOMES:
                    stats[key] = stats.get(key, 0) + entry.get(key, 0)
        channels.pop(self.channel, None)
        for name, entry in channels.items():
            count = self._lag_count.get(name, 0)
            entry["handled"] = self._handled.get(name, 0)
            entry["failed"] = self._failed.get(name, 0)
            entry["lag_avg"] = self._lag_sum.get(name, 0.0) / count if count else None
            entry["lag_max"] = self._lag_max.get(name) if count else None
        self._lag_sum.clear()
        self._lag_count.clear()
        self._lag_max.clear()
        return {
            "v": SNAPSHOT_VERSION,
            "bus": self.bus_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "ts": time.time(),
            "interval": self.interval,
            "connected": bus.connected,
            "reconnects": bus.reconnects,
            "connects": connects,
            "disconnects": disconnects,
            "scheduled": scheduled,
            "channels": channels,
            "subscriptions": subscriptions,
        }

    def encode(self, snapshot: dict[str, Any]) -> str | None:
        """The NOTIFY payload for ``snapshot``, shrunk to fit, or ``None`` if it cannot."""
        payload = json.dumps(snapshot, separators=(",", ":"))
        if len(payload.encode()) < MAX_PAYLOAD_BYTES:
            return payload
        payload = json.dumps(
            {**snapshot, "subscriptions": {}, "truncated": True}, separators=(",", ":")
        )
        if len(payload.encode()) < MAX_PAYLOAD_BYTES:
            return payload
        return None

    async def publish(self, bus: Bus) -> None:
        """Publish one snapshot now (the timer calls this every ``interval`` seconds)."""
        payload = self.encode(self.snapshot(bus))
        if payload is None:
            logger.warning("metrics snapshot too large for NOTIFY; skipped")
            return
        await bus.notify(self.channel, payload)

    async def _run(self, bus: Bus) -> None:
        closed = asyncio.ensure_future(bus.wait_closed())
        try:
            while True:
                await asyncio.wait({closed}, timeout=self.interval)
                if closed.done():
                    return
                try:
                    await self.publish(bus)
                except PgbusError as exc:  # stopping, or the database is away: try later
                    logger.debug("metrics snapshot not published: %s", exc)
        finally:
            closed.cancel()
            with contextlib.suppress(asyncio.CancelledError, PgbusError):
                await closed
