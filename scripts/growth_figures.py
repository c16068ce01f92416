"""Measure where one PostgreSQL stops for pgbus: the figures of docs/growing.md.

Three curves, each against one throwaway cluster with PostgreSQL's default durability
(``fsync=on``, ``synchronous_commit=on``, ``full_page_writes=on``):

``listeners``
    N buses LISTENing on one channel (one process; each bus is what one service process
    has): the rate at which all of them keep up with events the server makes
    (``generate_series``, 100 per commit), and the latency publish -> handler entry at a
    paced 100 events/s. Plain subscriptions, and durable ones (each bus a subscription
    of its own name, so each event is handled N times).
``commits``
    W concurrent writers, each committing transactions of one ``INSERT`` into a business
    table plus: nothing (plain ``INSERT``), a plain ``publish(connection=)`` (NOTIFY in
    the transaction), or a durable ``publish(connection=)`` (a journal row, the wake-up
    after the commit). Transactions per second over a fixed time.
``fanout``
    K subscriptions of one bus on one channel (plain handlers, or durable subscriptions
    of K names): events per second from ``publish_many`` (100 per call) to the last of
    the K handlers.

    python scripts/growth_figures.py                 # full run, a Markdown report
    python scripts/growth_figures.py --quick --json  # small counts: a smoke test

Timing belongs here and in ``pgbus bench``, not in the tests. The listeners, the
publishers and the server share this machine's cores, so read every figure as a lower
bound of what the server can do when the services run on machines of their own.
"""

# ruff: noqa: INP001 - a script, not a package
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import statistics
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any, Final

import asyncpg

from pgbus import Bus
from pgbus.bench import (
    NOTIFY_ONE,
    BenchEvent,
    Counter,
    envelope_template,
    event_class,
    machine,
    make_event,
    new_channel,
    paced,
    percentile,
    publish_series,
    raw_listener,
)
from pgbus.durable import DurablePlugin
from pgbus.server import TempCluster

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

#: The server's default durability, which TempCluster switches off unless told.
DEFAULT_DURABILITY: Final = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
#: Events per commit when the server makes them, and per publish_many call.
BATCH: Final = 100
#: Paced rate of the latency measurement (events per second).
LATENCY_RATE: Final = 100


@dataclasses.dataclass(slots=True)
class Plan:
    """The points and counts of one run."""

    listeners: tuple[int, ...]
    durable_listeners: tuple[int, ...]
    listener_events: int
    latency_events: int
    writers: tuple[int, ...]
    commit_seconds: float
    fanout: tuple[int, ...]
    fanout_events: int
    reps: int

    @classmethod
    def make(cls, *, quick: bool, reps: int | None) -> Plan:
        """The full run, or a quick smoke test of every curve."""
        if quick:
            return cls((1, 4), (1, 2), 200, 20, (1, 4), 0.3, (1, 2), 200, reps or 1)
        return cls(
            (1, 10, 50, 200), (1, 10, 50), 2_000, 200, (1, 4, 16), 3.0, (1, 4, 16), 2_000, reps or 3
        )


def log(message: str) -> None:
    """Progress on stderr (the report goes to stdout)."""
    sys.stderr.write(f"{message}\n")
    sys.stderr.flush()


async def handled(counter: Counter, started: float) -> tuple[float, int]:
    """Wait for the arrivals ``counter`` was armed for: (seconds since ``started``, lost)."""
    lost = await counter.wait()
    end = counter.last_arrival if lost else time.perf_counter()
    return max(end - started, 1e-9), lost


# ------------------------------------------------------------------------ 1. listeners


@contextlib.asynccontextmanager
async def listening(
    dsn: str, schema: str, n: int, *, durable: bool
) -> AsyncIterator[tuple[type[BenchEvent], Counter, list[float]]]:
    """``n`` started buses subscribed to one fresh channel; yield (class, counter, latencies)."""
    cls = event_class(new_channel("grow"))
    counter = Counter()
    samples: list[float] = []
    clock = time.perf_counter

    async def handle(event: BenchEvent) -> None:
        if event.sent:
            samples.append(clock() - event.sent)
        counter.hit()

    buses = []
    for i in range(n):
        plugins = [DurablePlugin(schema=schema, pool_max_size=1)] if durable else []
        bus = Bus(dsn, load_entrypoints=False, plugins=plugins, pool_max_size=1)
        bus.subscribe(cls, durable=f"member{i}" if durable else None)(handle)
        buses.append(bus)
    try:
        for start in range(0, n, 25):  # not all at once: the server has two cores
            await asyncio.gather(*(b.start() for b in buses[start : start + 25]))
        yield cls, counter, samples
    finally:
        await asyncio.gather(*(b.stop() for b in buses))


async def listeners_point(
    dsn: str, schema: str, n: int, plan: Plan, *, durable: bool
) -> dict[str, Any]:
    """One point of the listeners curve: receive rate and paced latency with ``n`` buses."""
    publisher = Bus(
        dsn, load_entrypoints=False, plugins=[DurablePlugin(schema=schema)] if durable else []
    )
    pending: set[asyncio.Task[Any]] = set()
    async with publisher, listening(dsn, schema, n, durable=durable) as (cls, counter, samples):
        m = plan.listener_events
        counter.arm(n * m)
        started = time.perf_counter()
        if durable:  # the journal is written by publishers, not by a server-side NOTIFY
            for first in range(0, m, BATCH):
                await publisher.publish_many(
                    [make_event(cls, i) for i in range(first, first + BATCH)]
                )
        else:
            async with _connection(dsn) as pub:
                await publish_series(
                    pub, cls.pgbus_channel or "", envelope_template(), 1, m, batch=BATCH
                )
        seconds, lost = await handled(counter, started)

        clock = time.perf_counter
        count = plan.latency_events
        counter.arm(n * count)
        samples.clear()

        async def send(i: int) -> None:  # not awaited in line: a publish may take longer
            task = asyncio.create_task(publisher.publish(make_event(cls, i, clock())))
            pending.add(task)
            task.add_done_callback(pending.discard)

        await paced(LATENCY_RATE, count, send)
        lost += await counter.wait()
    return listeners_figures(n, m, seconds, samples, lost)


async def raw_listeners_point(dsn: str, n: int, plan: Plan) -> dict[str, Any]:
    """The same point with ``n`` bare asyncpg LISTEN connections that only count.

    The cheapest possible client: what is left of its figures is the server's work
    (and the one process reading ``n`` sockets).
    """
    channel = new_channel("rawgrow")
    counter = Counter()
    samples: list[float] = []
    clock = time.perf_counter

    def callback(_conn: object, _pid: int, _channel: str, payload: str) -> None:
        if payload.startswith("t"):
            samples.append(clock() - float(payload[1:]))
        counter.hit()

    async with contextlib.AsyncExitStack() as stack:
        for _ in range(n):
            await stack.enter_async_context(raw_listener(dsn, channel, callback))
        pub: asyncpg.Connection = await stack.enter_async_context(_connection(dsn))
        m = plan.listener_events
        counter.arm(n * m)
        started = time.perf_counter()
        await publish_series(pub, channel, "%1$s", 1, m, batch=BATCH)
        seconds, lost = await handled(counter, started)
        count = plan.latency_events
        counter.arm(n * count)

        async def send(_i: int) -> None:
            await pub.execute(NOTIFY_ONE, channel, f"t{clock()!r}")

        await paced(LATENCY_RATE, count, send)
        lost += await counter.wait()
    return listeners_figures(n, m, seconds, samples, lost)


def listeners_figures(
    n: int, events: int, seconds: float, samples: Sequence[float], lost: int
) -> dict[str, Any]:
    """One point of the listeners curve as JSON data (latencies in ms)."""
    milli = [s * 1e3 for s in samples] or [float("nan")]
    return {
        "listeners": n,
        "events_per_s": events / seconds,
        "deliveries_per_s": n * events / seconds,
        "p50_ms": percentile(milli, 0.5),
        "p99_ms": percentile(milli, 0.99),
        "lost": lost,
    }


@contextlib.asynccontextmanager
async def _connection(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn: asyncpg.Connection = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


# -------------------------------------------------------------------------- 2. commits


async def commits_point(
    pool: asyncpg.Pool, schema: str, buses: dict[str, Bus], writers: int, seconds: float
) -> dict[str, float]:
    """Transactions per second of ``writers`` concurrent writers, for each kind of commit."""
    insert = f'INSERT INTO "{schema}".business (n) VALUES ($1)'  # noqa: S608 - a quoted uuid name
    cls = event_class(new_channel("commit"))
    rates: dict[str, float] = {}
    for kind in ("insert", "plain", "durable"):
        bus = buses.get(kind)
        done = 0
        started = time.perf_counter()
        deadline = started + seconds

        async def writer(bus: Bus | None = bus, deadline: float = deadline) -> None:
            nonlocal done
            async with pool.acquire() as conn:
                while time.perf_counter() < deadline:
                    async with conn.transaction():
                        await conn.execute(insert, done)
                        if bus is not None:
                            await bus.publish(make_event(cls, done), connection=conn)
                    done += 1

        await asyncio.gather(*(writer() for _ in range(writers)))
        rates[kind] = done / (time.perf_counter() - started)
    return rates


# --------------------------------------------------------------------------- 3. fan-out


async def fanout_point(
    dsn: str, schema: str, k: int, events: int, *, durable: bool
) -> dict[str, Any]:
    """Events per second from publish_many to the last of ``k`` subscriptions of one bus."""
    cls = event_class(new_channel("fan"))
    counter = Counter()

    async def handle(event: BenchEvent) -> None:  # noqa: ARG001 - counted only
        counter.hit()

    plugins = [DurablePlugin(schema=schema)] if durable else []
    receiver = Bus(dsn, load_entrypoints=False, plugins=plugins)
    for i in range(k):
        receiver.subscribe(cls, name=f"sub{i}", durable=f"sub{i}" if durable else None)(handle)
    publisher = Bus(
        dsn, load_entrypoints=False, plugins=[DurablePlugin(schema=schema)] if durable else []
    )
    async with receiver, publisher:
        counter.arm(k * events)
        started = time.perf_counter()
        for first in range(0, events, BATCH):
            await publisher.publish_many([make_event(cls, i) for i in range(first, first + BATCH)])
        seconds, lost = await handled(counter, started)
    return {
        "subscriptions": k,
        "events_per_s": events / seconds,
        "deliveries_per_s": k * events / seconds,
        "lost": lost,
    }


# ------------------------------------------------------------------------------ report


def medians(points: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The median of every figure over repetitions of one point; losses add up."""
    out: dict[str, Any] = {}
    for key in points[0]:
        values = [p[key] for p in points]
        out[key] = sum(values) if key == "lost" else statistics.median(values)
    return out


async def repeat(
    reps: int, run: Callable[..., Awaitable[dict[str, Any]]], *args: Any, **kwargs: Any
) -> dict[str, Any]:
    """``run(*args, **kwargs)`` ``reps`` times; the medians."""
    return medians([await run(*args, **kwargs) for _ in range(reps)])


async def measure(plan: Plan, cluster: TempCluster) -> dict[str, Any]:
    """Every curve against ``cluster``."""
    dsn = cluster.dsn
    schema = f"growth_{uuid.uuid4().hex[:10]}"
    setup = Bus(dsn, load_entrypoints=False, plugins=[DurablePlugin(schema=schema)])
    await setup.migrate()
    report: dict[str, Any] = {"listeners": {"raw asyncpg": []}, "fanout": {}, "commits": []}
    for n in plan.listeners:
        log(f"listeners: raw asyncpg, {n}")
        point = await repeat(plan.reps, raw_listeners_point, dsn, n, plan)
        report["listeners"]["raw asyncpg"].append(point)
    for durable in (False, True):
        side = "durable" if durable else "plain"
        points = plan.durable_listeners if durable else plan.listeners
        report["listeners"][side] = []
        for n in points:
            log(f"listeners: {side}, {n}")
            point = await repeat(plan.reps, listeners_point, dsn, schema, n, plan, durable=durable)
            report["listeners"][side].append(point)

    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=max(plan.writers))
    try:
        await pool.execute(
            f'CREATE TABLE "{schema}".business (id bigserial PRIMARY KEY, n int NOT NULL)'
        )
        plain = Bus(dsn, load_entrypoints=False)
        durable_bus = Bus(dsn, load_entrypoints=False, plugins=[DurablePlugin(schema=schema)])
        async with plain, durable_bus:
            buses = {"plain": plain, "durable": durable_bus}
            for w in plan.writers:
                log(f"commits: {w} writers")
                runs = [
                    await commits_point(pool, schema, buses, w, plan.commit_seconds)
                    for _ in range(plan.reps)
                ]
                report["commits"].append({"writers": w, **medians(runs)})
    finally:
        await pool.close()

    for durable in (False, True):
        side = "durable" if durable else "plain"
        report["fanout"][side] = []
        for k in plan.fanout:
            log(f"fanout: {side}, {k}")
            point = await repeat(
                plan.reps, fanout_point, dsn, schema, k, plan.fanout_events, durable=durable
            )
            report["fanout"][side].append(point)
    return report


def lost(report: dict[str, Any]) -> int:
    """Events lost over every curve."""
    points = [
        p for curve in ("listeners", "fanout") for side in report[curve].values() for p in side
    ]
    return sum(p["lost"] for p in points)


def table(title: str, head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table under a bold title; the first column left, numbers right."""
    align = ["---:" if i != 1 or head[1] != "kind" else "---" for i in range(len(head))]
    out = [title, "", f"| {' | '.join(head)} |", f"|{'|'.join(align)}|"]
    out += [f"| {' | '.join(row)} |" for row in rows]
    return [*out, ""]


def number(value: float) -> str:
    """A rate for the tables: whole numbers with separators, three digits below 100."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"  # noqa: PLR2004


def markdown(report: dict[str, Any]) -> str:
    """The report as the Markdown tables of docs/growing.md."""
    listeners = [
        [
            str(p["listeners"]),
            side,
            number(p["events_per_s"]),
            number(p["deliveries_per_s"]),
            f"{p['p50_ms']:.1f} ms",
            f"{p['p99_ms']:.1f} ms",
        ]
        for side, points in report["listeners"].items()
        for p in points
    ]
    commits = [
        [str(p["writers"]), number(p["insert"]), number(p["plain"]), number(p["durable"])]
        for p in report["commits"]
    ]
    fanout = [
        [str(p["subscriptions"]), side, number(p["events_per_s"]), number(p["deliveries_per_s"])]
        for side, points in report["fanout"].items()
        for p in points
    ]
    lines = [
        *table(
            "**Listeners** on one channel (receive: events made by the server, 100 per commit;"
            f" latency: publish -> handler at {LATENCY_RATE} events/s):",
            ["listeners", "kind", "events/s all keep up with", "deliveries/s", "p50", "p99"],
            listeners,
        ),
        *table(
            "**Commits** with default durability (transactions/s, each one `INSERT` plus):",
            ["writers", "nothing else", "plain `publish(connection=)`", "durable"],
            commits,
        ),
        *table(
            f"**Fan-out**: subscriptions of one bus (`publish_many`, {BATCH} per call):",
            ["subscriptions", "kind", "events/s", "deliveries/s"],
            fanout,
        ),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every curve on a default-durability throwaway cluster and print the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke test")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    parser.add_argument("--reps", type=int, help="repetitions per point (default 3; quick 1)")
    args = parser.parse_args(argv)
    plan = Plan.make(quick=args.quick, reps=args.reps)
    started = time.perf_counter()
    with TempCluster(max_connections=600, settings=DEFAULT_DURABILITY) as cluster:
        report = asyncio.run(measure(plan, cluster))
        conn_version = asyncio.run(_version(cluster.dsn))
    report["machine"] = {**machine(), "postgresql": conn_version, "settings": DEFAULT_DURABILITY}
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["lost"] = lost(report)
    sys.stdout.write(json.dumps(report) + "\n" if args.json else markdown(report))
    return 0 if report["lost"] == 0 else 1


async def _version(dsn: str) -> str:
    async with _connection(dsn) as conn:
        return str(await conn.fetchval("SHOW server_version"))


if __name__ == "__main__":
    sys.exit(main())
