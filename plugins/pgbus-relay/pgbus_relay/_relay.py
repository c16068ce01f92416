"""The relay: a durable consumer of pgbus's journal that forwards each event to a broker."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import string
import time
from typing import TYPE_CHECKING, Any

import pgbus
from pgbus import ConfigError, Reject, hookimpl
from pgbus_relay._backends import (
    BrokerMisconfigured,
    BrokerRejected,
    BrokerUnavailable,
    Record,
    backend_for,
    public_url,
)
from pgbus_relay._status import RelayStatus, mark, register, relay_status

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Hashable, Sequence

    from pgbus.durable import DurablePlugin
    from pgbus_relay._backends import Backend

logger = logging.getLogger(__name__)

#: The fields a topic template may use.
TEMPLATE_FIELDS = frozenset({"channel", "type"})
#: Latencies (publish to broker ack) a relay keeps for :attr:`Relay.latencies`.
LATENCY_WINDOW = 10_000


def _template(topic: str) -> str:
    fields = {field for _, field, _, _ in string.Formatter().parse(topic) if field is not None}
    unknown = fields - TEMPLATE_FIELDS
    if unknown or not topic:
        raise ConfigError(
            f"relay: topic template {topic!r}: it may use {{channel}} and {{type}}, not"
            f" {', '.join(sorted(unknown)) or 'nothing'}"
        )
    return topic


#: What stands for ``{type}`` while a template becomes a subject pattern.
_FIELD = "\x00"


def _wildcards(template: str, channel: str) -> str:
    """The subject pattern of ``template`` on ``channel`` (what a stream must capture).

    ``{type}`` is ``*``, or ``>`` when it is the whole last token: a dotted event type
    (``order.placed``) fills several tokens.
    """
    tokens = template.format(channel=channel, type=_FIELD).split(".")
    if tokens[-1] == _FIELD:
        tokens[-1] = ">"
    return ".".join(token.replace(_FIELD, "*") for token in tokens)


def _envelope(payload: str) -> dict[str, Any] | None:
    try:
        envelope = json.loads(payload)
    except ValueError:
        return None
    if isinstance(envelope, dict) and isinstance(envelope.get("id"), str) and "data" in envelope:
        return envelope
    return None


def _text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


class Relay:
    """Forward the events of ``channels`` from the durable journal to a broker.

    Each channel is a durable subscription named ``"{name}:{channel}"`` of ``bus``
    (which needs the durable plugin: ``Bus(dsn, durable=True)``): its position moves
    only once the broker acknowledged the event, processes with the same ``name`` share
    the work as a consumer group, and a restart resumes where the group stopped. While
    the broker is unreachable the relay waits as the bus's ``pgbus_reconnect_backoff``
    hook says and sends again; an event the broker refuses (too large) is dead-lettered
    with the broker's error, and the events behind it go on::

        bus = pgbus.Bus(dsn, durable=True)
        Relay(bus, to="nats://127.0.0.1:4222?stream=ORDERS", channels=["orders"], key="order_id")
        await bus.run_forever()

    :param bus: a bus with the durable plugin, not yet started.
    :param to: the broker: ``kafka://host:port`` or ``nats://host:port?stream=NAME``.
    :param channels: the channels to relay (one name, or several).
    :param topic: the Kafka topic or NATS subject of each event, from ``{channel}``
        and ``{type}`` (the envelope's type).
    :param key: a field of the events' payload: events with the same value keep their
        publish order on the broker, and it is the Kafka record key. Without it,
        events are sent ``concurrency`` at a time, and their order may change.
    :param name: the relay's name: processes with the same name are one consumer group.
    :param concurrency: events in flight at once (per channel).
    :param start: where a relay new to the database starts: ``"earliest"`` (every event
        still in the journal), ``"latest"`` or an aware datetime.
    :param status_interval: seconds between reads of its status into
        :attr:`last_status` while the bus runs (what :class:`RelayCollector` exports).
    :raises ConfigError: for an unsupported URL, a missing broker client, a bad template,
        no channels, or a bus without the durable plugin.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        bus: pgbus.Bus,
        *,
        to: str,
        channels: str | Sequence[str],
        topic: str = "{channel}",
        key: str | None = None,
        name: str = "relay",
        concurrency: int = 64,
        start: str | dt.datetime = "earliest",
        status_interval: float = 10.0,
    ) -> None:
        self.channels = [channels] if isinstance(channels, str) else list(dict.fromkeys(channels))
        if not self.channels:
            raise ConfigError("relay: give at least one channel")
        if concurrency < 1:
            raise ConfigError(f"relay: concurrency must be positive, not {concurrency!r}")
        if status_interval <= 0:
            raise ConfigError(f"relay: status_interval must be positive, not {status_interval!r}")
        self.backend: Backend = backend_for(to)
        self.bus, self.name, self.key = bus, name, key
        self.url = public_url(to)
        self.topic = _template(topic)
        self._topics = [_wildcards(self.topic, c) for c in self.channels]
        check = getattr(self.backend, "check_topics", None)
        if callable(check):
            check(self._topics)
        self.__name__ = f"relay {name}"  # the name pluggy registers it under
        #: Events the broker acknowledged, and events dead-lettered, by this process.
        self.relayed = self.dead_lettered = 0
        #: Seconds from publish to the broker's ack of the latest events.
        self.latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        #: This relay's status rows, as last read (every ``status_interval`` seconds).
        self.last_status: list[RelayStatus] = []
        self.status_interval = status_interval
        self._watcher: asyncio.Task[None] | None = None
        self._durable: DurablePlugin | None = None
        self._connected = False
        self._connecting = asyncio.Lock()
        self._failing: dict[str, str] = {}
        self._misconfigured: str | None = None
        self._stopping = asyncio.Event()
        for channel in self.channels:
            bus.subscribe(
                channel,
                name=self.subscription(channel),
                durable=self.subscription(channel),
                start=start,
                concurrency=concurrency,
                key=None if key is None else self._key,
            )(self._relay)
        bus.plugins.register(self, name=self.__name__)

    def __repr__(self) -> str:
        return f"<Relay {self.name!r} to {self.url} channels={self.channels}>"

    def subscription(self, channel: str) -> str:
        """The durable subscription that relays ``channel``."""
        return f"{self.name}:{channel}"

    # -- the data path -------------------------------------------------------------------

    def _key(self, message: pgbus.Message) -> Hashable:
        envelope = _envelope(message.payload)
        data = envelope.get("data") if envelope is not None else None
        if isinstance(data, dict) and self.key in data:
            return _text(data[self.key])
        return ("no key", message.stored_id or id(message))  # unkeyed: in parallel

    def _record(self, channel: str, envelope: dict[str, Any]) -> Record:
        """The broker's record of a journaled event: data as body, the rest as headers."""
        data, type_name = envelope["data"], _text(envelope.get("type", ""))
        headers = {str(k): _text(v) for k, v in (envelope.get("headers") or {}).items() if k != ""}
        headers.update(
            {
                "content-type": "application/json",
                "pgbus-id": envelope["id"],
                "pgbus-type": type_name,
                "pgbus-channel": channel,
                "pgbus-published-at": _text(envelope.get("ts", "")),
            }
        )
        key = data.get(self.key) if self.key is not None and isinstance(data, dict) else None
        return Record(
            topic=self.topic.format(channel=channel, type=type_name),
            value=json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode(),
            key=None if key is None else _text(key).encode(),
            event_id=envelope["id"],
            headers=headers,
        )

    async def _relay(self, message: pgbus.Message) -> None:
        """Send one event; return once the broker acknowledged it (then it is acked here)."""
        envelope = _envelope(message.payload)
        if envelope is None:
            raise Reject("relay: the journal row is not a pgbus envelope")
        record = self._record(message.channel, envelope)
        attempt = 0
        while True:
            try:
                await self._connect()
                await self.backend.send(record)
            except BrokerRejected as exc:
                self.dead_lettered += 1
                await self._failed(message.channel, exc, rejected=True)
                raise Reject(str(exc)) from exc
            except BrokerUnavailable as exc:
                attempt += 1
                delay = self.bus.plugins.backoff(attempt, exc)
                await self._failed(message.channel, exc, rejected=False)
                if delay is None:  # the backoff gave up: a failure, for the retry policy
                    raise
                if await self._stop_during(delay):
                    self._hand_back(message)
                    return
                continue
            break
        self.relayed += 1
        if isinstance(published := envelope.get("ts"), int | float):
            self.latencies.append(time.time() - float(published))
        if message.channel in self._failing:
            await self._recovered(message.channel)

    async def _stop_during(self, delay: float) -> bool:
        """Wait ``delay`` seconds, or less if the bus stops meanwhile: whether it stops."""
        if not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
        return self._stopping.is_set()

    def _hand_back(self, message: pgbus.Message) -> None:
        """The bus stops while the broker is down: leave ``message`` in the journal.

        Its journal row is released, neither acked nor a failure (no attempt counts): the
        next relay of the group (this one restarted, or another) sends it.
        """
        if self._durable is not None:  # not acked when the handler returns
            self._durable.hand_back(self.subscription(message.channel), message.stored_id)
        logger.info(
            "relay %s: stopping while %s is unreachable; an event of %s stays in the journal",
            self.name,
            self.url,
            message.channel,
        )

    async def _connect(self) -> None:
        if self._connected:
            return
        async with self._connecting:
            if not self._connected:
                await self.backend.connect(self._topics)
                self._connected = True
                self._misconfigured = None
                logger.info("relay %s: connected to %s", self.name, self.url)

    async def _failed(self, channel: str, error: BaseException, *, rejected: bool) -> None:
        text = str(error)
        misconfigured = isinstance(error, BrokerMisconfigured)
        if misconfigured and self._misconfigured != text:  # once, not per channel or attempt
            self._misconfigured = text
            logger.error(
                "relay %s: %s; the events wait in the journal until it is fixed", self.name, text
            )
        if rejected:
            logger.error(
                "relay %s: %s refused an event of %s: %s", self.name, self.url, channel, text
            )
        elif self._failing.get(channel) == text:
            return
        elif not misconfigured:
            logger.warning("relay %s: %s; waiting for the broker", self.name, text)
        if not rejected:
            self._failing[channel] = text
        await self._mark(channel, text, failing=not rejected)

    async def _recovered(self, channel: str) -> None:
        if self._failing.pop(channel, None) is not None:
            logger.info("relay %s: %s takes events of %s again", self.name, self.url, channel)
            await self._mark(channel, None, failing=False)

    async def _mark(self, channel: str, error: str | None, *, failing: bool) -> None:
        durable = self._durable
        if durable is None:
            return
        try:
            pool = await durable.pool()
            async with pool.acquire() as conn:
                await mark(conn, durable.schema, self.subscription(channel), error, failing=failing)
        except Exception as exc:  # the status is best effort; relaying goes on
            logger.warning("relay %s: cannot record its status: %r", self.name, exc)

    # -- lifecycle (hooks) ---------------------------------------------------------------

    @hookimpl(trylast=True)  # after the durable plugin checked its schema
    async def pgbus_on_start(self, bus: pgbus.Bus) -> None:
        """Register this relay's channels in the status table."""
        if bus is not self.bus:
            return
        durable: DurablePlugin = bus.plugins.get("durable")
        self._durable = durable
        self._stopping.clear()
        pool = await durable.pool()
        async with pool.acquire() as conn:
            for channel in self.channels:
                await register(
                    conn,
                    durable.schema,
                    self.subscription(channel),
                    relay=self.name,
                    channel=channel,
                    target=self.url,
                )
        self._watcher = asyncio.create_task(self._watch(), name=f"pgbus-relay-{self.name}")
        logger.info(
            "relay %s: %s to %s (%s)",
            self.name,
            ", ".join(self.channels),
            self.url,
            self.backend.delivery,
        )

    async def _watch(self) -> None:
        """Keep :attr:`last_status` fresh for the metrics."""
        while True:
            try:
                self.last_status = await self.status()
            except Exception as exc:  # the metrics are best effort; relaying goes on
                logger.warning("relay %s: cannot read its status: %r", self.name, exc)
            await asyncio.sleep(self.status_interval)

    @hookimpl
    async def pgbus_on_stop(self, bus: pgbus.Bus) -> None:
        """Stop refreshing the status, and waiting for a broker that is down."""
        if bus is self.bus:
            self._stopping.set()
        watcher, self._watcher = self._watcher, None
        if bus is self.bus and watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    @hookimpl
    async def pgbus_on_stopped(self, bus: pgbus.Bus) -> None:
        """Close the broker connection once the last event was sent."""
        if bus is self.bus:
            self._connected = False
            await self.backend.close()

    async def status(self) -> list[RelayStatus]:
        """This relay's status, one row per channel (``pgbus relay status``)."""
        durable: DurablePlugin = self.bus.plugins.get("durable")
        pool = await durable.pool()
        async with pool.acquire() as conn:
            rows = await relay_status(conn, durable.schema)
        return [row for row in rows if row.relay == self.name]
