"""OpenTelemetry for pgbus: traces across processes and metrics as instruments.

Tracing: publishing an event starts a ``PRODUCER`` span (``send <channel>``, a child of
whatever span is current) and puts its context in the envelope's headers with the
configured propagator (W3C ``traceparent``/``tracestate`` by default). Every handling of
that event, in any process, is a ``CONSUMER`` span (``process <channel>``) whose parent
is that context, so one trace shows the publisher and all its consumers. Each handler
attempt is its own span (``pgbus.attempt`` is 1, 2, … when the built-in retry plugin
retries) and records the exception the attempt raised.

An attempt of an event its publisher did not sample (the ``traceparent`` sampled flag is
off) makes no span: the flag is read from the header, which costs well under a
microsecond.

Metrics: observable counters that read the core metrics plugin's counters and histograms
(``bus.metrics.snapshot()``) when the SDK collects, so nothing is recorded per event.
They are named after the OpenTelemetry messaging conventions where they have a name
(``messaging.client.sent.messages``, ``messaging.client.consumed.messages``,
``messaging.process.duration.*``) and ``pgbus.*`` otherwise.

It uses the global tracer and meter providers unless given others, so a process that
configures the OpenTelemetry SDK (or runs under ``opentelemetry-instrument``) gets
pgbus's spans by installing the plugin. Without an SDK the API is a no-op and nothing
is added to the envelopes.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias

from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context, attach, detach
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode

import pgbus
from pgbus import hookimpl

if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Iterable, Sequence

    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.trace import Span
    from opentelemetry.util.types import AttributeValue

    from pgbus.types import CallNext, Encoder, Middleware, Outgoing

__all__ = ["OpenTelemetryPlugin", "plugin"]
__version__ = "0.1.0"

logger = logging.getLogger(__name__)

#: The value of the ``messaging.system`` attribute.
SYSTEM: Final = "pgbus"
#: Seconds a publish span waits for its publish to be confirmed before it is ended as
#: failed (a publish that raised is never confirmed).
PENDING_TIMEOUT: Final = 60.0
#: The length of a version-00 W3C ``traceparent``.
_TRACEPARENT_LENGTH: Final = 55
#: The ids of the unsampled parent that attempts of unsampled events run under.
_UNSAMPLED_TRACE_ID: Final = 0x5067627573_756E73616D706C6564
_UNSAMPLED_SPAN_ID: Final = 0x756E73616D706C65


class OpenTelemetryPlugin:
    """Trace publishes and handlings as linked spans; record metrics as instruments.

    :param tracer_provider: where spans go (default: the global provider).
    :param meter_provider: where metrics go (default: the global provider).
    :param propagator: how the context travels in the envelope's headers (default: the
        global propagator, W3C trace context and baggage).
    :param consumer_parent: ``"child"`` makes each handling span a child of the publish
        span (one trace across processes); ``"link"`` starts a new trace per handling,
        linked to the publish span (for very wide fan-out).
    :param record_metrics: also observe the metric instruments (read from the core
        metrics of every bus the plugin is configured on, at collection time).

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        propagator: TextMapPropagator | None = None,
        consumer_parent: Literal["child", "link"] = "child",
        record_metrics: bool = True,
    ) -> None:
        if consumer_parent not in {"child", "link"}:
            raise pgbus.ConfigError(
                f"consumer_parent is 'child' or 'link', not {consumer_parent!r}"
            )
        self._tracer_provider = tracer_provider
        self.tracer = trace.get_tracer(__name__, __version__, tracer_provider=tracer_provider)
        self._propagator = propagator
        self.consumer_parent = consumer_parent
        self.record_metrics = record_metrics
        self._pending: dict[str, tuple[Span, float]] = {}
        self._buses: weakref.WeakSet[pgbus.Bus] = weakref.WeakSet()
        if record_metrics:
            _observe(metrics.get_meter(__name__, __version__, meter_provider=meter_provider), self)
        # What an attempt runs in when its publisher did not sample it: one context made
        # once, with a valid but unsampled remote parent, so that the spans its handler
        # starts are not sampled either (ParentBased samplers), at the cost of one attach.
        self._unsampled = trace.set_span_in_context(
            NonRecordingSpan(SpanContext(_UNSAMPLED_TRACE_ID, _UNSAMPLED_SPAN_ID, is_remote=True))
        )

    def snapshots(self) -> list[pgbus.MetricsSnapshot]:
        """The core metrics of every bus this plugin is configured on (metrics enabled)."""
        return [bus.metrics.snapshot() for bus in list(self._buses)]

    @property
    def propagator(self) -> TextMapPropagator:
        """The propagator that writes and reads the envelope headers."""
        return self._propagator or propagate.get_global_textmap()

    # -- publishing -------------------------------------------------------------------------

    def _sweep(self, now: float) -> None:
        """End publish spans never confirmed (the publish raised) as failed."""
        pending = self._pending
        while pending:
            event_id = next(iter(pending))
            span, started = pending[event_id]
            if now - started < PENDING_TIMEOUT:
                return
            del pending[event_id]
            span.set_status(Status(StatusCode.ERROR, "publish not confirmed"))
            span.end()

    @hookimpl(wrapper=True, tryfirst=True)
    def pgbus_encoder(self, event_type: type[pgbus.Event]) -> Generator[None, Encoder | None, Any]:
        """Wrap whichever encoder wins: start the publish span, put it in the headers."""
        inner = yield
        if inner is None or isinstance(self._tracer_provider, trace.NoOpTracerProvider):
            return inner
        tracer = self.tracer
        type_name = event_type.pgbus_type

        def encode(out: Outgoing) -> str:
            span = tracer.start_span(
                f"send {out.channel}",
                kind=SpanKind.PRODUCER,
                attributes={
                    "messaging.system": SYSTEM,
                    "messaging.operation.type": "send",
                    "messaging.operation.name": "send",
                    "messaging.destination.name": out.channel,
                    "messaging.message.id": out.id,
                    "pgbus.event.type": type_name,
                },
            )
            if span.get_span_context().is_valid:
                carrier = dict(out.headers)
                self.propagator.inject(carrier, context=trace.set_span_in_context(span))
                out.headers = carrier
            try:
                payload = inner(out)
            except BaseException as exc:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                span.end()
                raise
            if span.is_recording():
                now = time.monotonic()
                self._sweep(now)
                span.set_attribute("messaging.message.body.size", len(payload.encode()))
                self._pending[out.id] = (span, now)
            return payload

        return encode

    @hookimpl
    def pgbus_on_published(self, outgoing: Sequence[Outgoing]) -> None:
        """End the publish spans."""
        pending = self._pending
        if pending:
            for out in outgoing:
                entry = pending.pop(out.id, None)
                if entry is not None:
                    entry[0].end()

    # -- handling ---------------------------------------------------------------------------

    def _parent(self, delivery: pgbus.Delivery) -> tuple[Context | None, list[Link]]:
        if not delivery.headers:
            return None, []
        context = self.propagator.extract(delivery.headers)
        if self.consumer_parent == "child":
            return context, []
        producer = trace.get_current_span(context).get_span_context()
        return Context(), [Link(producer)] if producer.is_valid else []

    def _tracing_off(self) -> bool:
        """Whether no SDK is configured: the API's no-op provider makes no spans."""
        provider = self._tracer_provider or trace.get_tracer_provider()
        return isinstance(provider, trace.NoOpTracerProvider | trace.ProxyTracerProvider)

    @hookimpl
    def pgbus_handler_middleware(self, subscription: pgbus.Subscription) -> Middleware | None:
        """Run each handler attempt in a consumer span (none with a no-op tracer provider).

        The built-in retry middleware is outermost, so this runs once per attempt. An
        attempt whose publisher did not sample the event (a W3C ``traceparent`` whose
        sampled flag is off) makes no span: with ``consumer_parent="child"`` its span
        would not be sampled either, so the flag is read from the header and the attempt
        runs in a context with an unsampled parent.
        """
        if isinstance(self._tracer_provider, trace.NoOpTracerProvider):
            return None
        tracer = self.tracer
        name = subscription.name
        child = self.consumer_parent == "child"
        unsampled = self._unsampled

        async def traced(delivery: pgbus.Delivery, call_next: CallNext) -> None:
            traceparent = delivery.headers.get("traceparent") if delivery.headers else None
            if child and traceparent is not None and _unsampled_flag(traceparent):
                token = attach(unsampled)
                try:
                    await call_next(delivery)
                finally:
                    detach(token)
                return
            if self._tracing_off():
                await call_next(delivery)
                return
            context, links = self._parent(delivery)
            attributes: dict[str, AttributeValue] = {
                "messaging.system": SYSTEM,
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": delivery.channel,
                "messaging.consumer.group.name": name,
                "pgbus.attempt": delivery.attempt,
            }
            if delivery.id is not None:
                attributes["messaging.message.id"] = delivery.id
            if delivery.event is not None:
                attributes["pgbus.event.type"] = type(delivery.event).pgbus_type
            with tracer.start_as_current_span(
                f"process {delivery.channel}",
                context=context,
                kind=SpanKind.CONSUMER,
                attributes=attributes,
                links=links,
            ):
                await call_next(delivery)

        return traced

    @hookimpl
    def pgbus_configure(self, bus: pgbus.Bus) -> None:
        """Read this bus's core metrics at collection time; replace an entry-point twin."""
        if bus.plugins.get("metrics") is not None:
            self._buses.add(bus)
        elif self.record_metrics:
            logger.info("pgbus-opentelemetry: the metrics plugin is disabled; no metrics")
        if self is plugin:
            return
        for name, other, origin, _hooks in bus.plugins.list():
            if other is not self and origin == "entry point" and isinstance(other, type(self)):
                bus.plugins.unregister(name)
                logger.info("pgbus-opentelemetry: the plugin passed in code replaces %r", name)


def _unsampled_flag(traceparent: str) -> bool:
    """Whether a version-00 ``traceparent`` has its sampled flag (the low bit) off."""
    return len(traceparent) == _TRACEPARENT_LENGTH and traceparent[-1] in "02468ace"


# -- metrics: observable instruments over the core metrics ------------------------------------

_Key: TypeAlias = "tuple[tuple[str, AttributeValue], ...]"
_Read: TypeAlias = "Callable[[pgbus.MetricsSnapshot], Iterable[tuple[_Key, float]]]"


def _per_channel(field: str) -> _Read:
    def read(snapshot: pgbus.MetricsSnapshot) -> Iterable[tuple[_Key, float]]:
        for channel, stats in snapshot.channels.items():
            yield _channel_key(channel), getattr(stats, field)

    return read


def _per_subscription(field: str) -> _Read:
    def read(snapshot: pgbus.MetricsSnapshot) -> Iterable[tuple[_Key, float]]:
        for name, stats in snapshot.subscriptions.items():
            yield _group_key(name), getattr(stats, field)

    return read


def _histogram(field: str, part: _Part) -> _Read:
    def read(snapshot: pgbus.MetricsSnapshot) -> Iterable[tuple[_Key, float]]:
        for name, stats in snapshot.subscriptions.items():
            histogram: pgbus.HistogramSnapshot = getattr(stats, field)
            key = _group_key(name)
            if part == "sum":
                yield key, histogram.sum
            elif part == "count":
                yield key, histogram.count
            else:
                seen = 0
                for bound, count in zip(
                    (*histogram.bounds, math.inf), histogram.counts, strict=True
                ):
                    seen += count
                    yield (*key, ("le", bound)), seen

    return read


_Part: TypeAlias = Literal["bucket", "sum", "count"]
#: The observable counters of one histogram: ``(part, unit)``.
_PARTS: Final[tuple[tuple[_Part, str], ...]] = (
    ("bucket", "{attempt}"),
    ("sum", "s"),
    ("count", "{attempt}"),
)


def _connects(snapshot: pgbus.MetricsSnapshot) -> Iterable[tuple[_Key, float]]:
    yield (("messaging.system", SYSTEM),), snapshot.connects


#: ``(name, unit, description, read)`` of every observable counter.
_COUNTERS: Final[tuple[tuple[str, str, str, _Read], ...]] = (
    ("messaging.client.sent.messages", "{message}", "Events published.", _per_channel("published")),
    (
        "messaging.client.consumed.messages",
        "{message}",
        "Notifications received.",
        _per_channel("received"),
    ),
    (
        "pgbus.decode_failures",
        "{message}",
        "Notifications that could not be decoded.",
        _per_channel("decode_failures"),
    ),
    (
        "pgbus.dead_letters",
        "{message}",
        "Notifications given up on.",
        _per_channel("dead_lettered"),
    ),
    ("pgbus.handled", "{message}", "Deliveries handled.", _per_subscription("handled")),
    ("pgbus.failed", "{attempt}", "Handler attempts that failed.", _per_subscription("failed")),
    (
        "pgbus.retries",
        "{attempt}",
        "Handler attempts followed by a retry.",
        _per_subscription("retried"),
    ),
    (
        "pgbus.dropped",
        "{message}",
        "Deliveries dropped by an overflow policy.",
        _per_subscription("dropped"),
    ),
    ("pgbus.listener.connects", "{connection}", "LISTEN connections established.", _connects),
    *(
        (f"{name}.{part}", unit, f"{what} ({part}).", _histogram(field, part))
        for name, field, what in (
            ("messaging.process.duration", "duration", "Handler attempt durations"),
            ("pgbus.lag", "lag", "Receive time minus publish time"),
        )
        for part, unit in _PARTS
    ),
)


def _observe(meter: metrics.Meter, owner: OpenTelemetryPlugin) -> None:
    """Create the observable counters, read from ``owner``'s buses at collection time."""
    for name, unit, description, read in _COUNTERS:
        meter.create_observable_counter(name, [_callback(owner, read)], unit, description)


def _callback(
    owner: OpenTelemetryPlugin, read: _Read
) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(_options: CallbackOptions) -> Iterable[Observation]:
        totals: dict[_Key, float] = {}
        for snapshot in owner.snapshots():  # summed over the buses in this process
            for key, value in read(snapshot):
                totals[key] = totals.get(key, 0) + value
        return [Observation(value, dict(key)) for key, value in totals.items()]

    return observe


def _channel_key(channel: str) -> _Key:
    return (("messaging.system", SYSTEM), ("messaging.destination.name", channel))


def _group_key(name: str) -> _Key:
    return (("messaging.system", SYSTEM), ("messaging.consumer.group.name", name))


#: The instance the ``pgbus`` entry point registers (global providers and propagator).
plugin = OpenTelemetryPlugin()
