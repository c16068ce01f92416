"""pgbus-signing against a real PostgreSQL: signed round trips, forged NOTIFYs, rotation."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import subprocess
import sys
import time

import asyncpg
import pytest
from pgbus_signing import SIGNATURE_HEADER, SignatureError, SigningPlugin

import pgbus

TIMEOUT = 10.0


class Observed:
    """Records handled deliveries and decode errors, as a plugin."""

    def __init__(self) -> None:
        self.handled: asyncio.Queue[pgbus.Delivery] = asyncio.Queue()
        self.decode_errors: list[BaseException] = []

    @pgbus.hookimpl
    def pgbus_on_handled(self, delivery) -> None:
        self.handled.put_nowait(delivery)

    @pgbus.hookimpl
    def pgbus_on_decode_error(self, error) -> None:
        self.decode_errors.append(error)


def model(channel: str) -> type[pgbus.Event]:
    class OrderPlaced(pgbus.Event, channel=channel):
        order_id: int

    return OrderPlaced


KEYS = {"k2": "second secret", "k1": "first secret"}


@pytest.fixture
async def conn(pg_dsn):
    connection = await asyncpg.connect(pg_dsn)
    yield connection
    await connection.close()


async def notify(conn: asyncpg.Connection, channel: str, payload: str) -> None:
    await conn.execute("SELECT pg_notify($1, $2)", channel, payload)


def envelope(order_id: int, **extra: object) -> str:
    env = {"v": 1, "type": "OrderPlaced", "id": f"id{order_id}", "ts": time.time()}
    return json.dumps({**env, **extra, "data": {"order_id": order_id}}, separators=(",", ":"))


async def test_signed_events_round_trip_with_the_key_id_in_the_headers(pg_dsn, channel):
    """A bus with the plugin signs what it publishes and its handlers see the signer's key id."""
    order = model(channel)
    seen: asyncio.Queue[pgbus.Event] = asyncio.Queue()
    observed = Observed()
    bus = pgbus.Bus(
        pg_dsn, load_entrypoints=False, plugins=[SigningPlugin(KEYS, key_id="k2"), observed]
    )
    bus.subscribe(order)(seen.put)
    raw: asyncio.Queue[pgbus.Message] = asyncio.Queue()
    bus.subscribe(channel)(raw.put)
    async with bus:
        await bus.publish(order(order_id=7))
        event = await asyncio.wait_for(seen.get(), TIMEOUT)
        message = await asyncio.wait_for(raw.get(), TIMEOUT)
        delivery = await asyncio.wait_for(observed.handled.get(), TIMEOUT)
    assert event == order(order_id=7)
    assert ',"sig":"v1:k2:' in message.payload
    assert delivery.headers[SIGNATURE_HEADER] == "k2"
    assert observed.decode_errors == []


async def test_forged_notifications_are_counted_dead_lettered_and_never_handled(
    pg_dsn, channel, conn
):
    """Unsigned, tampered, unknown-key and wrong-secret NOTIFYs reach no handler, typed or not."""
    order = model(channel)
    signer = SigningPlugin(KEYS, key_id="k1")
    stranger = SigningPlugin({"k1": "a guessed secret"})
    intruder = SigningPlugin({"k9": "their own key"})
    typed: asyncio.Queue[pgbus.Event] = asyncio.Queue()
    raw: asyncio.Queue[pgbus.Message] = asyncio.Queue()
    observed = Observed()
    bus = pgbus.Bus(pg_dsn, load_entrypoints=False, plugins=[SigningPlugin(KEYS), observed])
    bus.subscribe(order)(typed.put)
    bus.subscribe(channel)(raw.put)
    good = signer.sign(channel, envelope(4))
    forged = [
        envelope(1),  # unsigned
        good.replace('"order_id":4', '"order_id":5'),  # tampered
        intruder.sign(channel, envelope(2)),  # unknown key id
        stranger.sign(channel, envelope(3)),  # right key id, wrong secret
        envelope(6, sig="v1:k1:1:AAAA"),  # a made-up signature
    ]
    async with bus:
        for payload in forged:
            await notify(conn, channel, payload)
        await notify(conn, channel, good)
        event = await asyncio.wait_for(typed.get(), TIMEOUT)
        message = await asyncio.wait_for(raw.get(), TIMEOUT)
        dead = bus.dead_letters
        stats = bus.metrics.snapshot().channels[channel]
    assert event == order(order_id=4)
    assert message.payload == good
    assert typed.empty()
    assert raw.empty()
    assert [type(e) for e in observed.decode_errors] == [SignatureError] * len(forged)
    reasons = [e.reason for e in observed.decode_errors if isinstance(e, SignatureError)]
    assert reasons[0] == "no signature"
    assert reasons[1].startswith("bad signature")
    assert reasons[2] == "signed with unknown key 'k9'"
    assert reasons[3].startswith("bad signature")
    assert reasons[4] == "no signature"
    assert stats.decode_failures == len(forged)
    assert [d.payload for d in dead] == forged
    assert all(d.subscription is None for d in dead)


async def test_replays_outside_the_window_and_repeats_inside_it_are_rejected(pg_dsn, channel, conn):
    """A signature too old, dated in the future, or already accepted is rejected."""
    order = model(channel)
    signer = SigningPlugin(KEYS)
    typed: asyncio.Queue[pgbus.Event] = asyncio.Queue()
    observed = Observed()
    bus = pgbus.Bus(
        pg_dsn, load_entrypoints=False, plugins=[SigningPlugin(KEYS, max_age=60), observed]
    )
    bus.subscribe(order)(typed.put)
    now = time.time()
    fresh = signer.sign(channel, envelope(1))
    async with bus:
        await notify(conn, channel, fresh)
        await notify(conn, channel, signer.sign(channel, envelope(2), at=now - 61))
        await notify(conn, channel, signer.sign(channel, envelope(3), at=now + 3600))
        await notify(conn, channel, fresh)  # the same notification again
        await notify(conn, channel, signer.sign(channel, envelope(4)))
        first = await asyncio.wait_for(typed.get(), TIMEOUT)
        last = await asyncio.wait_for(typed.get(), TIMEOUT)
    assert (first, last) == (order(order_id=1), order(order_id=4))
    reasons = [e.reason for e in observed.decode_errors if isinstance(e, SignatureError)]
    assert len(reasons) == 3
    assert reasons[0].startswith("signature expired")
    assert "in the future" in reasons[1]
    assert reasons[2].startswith("replayed")


async def test_a_signature_is_bound_to_its_channel(pg_dsn, channel, conn):
    """A payload signed for one channel is rejected on another."""
    order = model(channel)
    signer = SigningPlugin(KEYS)
    typed: asyncio.Queue[pgbus.Event] = asyncio.Queue()
    observed = Observed()
    bus = pgbus.Bus(pg_dsn, load_entrypoints=False, plugins=[SigningPlugin(KEYS), observed])
    bus.subscribe(order)(typed.put)
    async with bus:
        await notify(conn, channel, signer.sign("elsewhere", envelope(1)))
        await notify(conn, channel, signer.sign(channel, envelope(2)))
        event = await asyncio.wait_for(typed.get(), TIMEOUT)
    assert event == order(order_id=2)
    assert [str(e.reason) for e in observed.decode_errors] == ["bad signature (key 'k2')"]


async def test_key_rotation_accepts_every_listed_key(pg_dsn, channel):
    """Publishers on the old and the new key are accepted while both are listed, then only new."""
    order = model(channel)
    both: asyncio.Queue[pgbus.Event] = asyncio.Queue()
    new_only: asyncio.Queue[pgbus.Event] = asyncio.Queue()
    listener = pgbus.Bus(pg_dsn, load_entrypoints=False, plugins=[SigningPlugin(KEYS)])
    listener.subscribe(order)(both.put)
    rotated_observed = Observed()
    rotated = pgbus.Bus(
        pg_dsn,
        load_entrypoints=False,
        plugins=[SigningPlugin({"k2": KEYS["k2"]}), rotated_observed],
    )
    rotated.subscribe(order)(new_only.put)
    old = pgbus.Bus(pg_dsn, load_entrypoints=False, plugins=[SigningPlugin(KEYS, key_id="k1")])
    new = pgbus.Bus(pg_dsn, load_entrypoints=False, plugins=[SigningPlugin(KEYS, key_id="k2")])
    async with listener, rotated, old, new:
        await old.publish(order(order_id=1))
        await new.publish(order(order_id=2))
        got = [await asyncio.wait_for(both.get(), TIMEOUT) for _ in range(2)]
        only = await asyncio.wait_for(new_only.get(), TIMEOUT)
    assert got == [order(order_id=1), order(order_id=2)]
    assert only == order(order_id=2)
    assert [e.reason for e in rotated_observed.decode_errors] == ["signed with unknown key 'k1'"]


async def test_without_keys_the_plugin_does_nothing(pg_dsn, channel, monkeypatch):
    """With no keys configured, payloads are neither signed nor verified."""
    monkeypatch.delenv("PGBUS_SIGNING_KEYS", raising=False)
    order = model(channel)
    raw: asyncio.Queue[pgbus.Message] = asyncio.Queue()
    typed: asyncio.Queue[pgbus.Event] = asyncio.Queue()
    plugin = SigningPlugin()
    bus = pgbus.Bus(pg_dsn, load_entrypoints=False, plugins=[plugin])
    bus.subscribe(channel)(raw.put)
    bus.subscribe(order)(typed.put)
    payload = envelope(1)
    async with bus:
        await bus.notify(channel, payload)
        await bus.publish(order(order_id=2))
        unsigned = await asyncio.wait_for(raw.get(), TIMEOUT)
        published = await asyncio.wait_for(raw.get(), TIMEOUT)
        events = [await asyncio.wait_for(typed.get(), TIMEOUT) for _ in range(2)]
    assert not plugin.enabled
    assert unsigned.payload == payload
    assert '"sig"' not in published.payload
    assert events == [order(order_id=1), order(order_id=2)]


async def test_the_environment_configures_a_plugin_built_without_arguments(
    pg_dsn, channel, monkeypatch
):
    """PGBUS_SIGNING_KEYS, _KEY_ID, _MAX_AGE and _CHANNELS configure SigningPlugin()."""
    monkeypatch.setenv("PGBUS_SIGNING_KEYS", "k1:first secret, k2:second secret")
    monkeypatch.setenv("PGBUS_SIGNING_KEY_ID", "k2")
    monkeypatch.setenv("PGBUS_SIGNING_MAX_AGE", "30")
    monkeypatch.setenv("PGBUS_SIGNING_CHANNELS", f"{channel},other")
    plugin = SigningPlugin()
    pgbus.Bus(pg_dsn, load_entrypoints=False, plugins=[plugin])
    assert plugin.enabled
    assert plugin.key_id == "k2"
    assert plugin.max_age == 30
    assert plugin.covers(channel)
    assert not plugin.covers("unsigned_channel")
    signed = plugin.sign(channel, envelope(1))
    assert SigningPlugin(KEYS).verify(channel, signed) == "k2"


async def test_channels_outside_the_scope_are_left_alone(pg_dsn, channel, conn):
    """With channels=[...], other channels accept unsigned notifications."""
    order = model(channel)
    typed: asyncio.Queue[pgbus.Event] = asyncio.Queue()
    bus = pgbus.Bus(
        pg_dsn, load_entrypoints=False, plugins=[SigningPlugin(KEYS, channels=["signed_only"])]
    )
    bus.subscribe(order)(typed.put)
    async with bus:
        await notify(conn, channel, envelope(1))
        event = await asyncio.wait_for(typed.get(), TIMEOUT)
    assert event == order(order_id=1)


def test_bad_configuration_is_refused():
    """Unknown key_id, bad key ids, empty secrets, bad max_age and non-object payloads fail."""
    with pytest.raises(pgbus.ConfigError, match="not one of the keys"):
        SigningPlugin(KEYS, key_id="k3")
    with pytest.raises(pgbus.ConfigError, match="key id"):
        SigningPlugin({"has:colon": "x"})
    with pytest.raises(pgbus.ConfigError, match="empty secret"):
        SigningPlugin({"k1": ""})
    with pytest.raises(pgbus.ConfigError, match="max_age"):
        SigningPlugin(KEYS, max_age=0)
    with pytest.raises(pgbus.ConfigError, match="JSON object"):
        SigningPlugin(KEYS).sign("c", "plain text")
    with pytest.raises(pgbus.ConfigError, match="no keys"):
        SigningPlugin({}).sign("c", "{}")


def _installed() -> bool:
    return bool(importlib.metadata.entry_points(group="pgbus", name="signing"))


@pytest.mark.skipif(
    not _installed() and not os.environ.get("CI"),
    reason="needs `pip install ./plugins/pgbus-signing` (CI installs it)",
)
def test_the_entry_point_is_listed_and_replaced_by_an_explicit_instance(pg_dsn, monkeypatch):
    """pip-installed, it loads from the entry point; one passed in code takes its place."""
    monkeypatch.delenv("PGBUS_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    listed = subprocess.run(
        [sys.executable, "-m", "pgbus", "plugins", "--json"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["signing"]["source"] == "entry point"
    assert rows["signing"]["distribution"].startswith("pgbus-signing")
    explicit = SigningPlugin(KEYS)
    bus = pgbus.Bus(pg_dsn, plugins=[explicit])
    signing = [p for _, p, _, _ in bus.plugins.list() if isinstance(p, SigningPlugin)]
    assert signing == [explicit]
