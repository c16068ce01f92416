"""Kafka: an idempotent producer (aiokafka), ``acks=all``, the event id in a header.

``kafka://host:port[,host:port...]``: records go to the topic the relay's template
names, keyed by the ``key`` field; the broker creates missing topics if it is allowed
to (``auto.create.topics.enable``), else create them first. A record sent again after
a crash or a timeout is stored again: at least once, with the ``pgbus-id`` header to
de-duplicate on. Credentials in the URL (``kafka://user:password@host``) are refused:
SASL and TLS are not supported yet.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
)

from pgbus import ConfigError
from pgbus_relay._backends import BrokerRejected, BrokerUnavailable, hosts

if TYPE_CHECKING:
    from collections.abc import Sequence
    from urllib.parse import SplitResult

    from pgbus_relay._backends import Record

logger = logging.getLogger(__name__)

#: What the broker (or the producer, before sending) says of a record it will never take:
#: over the size limit, or for a topic name Kafka does not allow.
REFUSED = (MessageSizeTooLargeError, RecordTooLargeError, InvalidTopicError)
#: Milliseconds one send may take, retries included, before it counts as unavailable.
REQUEST_TIMEOUT_MS = 10_000
#: The largest request the producer sends: the broker's limits decide (its error is kept).
MAX_REQUEST_SIZE = 16 * 1024 * 1024


class KafkaBackend:
    """An idempotent Kafka producer (``kafka://host:port``).

    :param parts: the split URL; ``timeout`` (query) is the seconds a send may take.
    :raises ConfigError: for credentials in the URL (no SASL yet).

    .. versionadded:: 0.1.0
    """

    delivery = "at least once, de-duplicate on the pgbus-id header (idempotent producer)"

    def __init__(self, parts: SplitResult) -> None:
        if "@" in parts.netloc:
            raise ConfigError(
                "relay: kafka:// takes no credentials (user:password@ or token@): SASL is"
                " not supported yet; use a listener without authentication"
            )
        query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
        timeout = query.get("timeout")
        self.request_timeout_ms = int(float(timeout) * 1000) if timeout else REQUEST_TIMEOUT_MS
        self.bootstrap = hosts(parts, 9092)
        self._producer: AIOKafkaProducer | None = None

    def __repr__(self) -> str:
        return f"<KafkaBackend {','.join(self.bootstrap)}>"

    async def connect(self, topics: Sequence[str]) -> None:  # noqa: ARG002 - topics are made on first write
        """Start a producer (a new one: a producer that failed to start cannot start again)."""
        await self.close()
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            client_id="pgbus-relay",
            acks="all",
            enable_idempotence=True,
            request_timeout_ms=self.request_timeout_ms,
            max_request_size=MAX_REQUEST_SIZE,
            linger_ms=0,
        )
        try:
            await producer.start()
        except KafkaError as exc:
            await producer.stop()
            raise BrokerUnavailable(f"Kafka {','.join(self.bootstrap)}: {exc!r}") from exc
        self._producer = producer

    async def send(self, record: Record) -> None:
        """Send ``record`` and wait until every in-sync replica has it."""
        producer = self._producer
        if producer is None:
            raise BrokerUnavailable("Kafka: not connected")
        headers = [(name, value.encode()) for name, value in record.headers.items()]
        try:
            await producer.send_and_wait(
                record.topic, record.value, key=record.key, headers=headers
            )
        except REFUSED as exc:
            raise BrokerRejected(f"Kafka: {exc!r} ({len(record.value)} bytes)") from exc
        except (KafkaError, OSError, TimeoutError) as exc:
            raise BrokerUnavailable(f"Kafka: {exc!r}") from exc

    async def close(self) -> None:
        """Flush and stop the producer."""
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await producer.stop()
            except (KafkaError, OSError) as exc:
                logger.debug("stopping the Kafka producer: %r", exc)
