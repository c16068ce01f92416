"""OpenTelemetry for pgbus: traces across processes and metrics as instruments.

Tracing: publishing an event starts a ``PRODUCER`` span (``send <channel>``, a child of
whatever span is current) and puts its context in the envelope's headers with the
configured propagator (W3C ``traceparent``/``tracestate`` by default). Every handling of
that event, in any process, is a ``CONSUMER`` span (``process <channel>``) whose parent
is that context, so one trace shows the publisher and all its consumers. Each handler
attempt is its own span (``pgbus.attempt`` is 1, 2, … when the built-in retry plugin
retries) and records the exception the attempt raised.

Metrics: counters and histograms recorded from the bus's hooks, named after the
OpenTelemetry messaging conventions where they have a name
(``messaging.client.sent.messages``, ``messaging.client.consumed.messages``,
``messaging.process.duration``) and ``pgbus.*`` otherwise.

It uses the global tracer and meter providers unless given others, so a process that
configures the OpenTelemetry SDK (or runs under ``opentelemetry-instrument``) gets
pgbus's spans by installing the plugin. Without an SDK the API is a no-op and nothing
is added to the envelopes.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Final, Literal

from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

import pgbus
from pgbus import hookimpl

if TYPE_CHECKING:
    from collections.abc import Generator, Sequence

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


class OpenTelemetryPlugin:
    """Trace publishes and handlings as linked spans; record metrics as instruments.

    :param tracer_provider: where spans go (default: the global provider).
    :param meter_provider: where metrics go (default: the global provider).
    :param propagator: how the context travels in the envelope's headers (default: the
        global propagator, W3C trace context and baggage).
    :param consumer_parent: ``"child"`` makes each handling span a child of the publish
        span (one trace across processes); ``"link"`` starts a new trace per handling,
        linked to the publish span (for very wide fan-out).
    :param record_metrics: also record the metric instruments.

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
        self.tracer = trace.get_tracer(__name__, __version__, tracer_provider=tracer_provider)
        self._propagator = propagator
        self.consumer_parent = consumer_parent
        self.record_metrics = record_metrics
        self._pending: dict[str, tuple[Span, float]] = {}
        meter = metrics.get_meter(__name__, __version__, meter_provider=meter_provider)
        self._sent = meter.create_counter(
            "messaging.client.sent.messages", "{message}", "Events published."
        )
        self._consumed = meter.create_counter(
            "messaging.client.consumed.messages", "{message}", "Notifications received."
        )
        self._duration = meter.create_histogram(
            "messaging.process.duration", "s", "Handling of one delivery, retries included."
        )
        self._lag = meter.create_histogram(
            "pgbus.lag", "s", "Receive time minus publish time of handled deliveries."
        )
        self._decode_failures = meter.create_counter(
            "pgbus.decode_failures", "{message}", "Notifications that could not be decoded."
        )
        self._retries = meter.create_counter(
            "pgbus.retries", "{attempt}", "Handler attempts followed by a retry."
        )
        self._dead_letters = meter.create_counter(
            "pgbus.dead_letters", "{message}", "Notifications given up on."
        )
        self._dropped = meter.create_counter(
            "pgbus.dropped", "{message}", "Deliveries dropped by an overflow policy."
        )
        self._connections = meter.create_counter(
            "pgbus.listener.connects", "{connection}", "LISTEN connections established."
        )

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
        if inner is None:
            return None
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
        """End the publish spans; count what was sent."""
        pending = self._pending
        for out in outgoing:
            entry = pending.pop(out.id, None) if pending else None
            if entry is not None:
                entry[0].end()
            if self.record_metrics:
                self._sent.add(1, _channel_attributes(out.channel))

    # -- handling ---------------------------------------------------------------------------

    def _parent(self, delivery: pgbus.Delivery) -> tuple[Context | None, list[Link]]:
        if not delivery.headers:
            return None, []
        context = self.propagator.extract(delivery.headers)
        if self.consumer_parent == "child":
            return context, []
        producer = trace.get_current_span(context).get_span_context()
        return Context(), [Link(producer)] if producer.is_valid else []

    @hookimpl
    def pgbus_handler_middleware(self, subscription: pgbus.Subscription) -> Middleware:
        """Run each handler attempt in a consumer span; time it.

        The built-in retry middleware is outermost, so this runs once per attempt.
        """
        tracer = self.tracer
        name = subscription.name
        duration = self._duration
        lag = self._lag
        record = self.record_metrics
        clock = time.perf_counter

        async def traced(delivery: pgbus.Delivery, call_next: CallNext) -> None:
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
            metric_attributes = {
                "messaging.system": SYSTEM,
                "messaging.destination.name": delivery.channel,
                "messaging.consumer.group.name": name,
            }
            if record and delivery.published_at is not None:
                lag.record(
                    max(0.0, delivery.message.received_at - delivery.published_at),
                    metric_attributes,
                )
            started = clock()
            with tracer.start_as_current_span(
                f"process {delivery.channel}",
                context=context,
                kind=SpanKind.CONSUMER,
                attributes=attributes,
                links=links,
            ):
                try:
                    await call_next(delivery)
                except BaseException as exc:
                    metric_attributes["error.type"] = type(exc).__qualname__
                    raise
                finally:
                    if record:
                        duration.record(clock() - started, metric_attributes)

        return traced

    @hookimpl
    def pgbus_on_retry(self, subscription: pgbus.Subscription) -> None:
        """Count retries."""
        if self.record_metrics:
            self._retries.add(1, {"messaging.consumer.group.name": subscription.name})

    # -- observers (metrics) ----------------------------------------------------------------

    @hookimpl
    def pgbus_on_received(self, messages: Sequence[pgbus.Message]) -> None:
        """Count received notifications per channel."""
        if self.record_metrics:
            for message in messages:
                self._consumed.add(1, _channel_attributes(message.channel))

    @hookimpl
    def pgbus_on_decode_error(self, message: pgbus.Message, error: BaseException) -> None:
        """Count notifications that could not be decoded."""
        if self.record_metrics:
            attributes = {**_channel_attributes(message.channel)}
            attributes["error.type"] = type(error).__qualname__
            self._decode_failures.add(1, attributes)

    @hookimpl
    def pgbus_on_dead_letter(self, dead_letter: pgbus.DeadLetter) -> None:
        """Count dead letters."""
        if self.record_metrics:
            attributes = {**_channel_attributes(dead_letter.channel)}
            if dead_letter.subscription is not None:
                attributes["messaging.consumer.group.name"] = dead_letter.subscription
            self._dead_letters.add(1, attributes)

    @hookimpl
    def pgbus_on_dropped(self, subscription: pgbus.Subscription) -> None:
        """Count deliveries dropped by overflow policies."""
        if self.record_metrics:
            self._dropped.add(1, {"messaging.consumer.group.name": subscription.name})

    @hookimpl
    def pgbus_on_connect(self) -> None:
        """Count LISTEN connections."""
        if self.record_metrics:
            self._connections.add(1, {"messaging.system": SYSTEM})

    @hookimpl
    def pgbus_configure(self, bus: pgbus.Bus) -> None:
        """Replace an entry-point twin with this instance."""
        if self is plugin:
            return
        for name, other, origin, _hooks in bus.plugins.list():
            if other is not self and origin == "entry point" and isinstance(other, type(self)):
                bus.plugins.unregister(name)
                logger.info("pgbus-opentelemetry: the plugin passed in code replaces %r", name)


def _channel_attributes(channel: str) -> dict[str, AttributeValue]:
    return {"messaging.system": SYSTEM, "messaging.destination.name": channel}


#: The instance the ``pgbus`` entry point registers (global providers and propagator).
plugin = OpenTelemetryPlugin()
