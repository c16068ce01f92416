# ruff: noqa: T201 - a benchmark script prints its table
"""Benchmark: durable publish and receive throughput next to plain NOTIFY (not a test).

Usage: python tests/durable/bench_durable.py [DSN] [--events N] [--reps R] [--cluster]

``--cluster`` runs against a throwaway cluster (fsync off, like the NOTIFY notes)
instead of DSN.

Runs each case R times, interleaved, and prints medians (events/s) as a Markdown table
for docs/durable.md. It uses a throwaway schema that it drops at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from typing import Any

import asyncpg

import pgbus
from pgbus.durable import DurablePlugin, migrate


def make_event(channel: str) -> type[pgbus.Event]:
    class Tick(pgbus.Event, channel=channel):
        n: int
        note: str = "a short text field of some forty bytes..."

    return Tick


class Counter:
    def __init__(self, total: int) -> None:
        self.total = total
        self.count = 0
        self.done = asyncio.Event()

    async def __call__(self, _: Any) -> None:
        self.count += 1
        if self.count >= self.total:
            self.done.set()


def bus_for(dsn: str, schema: str | None) -> pgbus.Bus:
    plugins = [DurablePlugin(schema, prune_interval=None)] if schema else []
    return pgbus.Bus(dsn, load_entrypoints=False, plugins=plugins, stop_timeout=30)


async def raw_notify(dsn: str, schema: str | None, n: int) -> float:
    """The floor: asyncpg alone, one ``pg_notify`` per statement (schema unused)."""
    del schema
    conn = await asyncpg.connect(dsn)
    try:
        start = time.perf_counter()
        for i in range(n):
            await conn.execute("SELECT pg_notify('bench_raw', $1)", str(i))
        return n / (time.perf_counter() - start)
    finally:
        await conn.close()


async def publish_one_by_one(dsn: str, schema: str | None, n: int) -> float:
    tick = make_event(f"b_{uuid.uuid4().hex[:8]}")
    async with bus_for(dsn, schema) as bus:
        await bus.publish(tick(n=-1))  # warm the pool
        start = time.perf_counter()
        for i in range(n):
            await bus.publish(tick(n=i))
        return n / (time.perf_counter() - start)


async def publish_batched(dsn: str, schema: str | None, n: int, batch: int = 100) -> float:
    tick = make_event(f"b_{uuid.uuid4().hex[:8]}")
    async with bus_for(dsn, schema) as bus:
        await bus.publish(tick(n=-1))
        start = time.perf_counter()
        for first in range(0, n, batch):
            await bus.publish_many([tick(n=i) for i in range(first, first + batch)])
        return n / (time.perf_counter() - start)


async def receive_live(dsn: str, schema: str | None, n: int, batch: int = 100) -> float:
    """Publish in batches of 100 while a subscriber handles: end-to-end events/s."""
    tick = make_event(f"b_{uuid.uuid4().hex[:8]}")
    counter = Counter(n)
    sub_bus = bus_for(dsn, schema)
    if schema:
        sub_bus.subscribe(tick, durable="bench")(counter)
    else:
        sub_bus.subscribe(tick)(counter)
    async with sub_bus, bus_for(dsn, schema) as pub:
        start = time.perf_counter()
        for first in range(0, n, batch):
            await pub.publish_many([tick(n=i) for i in range(first, first + batch)])
        await asyncio.wait_for(counter.done.wait(), 300)
        return n / (time.perf_counter() - start)


async def catch_up(dsn: str, schema: str, n: int, batch: int = 100) -> float:
    """A durable subscriber that was away replays n journaled events: events/s."""
    tick = make_event(f"b_{uuid.uuid4().hex[:8]}")
    first_run = bus_for(dsn, schema)
    first_run.subscribe(tick, durable="replay")(Counter(1))
    async with first_run:  # registers the subscription
        pass
    async with bus_for(dsn, schema) as pub:
        for first in range(0, n, batch):
            await pub.publish_many([tick(n=i) for i in range(first, first + batch)])
    counter = Counter(n)
    sub_bus = bus_for(dsn, schema)
    sub_bus.subscribe(tick, durable="replay")(counter)
    start = time.perf_counter()
    async with sub_bus:
        await asyncio.wait_for(counter.done.wait(), 300)
        return n / (time.perf_counter() - start)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "dsn",
        nargs="?",
        default=os.environ.get("PGBUS_DSN", "postgresql://postgres@127.0.0.1/postgres"),
    )
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cluster", action="store_true", help="use a throwaway cluster")
    args = parser.parse_args()
    if args.cluster:
        from pgbus.server import TempCluster

        with TempCluster() as cluster:
            args.dsn = cluster.dsn
            await run(args)
    else:
        await run(args)


async def run(args: argparse.Namespace) -> None:
    schema = f"pgbus_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(args.dsn)
    await migrate(conn, schema)
    n = args.events
    cases: dict[str, list[float]] = {}
    try:
        for _ in range(args.reps):
            for mode, sch in (("plain", None), ("durable", schema)):
                for name, fn in (
                    ("publish, 1 event per call", publish_one_by_one),
                    ("publish_many, 100 per call", publish_batched),
                    ("publish_many 100 + receive, end to end", receive_live),
                ):
                    count = n // 5 if fn is publish_one_by_one else n
                    cases.setdefault(f"{name}|{mode}", []).append(await fn(args.dsn, sch, count))
            cases.setdefault("raw asyncpg pg_notify, 1 per statement|plain", []).append(
                await raw_notify(args.dsn, None, n // 5)
            )
            cases.setdefault("catch-up after a restart (replay)|durable", []).append(
                await catch_up(args.dsn, schema, n)
            )
    finally:
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()
    rows: dict[str, dict[str, float]] = {}
    for key, values in cases.items():
        name, mode = key.split("|")
        rows.setdefault(name, {})[mode] = statistics.median(values)
    print(f"events per run: {n} (1-by-1 publish: {n // 5}); median of {args.reps} runs\n")
    print("| case | plain NOTIFY | durable | durable / plain |")
    print("|---|---:|---:|---:|")
    for name, by_mode in rows.items():
        plain = by_mode.get("plain")
        durable = by_mode.get("durable")
        ratio = f"{durable / plain:.2f}" if plain and durable else "-"
        plain_s = f"{plain:,.0f}/s" if plain else "-"
        durable_s = f"{durable:,.0f}/s" if durable else "-"
        print(f"| {name} | {plain_s} | {durable_s} | {ratio} |")


if __name__ == "__main__":
    asyncio.run(main())
