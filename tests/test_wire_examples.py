"""The wire format's examples (examples/wire/) for psql, Go and Node, against a real PostgreSQL.

Each foreign publisher's event reaches a pgbus subscriber typed, and each foreign
listener receives an event pgbus published. Without psql, Go (with pgx) or Node (with
``npm install`` run in examples/wire/node) a test is skipped, and fails in CI, whose
``.ci/run`` installs them. Every envelope seen is validated against the JSON Schema of
the wire-format page.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

import jsonschema
import pytest
from _helpers import Process, missing

import pgbus
from pgbus.default_plugins.codec import is_envelope, wire_schema

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

ROOT = Path(__file__).resolve().parent.parent
WIRE = ROOT / "examples" / "wire"
SCHEMA = ROOT / "docs" / "reference" / "envelope.schema.json"
#: Where Debian's golang-github-jackc-pgx-v4-dev puts pgx (the Go example's GOPATH).
GOPATH = Path("/usr/share/gocode")


def order_on(channel: str) -> type[pgbus.Event]:
    """The examples' OrderPlaced model, bound to ``channel``."""
    return type(
        "OrderPlaced",
        (pgbus.Event,),
        {"__annotations__": {"order_id": int, "total": Decimal}},
        channel=channel,
    )


def tool(name: str) -> str:
    """The path of program ``name``, or skip (fail in CI) when it is not installed."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed (.ci/run installs it)")
    return path


@pytest.fixture(scope="session")
def go_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/wire/go built with the Debian pgx, offline."""
    go = tool("go")
    if not (GOPATH / "src/github.com/jackc/pgx/v4").is_dir():
        missing(f"pgx is not in {GOPATH} (apt-get install golang-github-jackc-pgx-v4-dev)")
    binary = tmp_path_factory.mktemp("go") / "wire"
    env = {**os.environ, "GOPATH": str(GOPATH), "GO111MODULE": "off", "GOFLAGS": ""}
    if not any(env.get(name) for name in ("GOCACHE", "XDG_CACHE_HOME", "HOME")):
        env["GOCACHE"] = str(tmp_path_factory.mktemp("gocache"))  # go needs a build cache

    async def build() -> tuple[int | None, bytes]:
        proc = await asyncio.create_subprocess_exec(
            go,
            "build",
            "-o",
            str(binary),
            ".",
            cwd=WIRE / "go",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 300)
        return proc.returncode, out

    code, out = asyncio.run(build())
    assert code == 0, out.decode()
    return binary


@pytest.fixture(scope="session")
def node() -> str:
    """Node, with pg installed in examples/wire/node."""
    path = tool("node")
    if not (WIRE / "node" / "node_modules" / "pg").is_dir():
        missing("pg is not installed: run `npm install` in examples/wire/node")
    return path


@pytest.fixture
async def run(pg_dsn: str) -> AsyncIterator[Callable[..., object]]:
    """Start a program; every one still running at the end is killed."""
    procs: list[asyncio.subprocess.Process] = []

    async def start(*args: str | Path, cwd: Path = WIRE) -> Process:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=cwd,
        )
        procs.append(proc)
        return Process(proc)

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def finished(program: Process) -> None:
    """Wait for ``program`` to end, and check it ended well."""
    await asyncio.wait_for(program.proc.wait(), 30)
    assert program.proc.stderr is not None
    errors = await program.proc.stderr.read()
    assert program.proc.returncode == 0, errors.decode()


def conforms(payload: str) -> None:
    """Check an envelope against the JSON Schema on the wire-format page."""
    jsonschema.validate(json.loads(payload), json.loads(SCHEMA.read_text()))


def test_the_pages_schema_is_the_codecs() -> None:
    """docs/reference/envelope.schema.json is what the codec's wire_schema() gives."""
    assert json.loads(SCHEMA.read_text()) == wire_schema()
    assert SCHEMA.read_text() == json.dumps(wire_schema(), indent=2) + "\n"


async def test_envelopes_pgbus_publishes_conform_to_the_schema(make_bus, channel) -> None:
    """What pgbus itself sends, headers included, validates against the published schema."""
    Order = order_on(channel)
    raw: asyncio.Queue[pgbus.Message] = asyncio.Queue()
    bus = make_bus()
    bus.subscribe(channel)(raw.put)
    async with bus:
        await bus.publish(Order(order_id=1, total=Decimal("2.50")))
        await bus.publish(Order(order_id=2, total=Decimal(3)), headers={"traceparent": "00-x"})
        for _ in range(2):
            conforms((await asyncio.wait_for(raw.get(), 5)).payload)


@pytest.mark.parametrize(
    "payload",
    [
        '{"v":1,"id":"a","type":"T","ts":"2024-11-25T10:20:00Z","data":{}}',
        '{"v":1,"id":"a","type":"T","ts":1732530000250,"data":{}}',
        '{"v":2,"id":"a","type":"T","ts":1.5,"data":{}}',
        '{"v":true,"id":"a","type":"T","ts":1.5,"data":{}}',
        '{"v":1,"id":"","type":"T","ts":1.5,"data":{}}',
        '{"v":1,"id":"a","type":"T","ts":1.5,"data":null}',
        '{"v":1,"id":"a","type":"T","ts":1.5}',
    ],
)
def test_the_schema_refuses_what_pgbus_refuses(payload: str) -> None:
    """What pgbus refuses (a string or millisecond ts, v 2, empty id, no data) fails the schema."""
    with pytest.raises(jsonschema.ValidationError):
        conforms(payload)


async def received(
    make_bus, model: type[pgbus.Event], publish: Callable[[], object], count: int
) -> tuple[list[pgbus.Delivery], list[str]]:
    """Run ``publish`` with a pgbus subscriber; the typed deliveries and the raw payloads."""
    channel = model.pgbus_channel
    assert channel is not None
    deliveries: asyncio.Queue[pgbus.Delivery] = asyncio.Queue()
    raw: asyncio.Queue[pgbus.Message] = asyncio.Queue()

    class Deliveries:
        @pgbus.hookimpl
        def pgbus_on_handled(
            self, subscription: pgbus.Subscription, delivery: pgbus.Delivery, duration: float
        ) -> None:
            if subscription.name == "typed":
                deliveries.put_nowait(delivery)

    bus = make_bus(plugins=[Deliveries()])

    @bus.subscribe(model, name="typed")
    async def typed(event: pgbus.Event) -> None:
        pass

    bus.subscribe(channel)(raw.put)
    async with bus:
        await publish()  # type: ignore[misc]
        got = [await asyncio.wait_for(deliveries.get(), 10) for _ in range(count)]
        payloads = [(await asyncio.wait_for(raw.get(), 10)).payload for _ in range(count)]
        assert bus.metrics.snapshot().decode_failures == 0
    return got, payloads


async def test_psql_publishes_an_envelope_and_a_bare_object(make_bus, run, channel, pg_dsn) -> None:
    """examples/wire/publish.sql, run by psql, delivers a typed envelope and a bare object."""
    psql = tool("psql")

    async def publish() -> None:
        program = await run(
            psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-v", f"channel={channel}",
            "-f", WIRE / "publish.sql", pg_dsn,
        )  # fmt: skip
        await finished(program)

    Order = order_on(channel)
    (envelope, bare), payloads = await received(make_bus, Order, publish, 2)
    assert envelope.event == Order(order_id=42, total=Decimal("9.90"))
    assert envelope.id is not None
    assert envelope.published_at is not None
    assert abs(envelope.published_at - envelope.message.received_at) < 60
    assert bare.event == Order(order_id=43, total=Decimal("1.50"))
    assert (bare.id, bare.published_at) == (None, None)
    conforms(payloads[0])
    assert not is_envelope(json.loads(payloads[1]))


async def test_a_go_publisher_reaches_a_pgbus_subscriber(
    make_bus, run, channel, pg_dsn, go_example
) -> None:
    """examples/wire/go publish sends an envelope pgbus decodes into the typed event."""

    async def publish() -> None:
        await finished(await run(go_example, "publish", pg_dsn, channel))

    Order = order_on(channel)
    (delivery,), (payload,) = await received(make_bus, Order, publish, 1)
    assert delivery.event == Order(order_id=42, total=Decimal("9.90"))
    assert delivery.published_at is not None
    assert abs(delivery.published_at - delivery.message.received_at) < 60
    conforms(payload)


async def test_a_node_publisher_reaches_a_pgbus_subscriber(
    make_bus, run, channel, pg_dsn, node
) -> None:
    """examples/wire/node/publish.js sends an envelope pgbus decodes into the typed event."""

    async def publish() -> None:
        await finished(await run(node, "publish.js", pg_dsn, channel, cwd=WIRE / "node"))

    Order = order_on(channel)
    (delivery,), (payload,) = await received(make_bus, Order, publish, 1)
    assert delivery.event == Order(order_id=42, total=Decimal("9.90"))
    assert delivery.published_at is not None
    assert abs(delivery.published_at - delivery.message.received_at) < 60
    conforms(payload)


async def listened(make_bus, channel: str, program: Process) -> None:
    """Publish an OrderPlaced with pgbus once ``program`` listens; check what it printed."""
    await program.until("listening", stream="stdout")
    Order = order_on(channel)
    async with make_bus() as bus:
        event_id = await bus.publish(Order(order_id=42, total=Decimal("9.90")))
    line = await program.until("OrderPlaced", stream="stdout")
    assert line.split() == ["OrderPlaced", f"id={event_id}", "order_id=42", "total=9.90"]
    await finished(program)


async def test_a_go_listener_receives_a_pgbus_event(
    make_bus, run, channel, pg_dsn, go_example
) -> None:
    """examples/wire/go listen decodes an event that pgbus published."""
    await listened(make_bus, channel, await run(go_example, "listen", pg_dsn, channel))


async def test_a_node_listener_receives_a_pgbus_event(make_bus, run, channel, pg_dsn, node) -> None:
    """examples/wire/node/listen.js decodes an event that pgbus published."""
    program = await run(node, "listen.js", pg_dsn, channel, cwd=WIRE / "node")
    await listened(make_bus, channel, program)
