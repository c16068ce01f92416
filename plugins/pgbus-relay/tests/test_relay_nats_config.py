"""The relay's NATS setup: stream subjects, dotted event types, credentials, stopping."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
import uuid
from typing import TYPE_CHECKING

import nats
import pytest
from nats.js.api import StreamConfig
from nats_server import NatsServer, StreamReader
from pgbus_relay import Relay, public_url
from pgbus_relay._nats import subject_covers
from relay_helpers import TIMEOUT, dead_letters, order_type, status_rows, wait_for_status

import pgbus

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    from nats.aio.client import Client


class FastBackoff:
    """Retry the broker every 0.2 s (the default waits up to 10 s); ``tried`` is set once
    ``attempts`` retries were asked for."""

    def __init__(self, attempts: int) -> None:
        self.attempts = attempts
        self.tried = asyncio.Event()

    @pgbus.hookimpl(tryfirst=True)
    def pgbus_reconnect_backoff(self, attempt: int, error: BaseException | None) -> float:  # noqa: ARG002 - hook signature
        self.attempts -= 1
        if self.attempts <= 0:
            self.tried.set()
        return 0.2


@pytest.fixture
async def js_client(jetstream: str) -> AsyncIterator[Client]:
    """A client of the shared server, for making and reading streams."""
    nc = await nats.connect(jetstream)
    yield nc
    await nc.close()


@pytest.fixture
async def prefix(js_client: Client) -> AsyncIterator[str]:
    """A subject prefix no other test uses; every stream named after it is dropped."""
    name = f"rv{uuid.uuid4().hex[:8]}"
    yield name
    js = js_client.jetstream()
    for stream in (name.upper(), f"{name.upper()}_OTHER"):
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(stream)


@pytest.mark.parametrize(
    ("pattern", "subject", "covered"),
    [
        ("orders.>", "orders.eu", True),
        ("orders.>", "orders.*", True),
        ("orders.>", "orders.>", True),
        ("orders.>", "orders", False),
        ("orders.*", "orders.eu", True),
        ("orders.*", "orders.>", False),
        ("orders.*", "orders.eu.x", False),
        ("*.eu", "orders.eu", True),
        (">", "orders.eu.x", True),
        ("orders", "orders", True),
        ("orders", "orders.eu", False),
        ("orders.eu", "orders.*", False),
    ],
)
def test_subjects_are_matched_token_by_token(pattern: str, subject: str, covered: bool) -> None:
    """``*`` is one token, ``>`` the rest: what a stream's subject captures."""
    assert subject_covers(pattern, subject) is covered


async def test_a_stream_whose_wildcard_covers_the_channel_is_used_as_it_is(
    durable_bus: Callable[..., pgbus.Bus], jetstream: str, js_client: Client, prefix: str
) -> None:
    """A stream with ``prefix.>`` captures channel ``prefix.orders``: nothing to update."""
    js = js_client.jetstream()
    stream = prefix.upper()
    await js.add_stream(StreamConfig(name=stream, subjects=[f"{prefix}.>"]))
    channel = f"{prefix}.orders"
    order = order_type(channel)
    bus = durable_bus()
    relay = Relay(bus, to=f"{jetstream}?stream={stream}&timeout=1", channels=[channel])
    reader = StreamReader(js_client, stream, channel)
    async with bus:
        ids = [await bus.publish(order(order_id=n)) for n in range(3)]
        messages = await reader.take(3, TIMEOUT)
    assert sorted(m.headers["Nats-Msg-Id"] for m in messages) == sorted(ids)
    assert relay.relayed == 3
    info = await js.stream_info(stream)
    assert info.config.subjects == [f"{prefix}.>"]


async def test_a_stream_the_server_refuses_is_a_configuration_error_logged_once(
    durable_bus: Callable[..., pgbus.Bus],
    pgbus_dsn: str,
    schema: str,
    jetstream: str,
    js_client: Client,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Another stream holds the subjects: the relay says so once, waits, and loses nothing."""
    js = js_client.jetstream()
    other, stream = f"{prefix.upper()}_OTHER", prefix.upper()
    await js.add_stream(StreamConfig(name=other, subjects=[f"{prefix}.>"]))
    channel = f"{prefix}.orders"
    order = order_type(channel)
    bus = durable_bus()
    backoff = FastBackoff(attempts=5)
    bus.plugins.register(backoff)
    relay = Relay(bus, to=f"{jetstream}?stream={stream}&timeout=1", channels=[channel])
    caplog.set_level(logging.INFO, logger="pgbus_relay")
    async with bus:
        ids = [await bus.publish(order(order_id=n)) for n in range(3)]
        row = await wait_for_status(pgbus_dsn, schema, lambda row: row.failing)
        await asyncio.wait_for(backoff.tried.wait(), TIMEOUT)  # several attempts
        assert relay.relayed == 0
        error = row.last_error or ""
        assert f"stream {stream}" in error
        assert f"{prefix}.orders" in error
        assert "refuses" in error
        refusals = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(refusals) == 1, [r.getMessage() for r in refusals]
        assert stream in refusals[0].getMessage()
        assert not [r for r in caplog.records if "waiting for the broker" in r.getMessage()]
        await js.delete_stream(other)  # fixed: the relay makes its stream and goes on
        reader = StreamReader(js_client, stream, channel)
        messages = await reader.take(3, TIMEOUT)
    assert sorted(m.headers["Nats-Msg-Id"] for m in messages) == sorted(ids)
    assert await dead_letters(pgbus_dsn, schema) == []


async def test_a_dotted_event_type_as_the_last_token_is_captured(
    durable_bus: Callable[..., pgbus.Bus], jetstream: str, js_client: Client, prefix: str
) -> None:
    """``{channel}.{type}`` with type ``order.placed``: the relay's stream takes ``ch.>``."""
    stream, channel = prefix.upper(), prefix

    class Placed(pgbus.Event, channel=channel, event_type="order.placed"):
        order_id: int

    bus = durable_bus()
    relay = Relay(
        bus,
        to=f"{jetstream}?stream={stream}&timeout=1",
        channels=[channel],
        topic="{channel}.{type}",
    )
    reader = StreamReader(js_client, stream, f"{channel}.>")
    async with bus:
        event_id = await bus.publish(Placed(order_id=1))
        messages = await reader.take(1, TIMEOUT)
    assert messages[0].subject == f"{channel}.order.placed"
    assert messages[0].headers["Nats-Msg-Id"] == event_id
    assert relay.relayed == 1
    info = await js_client.jetstream().stream_info(stream)
    assert info.config.subjects == [f"{channel}.>"]


async def test_a_subject_no_stream_captures_is_dead_lettered_not_retried_forever(
    durable_bus: Callable[..., pgbus.Bus],
    pgbus_dsn: str,
    schema: str,
    jetstream: str,
    js_client: Client,
    prefix: str,
) -> None:
    """``{type}.{channel}`` (stream ``*.ch``) and a dotted type: refused with a clear error."""
    stream, channel = prefix.upper(), prefix

    class Placed(pgbus.Event, channel=channel, event_type="order.placed"):
        order_id: int

    class Paid(pgbus.Event, channel=channel, event_type="paid"):
        order_id: int

    bus = durable_bus()
    relay = Relay(
        bus,
        to=f"{jetstream}?stream={stream}&timeout=1",
        channels=[channel],
        topic="{type}.{channel}",
        key="order_id",
    )
    reader = StreamReader(js_client, stream, f"*.{channel}")
    async with bus:
        dotted = await bus.publish(Placed(order_id=1))
        paid = await bus.publish(Paid(order_id=1))  # same key: waits behind the dotted one
        messages = await reader.take(1, TIMEOUT)
    assert [m.headers["Nats-Msg-Id"] for m in messages] == [paid]
    assert relay.dead_lettered == 1
    rows = await dead_letters(pgbus_dsn, schema)
    assert [r["event_id"] for r in rows] == [dotted]
    assert f"order.placed.{channel}" in rows[0]["error"]
    assert "{type} last" in rows[0]["error"]


@pytest.mark.parametrize("topic", ["{channel}.t_{type}", "{channel}{type}", "{channel}..x"])
def test_a_template_no_stream_can_capture_is_refused_at_once(
    durable_bus: Callable[..., pgbus.Bus], jetstream: str, topic: str
) -> None:
    """{type} inside a token (or an empty token) is a ConfigError when the relay is made."""
    with pytest.raises(pgbus.ConfigError, match="token"):
        Relay(durable_bus(), to=f"{jetstream}?stream=X", channels=["a"], topic=topic)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://u:s3cret@h:4222?stream=S", "nats://u:***@h:4222?stream=S"),
        ("nats://TOKSECRET@h:4222?stream=S", "nats://***@h:4222?stream=S"),
        ("nats://u:p%40ss/w?rd@h?stream=S", "nats://u:***@h?stream=S"),
        ("nats://h:4222?stream=S&token=TOKSECRET", "nats://h:4222?stream=S&token=***"),
        ("kafka://a:9092,b:9092", "kafka://a:9092,b:9092"),
    ],
)
def test_public_url_hides_every_secret(url: str, shown: str) -> None:
    """Passwords, lone tokens and secret query parameters become ***."""
    assert public_url(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        "amqp://u:s3cret@127.0.0.1",
        "ftp://s3cret@127.0.0.1",
        "kafka://u:s3cret@127.0.0.1:9092",
        "kafka://s3cret@127.0.0.1:9092",
        "nats://s3cret@127.0.0.1:4222",
        "nats://u:s3cret@[::1",
    ],
)
def test_configuration_errors_show_no_secret(
    durable_bus: Callable[..., pgbus.Bus], url: str
) -> None:
    """A refused URL's error names it without the password or token."""
    with pytest.raises(pgbus.ConfigError) as caught:
        Relay(durable_bus(), to=url, channels=["orders"])
    assert "s3cret" not in str(caught.value)
    assert "s3cret" not in repr(caught.value)
    if url.startswith("kafka"):
        assert "SASL" in str(caught.value)


@pytest.mark.parametrize(
    ("args", "userinfo", "auth"),
    [
        (["--user", "relayer", "--pass", "s3cret"], "relayer:s3cret", {"password": "s3cret"}),
        (
            ["--user", "relayer", "--pass", "p@ss/s3cret"],
            "relayer:p%40ss%2Fs3cret",  # percent-encoded in the URL
            {"password": "p@ss/s3cret"},
        ),
        (["--auth", "s3crettoken"], "s3crettoken", {"token": "s3crettoken"}),
    ],
)
async def test_credentials_in_the_url_reach_the_server_and_nowhere_else(
    durable_bus: Callable[..., pgbus.Bus],
    pgbus_dsn: str,
    schema: str,
    tmp_path: Path,
    pgbus_channel: str,
    caplog: pytest.LogCaptureFixture,
    args: list[str],
    userinfo: str,
    auth: dict[str, str],
) -> None:
    """user:password@ and a lone token@ authenticate; no log, repr or status shows them."""
    server = NatsServer(tmp_path, args=args).start()
    caplog.set_level(logging.DEBUG)
    stream = f"RELAY_{uuid.uuid4().hex[:10].upper()}"
    try:
        order = order_type(pgbus_channel)
        bus = durable_bus()
        url = f"nats://{userinfo}@127.0.0.1:{server.port}?stream={stream}&timeout=1"
        relay = Relay(bus, to=url, channels=[pgbus_channel])
        async with bus:
            ids = [await bus.publish(order(order_id=n)) for n in range(3)]
            await wait_for_status(pgbus_dsn, schema, lambda row: row.lag == 0)
        assert relay.relayed == 3
        if "password" in auth:
            auth["user"] = "relayer"
        nc = await nats.connect(f"nats://127.0.0.1:{server.port}", **auth)  # type: ignore[arg-type]
        try:
            messages = await StreamReader(nc, stream, pgbus_channel).take(3, TIMEOUT)
        finally:
            await nc.close()
        assert sorted(m.headers["Nats-Msg-Id"] for m in messages) == sorted(ids)
        rows = await status_rows(pgbus_dsn, schema)
        shown = [repr(relay), repr(relay.backend), relay.url, rows[0].target, caplog.text]
        for text in shown:
            assert "s3cret" not in text, text
        assert "***@" in rows[0].target
    finally:
        server.kill()


async def test_a_wrong_password_shows_no_secret_in_the_status(
    durable_bus: Callable[..., pgbus.Bus],
    pgbus_dsn: str,
    schema: str,
    tmp_path: Path,
    pgbus_channel: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Refused credentials fail the relay (waiting), with an error that holds no secret."""
    server = NatsServer(tmp_path, args=["--user", "relayer", "--pass", "right"]).start()
    caplog.set_level(logging.DEBUG)
    try:
        bus = durable_bus()
        url = f"nats://relayer:wr0ngs3cret@127.0.0.1:{server.port}?stream=S&timeout=1"
        Relay(bus, to=url, channels=[pgbus_channel])
        async with bus:
            await bus.publish(order_type(pgbus_channel)(order_id=1))
            row = await wait_for_status(pgbus_dsn, schema, lambda row: row.failing)
        assert "uthorization" in (row.last_error or "")
        assert "wr0ngs3cret" not in (row.last_error or "")
        assert "wr0ngs3cret" not in row.target
        assert "wr0ngs3cret" not in caplog.text
    finally:
        server.kill()
        gc.collect()  # a socket a refused connect leaked fails this test, not a later one


async def test_stop_returns_promptly_while_the_broker_is_down_and_loses_nothing(
    durable_bus: Callable[..., pgbus.Bus],
    pgbus_dsn: str,
    schema: str,
    own_nats: NatsServer,
    stream: str,
    pgbus_channel: str,
) -> None:
    """The waiting events go back to the journal at stop(); a later relay sends them."""
    order = order_type(pgbus_channel)
    url = f"{own_nats.url}?stream={stream}&timeout=0.5"
    bus = durable_bus(stop_timeout=20.0)
    first = Relay(bus, to=url, channels=[pgbus_channel], key="order_id")
    await bus.start()
    ids = [await bus.publish(order(order_id=n % 2, seq=n)) for n in range(6)]
    await wait_for_status(pgbus_dsn, schema, lambda row: row.failing)
    started = time.monotonic()
    await bus.stop()
    assert time.monotonic() - started < 5.0
    assert first.relayed == 0
    assert await dead_letters(pgbus_dsn, schema) == []
    own_nats.start()
    again = durable_bus()
    second = Relay(again, to=url, channels=[pgbus_channel], key="order_id")
    nc = await nats.connect(own_nats.url)
    try:
        async with again:
            messages = await StreamReader(nc, stream, pgbus_channel).take(6, TIMEOUT)
    finally:
        await nc.close()
    assert sorted(m.headers["Nats-Msg-Id"] for m in messages) == sorted(ids)
    assert second.relayed == 6
    assert await dead_letters(pgbus_dsn, schema) == []
