"""The FastStream broker over a pgbus Bus: subscribers LISTEN through it, publishers NOTIFY."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fast_depends import dependency_provider
from faststream._internal.broker import BrokerUsecase
from faststream._internal.broker.registrator import Registrator
from faststream._internal.broker.router import BrokerRouter, SubscriberRoute
from faststream._internal.configs import (
    BrokerConfig,
    PublisherSpecificationConfig,
    PublisherUsecaseConfig,
    SubscriberSpecificationConfig,
    SubscriberUsecaseConfig,
)
from faststream._internal.constants import EMPTY
from faststream._internal.context.repository import ContextRepo
from faststream._internal.di import FastDependsConfig
from faststream._internal.endpoint.publisher import PublisherSpecification, PublisherUsecase
from faststream._internal.endpoint.subscriber import SubscriberSpecification, SubscriberUsecase
from faststream._internal.endpoint.subscriber.call_item import CallsCollection
from faststream._internal.logger import DefaultLoggerStorage, make_logger_state
from faststream._internal.logger.logging import get_broker_logger
from faststream._internal.parser import DefaultCodec
from faststream._internal.producer import ProducerProto
from faststream.exceptions import FeatureNotSupportedException, StopConsume
from faststream.message import StreamMessage, decode_message
from faststream.middlewares import AckPolicy
from faststream.response import PublishCommand
from faststream.response.publish_type import PublishType
from faststream.specification.asyncapi.utils import resolve_payloads
from faststream.specification.schema import (
    BrokerSpec,
    Message,
    Operation,
    PublisherSpec,
    SubscriberSpec,
)

import pgbus

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from types import TracebackType

    from fast_depends.library.serializer import SerializerProto
    from faststream._internal.basic_types import LoggerProto

__all__ = ["PgbusBroker", "PgbusMessage", "PgbusPublisher", "PgbusRouter", "PgbusSubscriber"]

logger = logging.getLogger("faststream_pgbus")


@dataclass(frozen=True)
class PgbusMessage:
    """What a FastStream subscriber receives from pgbus: the notification and its context."""

    message: pgbus.Message
    context: pgbus.Context


def _body(payload: str) -> bytes:
    """The message body: an envelope's ``data``, or a bare payload as sent."""
    try:
        decoded = json.loads(payload)
    except ValueError:
        return payload.encode()
    if isinstance(decoded, dict) and "v" in decoded and "type" in decoded:
        return json.dumps(decoded.get("data"), separators=(",", ":")).encode()
    return payload.encode()


def _public_url(dsn: str | None) -> str:
    """The server's address for AsyncAPI: the DSN's host, port and database, no credentials."""
    parts = urlsplit(dsn or "")
    if parts.scheme not in {"postgres", "postgresql"} or not parts.hostname:
        return "postgresql://localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"postgresql://{parts.hostname}{port}{parts.path}"


async def _parse(raw: PgbusMessage) -> StreamMessage[PgbusMessage]:
    context = raw.context
    headers = dict(context.headers)
    return StreamMessage(
        raw_message=raw,
        body=_body(raw.message.payload),
        headers=headers,
        content_type="application/json",
        correlation_id=headers.get("correlation_id") or context.id,
        message_id=context.id,
    )


async def _decode(msg: StreamMessage[Any]) -> Any:
    return decode_message(msg)


class PgbusPublishCommand(PublishCommand):
    """A publish on a pgbus channel (``destination``; empty for a :class:`pgbus.Event`)."""

    @classmethod
    def from_cmd(cls, cmd: PublishCommand) -> PgbusPublishCommand:
        if isinstance(cmd, PgbusPublishCommand):
            return cmd
        return cls(
            cmd.body,
            destination=cmd.destination,
            correlation_id=cmd.correlation_id,
            headers=cmd.headers,
            _publish_type=cmd.publish_type,
        )


class PgbusProducer(ProducerProto[PublishCommand]):
    """Sends FastStream's publish commands through the broker's Bus."""

    def __init__(self) -> None:
        self.bus: pgbus.Bus | None = None
        self.serializer: SerializerProto | None = None
        self.codec = DefaultCodec()
        self._parser = _parse
        self._decoder = _decode
        self._warned: set[str] = set()

    def connected_bus(self) -> pgbus.Bus:
        """The broker's running Bus."""
        if self.bus is None:
            raise pgbus.ConfigError("the PgbusBroker is not connected: start it first")
        return self.bus

    async def publish(self, cmd: PublishCommand) -> str | None:
        bus = self.connected_bus()
        headers = {k: str(v) for k, v in cmd.headers.items()}
        if isinstance(cmd.body, pgbus.Event):
            return await bus.publish(cmd.body, headers=headers or None)
        if not cmd.destination:
            raise pgbus.ConfigError("publishing what is not a pgbus.Event needs a channel=")
        payload, _ = await self.codec.encode(cmd.body, self.serializer)
        if bus.plugins.get("durable") is not None and cmd.destination not in self._warned:
            self._warned.add(cmd.destination)
            logger.warning(
                "publishing a bare body on %s: it is a plain NOTIFY, which durable"
                " subscribers do not get; publish a pgbus.Event to journal it",
                cmd.destination,
            )
        await bus.notify(cmd.destination, payload.decode())
        return None

    async def request(self, cmd: PublishCommand) -> Any:  # noqa: ARG002
        raise FeatureNotSupportedException("pgbus has no request/reply")

    async def publish_batch(self, cmd: PublishCommand) -> None:  # noqa: ARG002
        raise FeatureNotSupportedException("publish pgbus events with bus.publish_many")


@dataclass(kw_only=True)
class PgbusBrokerConfig(BrokerConfig):
    """The broker's configuration, shared by its subscribers and publishers."""

    producer: PgbusProducer = field(default_factory=PgbusProducer)


@dataclass(kw_only=True)
class PgbusSubscriberConfig(SubscriberUsecaseConfig):
    """One subscriber: its channel and the pgbus subscription options it passes on."""

    _outer_config: PgbusBrokerConfig = field(default_factory=PgbusBrokerConfig)
    channel: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def ack_policy(self) -> AckPolicy:
        """Pgbus settles deliveries itself (retries, dead letters): FastStream only acks."""
        return AckPolicy.ACK


@dataclass(kw_only=True)
class PgbusPublisherConfig(PublisherUsecaseConfig):
    """One publisher: its channel and default headers."""

    _outer_config: PgbusBrokerConfig = field(default_factory=PgbusBrokerConfig)
    channel: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(kw_only=True)
class PgbusSubscriberSpecificationConfig(SubscriberSpecificationConfig):
    """What AsyncAPI says about a subscriber."""

    channel: str


@dataclass(kw_only=True)
class PgbusPublisherSpecificationConfig(PublisherSpecificationConfig):
    """What AsyncAPI says about a publisher."""

    channel: str


class PgbusSubscriberSpecification(
    SubscriberSpecification[PgbusBrokerConfig, PgbusSubscriberSpecificationConfig]
):
    """A subscriber's AsyncAPI operation: receive on its (prefixed) channel."""

    @property
    def channel(self) -> str:
        return f"{self._outer_config.prefix}{self.config.channel}"

    @property
    def channel_labels(self) -> list[str]:
        return [self.channel]

    def get_schema(self) -> dict[str, SubscriberSpec]:
        payloads = self.get_payloads()
        return {
            self.name: SubscriberSpec(
                address=self.channel,
                description=self.description,
                operation=Operation(
                    message=Message(
                        title=f"{self.name}:Message", payload=resolve_payloads(payloads)
                    ),
                    bindings=None,
                ),
                bindings=None,
            )
        }


class PgbusPublisherSpecification(
    PublisherSpecification[PgbusBrokerConfig, PgbusPublisherSpecificationConfig]
):
    """A publisher's AsyncAPI operation: send on its (prefixed) channel."""

    @property
    def channel(self) -> str:
        return f"{self._outer_config.prefix}{self.config.channel}"

    @property
    def name(self) -> str:
        return self.config.title_ or f"{self.channel}:Publisher"

    def get_schema(self) -> dict[str, PublisherSpec]:
        payloads = self.get_payloads()
        return {
            self.name: PublisherSpec(
                address=self.channel,
                description=self.config.description_,
                operation=Operation(
                    message=Message(
                        title=f"{self.name}:Message",
                        payload=resolve_payloads(payloads, "Publisher"),
                    ),
                    bindings=None,
                ),
                bindings=None,
            )
        }


class PgbusSubscriber(SubscriberUsecase[PgbusMessage]):
    """A pgbus subscription whose handler hands each notification to FastStream."""

    _outer_config: PgbusBrokerConfig

    def __init__(
        self,
        config: PgbusSubscriberConfig,
        specification: SubscriberSpecification[Any, Any],
        calls: CallsCollection[PgbusMessage],
    ) -> None:
        config.parser = _parse
        config.decoder = _decode
        super().__init__(config, specification, calls)
        self._channel = config.channel
        self._options = config.options
        self._subscription: pgbus.Subscription | None = None
        #: Set once FastStream started it: a durable backlog replayed at the bus's start
        #: waits for it (it would be acked unhandled otherwise).
        self._started = asyncio.Event()

    @property
    def channel(self) -> str:
        """The channel it LISTENs on, with the routers' prefixes."""
        return f"{self._outer_config.prefix}{self._channel}"

    @property
    def durable(self) -> bool:
        """Whether it is a durable pgbus subscription (made before its bus starts)."""
        return self._options.get("durable") is not None

    def _subscription_options(self) -> tuple[str, dict[str, Any]]:
        options = dict(self._options)
        name = options.pop("name", None) or f"faststream:{self.channel}:{id(self)}"
        return name, options

    def join(self, bus: pgbus.Bus) -> None:
        """Subscribe to ``bus`` before it starts: how a durable subscription is made.

        pgbus registers durable subscriptions (their positions, their consumer group) when
        the bus starts, so the broker subscribes its durable subscribers here, and
        :meth:`start` then finds the subscription made.
        """
        if not self.calls:
            return
        name, options = self._subscription_options()
        bus.subscribe(self.channel, name=name, **options)(self._receive)
        self._subscription = next(s for s in bus.subscriptions if s.name == name)

    async def start(self) -> None:
        await super().start()
        if self.calls and self._subscription is None:
            bus = self._outer_config.producer.connected_bus()
            name, options = self._subscription_options()
            self._subscription = await bus.listen(self.channel, self._receive, name=name, **options)
        self._post_start()
        self._started.set()

    async def _receive(self, message: pgbus.Message, context: pgbus.Context) -> None:
        # Not consume(): it swallows the handler's exception, and pgbus must see it to
        # retry and dead-letter the delivery (a pgbus.Nack or Reject works as in pgbus).
        if not self.running:
            if not self.durable:  # stopped: a plain notification nobody handles now
                return
            # durable: the bus replays its backlog as it starts, before FastStream starts
            # this subscriber (or while it restarts); acked unhandled it would be lost
            await self._started.wait()
        try:
            await self.process_message(PgbusMessage(message, context))
        except StopConsume:
            await self.stop()

    async def stop(self) -> None:
        bus = self._outer_config.producer.bus
        if self._subscription is not None and bus is not None:
            await bus.unlisten(self._subscription)
        self._subscription = None
        self._started.clear()
        await super().stop()

    def _make_response_publisher(self, message: StreamMessage[Any]) -> Sequence[Any]:  # noqa: ARG002
        return ()

    async def get_one(
        self,
        *,
        timeout: float = 5,  # noqa: ARG002, ASYNC109 - FastStream's signature
    ) -> StreamMessage[PgbusMessage] | None:
        raise FeatureNotSupportedException("pgbus subscribers are push-only: use a handler")

    def __aiter__(self) -> Any:
        raise FeatureNotSupportedException("pgbus subscribers are push-only: use a handler")

    def get_log_context(self, message: StreamMessage[PgbusMessage] | None) -> dict[str, str]:
        return {"channel": self.channel, "message_id": getattr(message, "message_id", "")}


class PgbusPublisher(PublisherUsecase):
    """``@broker.publisher("channel")``: publishes what its handler returns, or on call."""

    _outer_config: PgbusBrokerConfig

    def __init__(
        self, config: PgbusPublisherConfig, specification: PublisherSpecification[Any, Any]
    ) -> None:
        super().__init__(config, specification)
        self._channel = config.channel
        self.headers = config.headers

    @property
    def channel(self) -> str:
        """The channel it publishes on, with the routers' prefixes."""
        return f"{self._outer_config.prefix}{self._channel}"

    async def publish(
        self,
        message: Any,
        /,
        channel: str = "",
        *,
        headers: dict[str, str] | None = None,
        correlation_id: str | None = None,
    ) -> Any:
        cmd = PgbusPublishCommand(
            message,
            destination=channel or self.channel,
            headers=self.headers | (headers or {}),
            correlation_id=correlation_id,
            _publish_type=PublishType.PUBLISH,
        )
        return await self._basic_publish(
            cmd, producer=self._outer_config.producer, _extra_middlewares=()
        )

    async def _publish(self, cmd: PublishCommand, *, _extra_middlewares: Iterable[Any]) -> None:
        cmd = PgbusPublishCommand.from_cmd(cmd)
        cmd.destination = cmd.destination or self.channel
        cmd.add_headers(self.headers, override=False)
        await self._basic_publish(
            cmd, producer=self._outer_config.producer, _extra_middlewares=_extra_middlewares
        )

    async def request(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ARG002
        raise FeatureNotSupportedException("pgbus has no request/reply")


class PgbusRegistrator(Registrator[PgbusMessage, PgbusBrokerConfig]):
    """``subscriber()`` and ``publisher()``, shared by the broker and its routers."""

    def subscriber(  # type: ignore[override]
        self,
        channel: str,
        *,
        durable: str | None = None,
        dependencies: Sequence[Any] = (),
        parser: Any = None,
        decoder: Any = None,
        no_reply: bool = False,
        persistent: bool = True,
        title: str | None = None,
        description: str | None = None,
        include_in_schema: bool = True,
        **subscription_options: Any,
    ) -> PgbusSubscriber:
        """Subscribe a handler to ``channel``; other keywords go to ``Bus.listen``.

        :param durable: a durable pgbus subscription of this name (``Bus(dsn, durable=True)``).
        """
        config: PgbusBrokerConfig = self.config  # type: ignore[assignment]
        options = {"durable": durable, **subscription_options}
        calls = CallsCollection[PgbusMessage]()
        specification = PgbusSubscriberSpecification(
            config,
            PgbusSubscriberSpecificationConfig(
                channel=channel,
                title_=title,
                description_=description,
                include_in_schema=include_in_schema,
            ),
            calls,
        )
        sub = PgbusSubscriber(
            PgbusSubscriberConfig(
                channel=channel, options=options, no_reply=no_reply, _outer_config=config
            ),
            specification,
            calls,
        )
        super().subscriber(sub, persistent=persistent)
        return sub.add_call(
            parser_=parser or self._parser,
            decoder_=decoder or self._decoder,
            dependencies_=dependencies,
        )

    def publisher(  # type: ignore[override]
        self,
        channel: str,
        *,
        headers: dict[str, str] | None = None,
        persistent: bool = True,
        title: str | None = None,
        description: str | None = None,
        schema: Any | None = None,
        include_in_schema: bool = True,
    ) -> PgbusPublisher:
        """A publisher on ``channel``, usable as a handler decorator or called directly."""
        config: PgbusBrokerConfig = self.config  # type: ignore[assignment]
        pub = PgbusPublisher(
            PgbusPublisherConfig(channel=channel, headers=headers or {}, _outer_config=config),
            PgbusPublisherSpecification(
                _outer_config=config,
                specification_config=PgbusPublisherSpecificationConfig(
                    channel=channel,
                    schema_=schema,
                    title_=title,
                    description_=description,
                    include_in_schema=include_in_schema,
                ),
            ),
        )
        super().publisher(pub, persistent=persistent)
        return pub


class PgbusRouter(PgbusRegistrator, BrokerRouter[PgbusMessage, PgbusBrokerConfig]):
    """Subscribers and publishers to include in a :class:`PgbusBroker`, under a prefix."""

    def __init__(
        self,
        prefix: str = "",
        handlers: Iterable[SubscriberRoute] = (),
        *,
        dependencies: Sequence[Any] = (),
        middlewares: Sequence[Any] = (),
        routers: Iterable[PgbusRegistrator] = (),
        parser: Any = None,
        decoder: Any = None,
        include_in_schema: bool | None = None,
    ) -> None:
        super().__init__(
            handlers=handlers,
            config=PgbusBrokerConfig(
                prefix=prefix,
                broker_dependencies=dependencies,
                broker_middlewares=middlewares,
                broker_parser=parser,
                broker_decoder=decoder,
                include_in_schema=include_in_schema,
            ),
            routers=routers,
        )


class PgbusBroker(PgbusRegistrator, BrokerUsecase[PgbusMessage, pgbus.Bus, PgbusBrokerConfig]):
    """A FastStream broker on PostgreSQL LISTEN/NOTIFY, through a :class:`pgbus.Bus`.

    ``PgbusBroker(dsn, **bus_options)``: the keywords FastStream brokers share are its
    own, every other one goes to ``pgbus.Bus``.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        dependencies: Sequence[Any] = (),
        middlewares: Sequence[Any] = (),
        routers: Iterable[PgbusRegistrator] = (),
        parser: Any = None,
        decoder: Any = None,
        graceful_timeout: float | None = 15.0,
        description: str | None = None,
        specification_url: str | None = None,
        tags: Iterable[Any] = (),
        logger: LoggerProto | None = EMPTY,
        log_level: int = logging.INFO,
        apply_types: bool = True,
        context: ContextRepo | None = None,
        **bus_options: Any,
    ) -> None:
        self.dsn = dsn
        self.bus_options = bus_options
        self._pgbus_producer = PgbusProducer()
        super().__init__(
            routers=routers,
            config=PgbusBrokerConfig(
                producer=self._pgbus_producer,
                broker_middlewares=middlewares,
                broker_parser=parser,
                broker_decoder=decoder,
                logger=make_logger_state(
                    logger=logger,
                    log_level=log_level,
                    default_storage_cls=_LoggerStorage,  # type: ignore[type-abstract]
                ),
                fd_config=FastDependsConfig(
                    use_fastdepends=apply_types,
                    provider=dependency_provider,
                    context=context or ContextRepo(),
                ),
                broker_dependencies=dependencies,
                graceful_timeout=graceful_timeout,
                extra_context={"broker": self},
            ),
            specification=BrokerSpec(
                description=description,
                url=[specification_url or _public_url(dsn)],
                protocol="postgresql",
                protocol_version=None,
                tags=tags,
                security=None,
            ),
        )

    async def _connect(self) -> pgbus.Bus:
        bus = pgbus.Bus(self.dsn, **self.bus_options)
        for sub in self.subscribers:  # durable ones are made before the bus starts
            if isinstance(sub, PgbusSubscriber) and sub.durable:
                sub.join(bus)
        await bus.start()
        self._pgbus_producer.bus = bus
        self._pgbus_producer.serializer = self.config.fd_config._serializer  # noqa: SLF001 - FastStream's
        return bus

    async def start(self) -> None:
        await self.connect()
        await super().start()

    async def stop(
        self,
        exc_type: type[BaseException] | None = None,
        exc_val: BaseException | None = None,
        exc_tb: TracebackType | None = None,
    ) -> None:
        await super().stop(exc_type, exc_val, exc_tb)
        if self._connection is not None:
            await self._connection.stop()
            self._connection = None
        self._pgbus_producer.bus = None

    async def ping(self, timeout: float | None = None) -> bool:  # noqa: ARG002, ASYNC109
        bus = self._connection
        return bus is not None and bus.ready

    async def publish(
        self,
        message: Any = None,
        channel: str = "",
        *,
        headers: dict[str, str] | None = None,
    ) -> str | None:
        """Publish ``message`` on ``channel`` (a :class:`pgbus.Event` knows its own).

        A pgbus event goes out as an envelope (with ``headers``); anything else as the
        bare JSON FastStream encodes it to, which pgbus subscribers decode against the
        channel's model.

        :returns: the event's id, for a pgbus event.
        """
        cmd = PgbusPublishCommand(
            message,
            destination=channel,
            headers=headers,
            _publish_type=PublishType.PUBLISH,
        )
        result: str | None = await self._basic_publish(cmd, producer=self._pgbus_producer)
        return result

    async def request(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ARG002
        raise FeatureNotSupportedException("pgbus has no request/reply")


class _LoggerStorage(DefaultLoggerStorage):
    """FastStream's log lines for this broker: ``channel | message_id - message``."""

    def __init__(self) -> None:
        super().__init__()
        self.logger_log_level = logging.INFO

    def set_level(self, level: int) -> None:
        self.logger_log_level = level

    def get_logger(self, *, context: ContextRepo) -> LoggerProto:
        if not (lg := self._get_logger_ref()):
            lg = get_broker_logger(
                name="pgbus",
                default_context={"channel": ""},
                message_id_ln=10,
                fmt="%(asctime)s %(levelname)-8s - %(channel)s | %(message_id)-10s - %(message)s",
                context=context,
                log_level=self.logger_log_level,
            )
            self._logger_ref.add(lg)
        return lg
