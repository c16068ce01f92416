"""NATS JetStream: publish with ``Nats-Msg-Id``, return on the stream's ack (nats-py).

``nats://[user:password@ | token@]host:port?stream=NAME``: the stream must capture the
relay's subjects; if it does not exist, the relay creates it (file storage, limits
retention, the server's default duplicate window of two minutes), and adds the subjects
none of its own covers (NATS matching: ``*`` one token, ``>`` the rest) to one that does.
A server that refuses that is a configuration error (:class:`BrokerMisconfigured`). The
event id is the ``Nats-Msg-Id``, so a record sent again after a crash within the
stream's duplicate window is stored once: exactly once in the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from nats.aio.client import Client
from nats.errors import BadHeaderError, BadSubjectError, MaxPayloadError
from nats.errors import Error as NatsError
from nats.js.api import StreamConfig
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError, ServiceUnavailableError

from pgbus import ConfigError
from pgbus_relay._backends import (
    BrokerMisconfigured,
    BrokerRejected,
    BrokerUnavailable,
    credentials,
    hosts,
)

if TYPE_CHECKING:
    from collections.abc import Sequence
    from urllib.parse import SplitResult

    from nats.js import JetStreamContext

    from pgbus_relay._backends import Record

logger = logging.getLogger(__name__)

#: JetStream's error codes for a message over the stream's (or the server's) size limit.
TOO_LARGE = frozenset({10054})
#: Seconds one publish waits for the stream's ack before it counts as unavailable.
ACK_TIMEOUT = 5.0
#: JetStream's error code for a subject that another stream than ``?stream=`` captures.
WRONG_STREAM = frozenset({10060})


def subject_covers(pattern: str, subject: str) -> bool:
    """Whether every subject ``subject`` matches is matched by ``pattern`` (NATS rules).

    Token by token (``.``-separated): ``*`` is any one token, ``>`` (last) one or more;
    ``subject`` may hold wildcards itself (``orders.>`` covers ``orders.*`` and
    ``orders.eu``, ``orders.*`` does not cover ``orders.>``).
    """
    want, have = subject.split("."), pattern.split(".")
    for index, part in enumerate(have):
        if part == ">":
            return len(want) > index
        if index >= len(want) or want[index] == ">":
            return False
        if part not in ("*", want[index]):
            return False
    return len(want) == len(have)


def check_subjects(subjects: Sequence[str]) -> None:
    """Refuse subject patterns no stream can capture: ``*`` or ``>`` inside a token.

    :raises ConfigError: naming the subject.
    """
    for subject in subjects:
        tokens = subject.split(".")
        for index, part in enumerate(tokens):
            if (("*" in part or ">" in part) and part not in ("*", ">")) or (
                part == ">" and index != len(tokens) - 1
            ):
                raise ConfigError(
                    f"relay: the NATS subject {subject!r} puts a template field inside a"
                    " token: no stream can capture it; make {type} a whole token"
                    " ('{channel}.{type}')"
                )
            if not part:
                raise ConfigError(f"relay: the NATS subject {subject!r} has an empty token")


class JetStreamBackend:
    """A JetStream publisher (``nats://host:port?stream=NAME``).

    :param parts: the split URL; ``stream`` (query) names the stream, ``timeout`` (query)
        the seconds to wait for each ack.
    :raises ConfigError: without ``?stream=``.

    .. versionadded:: 0.1.0
    """

    delivery = "exactly once within the stream's duplicate window (Nats-Msg-Id)"

    def __init__(self, parts: SplitResult) -> None:
        query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
        self.stream = query.get("stream", "")
        if not self.stream:
            raise ConfigError("relay: a nats:// URL names its JetStream stream: ?stream=NAME")
        self.timeout = float(query.get("timeout", ACK_TIMEOUT))
        self.servers = [f"nats://{host}" for host in hosts(parts, 4222)]
        user, password = credentials(parts)
        #: The credentials for nats.connect (never shown): user and password, or a token.
        self._user = user if password is not None else None
        self._password = password
        self._token = user if password is None and user else None
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._subjects: list[str] = []
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<JetStreamBackend {','.join(self.servers)} stream={self.stream!r}>"

    def check_topics(self, topics: Sequence[str]) -> None:
        """Refuse, when the relay is made, subjects no stream could capture."""
        check_subjects(topics)

    async def connect(self, topics: Sequence[str]) -> None:
        """Connect, and make sure the stream exists and captures ``topics``."""
        self._subjects = list(topics)
        await self._reconnect()

    async def _reconnect(self) -> None:
        """A new connection, unless another task made one meanwhile.

        nats-py's own reconnecting is off (its connect would never give up unless
        ``max_reconnect_attempts`` is positive): a closed connection makes the next
        send connect again, after the relay's backoff, the bus's
        ``pgbus_reconnect_backoff``.
        """
        async with self._lock:
            if self._nc is not None and not self._nc.is_closed:
                return
            nc = Client()
            try:
                await nc.connect(
                    self.servers,
                    connect_timeout=self.timeout,  # type: ignore[arg-type]  # seconds, a float
                    allow_reconnect=False,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0.1,  # type: ignore[arg-type]  # seconds, a float
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    user=self._user,
                    password=self._password,
                    token=self._token,
                )
            except (NatsError, OSError, TimeoutError) as exc:
                await self._discard(nc)  # a refused connect (credentials) keeps its socket
                raise BrokerUnavailable(f"NATS {','.join(self.servers)}: {exc!r}") from exc
            js = nc.jetstream(timeout=self.timeout)
            try:
                await self._ensure_stream(js)
            except BrokerMisconfigured:
                await nc.close()
                raise
            except (NatsError, OSError, TimeoutError) as exc:
                await nc.close()
                raise BrokerUnavailable(f"JetStream stream {self.stream}: {exc!r}") from exc
            self._nc, self._js = nc, js

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        try:
            info = await js.stream_info(self.stream)
        except NotFoundError:
            subjects = self._subjects
            try:
                await js.add_stream(StreamConfig(name=self.stream, subjects=subjects))
            except APIError as exc:
                raise self._refused("cannot create", subjects, exc) from exc
            logger.info("created JetStream stream %s for %s", self.stream, ", ".join(subjects))
            return
        have = list(info.config.subjects or ())
        missing = [s for s in self._subjects if not any(subject_covers(h, s) for h in have)]
        if missing:
            info.config.subjects = [*have, *missing]
            try:
                await js.update_stream(info.config)
            except APIError as exc:
                raise self._refused(f"cannot add {', '.join(missing)} to", have, exc) from exc
            logger.info("JetStream stream %s now also takes %s", self.stream, ", ".join(missing))

    def _refused(self, what: str, subjects: Sequence[str], exc: APIError) -> BrokerUnavailable:
        """The error for a refused add_stream or update_stream: the server's, or ours."""
        if isinstance(exc, ServiceUnavailableError) or exc.code == 503:  # noqa: PLR2004
            return BrokerUnavailable(f"JetStream stream {self.stream}: {exc!r}")
        return BrokerMisconfigured(
            f"JetStream: {what} stream {self.stream} (subjects {', '.join(subjects)}) for the"
            f" relay's subjects {', '.join(self._subjects)}: the server refuses it:"
            f" {exc.description} (err_code {exc.err_code}); fix the stream or the relay's"
            " --topic"
        )

    async def send(self, record: Record) -> None:
        """Publish ``record`` to the stream and wait for its ack."""
        if self._js is None or self._nc is None or self._nc.is_closed:
            await self._reconnect()
        js = self._js
        if js is None:  # closed meanwhile
            raise BrokerUnavailable("JetStream: the relay is closing")
        headers = {**record.headers, "Nats-Msg-Id": record.event_id}
        try:
            await js.publish(
                record.topic,
                record.value,
                timeout=self.timeout,
                stream=self.stream,
                headers=headers,
            )
        except NoStreamResponseError as exc:
            raise await self._no_stream(record) from exc
        except MaxPayloadError as exc:
            raise BrokerRejected(f"NATS: {exc} ({len(record.value)} bytes)") from exc
        except (BadSubjectError, BadHeaderError) as exc:  # this record's subject or headers
            raise BrokerRejected(f"NATS: {exc!r}") from exc
        except APIError as exc:
            if exc.err_code in TOO_LARGE or exc.err_code in WRONG_STREAM:
                raise BrokerRejected(
                    f"JetStream: {exc.description} (err_code {exc.err_code}, subject"
                    f" {record.topic!r}, stream {self.stream})"
                ) from exc
            raise BrokerUnavailable(f"JetStream: {exc!r}") from exc
        except (NatsError, OSError, TimeoutError) as exc:
            raise BrokerUnavailable(f"JetStream: {exc!r}") from exc

    async def _no_stream(self, record: Record) -> BrokerUnavailable | BrokerRejected:
        """No stream answered for ``record``'s subject: refused, unless it may pass later.

        When the stream exists and none of its subjects covers the record's, sending it
        again would fail again: refused (dead-lettered). Without the stream (deleted
        meanwhile) the next send connects again and makes it; else JetStream was busy.
        """
        js = self._js
        if js is None:
            return BrokerUnavailable("JetStream: the relay is closing")
        try:
            info = await js.stream_info(self.stream)
        except NotFoundError:
            await self.close()  # the next send makes the stream again
            return BrokerUnavailable(f"JetStream: stream {self.stream} is gone")
        except (NatsError, OSError, TimeoutError) as exc:
            return BrokerUnavailable(f"JetStream: no stream answered: {exc!r}")
        subjects = list(info.config.subjects or ())
        if any(subject_covers(s, record.topic) for s in subjects):
            return BrokerUnavailable(f"JetStream: stream {self.stream} did not answer")
        return BrokerRejected(
            f"JetStream: no subject of stream {self.stream} ({', '.join(subjects)}) captures"
            f" the subject {record.topic!r}; put {{type}} last in the relay's --topic (a"
            " dotted type spans several tokens) or add a subject that captures it"
        )

    async def close(self) -> None:
        """Drain and close the connection."""
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            try:
                await nc.close()
            except (NatsError, OSError, TimeoutError) as exc:
                logger.debug("closing the NATS connection: %r", exc)

    @staticmethod
    async def _discard(nc: Client) -> None:
        """Close what a failed connect left open (nats-py keeps the transport)."""
        with contextlib.suppress(NatsError, OSError, TimeoutError):
            await nc.close()
        transport = getattr(nc, "_transport", None)
        if transport is not None:
            transport.close()

    async def _on_error(self, error: Exception) -> None:
        logger.debug("NATS: %r", error)

    async def _on_disconnected(self) -> None:
        logger.info("NATS %s: disconnected", ",".join(self.servers))
