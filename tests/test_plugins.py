"""Plugins: entry-point loading of a real distribution, blocking and replacing built-ins."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest

import pgbus
from pgbus.default_plugins import DEFAULT_PLUGINS
from pgbus.default_plugins.codec import pgbus_encoder
from pgbus.types import Outgoing

PLUGIN_DIST = Path(__file__).parent / "plugin_dist"


@pytest.fixture(scope="session")
def installed_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pip-install tests/plugin_dist into a private directory (a real distribution)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(target),
            str(PLUGIN_DIST),
        ],
        check=True,
        timeout=300,
    )
    return target


@pytest.fixture
def plugin_on_path(installed_plugin, monkeypatch):
    monkeypatch.syspath_prepend(str(installed_plugin))
    importlib.invalidate_caches()
    module = importlib.import_module("pgbus_test_plugin")
    module.CALLS.clear()
    yield module
    sys.modules.pop("pgbus_test_plugin", None)


async def test_entry_point_plugin_is_loaded_and_replaces_backoff(
    plugin_on_path, pg_dsn, pg_conn, channel
):
    """A pip-installed plugin loads from the pgbus entry point; its backoff is the one used."""
    bus = pgbus.Bus(pg_dsn)
    names = {name: origin for name, _, origin, _ in bus.plugins.list()}
    assert names["fixed_backoff"] == "entry point"
    assert names["backoff"] == "built-in"
    assert ("pgbus_configure", bus) in plugin_on_path.CALLS
    reconnected: asyncio.Queue[None] = asyncio.Queue()

    class Watch:
        @pgbus.hookimpl
        def pgbus_on_resync(self, bus, channels, disconnected_at, reconnected_at) -> None:
            reconnected.put_nowait(None)

    bus.plugins.register(Watch())
    bus.subscribe(channel)(lambda m: None)
    async with bus:
        await pg_conn.execute("SELECT pg_terminate_backend($1)", bus.listener_pid)
        await asyncio.wait_for(reconnected.get(), 10)
    assert ("pgbus_reconnect_backoff", 1) in plugin_on_path.CALLS


def test_autoload_can_be_turned_off(plugin_on_path, pg_dsn, monkeypatch):
    """load_entrypoints=False and PGBUS_DISABLE_PLUGIN_AUTOLOAD=1 both skip entry points."""
    assert "fixed_backoff" not in _names(pgbus.Bus(pg_dsn, load_entrypoints=False))
    monkeypatch.setenv("PGBUS_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "fixed_backoff" not in _names(pgbus.Bus(pg_dsn))
    monkeypatch.setenv("PGBUS_DISABLE_PLUGIN_AUTOLOAD", "0")
    assert "fixed_backoff" in _names(pgbus.Bus(pg_dsn))


def test_plugins_can_be_blocked_by_name(plugin_on_path, pg_dsn, monkeypatch):
    """disable_plugins and PGBUS_DISABLE_PLUGINS block built-ins and entry points by name."""
    bus = pgbus.Bus(pg_dsn, disable_plugins=["metrics", "fixed_backoff"])
    assert not {"metrics", "fixed_backoff"} & _names(bus)
    with pytest.raises(pgbus.ConfigError, match="metrics"):
        _ = bus.metrics
    monkeypatch.setenv("PGBUS_DISABLE_PLUGINS", "backoff, routing")
    assert not {"backoff", "routing"} & _names(pgbus.Bus(pg_dsn, load_entrypoints=False))


def _pgbus(site: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pgbus ARGS`` with the installed plugin distribution on the path."""
    environ = {**os.environ, "PYTHONPATH": str(site), **env}
    argv = [sys.executable, "-m", "pgbus", *args]
    return subprocess.run(
        argv, capture_output=True, text=True, env=environ, timeout=60, check=False
    )


def test_a_plugin_distribution_adds_a_command(installed_plugin):
    """A `pgbus.commands` entry point is a command, listed in --help, run in the group context."""
    result = _pgbus(installed_plugin, "--help")
    assert result.returncode == 0, result.stderr
    assert "Plugin commands" in result.stdout
    assert "hello" in result.stdout
    assert "Say hello to the database" in result.stdout
    result = _pgbus(installed_plugin, "--timeout", "3", "hello", "--dsn", "postgresql://db/x")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hello postgresql://db/x within 3.0s"
    result = _pgbus(installed_plugin, "run", "--help")  # the built-in, not the plugin's
    assert "MODULE:ATTR" in result.stdout
    result = _pgbus(installed_plugin, "hello", PGBUS_DISABLE_PLUGIN_AUTOLOAD="1")
    assert result.returncode == 2
    assert "No such command 'hello'" in result.stderr


def _names(bus: pgbus.Bus) -> set[str]:
    return {name for name, *_ in bus.plugins.list()}


async def test_a_registered_codec_replaces_the_builtin(make_bus, channel):
    """A plugin's decoder wins over the built-in one (which runs last)."""
    Ping = type("Ping", (pgbus.Event,), {"__annotations__": {"n": int}}, channel=channel)

    class Reversed:
        @pgbus.hookimpl
        def pgbus_decoder(self, channel, event_types):
            def decode(message: pgbus.Message) -> pgbus.Delivery:
                return pgbus.Delivery(message, event_types[0](n=int(message.payload[::-1])))

            return decode

    got: asyncio.Queue[pgbus.Event] = asyncio.Queue()
    bus = make_bus(plugins=[Reversed()])
    bus.subscribe(Ping)(got.put)
    async with bus:
        await bus.notify(channel, "321")
        assert await asyncio.wait_for(got.get(), 5) == Ping(n=123)


def test_without_a_codec_typed_subscriptions_fail_clearly(pg_dsn, channel):
    """Blocking the codec with nothing to replace it is a clear ConfigError."""
    Ping = type("Ping", (pgbus.Event,), {"__annotations__": {"n": int}}, channel=channel)
    bus = pgbus.Bus(pg_dsn, load_entrypoints=False, disable_plugins=["codec"])
    with pytest.raises(pgbus.ConfigError, match="decoder"):
        bus.subscribe(Ping)(lambda e: None)


def test_bad_plugins_are_refused(pg_dsn):
    """A misspelled hook or an async firstresult hook raises PluginError at registration."""

    class Typo:
        @pgbus.hookimpl
        def pgbus_on_recieved(self, messages):
            """Misspelled."""

    class AsyncBackoff:
        @pgbus.hookimpl
        async def pgbus_reconnect_backoff(self, attempt, error):
            return 1.0

    bus = pgbus.Bus(pg_dsn, load_entrypoints=False)
    with pytest.raises(pgbus.PluginError, match="pgbus_on_recieved"):
        bus.plugins.register(Typo())
    with pytest.raises(pgbus.PluginError, match="async"):
        bus.plugins.register(AsyncBackoff())
    assert {"codec", "routing", "backoff", "metrics"} <= _names(bus)
    assert len(bus.plugins.list()) == len(DEFAULT_PLUGINS)  # nothing half-registered


def test_unregister_by_name(pg_dsn):
    """A plugin can be removed by name; an unknown name is a PluginError."""
    bus = pgbus.Bus(pg_dsn, load_entrypoints=False)
    plugin = bus.plugins.unregister("metrics")
    assert isinstance(plugin, pgbus.default_plugins.metrics.Metrics)
    with pytest.raises(pgbus.PluginError):
        bus.plugins.unregister("metrics")


def test_the_codec_writes_what_model_dump_json_writes() -> None:
    """The built-in encoder calls the model's serializer directly: aliases (when the model
    serializes by alias), field serializers and excluded fields come out as in
    model_dump_json()."""

    class Shipped(pgbus.Event, channel="codec_check"):
        model_config = pydantic.ConfigDict(serialize_by_alias=True)
        order_id: int = pydantic.Field(alias="orderId")
        secret: str = pydantic.Field("x", exclude=True)
        when: float

        @pydantic.field_serializer("when")
        def _rounded(self, value: float) -> float:
            return round(value, 1)

    event = Shipped(orderId=7, when=1.26)
    payload = pgbus_encoder(Shipped)(Outgoing("codec_check", event, "abc", 1.5, {"k": "v"}))
    envelope = json.loads(payload)
    assert json.dumps(envelope["data"], separators=(",", ":")) == event.model_dump_json()
    assert envelope["data"] == {"orderId": 7, "when": 1.3}
    assert (envelope["id"], envelope["ts"], envelope["headers"]) == ("abc", 1.5, {"k": "v"})
