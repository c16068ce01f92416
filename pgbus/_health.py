"""The health endpoints of ``pgbus run --health``: ``/livez``, ``/readyz``, ``/metrics``.

A few lines of HTTP/1.0 on :func:`asyncio.start_server` (no web framework): probes and
a Prometheus scraper send one ``GET`` per connection.

- ``/livez``: 200 while the process serves its event loop.
- ``/readyz``: 200 when :attr:`pgbus.Bus.ready` (listening and dispatching), else 503.
- ``/metrics``: the built-in metrics plugin's counters in the Prometheus text format.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from pgbus.errors import ConfigError

if TYPE_CHECKING:
    from pgbus._bus import Bus
    from pgbus.default_plugins.metrics import MetricsSnapshot

logger = logging.getLogger(__name__)

#: The Prometheus text exposition format's content type.
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"

#: ``(metric, type, help, field)`` of each subscription's statistics.
_SUBSCRIPTION_METRICS = (
    ("handled_total", "counter", "Deliveries handled.", "handled"),
    ("failed_attempts_total", "counter", "Handler attempts that failed.", "failed"),
    ("retried_total", "counter", "Attempts followed by a retry.", "retried"),
    ("dead_lettered_total", "counter", "Deliveries given up on.", "dead_lettered"),
    ("dropped_total", "counter", "Deliveries dropped by the overflow policy.", "dropped"),
    ("nacked_total", "counter", "Handler attempts that raised pgbus.Nack.", "nacked"),
    ("rejected_total", "counter", "Deliveries whose handler raised pgbus.Reject.", "rejected"),
    ("handler_seconds_total", "counter", "Seconds spent in handler attempts.", "handler_seconds"),
    ("pending", "gauge", "Deliveries waiting in the queue.", "pending"),
    ("running", "gauge", "Deliveries being handled.", "running"),
    ("delayed", "gauge", "Deliveries waiting out a nack's delay.", "delayed"),
)

#: ``(metric, help, field)`` of each channel's counters.
_CHANNEL_METRICS = (
    ("published_total", "Events and payloads published.", "published"),
    ("received_total", "Notifications received.", "received"),
    ("decode_failures_total", "Notifications that could not be decoded.", "decode_failures"),
)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(bus: Bus) -> str:
    """The bus's readiness, reconnects and (when enabled) metrics, as Prometheus text."""
    lines = [
        "# HELP pgbus_ready Whether the bus is listening and dispatching.",
        "# TYPE pgbus_ready gauge",
        f"pgbus_ready {int(bus.ready)}",
        "# HELP pgbus_reconnects_total LISTEN connections re-established.",
        "# TYPE pgbus_reconnects_total counter",
        f"pgbus_reconnects_total {bus.reconnects}",
    ]
    try:
        snap = bus.metrics.snapshot()
    except ConfigError:  # the metrics plugin is disabled
        return "\n".join(lines) + "\n"
    lines.extend(_snapshot_lines(snap))
    return "\n".join(lines) + "\n"


def _snapshot_lines(snap: MetricsSnapshot) -> list[str]:
    lines = []
    for metric, text, field in _CHANNEL_METRICS:
        name = f"pgbus_channel_{metric}"
        lines += [f"# HELP {name} {text}", f"# TYPE {name} counter"]
        lines += [
            f'{name}{{channel="{_label(channel)}"}} {getattr(stats, field)}'
            for channel, stats in snap.channels.items()
        ]
    for metric, kind, text, field in _SUBSCRIPTION_METRICS:
        name = f"pgbus_subscription_{metric}"
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        lines += [
            f'{name}{{subscription="{_label(sub)}"}} {getattr(stats, field)}'
            for sub, stats in snap.subscriptions.items()
        ]
    return lines


def _response(status: str, body: str, content_type: str = "text/plain; charset=utf-8") -> bytes:
    data = body.encode()
    head = (
        f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + data


def respond(bus: Bus, path: str) -> bytes:
    """The whole HTTP response to ``GET path``."""
    if path == "/livez":
        return _response("200 OK", "ok\n")
    if path == "/readyz":
        if bus.ready:
            return _response("200 OK", "ready\n")
        return _response("503 Service Unavailable", f"not ready: {bus.status.state.value}\n")
    if path == "/metrics":
        return _response("200 OK", prometheus_text(bus), PROMETHEUS_TEXT)
    return _response("404 Not Found", "try /livez, /readyz or /metrics\n")


async def serve_health(bus: Bus, host: str, port: int) -> asyncio.Server:
    """Serve ``bus``'s health endpoints on ``host:port`` (port 0: any free port)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            method, _, rest = request.decode("latin-1").partition(" ")
            path = rest.partition(" ")[0].partition("?")[0]
            if method not in ("GET", "HEAD"):
                writer.write(_response("405 Method Not Allowed", "GET only\n"))
            else:
                writer.write(respond(bus, path))
            await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a probe that hung up or sent no request: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    return await asyncio.start_server(handle, host, port)
