"""``pgbus bench``: pgbus measured side by side with raw asyncpg, in the same run.

Every pgbus figure has a baseline written with asyncpg alone (and pydantic where the
scenario decodes), measured in the same process, against the same server, with the same
payloads. Repetitions of pgbus and of its baseline are interleaved (the order rotates
from one repetition to the next), and the table reports the median with the min and max,
because the machine's speed drifts between runs while the ratio does not.

Scenarios:

``publish``
    one event per call: ``await bus.publish(event)`` against
    ``pool.execute("SELECT pg_notify($1, $2)", channel, event.model_dump_json())``.
``publish_many``
    100 typed events per call, ``bus.publish_many(events)``, against one
    ``SELECT pg_notify($1, x) FROM unnest($2::text[])`` of 100 payloads encoded
    beforehand (the ``raw + model_dump_json`` peer encodes them in the loop).
``receive``
    typed events decoded, routed and handled by an ``async def`` handler with every
    default plugin on, against a raw listener whose sync callback validates the same
    pydantic model; ``broadcaster`` is a peer when it is installed. The events are made
    by PostgreSQL itself (``generate_series``), so the publisher costs this process
    nothing. Every event must arrive: ``lost`` counts those that did not.
``receive_metrics``
    the same pgbus receive with the metrics plugin on, against it blocked.
``receive_batch``
    the same receive into a batch handler (``batch=100, batch_wait=0.05``, a list of
    typed events per call) with every default plugin on, against the same raw listener.
``otel_metrics``, ``otel_unsampled`` and ``otel_sampled``
    the CPU µs per received event with ``pgbus-opentelemetry`` (SDK metrics on; SDK
    tracing on, events whose ``traceparent`` is unsampled; the same, sampled) against
    the same receive without it, when the plugin and the SDK are installed.
``latency_1k`` and ``latency_5k``
    publish to handler entry at a paced rate, p99 (p50 and max in the details).
``request``
    ``bus.request`` round trips, one in flight, between two buses of one process
    (p99; p50 in the details), against a raw asyncpg NOTIFY/LISTEN ping-pong between
    two connections.
``fanout``
    100 ``Bus`` instances against 100 raw listener connections, one process,
    deliveries per second. When the server has too few free connections a throwaway
    cluster (``max_connections=400``) is started for it, or the count is scaled down.
``memory``
    the RSS of a listener process (``/proc/<pid>/status``) after 10k events and after
    1M; the figure is the growth in MB.
``durable_publish`` and ``durable_receive``
    the durable mode against plain NOTIFY (``publish_many``; publish to handled), when
    :mod:`pgbus.durable` is installed.
``relay_nats``, ``relay_kafka`` and their ``_latency_1k``
    ``pgbus-relay`` to NATS JetStream and Kafka: ``publish_many`` to the broker's ack
    (events/s, with p50/p99 publish -> ack in the details), and publish -> ack at
    1,000 events/s (p99), against a durable subscription's publish -> handled, when
    the plugin and a broker are there (``$PGBUS_BENCH_NATS``, ``$PGBUS_BENCH_KAFKA``,
    127.0.0.1:4222 and :9092, else a ``nats-server -js`` of its own).

The baseline is raw asyncpg everywhere except ``receive_metrics`` (pgbus with the
metrics plugin blocked), the ``otel_*`` scenarios (pgbus without the plugin), the
durable scenarios (pgbus with plain NOTIFY) and the relay scenarios (a durable
subscription).

Run it as ``pgbus bench`` or ``python -m pgbus.bench``; ``--quick`` runs every scenario
with small counts (well under a minute) and asserts only that nothing was lost.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import importlib
import importlib.util
import json
import logging
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import asyncpg
import pydantic

from pgbus._bus import Bus
from pgbus._events import Event
from pgbus._markers import hookimpl
from pgbus._util import keep_session
from pgbus._version import __version__
from pgbus.server import (
    ClusterError,
    ServerNotFound,
    TempCluster,
    _free_port,
    find_bindirs,
    local_server,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence

    from pgbus._publish import Connection

__all__ = [
    "BENCHES",
    "SCENARIOS",
    "Config",
    "Measure",
    "Result",
    "Series",
    "main",
    "markdown",
    "run",
    "run_benches",
]

logger = logging.getLogger(__name__)

#: The single-publish statement both sides use.
NOTIFY_ONE: Final = "SELECT pg_notify($1, $2)"
#: The raw batch statement (one channel, many payloads).
NOTIFY_UNNEST: Final = "SELECT pg_notify($1, x) FROM unnest($2::text[]) AS x"
#: Events made by the server: ``format($2, i)`` for ``i`` in ``[$3, $4]``.
NOTIFY_SERIES: Final = (
    "SELECT count(pg_notify($1, format($2, i))) FROM generate_series($3::int, $4::int) AS i"
)
#: Events per server-side statement (one transaction) when filling a listener.
SERIES_BATCH: Final = 10_000
#: Seconds without a new arrival after which the missing events count as lost.
STALL_SECONDS: Final = 10.0
#: How often a wait for arrivals looks at the count.
POLL_SECONDS: Final = 0.25
#: Seconds a wait for arrivals may take in all.
MAX_WAIT_SECONDS: Final = 600.0
#: Events the memory scenario lets its listener process have outstanding.
MEMORY_WINDOW: Final = 20_000
#: Connections a scenario keeps besides its listeners (publisher, pools, headroom).
SPARE_CONNECTIONS: Final = 20

SCENARIOS: Final = (
    "publish",
    "publish_many",
    "receive",
    "receive_metrics",
    "receive_batch",
    "receive_dashboard",
    "otel_metrics",
    "otel_unsampled",
    "otel_sampled",
    "latency_1k",
    "latency_5k",
    "request",
    "fanout",
    "memory",
    "durable_publish",
    "durable_receive",
    "durable_writers",
    "durable_rows",
    "durable_latency_1k",
    "durable_latency_tx",
    "publish_64",
    "durable_publish_64",
    "relay_nats",
    "relay_nats_latency_1k",
    "relay_kafka",
    "relay_kafka_latency_1k",
)


class BenchData(pydantic.BaseModel):
    """The fields of the benchmark's event (the raw side validates this model)."""

    seq: int
    name: str
    value: float
    tags: list[str]
    sent: float


class BenchEvent(Event):
    """The benchmark's typed event (without a channel; each run binds its own)."""

    seq: int
    name: str
    value: float
    tags: list[str]
    sent: float


class RawEnvelope(pydantic.BaseModel):
    """The pgbus envelope as a plain pydantic model: what a raw listener validates."""

    v: int
    id: str
    type: str
    ts: float
    data: BenchData


def event_class(channel: str) -> type[BenchEvent]:
    """A :class:`BenchEvent` subclass bound to ``channel`` (a fresh one per scenario)."""

    class Bench(BenchEvent, channel=channel, event_type="BenchEvent"):
        pass

    return Bench


def new_channel(tag: str) -> str:
    """A channel name no other run uses."""
    return f"pgbus_bench_{tag}_{uuid.uuid4().hex[:10]}"


def envelope_template(ts: float | None = None, headers: Mapping[str, str] | None = None) -> str:
    """A ``format()`` template of the pgbus envelope; ``%1$s`` becomes the sequence number.

    It is exactly what the built-in codec writes, so pgbus decodes it as an event. Event
    ids are unique per template (a fresh prefix), as a publisher's are: the receive path
    drops an id it has seen recently. ``headers`` go into the envelope as they are.
    """
    stamp = time.time() if ts is None else ts
    prefix = uuid.uuid4().hex[:12]
    data = '{"seq":%1$s,"name":"bench","value":1.5,"tags":["a","b"],"sent":0.0}'
    head = f'{{"v":1,"type":"BenchEvent","id":"{prefix}%1$s","ts":{stamp!r}'
    if headers:
        head += f',"headers":{json.dumps(headers, separators=(",", ":"))}'
    return f'{head},"data":{data}}}'


def make_event(cls: type[BenchEvent], seq: int, sent: float = 0.0) -> BenchEvent:
    """One event with the benchmark's payload."""
    return cls(seq=seq, name="bench", value=1.5, tags=["a", "b"], sent=sent)


async def publish_series(
    conn: asyncpg.Connection | asyncpg.Pool,
    channel: str,
    template: str,
    first: int,
    last: int,
    *,
    batch: int = SERIES_BATCH,
) -> None:
    """Let the server NOTIFY ``template`` for each seq in ``[first, last]``, batch per commit."""
    start = first
    while start <= last:
        end = min(last, start + batch - 1)
        await conn.fetchval(NOTIFY_SERIES, channel, template, start, end)
        start = end + 1


# ----------------------------------------------------------------------------- results


def ratio_target(minimum: float, also: str = "") -> dict[str, Any]:
    """A target "pgbus / baseline >= ``minimum``": its text and its check, which agree."""
    return {"target": f"ratio >= {minimum:g}{also}", "check": lambda p, b: p >= minimum * b}


@dataclasses.dataclass(slots=True)
class Measure:
    """One repetition of one side: its figure, what it lost, and any details."""

    value: float
    lost: int | None = 0
    details: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(slots=True)
class Series:
    """Every repetition of one side of a scenario."""

    measures: list[Measure] = dataclasses.field(default_factory=list)

    @property
    def values(self) -> list[float]:
        """The figures, in run order."""
        return [m.value for m in self.measures]

    @property
    def median(self) -> float | None:
        """The median figure."""
        return statistics.median(self.values) if self.measures else None

    @property
    def lost(self) -> int | None:
        """Events lost over every repetition (``None``: this side receives nothing)."""
        counts = [m.lost for m in self.measures if m.lost is not None]
        return sum(counts) if counts else None

    def to_json(self) -> dict[str, Any]:
        """The series as JSON: median, min, max, every value, lost, median details."""
        values = self.values
        keys = dict.fromkeys(k for m in self.measures for k in m.details)
        details = {
            k: statistics.median([m.details[k] for m in self.measures if k in m.details])
            for k in keys
        }
        return {
            "median": _round(self.median),
            "min": _round(min(values)) if values else None,
            "max": _round(max(values)) if values else None,
            "values": [_round(v) for v in values],
            "lost": self.lost,
            "details": {k: _round(v) for k, v in details.items()},
        }


@dataclasses.dataclass(slots=True)
class Result:
    """One scenario: pgbus, its baseline, peers, and whether the target was met."""

    name: str
    title: str
    unit: str
    higher_is_better: bool
    target: str
    pgbus: Series = dataclasses.field(default_factory=Series)
    baseline: Series = dataclasses.field(default_factory=Series)
    peers: dict[str, Series] = dataclasses.field(default_factory=dict)
    check: Callable[[float, float], bool] | None = None
    #: whether pgbus / baseline means something (not for growths near zero)
    has_ratio: bool = True
    notes: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None
    skipped: str | None = None

    @property
    def ratio(self) -> float | None:
        """The median of pgbus divided by the median of the baseline."""
        p, b = self.pgbus.median, self.baseline.median
        if not self.has_ratio or p is None or b is None or b == 0:
            return None
        return p / b

    @property
    def met(self) -> bool | None:
        """Whether the target holds for the medians and pgbus lost nothing.

        ``None`` when there is no target or no figures to judge.
        """
        p, b = self.pgbus.median, self.baseline.median
        if self.check is None or p is None or b is None:
            return None
        return self.check(p, b) and not self.pgbus.lost

    @property
    def lost(self) -> int | None:
        """Events lost by pgbus, the baseline and the peers together."""
        counts = [s.lost for s in (self.pgbus, self.baseline, *self.peers.values())]
        known = [c for c in counts if c is not None]
        return sum(known) if known else None

    @property
    def ok(self) -> bool:
        """Whether it ran (or was skipped on purpose) without errors or losses."""
        return self.error is None and not self.lost

    def to_json(self) -> dict[str, Any]:
        """The scenario as one JSON object."""
        ratio = self.ratio
        return {
            "name": self.name,
            "title": self.title,
            "unit": self.unit,
            "higher_is_better": self.higher_is_better,
            "pgbus": _round(self.pgbus.median),
            "baseline": _round(self.baseline.median),
            "ratio": round(ratio, 3) if ratio is not None else None,
            "target": self.target,
            "met": self.met,
            "lost": self.lost,
            "reps": len(self.pgbus.measures),
            "pgbus_stats": self.pgbus.to_json(),
            "baseline_stats": self.baseline.to_json(),
            "peers": {name: s.to_json() for name, s in self.peers.items()},
            "notes": self.notes,
            "error": self.error,
            "skipped": self.skipped,
        }


def _round(value: float | None) -> float | None:
    if value is None:
        return None
    if value == 0 or not math.isfinite(value):
        return value
    digits = max(0, 3 - math.floor(math.log10(abs(value))))
    return round(value, digits)


# ------------------------------------------------------------------------------ config


@dataclasses.dataclass(slots=True)
class Config:
    """Counts and repetitions of one run."""

    dsn: str
    quick: bool
    reps: int
    publish_events: int
    publish_many_calls: int
    batch: int
    receive_events: int
    latency_seconds: float
    fanout_listeners: int
    fanout_events: int
    memory_small: int
    memory_large: int
    memory_reps: int
    durable_events: int
    progress: Callable[[str], None]

    @classmethod
    def make(
        cls,
        dsn: str,
        *,
        quick: bool,
        reps: int | None,
        progress: Callable[[str], None],
    ) -> Config:
        """The counts of a full run, or of a quick one."""
        if quick:
            return cls(
                dsn=dsn,
                quick=True,
                reps=reps or 1,
                publish_events=200,
                publish_many_calls=20,
                batch=100,
                receive_events=5_000,
                latency_seconds=0.3,
                fanout_listeners=10,
                fanout_events=100,
                memory_small=2_000,
                memory_large=20_000,
                memory_reps=1,
                durable_events=200,
                progress=progress,
            )
        return cls(
            dsn=dsn,
            quick=False,
            reps=reps or 5,
            publish_events=3_000,
            publish_many_calls=500,
            batch=100,
            receive_events=100_000,
            latency_seconds=2.0,
            fanout_listeners=100,
            fanout_events=2_000,
            memory_small=10_000,
            memory_large=1_000_000,
            memory_reps=min(reps or 3, 3),
            durable_events=2_000,
            progress=progress,
        )


# ------------------------------------------------------------------------- machinery


class Stopwatch:
    """Wall-clock and CPU time (of this process) since it was made."""

    __slots__ = ("cpu", "wall")

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def measure(self, events: int, lost: int | None, until: float | None = None) -> Measure:
        """Events per wall-clock second, with this process's CPU µs per event.

        The CPU time per event barely depends on what else runs on the machine, so it
        is the steadier figure on a shared machine. When events were lost, the rate is
        that of the events that arrived, up to the last arrival (``until``).

        :param events: the events sent.
        :param lost: how many of them did not arrive (``None``: nothing was received).
        :param until: when the last one arrived (``time.perf_counter()``; default: now).
        """
        end = until if until is not None and lost else time.perf_counter()
        arrived = events - (lost or 0)
        wall = max(end - self.wall, 1e-9)
        cpu = time.process_time() - self.cpu
        per_event = cpu / max(arrived, 1) * 1e6
        return Measure(arrived / wall, lost, {"cpu_us_per_event": per_event})


class Counter:
    """Counts arrivals and resolves a future when the expected number is reached."""

    __slots__ = ("count", "done", "expected", "last_arrival")

    def __init__(self) -> None:
        self.count = 0
        self.expected = 0
        self.done: asyncio.Future[None] | None = None
        #: ``time.perf_counter()`` when the count last grew, as seen by :meth:`wait`
        self.last_arrival = 0.0

    def arm(self, expected: int) -> asyncio.Future[None]:
        """Start counting towards ``expected``."""
        self.count = 0
        self.expected = expected
        self.done = asyncio.get_running_loop().create_future()
        return self.done

    def hit(self, n: int = 1) -> None:
        """Count ``n`` arrivals (a batch handler's list)."""
        self.count += n
        if self.count >= self.expected:
            done = self.done
            if done is not None and not done.done():
                done.set_result(None)

    async def wait(self, stall: float = STALL_SECONDS) -> int:
        """Wait for the expected count while events keep arriving; return how many are missing.

        It gives up once nothing arrived for ``stall`` seconds (or after
        :data:`MAX_WAIT_SECONDS` in all): a slow machine is slow, not lossy. When it
        gives up, :attr:`last_arrival` tells when the last event came (within
        :data:`POLL_SECONDS`), so that a rate can leave out the wait.
        """
        done = self.done
        if done is None:
            return 0
        now = time.perf_counter()
        deadline = now + MAX_WAIT_SECONDS
        seen, self.last_arrival = self.count, now
        while not done.done() and now - self.last_arrival < stall and now < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(done), POLL_SECONDS)
            now = time.perf_counter()
            if self.count != seen:
                seen, self.last_arrival = self.count, now
        if done.done():
            self.last_arrival = time.perf_counter()
        return max(0, self.expected - self.count)


async def interleave(
    result: Result,
    reps: int,
    sides: Sequence[tuple[str, Callable[[], Awaitable[Measure]]]],
    progress: Callable[[str], None],
) -> None:
    """Run every side ``reps`` times, rotating their order each repetition."""
    for rep in range(reps):
        shift = rep % len(sides)
        order = [*sides[shift:], *sides[:shift]]
        for name, run in order:
            progress(f"{result.name}: {name} ({rep + 1}/{reps})")
            measure = await run()
            gc.collect()
            if name == "pgbus":
                result.pgbus.measures.append(measure)
            elif name == "baseline":
                result.baseline.measures.append(measure)
            else:
                result.peers.setdefault(name, Series()).measures.append(measure)


@contextlib.asynccontextmanager
async def raw_listener(
    dsn: str, channel: str, callback: Callable[..., None]
) -> AsyncIterator[asyncpg.Connection]:
    """A raw asyncpg connection LISTENing on ``channel`` with ``callback``."""
    conn: asyncpg.Connection = await asyncpg.connect(dsn)
    try:
        await conn.add_listener(channel, callback)
        yield conn
    finally:
        await conn.close()


# ------------------------------------------------------------------- 1. publish (one)


async def bench_publish(cfg: Config) -> Result:
    """One event per call: pgbus ``publish`` against ``pg_notify`` on a pool connection."""
    result = Result(
        "publish",
        "publish, one event per call",
        "events/s",
        higher_is_better=True,
        **ratio_target(0.85),
    )
    cls = event_class(new_channel("pub"))
    channel = cls.pgbus_channel or ""
    events = [make_event(cls, i) for i in range(cfg.publish_events)]
    n = len(events)
    pool = await asyncpg.create_pool(cfg.dsn, min_size=1, max_size=10)
    # a pool that skips asyncpg's reset query on release, as pgbus's own pool does
    lean = await asyncpg.create_pool(cfg.dsn, min_size=1, max_size=10, reset=keep_session)
    try:
        async with Bus(cfg.dsn, load_entrypoints=False) as bus:

            async def run_pgbus() -> Measure:
                publish = bus.publish
                watch = Stopwatch()
                for event in events:
                    await publish(event)
                return watch.measure(n, None)

            def raw_on(p: asyncpg.Pool) -> Callable[[], Awaitable[Measure]]:
                async def run_raw() -> Measure:
                    execute = p.execute
                    watch = Stopwatch()
                    for event in events:
                        await execute(NOTIFY_ONE, channel, event.model_dump_json())
                    return watch.measure(n, None)

                return run_raw

            for event in events[:50]:  # warm up both paths (prepared statements, pools)
                await bus.publish(event)
                await pool.execute(NOTIFY_ONE, channel, event.model_dump_json())
                await lean.execute(NOTIFY_ONE, channel, event.model_dump_json())
            await interleave(
                result,
                cfg.reps,
                [
                    ("pgbus", run_pgbus),
                    ("baseline", raw_on(pool)),
                    ("raw, pool without reset", raw_on(lean)),
                ],
                cfg.progress,
            )
    finally:
        await pool.close()
        await lean.close()
    result.notes.append(
        "raw: pool.execute('SELECT pg_notify($1, $2)', ch, e.model_dump_json()) on a default"
        " asyncpg pool, which resets each connection on release (a second round trip);"
        " the peer's pool skips that, as pgbus's does"
    )
    return result


# ---------------------------------------------------------------- 2. publish_many


async def bench_publish_many(cfg: Config) -> Result:
    """``publish_many`` of 100 typed events against one raw ``unnest`` statement."""
    result = Result(
        "publish_many",
        f"publish_many, {cfg.batch} events per call",
        "events/s",
        higher_is_better=True,
        **ratio_target(0.5),
    )
    cls = event_class(new_channel("many"))
    channel = cls.pgbus_channel or ""
    events = [make_event(cls, i) for i in range(cfg.batch)]
    # unique within the batch: identical NOTIFYs in one transaction are delivered once
    payloads = [e.model_dump_json() for e in events]
    calls = cfg.publish_many_calls
    total = calls * len(events)
    pool = await asyncpg.create_pool(cfg.dsn, min_size=1, max_size=10)
    try:
        async with Bus(cfg.dsn, load_entrypoints=False) as bus:

            async def run_pgbus() -> Measure:
                publish_many = bus.publish_many
                watch = Stopwatch()
                for _ in range(calls):
                    await publish_many(events)
                return watch.measure(total, None)

            async def run_raw() -> Measure:
                execute = pool.execute
                watch = Stopwatch()
                for _ in range(calls):
                    await execute(NOTIFY_UNNEST, channel, payloads)
                return watch.measure(total, None)

            async def run_raw_encoding() -> Measure:
                execute = pool.execute
                watch = Stopwatch()
                for _ in range(calls):
                    await execute(NOTIFY_UNNEST, channel, [e.model_dump_json() for e in events])
                return watch.measure(total, None)

            for _ in range(5):
                await bus.publish_many(events)
                await pool.execute(NOTIFY_UNNEST, channel, payloads)
            await interleave(
                result,
                cfg.reps,
                [
                    ("pgbus", run_pgbus),
                    ("baseline", run_raw),
                    ("raw + model_dump_json", run_raw_encoding),
                ],
                cfg.progress,
            )
    finally:
        await pool.close()
    result.notes.append(
        "raw: one 'SELECT pg_notify($1, x) FROM unnest($2::text[])' of payloads encoded"
        " beforehand; the 'raw + model_dump_json' peer encodes them in the loop"
    )
    return result


# ------------------------------------------------------------------------- 3. receive


async def _receive_pgbus(
    cfg: Config,
    *,
    disable: Sequence[str] = (),
    batch: int | None = None,
    plugins: Sequence[object] = (),
    headers: Mapping[str, str] | None = None,
) -> AsyncIterator[Callable[[], Awaitable[Measure]]]:
    """A running Bus with an async handler, and a runner that fills and times it.

    With ``batch``, the handler is a batch handler of that size; ``plugins`` are
    registered besides the defaults; every envelope carries ``headers``.
    """
    cls = event_class(new_channel("recv"))
    channel = cls.pgbus_channel or ""
    counter = Counter()
    bus = Bus(cfg.dsn, load_entrypoints=False, disable_plugins=disable, plugins=plugins)
    if batch is None:

        @bus.subscribe(cls)
        async def handle(event: BenchEvent) -> None:  # noqa: ARG001 - the event is what is handled
            counter.hit()

    else:

        @bus.subscribe(cls, batch=batch, batch_wait=0.05)
        async def handle_batch(events: list[BenchEvent]) -> None:
            counter.hit(len(events))

    template = envelope_template(headers=headers)
    pub: asyncpg.Connection = await asyncpg.connect(cfg.dsn)
    try:
        async with bus:

            async def run() -> Measure:
                n = cfg.receive_events
                counter.arm(n)
                watch = Stopwatch()
                await publish_series(pub, channel, envelope_template(headers=headers), 1, n)
                lost = await counter.wait()
                return watch.measure(n, lost, counter.last_arrival)

            counter.arm(2_000)  # warm up
            await publish_series(pub, channel, template, 1, 2_000)
            await counter.wait()
            yield run
    finally:
        await pub.close()


async def _receive_raw(cfg: Config) -> AsyncIterator[Callable[[], Awaitable[Measure]]]:
    """A raw listener whose sync callback validates the envelope with pydantic."""
    channel = new_channel("raw")
    counter = Counter()
    validate = RawEnvelope.model_validate_json
    hit = counter.hit

    def callback(_conn: object, _pid: int, _channel: str, payload: str) -> None:
        validate(payload)
        hit()

    template = envelope_template()
    pub: asyncpg.Connection = await asyncpg.connect(cfg.dsn)
    try:
        async with raw_listener(cfg.dsn, channel, callback):

            async def run() -> Measure:
                n = cfg.receive_events
                counter.arm(n)
                watch = Stopwatch()
                await publish_series(pub, channel, envelope_template(), 1, n)
                lost = await counter.wait()
                return watch.measure(n, lost, counter.last_arrival)

            counter.arm(2_000)
            await publish_series(pub, channel, template, 1, 2_000)
            await counter.wait()
            yield run
    finally:
        await pub.close()


async def _receive_broadcaster(cfg: Config) -> AsyncIterator[Callable[[], Awaitable[Measure]]]:
    """The postgres backend of broadcaster, its subscriber validating the same model."""
    from broadcaster import Broadcast  # noqa: PLC0415 - an optional peer

    channel = new_channel("bcast")
    counter = Counter()
    validate = RawEnvelope.model_validate_json
    ready = asyncio.get_running_loop().create_future()
    broadcast = Broadcast(cfg.dsn)
    await broadcast.connect()

    async def consume() -> None:
        async with broadcast.subscribe(channel) as subscriber:
            ready.set_result(None)
            while True:
                item = await subscriber.get()
                validate(item.message)
                counter.hit()

    task = asyncio.create_task(consume())
    template = envelope_template()
    pub: asyncpg.Connection = await asyncpg.connect(cfg.dsn)
    try:
        await asyncio.wait_for(ready, 30)

        async def run() -> Measure:
            n = cfg.receive_events
            counter.arm(n)
            watch = Stopwatch()
            await publish_series(pub, channel, envelope_template(), 1, n)
            lost = await counter.wait()
            return watch.measure(n, lost, counter.last_arrival)

        counter.arm(2_000)
        await publish_series(pub, channel, template, 1, 2_000)
        await counter.wait()
        yield run
    finally:
        await pub.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await broadcast.disconnect()


def broadcaster_installed() -> bool:
    """Whether the optional peer ``broadcaster`` can be imported."""
    return importlib.util.find_spec("broadcaster") is not None


async def bench_receive(cfg: Config, *, batch: int | None = None) -> Result:
    """Receive throughput: pgbus with every default plugin against a raw listener.

    With ``batch``, into a batch handler of that size (``receive_batch``, no peers).
    """
    handler = "async handler" if batch is None else f"batch handler (batch={batch})"
    result = Result(
        "receive" if batch is None else "receive_batch",
        f"receive: decode + route + {handler}, all default plugins",
        "events/s",
        higher_is_better=True,
        **ratio_target(0.6 if batch is None else 1.0, ", lost = 0"),
    )
    async with contextlib.AsyncExitStack() as stack:
        pgbus_side = _receive_pgbus(cfg, batch=batch)
        sides: list[tuple[str, Callable[[], Awaitable[Measure]]]] = [
            ("pgbus", await stack.enter_async_context(_as_cm(pgbus_side))),
            ("baseline", await stack.enter_async_context(_as_cm(_receive_raw(cfg)))),
        ]
        peers = batch is None  # the peers are compared on the plain receive
        if peers and broadcaster_installed():
            bcast = await stack.enter_async_context(_as_cm(_receive_broadcaster(cfg)))
            sides.append(("broadcaster", bcast))
        elif peers:
            result.notes.append("broadcaster is not installed (pip install 'pgbus[bench]')")
        await interleave(result, cfg.reps, sides, cfg.progress)
    result.notes.append(
        "raw: asyncpg listener, sync callback RawEnvelope.model_validate_json(payload);"
        " events made by the server (generate_series), 10k per commit"
    )
    return result


async def bench_receive_metrics(cfg: Config) -> Result:
    """The cost of the metrics plugin: pgbus receive with it on, against it blocked."""
    result = Result(
        "receive_metrics",
        "receive: metrics plugin on (pgbus) vs blocked (baseline)",
        "events/s",
        higher_is_better=True,
        **ratio_target(0.9),
    )
    async with contextlib.AsyncExitStack() as stack:
        on = await stack.enter_async_context(_as_cm(_receive_pgbus(cfg)))
        off = await stack.enter_async_context(_as_cm(_receive_pgbus(cfg, disable=["metrics"])))
        # Two nearly equal figures: three times the repetitions, so that the medians
        # resolve a difference of 10 % through the noise of a shared machine.
        reps = cfg.reps if cfg.quick else 3 * cfg.reps
        await interleave(result, reps, [("pgbus", on), ("baseline", off)], cfg.progress)
    return result


#: How often the dashboard's overview page refreshes (``create_app(refresh=...)``).
DASHBOARD_REFRESH: Final = 2.0
#: The dashboard scenario's events per run, as a multiple of ``receive_events``: runs of
#: a few seconds, so that each one sees several refreshes.
DASHBOARD_EVENTS_FACTOR: Final = 5


def dashboard_available() -> bool:
    """Whether the ``dashboard`` extra (and httpx, the polling client) is installed."""
    return all(
        importlib.util.find_spec(name) is not None
        for name in ("starlette", "uvicorn", "jinja2", "httpx")
    )


@contextlib.asynccontextmanager
async def dashboard_server(dsn: str) -> AsyncIterator[str]:
    """``pgbus dashboard`` in a process of its own, as an operator runs it; yields its URL."""
    import httpx  # noqa: PLC0415 - only with the dashboard extra

    from pgbus.server import _free_port  # noqa: PLC0415 - the helper of the clusters' ports

    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pgbus",
        "--dsn",
        dsn,
        "dashboard",
        "--port",
        str(port),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url) as client, asyncio.timeout(30):
            while True:  # until it answers (it connects to the database first)
                with contextlib.suppress(httpx.TransportError):
                    (await client.get("/")).raise_for_status()
                    break
                if proc.returncode is not None:
                    raise RuntimeError(f"pgbus dashboard exited with status {proc.returncode}")
                await asyncio.sleep(0.1)
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


async def bench_receive_dashboard(cfg: Config) -> Result:
    """A busy bus's receive rate with the dashboard open on it, against without one."""
    result = Result(
        "receive_dashboard",
        "receive: `pgbus dashboard` open on the overview, refreshing every"
        f" {DASHBOARD_REFRESH:g} s (pgbus) vs no dashboard (baseline)",
        "events/s",
        higher_is_better=True,
        **ratio_target(0.95, ", lost = 0"),
    )
    if not dashboard_available():
        result.skipped = "not available: pip install 'pgbus[dashboard]' httpx"
        return result
    import httpx  # noqa: PLC0415 - only with the dashboard extra

    from pgbus._metrics_publisher import MetricsPublisher  # noqa: PLC0415 - this scenario's

    longer = dataclasses.replace(cfg, receive_events=cfg.receive_events * DASHBOARD_EVENTS_FACTOR)
    polls: list[int] = []

    async with _as_cm(_receive_pgbus(longer, plugins=[MetricsPublisher()])) as run:

        async def with_dashboard() -> Measure:
            async with dashboard_server(cfg.dsn) as url, httpx.AsyncClient(base_url=url) as client:
                stop = asyncio.Event()

                async def poll() -> None:
                    (await client.get("/")).raise_for_status()  # the page, then its fragment
                    count = 1
                    while True:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), DASHBOARD_REFRESH)
                        if stop.is_set():
                            polls.append(count)
                            return
                        (await client.get("/fragments/overview")).raise_for_status()
                        count += 1

                poller = asyncio.create_task(poll())
                try:
                    measure = await run()
                finally:
                    stop.set()
                    await poller
                measure.details["dashboard_requests"] = float(polls[-1])
                return measure

        await interleave(
            result, cfg.reps, [("pgbus", with_dashboard), ("baseline", run)], cfg.progress
        )
    result.notes.append(
        "both sides: the same Bus with every default plugin and pgbus.MetricsPublisher();"
        f" {longer.receive_events:,} events per run; the dashboard runs in its own process,"
        f" started before each run of its side and stopped after it; requests per run:"
        f" {min(polls, default=0)} to {max(polls, default=0)}"
    )
    return result


#: A W3C ``traceparent`` whose publisher sampled the event, and one whose did not.
TRACEPARENT_SAMPLED: Final = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACEPARENT_UNSAMPLED: Final = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
#: What the OpenTelemetry scenarios measure on each side: ``(tracing, metrics, traceparent)``.
OTEL_SIDES: Final[dict[str, tuple[bool, bool, str]]] = {
    "otel_metrics": (False, True, TRACEPARENT_UNSAMPLED),
    "otel_unsampled": (True, False, TRACEPARENT_UNSAMPLED),
    "otel_sampled": (True, False, TRACEPARENT_SAMPLED),
}


def otel_available() -> bool:
    """Whether ``pgbus-opentelemetry`` and the OpenTelemetry SDK are installed."""
    return all(
        importlib.util.find_spec(name) is not None
        for name in ("pgbus_opentelemetry", "opentelemetry.sdk")
    )


def _otel_plugin(*, tracing: bool, metrics: bool) -> object:
    """An ``OpenTelemetryPlugin`` with the SDK's providers for what is on, no-ops otherwise."""
    # Optional: imported only when installed (otel_available()).
    from opentelemetry.metrics import NoOpMeterProvider  # noqa: PLC0415
    from opentelemetry.sdk.metrics import MeterProvider  # noqa: PLC0415
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: PLC0415
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider  # noqa: PLC0415
    from opentelemetry.trace import NoOpTracerProvider  # noqa: PLC0415
    from pgbus_opentelemetry import OpenTelemetryPlugin  # noqa: PLC0415

    tracer_provider: Any = NoOpTracerProvider()
    if tracing:
        tracer_provider = TracerProvider()
        # The base processor does nothing with the spans: the figure leaves out exporting.
        tracer_provider.add_span_processor(SpanProcessor())
    meter_provider: Any = (
        MeterProvider(metric_readers=[InMemoryMetricReader()]) if metrics else NoOpMeterProvider()
    )
    return OpenTelemetryPlugin(
        tracer_provider=tracer_provider, meter_provider=meter_provider, record_metrics=metrics
    )


async def bench_otel(cfg: Config, name: str) -> Result:
    """The CPU cost per received event of pgbus-opentelemetry: with it, against without it."""
    tracing, metrics, traceparent = OTEL_SIDES[name]
    what = {
        "otel_metrics": "SDK metrics on (observable, MeterProvider)",
        "otel_unsampled": "SDK tracing on, events their publisher did not sample",
        "otel_sampled": "SDK tracing on, sampled events (a span per attempt)",
    }[name]
    result = Result(
        name,
        f"receive: pgbus-opentelemetry, {what} (pgbus) vs without it (baseline)",
        "CPU µs/event",
        higher_is_better=False,
        target="(reported)" if name == "otel_sampled" else "<= baseline + 1 µs",
        check=None if name == "otel_sampled" else (lambda p, b: p <= b + 1),
    )
    if not otel_available():
        result.skipped = (
            "not available: pip install ./plugins/pgbus-opentelemetry opentelemetry-sdk"
        )
        return result
    headers = {"traceparent": traceparent}
    plugin = _otel_plugin(tracing=tracing, metrics=metrics)
    async with contextlib.AsyncExitStack() as stack:
        on = await stack.enter_async_context(
            _as_cm(_receive_pgbus(cfg, plugins=[plugin], headers=headers))
        )
        off = await stack.enter_async_context(_as_cm(_receive_pgbus(cfg, headers=headers)))
        # A difference of 1 µs in about 10: three times the repetitions, as receive_metrics.
        reps = cfg.reps if cfg.quick else 3 * cfg.reps
        await interleave(
            result, reps, [("pgbus", _cpu_figure(on)), ("baseline", _cpu_figure(off))], cfg.progress
        )
    result.notes.append(
        "both sides: every default plugin, envelopes with a traceparent header;"
        " the figure is this process's CPU time per event"
    )
    return result


def _cpu_figure(run: Callable[[], Awaitable[Measure]]) -> Callable[[], Awaitable[Measure]]:
    """The same runner, with the CPU µs per event as its figure (events/s in the details)."""

    async def cpu() -> Measure:
        measure = await run()
        per_event = measure.details["cpu_us_per_event"]
        return Measure(per_event, measure.lost, {"events_per_s": measure.value})

    return cpu


def _as_cm(
    gen: AsyncIterator[Callable[[], Awaitable[Measure]]],
) -> contextlib.AbstractAsyncContextManager[Callable[[], Awaitable[Measure]]]:
    """Turn a one-yield async generator into an async context manager."""

    @contextlib.asynccontextmanager
    async def cm() -> AsyncIterator[Callable[[], Awaitable[Measure]]]:
        run = await anext(gen)
        try:
            yield run
        finally:
            with contextlib.suppress(StopAsyncIteration):
                await anext(gen)

    return cm()


# ------------------------------------------------------------------------- 4. latency


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nearest rank)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


async def paced(rate: float, count: int, send: Callable[[int], Awaitable[None]]) -> None:
    """Call ``send(i)`` ``count`` times at ``rate`` per second, catching up after late wake-ups.

    The event loop sleeps with millisecond resolution, so above 1000/s the sends come
    in short bursts, each at its due time or just after.
    """
    interval = 1.0 / rate
    started = time.perf_counter()
    for i in range(count):
        delay = started + i * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await send(i)


def _latency_measure(samples: list[float], expected: int, sent_per_s: float) -> Measure:
    if not samples:
        return Measure(math.inf, expected)
    micro = [s * 1e6 for s in samples]
    return Measure(
        percentile(micro, 0.99),
        expected - len(samples),
        {
            "p50": percentile(micro, 0.50),
            "p99": percentile(micro, 0.99),
            "max": max(micro),
            "sent_per_s": sent_per_s,
        },
    )


async def _latency_run(
    rate: float,
    count: int,
    send: Callable[[int], Awaitable[None]],
    samples: list[float],
    counter: Counter,
) -> Measure:
    """Send ``count`` events at ``rate``, wait for them, measure the latencies."""
    samples.clear()
    counter.arm(count)
    sending = time.perf_counter()
    await paced(rate, count, send)
    sent_per_s = count / (time.perf_counter() - sending)
    await counter.wait()
    return _latency_measure(samples, count, sent_per_s)


async def bench_latency(cfg: Config, rate: int) -> Result:
    """Publish to handler entry at ``rate`` events/s: pgbus against a raw callback."""
    name = f"latency_{rate // 1000}k"
    result = Result(
        name,
        f"latency publish -> handler entry at {rate:,} events/s (p99)",
        "µs",
        higher_is_better=False,
        target="p99 <= raw p99 + 500 µs",
        check=lambda p, b: p <= b + 500,
    )
    count = max(50, int(rate * cfg.latency_seconds))
    clock = time.perf_counter

    cls = event_class(new_channel("lat"))
    samples: list[float] = []
    counter = Counter()
    bus = Bus(cfg.dsn, load_entrypoints=False)

    @bus.subscribe(cls)
    async def handle(event: BenchEvent) -> None:
        samples.append(clock() - event.sent)
        counter.hit()

    raw_channel = new_channel("rawlat")
    raw_samples: list[float] = []
    raw_counter = Counter()
    validate = BenchData.model_validate_json

    def callback(_conn: object, _pid: int, _channel: str, payload: str) -> None:
        data = validate(payload)
        raw_samples.append(clock() - data.sent)
        raw_counter.hit()

    pool = await asyncpg.create_pool(cfg.dsn, min_size=1, max_size=10)
    try:
        async with bus, raw_listener(cfg.dsn, raw_channel, callback):

            async def send_pgbus(i: int) -> None:
                await bus.publish(make_event(cls, i, clock()))

            async def send_raw(i: int) -> None:
                data = BenchData(seq=i, name="bench", value=1.5, tags=["a", "b"], sent=clock())
                await pool.execute(NOTIFY_ONE, raw_channel, data.model_dump_json())

            async def run_pgbus() -> Measure:
                return await _latency_run(rate, count, send_pgbus, samples, counter)

            async def run_raw() -> Measure:
                return await _latency_run(rate, count, send_raw, raw_samples, raw_counter)

            counter.arm(50)
            raw_counter.arm(50)
            await paced(rate, 50, send_pgbus)
            await paced(rate, 50, send_raw)
            await counter.wait()
            await raw_counter.wait()
            await interleave(
                result, cfg.reps, [("pgbus", run_pgbus), ("baseline", run_raw)], cfg.progress
            )
    finally:
        await pool.close()
    result.notes.append(
        f"{count} events per repetition, one process; raw: pg_notify on a pool connection,"
        " sync callback validating BenchData"
    )
    return result


async def bench_request(cfg: Config) -> Result:
    """Request/reply round trips, one at a time: ``bus.request`` against raw ping-pong."""
    result = Result(
        "request",
        "request/reply round trip, one in flight (p99)",
        "µs",
        higher_is_better=False,
        target="(reported)",
    )
    count = max(50, int(500 * cfg.latency_seconds))
    clock = time.perf_counter
    cls = event_class(new_channel("req"))
    responder, requester = (
        Bus(cfg.dsn, load_entrypoints=False),
        Bus(cfg.dsn, load_entrypoints=False),
    )

    @responder.subscribe(cls)
    async def answer(event: BenchEvent) -> BenchData:
        return BenchData(seq=event.seq, name="reply", value=event.value, tags=[], sent=event.sent)

    ping, pong = new_channel("rawping"), new_channel("rawpong")
    waiting: dict[int, asyncio.Future[None]] = {}
    validate = BenchData.model_validate_json
    tasks: set[asyncio.Task[str]] = set()

    def answered(_conn: object, _pid: int, _channel: str, payload: str) -> None:
        waiter = waiting.pop(validate(payload).seq, None)
        if waiter is not None:
            waiter.set_result(None)

    def reply(conn: asyncpg.Connection, _pid: int, _channel: str, payload: str) -> None:
        data = validate(payload).model_copy(update={"name": "reply"})
        task = asyncio.ensure_future(conn.execute(NOTIFY_ONE, pong, data.model_dump_json()))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async with (
        responder,
        requester,
        raw_listener(cfg.dsn, pong, answered) as asking,
        raw_listener(cfg.dsn, ping, reply),
    ):

        async def run_pgbus() -> Measure:
            samples = []
            for i in range(count):
                started = clock()
                await requester.request(make_event(cls, i, started), timeout=10)
                samples.append(clock() - started)
            return _latency_measure(samples, count, count / sum(samples))

        async def run_raw() -> Measure:
            samples = []
            for i in range(count):
                started = clock()
                waiter = waiting[i] = asyncio.get_running_loop().create_future()
                data = BenchData(seq=i, name="bench", value=1.5, tags=["a", "b"], sent=started)
                await asking.execute(NOTIFY_ONE, ping, data.model_dump_json())
                await asyncio.wait_for(waiter, 10)
                samples.append(clock() - started)
            return _latency_measure(samples, count, count / sum(samples))

        await run_pgbus()  # warm up both
        await run_raw()
        await interleave(
            result, cfg.reps, [("pgbus", run_pgbus), ("baseline", run_raw)], cfg.progress
        )
    result.notes.append(
        f"{count} sequential round trips per repetition, one process; raw: two asyncpg"
        " connections NOTIFY/LISTEN ping-pong, validating BenchData on both sides"
    )
    return result


# -------------------------------------------------------------------------- 5. fan-out


@contextlib.asynccontextmanager
async def fanout_server(cfg: Config, listeners: int) -> AsyncIterator[tuple[str, int, str]]:
    """A server with room for ``listeners`` connections: ``(dsn, listeners, where)``.

    The configured server when it has the room; else a throwaway cluster with
    ``max_connections=400``; else the configured server with fewer listeners.
    """
    conn: asyncpg.Connection = await asyncpg.connect(cfg.dsn)
    try:
        limit = int(await conn.fetchval("SHOW max_connections"))
        reserved = int(await conn.fetchval("SHOW superuser_reserved_connections"))
        used = int(await conn.fetchval("SELECT count(*) FROM pg_stat_activity"))
    finally:
        await conn.close()
    free = limit - reserved - used
    if free >= listeners + SPARE_CONNECTIONS:
        yield cfg.dsn, listeners, f"the configured server ({free} connections free)"
        return
    cluster = _start_cluster(max(400, 2 * listeners + 50)) if find_bindirs() else None
    if cluster is not None:
        try:
            yield (
                cluster.dsn,
                listeners,
                (
                    f"a throwaway cluster with max_connections={max(400, 2 * listeners + 50)}"
                    f" (the configured server had {free} connections free)"
                ),
            )
        finally:
            cluster.destroy()
        return
    scaled = max(1, free - SPARE_CONNECTIONS)
    yield cfg.dsn, scaled, f"the configured server, scaled down to {scaled} listeners"


def _start_cluster(max_connections: int) -> TempCluster | None:
    cluster = TempCluster(max_connections=max_connections)
    try:
        cluster.start()
    except (ClusterError, OSError) as exc:
        logger.warning("cannot start a throwaway cluster for the fan-out: %s", exc)
        cluster.destroy()
        return None
    return cluster


async def bench_fanout(cfg: Config) -> Result:
    """``N`` Bus instances against ``N`` raw listener connections, in one process."""
    result = Result(
        "fanout",
        f"fan-out: {cfg.fanout_listeners} Bus instances vs raw listener connections",
        "deliveries/s",
        higher_is_better=True,
        **ratio_target(0.5),
    )
    async with fanout_server(cfg, cfg.fanout_listeners) as (dsn, listeners, where):
        result.notes.append(f"{listeners} listeners on {where}")
        result.title = f"fan-out: {listeners} Bus instances vs {listeners} raw listeners"
        m = cfg.fanout_events
        expected = listeners * m
        template = envelope_template()
        batch = 100
        pub: asyncpg.Connection = await asyncpg.connect(dsn)
        try:

            async def run_pgbus() -> Measure:
                cls = event_class(new_channel("fan"))
                channel = cls.pgbus_channel or ""
                counter = Counter()

                async def handle(event: BenchEvent) -> None:  # noqa: ARG001 - counted only
                    counter.hit()

                buses = [
                    Bus(dsn, load_entrypoints=False, pool_max_size=1) for _ in range(listeners)
                ]
                for bus in buses:
                    bus.subscribe(cls)(handle)
                try:
                    await asyncio.gather(*(b.start() for b in buses))
                    counter.arm(expected)
                    watch = Stopwatch()
                    await publish_series(pub, channel, template, 1, m, batch=batch)
                    lost = await counter.wait()
                    return watch.measure(expected, lost, counter.last_arrival)
                finally:
                    await asyncio.gather(*(b.stop() for b in buses))

            async def run_raw() -> Measure:
                channel = new_channel("rawfan")
                counter = Counter()
                validate = RawEnvelope.model_validate_json
                hit = counter.hit

                def callback(_conn: object, _pid: int, _channel: str, payload: str) -> None:
                    validate(payload)
                    hit()

                async with contextlib.AsyncExitStack() as stack:
                    await asyncio.gather(
                        *(
                            stack.enter_async_context(raw_listener(dsn, channel, callback))
                            for _ in range(listeners)
                        )
                    )
                    counter.arm(expected)
                    watch = Stopwatch()
                    await publish_series(pub, channel, template, 1, m, batch=batch)
                    lost = await counter.wait()
                    return watch.measure(expected, lost, counter.last_arrival)

            reps = min(cfg.reps, 3)
            await interleave(
                result, reps, [("pgbus", run_pgbus), ("baseline", run_raw)], cfg.progress
            )
        finally:
            await pub.close()
    result.notes.append(
        f"{m} events per repetition, {batch} per commit, made by the server;"
        " raw callbacks validate RawEnvelope"
    )
    return result


# --------------------------------------------------------------------------- 6. memory


def rss_kib(pid: int) -> int:
    """The resident set size of process ``pid`` in KiB (``VmRSS`` in ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise OSError(f"no VmRSS for process {pid}")


class _ChildProgress:
    """What the listener process reports on its stdout: ``count N`` and ``at N`` lines."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.count = 0
        self.marks: set[int] = set()
        self.exited = False
        self._changed = asyncio.Event()
        self._stream = stream
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while line := await self._stream.readline():
            word, _, number = line.decode().strip().partition(" ")
            if number.isdigit():
                self.count = max(self.count, int(number))
                if word == "at":
                    self.marks.add(int(number))
            self._changed.set()
        self.exited = True
        self._changed.set()

    async def until(self, count: int, *, mark: bool = False) -> int:
        """Wait until the process counted ``count`` (and reported it as a milestone).

        :returns: its count, when it got there or when it stalled for
            :data:`STALL_SECONDS`.
        """
        while not self.exited and (self.count < count or (mark and count not in self.marks)):
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), STALL_SECONDS)
            except TimeoutError:
                break
        if self.exited and self.count < count:
            raise RuntimeError("the listener process exited early")
        return self.count

    async def close(self) -> None:
        """Stop reading."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def _memory_run(cfg: Config, impl: str) -> Measure:
    """Start a listener process, feed it events, read its RSS at the milestones.

    The events are sent ten thousand per commit, with at most :data:`MEMORY_WINDOW`
    not yet handled: the figure is the listener's memory in a steady state, not the
    size of a backlog in the socket.
    """
    channel = new_channel("mem")
    small, large = cfg.memory_small, cfg.memory_large
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pgbus.bench",
        "--memory-child",
        impl,
        "--dsn",
        cfg.dsn,
        "--channel",
        channel,
        "--milestones",
        f"{small},{large}",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    stdout = proc.stdout
    if stdout is None:  # pragma: no cover - stdout=PIPE
        raise RuntimeError("no pipe to the listener process")
    template = envelope_template()
    pub: asyncpg.Connection = await asyncpg.connect(cfg.dsn)
    progress: _ChildProgress | None = None
    try:
        line = await asyncio.wait_for(stdout.readline(), 60)
        if line.strip() != b"ready":
            raise RuntimeError(f"the listener process did not start: {line!r}")
        progress = tracker = _ChildProgress(stdout)

        async def feed(first: int, last: int) -> None:
            for start in range(first, last + 1, SERIES_BATCH):
                await tracker.until(start - 1 - MEMORY_WINDOW)
                end = min(last, start + SERIES_BATCH - 1)
                await publish_series(pub, channel, template, start, end)

        await feed(1, small)
        await tracker.until(small, mark=True)
        rss_small = rss_kib(proc.pid)
        await feed(small + 1, large)
        got_large = await tracker.until(large, mark=True)
        rss_large = rss_kib(proc.pid)
    finally:
        await pub.close()
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        if progress is not None:
            await progress.close()
    growth = (rss_large - rss_small) / 1024
    return Measure(
        growth,
        large - got_large,
        {"rss_small_mb": rss_small / 1024, "rss_large_mb": rss_large / 1024},
    )


async def bench_memory(cfg: Config) -> Result:
    """RSS growth of a listener process between ``memory_small`` and ``memory_large`` events."""
    result = Result(
        "memory",
        f"memory: listener RSS growth from {cfg.memory_small:,} to {cfg.memory_large:,} events",
        "MB",
        higher_is_better=False,
        target="growth <= 5 MB, lost = 0",
        check=lambda p, _b: p <= 5,  # noqa: PLR2004 - the target
        has_ratio=False,
    )
    if not sys.platform.startswith("linux"):
        result.skipped = "needs /proc (Linux) to read a process's RSS"
        return result

    async def run_pgbus() -> Measure:
        return await _memory_run(cfg, "pgbus")

    async def run_raw() -> Measure:
        return await _memory_run(cfg, "raw")

    await interleave(
        result, cfg.memory_reps, [("pgbus", run_pgbus), ("baseline", run_raw)], cfg.progress
    )
    result.notes.append(
        "a listener in its own process (pgbus: Bus, default plugins, async handler;"
        " raw: asyncpg callback validating RawEnvelope); RSS from /proc/<pid>/status"
    )
    return result


async def memory_child(impl: str, dsn: str, channel: str, milestones: Sequence[int]) -> None:
    """The listener process of the memory scenario: report each milestone on stdout."""
    marks = sorted(milestones)
    counter = Counter()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    def hit() -> None:
        counter.hit()
        if marks and counter.count == marks[0]:
            marks.pop(0)
            gc.collect()
            sys.stdout.write(f"at {counter.count}\n")
            sys.stdout.flush()

    async def report_progress() -> None:
        reported = 0
        while True:
            await asyncio.sleep(0.5)
            if counter.count != reported:
                reported = counter.count
                sys.stdout.write(f"count {reported}\n")
                sys.stdout.flush()

    progress = asyncio.create_task(report_progress())
    try:
        await _serve(impl, dsn, channel, hit, stop)
    finally:
        progress.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await progress


async def _serve(
    impl: str, dsn: str, channel: str, hit: Callable[[], None], stop: asyncio.Event
) -> None:
    """Listen on ``channel`` (with pgbus or raw asyncpg) until ``stop`` is set."""
    if impl == "pgbus":
        cls = event_class(channel)
        bus = Bus(dsn, load_entrypoints=False)

        @bus.subscribe(cls)
        async def handle(event: BenchEvent) -> None:  # noqa: ARG001 - counted only
            hit()

        async with bus:
            sys.stdout.write("ready\n")
            sys.stdout.flush()
            await stop.wait()
        return
    validate = RawEnvelope.model_validate_json

    def callback(_conn: object, _pid: int, _channel: str, payload: str) -> None:
        validate(payload)
        hit()

    async with raw_listener(dsn, channel, callback):
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await stop.wait()


# -------------------------------------------------------------------------- 7. durable


def durable_available() -> bool:
    """Whether the durable mode (:mod:`pgbus.durable`) is installed."""
    try:
        return hasattr(importlib.import_module("pgbus.durable"), "DurablePlugin")
    except ImportError:
        return False


@contextlib.asynccontextmanager
async def _durable_schema(dsn: str) -> AsyncIterator[str]:
    """A schema name of its own for the durable tables, dropped afterwards."""
    schema = f"pgbus_bench_{uuid.uuid4().hex[:10]}"
    try:
        yield schema
    finally:
        conn: asyncpg.Connection = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


async def bench_durable(cfg: Config, *, receive: bool) -> Result:
    """The durable mode against plain NOTIFY: ``publish_many``, or publish to handled."""
    what = "publish_many to handled, one process" if receive else "publish_many"
    result = Result(
        "durable_receive" if receive else "durable_publish",
        f"durable mode (pgbus) vs plain NOTIFY (baseline): {what}, {cfg.batch} per call",
        "events/s",
        higher_is_better=True,
        **(ratio_target(0.6, ", lost = 0") if receive else {"target": "(reported)"}),
    )
    if not durable_available():
        result.skipped = "not available: pgbus.durable is not installed"
        return result
    durable: Any = importlib.import_module("pgbus.durable")
    n = max(cfg.batch, cfg.durable_events - cfg.durable_events % cfg.batch)
    async with _durable_schema(cfg.dsn) as schema:

        def bus_for(*, durable_mode: bool) -> tuple[Bus, type[BenchEvent], Counter]:
            cls = event_class(new_channel("dur" if durable_mode else "plain"))
            counter = Counter()
            plugins = [durable.DurablePlugin(schema=schema)] if durable_mode else []
            bus = Bus(cfg.dsn, load_entrypoints=False, plugins=plugins)

            async def handle(event: BenchEvent) -> None:  # noqa: ARG001 - counted only
                counter.hit()

            if receive and durable_mode:
                bus.subscribe(cls, durable="bench")(handle)
            elif receive:
                bus.subscribe(cls)(handle)
            return bus, cls, counter

        durable_bus, durable_cls, durable_counter = bus_for(durable_mode=True)
        plain_bus, plain_cls, plain_counter = bus_for(durable_mode=False)
        await durable_bus.migrate()

        def runner(
            bus: Bus, cls: type[BenchEvent], counter: Counter
        ) -> Callable[[], Awaitable[Measure]]:
            batches = [
                [make_event(cls, i) for i in range(start, start + cfg.batch)]
                for start in range(0, n, cfg.batch)
            ]

            async def run() -> Measure:
                counter.arm(n)
                watch = Stopwatch()
                for events in batches:
                    await bus.publish_many(events)
                if not receive:
                    return watch.measure(n, None)
                lost = await counter.wait()
                return watch.measure(n, lost, counter.last_arrival)

            return run

        async with durable_bus, plain_bus:
            run_durable = runner(durable_bus, durable_cls, durable_counter)
            run_plain = runner(plain_bus, plain_cls, plain_counter)
            await interleave(
                result, cfg.reps, [("pgbus", run_durable), ("baseline", run_plain)], cfg.progress
            )
    result.notes.append(
        f"{n} events per repetition; durable: DurablePlugin with a schema of its own"
        + (", a durable subscription; plain: an ordinary one" if receive else ", no subscribers")
    )
    return result


#: Concurrent application transactions of the writers scenario.
WRITERS: Final = 16
#: Concurrent publishing tasks of the coalescing scenarios.
PUBLISHERS: Final = 64
#: Rows per event the durable schema may take with two subscriptions.
ROWS_TARGET: Final = 1.1


async def _business_table(conn: Connection, schema: str) -> None:
    """The application's own table of the writers scenario, and a journal-like twin."""
    await conn.execute(
        f'CREATE TABLE "{schema}".business (id bigserial PRIMARY KEY, n int NOT NULL)'
    )
    await conn.execute(
        f'CREATE TABLE "{schema}".own_journal (id bigint GENERATED ALWAYS AS IDENTITY'
        " PRIMARY KEY, xid xid8 NOT NULL DEFAULT pg_current_xact_id(), channel text NOT NULL,"
        " event_id text NOT NULL UNIQUE, type text NOT NULL, payload text NOT NULL)"
    )


async def bench_durable_writers(cfg: Config) -> Result:
    """16 concurrent transactions: INSERT + durable publish(connection=) vs INSERT + INSERT."""
    result = Result(
        "durable_writers",
        f"{WRITERS} concurrent transactions: INSERT + durable publish(connection=) (pgbus)"
        " vs INSERT + an own journal-like row (baseline)",
        "tx/s",
        higher_is_better=True,
        **ratio_target(0.8),
    )
    if not durable_available():
        result.skipped = "not available: pgbus.durable is not installed"
        return result
    durable: Any = importlib.import_module("pgbus.durable")
    per_writer = max(10, cfg.durable_events // WRITERS)
    async with _durable_schema(cfg.dsn) as schema:
        cls = event_class(new_channel("writers"))
        bus = Bus(cfg.dsn, load_entrypoints=False, plugins=[durable.DurablePlugin(schema=schema)])
        await bus.migrate()
        pool = await asyncpg.create_pool(cfg.dsn, min_size=WRITERS, max_size=WRITERS)
        async with pool.acquire() as conn:
            await _business_table(conn, schema)
        payload = envelope_template()
        insert = f'INSERT INTO "{schema}".business (n) VALUES ($1)'  # noqa: S608 - quoted
        own = (
            f'INSERT INTO "{schema}".own_journal (channel, event_id, type, payload)'  # noqa: S608
            " VALUES ($1, $2, 'BenchEvent', $3)"
        )

        def runner(*, with_bus: bool) -> Callable[[], Awaitable[Measure]]:
            async def writer() -> None:
                async with pool.acquire() as conn:
                    for i in range(per_writer):
                        async with conn.transaction():
                            await conn.execute(insert, i)
                            if with_bus:
                                await bus.publish(make_event(cls, i), connection=conn)
                            else:
                                await conn.execute(
                                    own, cls.pgbus_channel, uuid.uuid4().hex, payload
                                )

            async def run() -> Measure:
                watch = Stopwatch()
                await asyncio.gather(*(writer() for _ in range(WRITERS)))
                return watch.measure(WRITERS * per_writer, None)

            return run

        try:
            async with bus:
                await interleave(
                    result,
                    cfg.reps,
                    [("pgbus", runner(with_bus=True)), ("baseline", runner(with_bus=False))],
                    cfg.progress,
                )
        finally:
            await pool.close()
    result.notes.append(f"{WRITERS} writers x {per_writer} transactions per repetition")
    return result


async def _run_sides(
    result: Result,
    cfg: Config,
    sides: Sequence[tuple[Any, ...]],
    runner: Callable[..., Callable[[], Awaitable[Measure]]],
) -> None:
    """Start the buses of the two sides (each side's first item) and interleave their runs."""
    async with sides[0][0], sides[1][0]:
        await interleave(
            result,
            cfg.reps,
            [("pgbus", runner(*sides[0])), ("baseline", runner(*sides[1]))],
            cfg.progress,
        )


def _durable_latency_result(name: str, description: str) -> Result:
    """The result of a durable-vs-plain latency scenario (skipped without pgbus.durable)."""
    result = Result(
        name,
        description,
        "µs",
        higher_is_better=False,
        target="p99 <= plain p99 + 5 ms",
        check=lambda p, b: p <= b + 5_000,
    )
    if not durable_available():
        result.skipped = "not available: pgbus.durable is not installed"
    return result


def _latency_side(
    cfg: Config,
    schema: str,
    durable_name: str | None,
    handle: Callable[[BenchEvent], Awaitable[None]],
) -> tuple[Bus, type[BenchEvent]]:
    """A bus with ``handle`` on a new channel: durable as ``durable_name``, else plain."""
    durable: Any = importlib.import_module("pgbus.durable")
    cls = event_class(new_channel("dlat" if durable_name else "plat"))
    plugins = [durable.DurablePlugin(schema=schema)] if durable_name else []
    bus = Bus(cfg.dsn, load_entrypoints=False, plugins=plugins)
    bus.subscribe(cls, durable=durable_name)(handle)
    return bus, cls


async def bench_durable_latency(cfg: Config) -> Result:
    """Publish to handler entry at 1,000 events/s: a durable subscription against plain."""
    rate = 1_000
    result = _durable_latency_result(
        "durable_latency_1k",
        f"latency publish -> handler entry at {rate:,} events/s (p99): durable subscription"
        " (pgbus) vs plain subscription (baseline)",
    )
    if result.skipped:
        return result
    count = max(50, int(rate * cfg.latency_seconds))
    clock = time.perf_counter
    async with _durable_schema(cfg.dsn) as schema:
        sides = []
        for durable_name in ("latency", None):
            samples: list[float] = []
            counter = Counter()

            async def handle(
                event: BenchEvent, samples: list[float] = samples, counter: Counter = counter
            ) -> None:
                samples.append(clock() - event.sent)
                counter.hit()

            bus, cls = _latency_side(cfg, schema, durable_name, handle)
            sides.append((bus, cls, samples, counter))
        await sides[0][0].migrate()
        pending: set[asyncio.Task[Any]] = set()

        def runner(
            bus: Bus, cls: type[BenchEvent], samples: list[float], counter: Counter
        ) -> Callable[[], Awaitable[Measure]]:
            async def send(i: int) -> None:  # not awaited in line: a publish may take longer
                task = asyncio.create_task(bus.publish(make_event(cls, i, clock())))
                pending.add(task)
                task.add_done_callback(pending.discard)

            async def run() -> Measure:
                return await _latency_run(rate, count, send, samples, counter)

            return run

        await _run_sides(result, cfg, sides, runner)
    result.notes.append(f"{count} events per repetition, one process, publish() through the pool")
    return result


#: Seconds the transactions of the ``durable_latency_tx`` scenario stay open after
#: their publish (the issue's case: the caller commits 2 s later), and their rate.
TX_HOLD: Final = 2.0
TX_RATE: Final = 10


async def bench_durable_latency_tx(cfg: Config) -> Result:
    """Commit to handler entry of ``publish(connection=)`` whose caller commits later."""
    hold = 0.2 if cfg.quick else TX_HOLD
    count = 10 if cfg.quick else int(TX_RATE * 2 * TX_HOLD)
    result = _durable_latency_result(
        "durable_latency_tx",
        f"latency commit -> handler entry (p99) of publish(connection=) in transactions"
        f" committed {hold:g} s after it, {TX_RATE}/s: durable subscription (pgbus) vs"
        " plain subscription, NOTIFY in the transaction (baseline)",
    )
    if result.skipped:
        return result
    clock = time.perf_counter
    writers = int(TX_RATE * hold) + 4
    async with _durable_schema(cfg.dsn) as schema:
        sides = []
        for durable_name in ("latency_tx", None):
            samples: list[float] = []
            committing: dict[int, float] = {}
            counter = Counter()

            async def handle(
                event: BenchEvent,
                samples: list[float] = samples,
                committing: dict[int, float] = committing,
                counter: Counter = counter,
            ) -> None:
                samples.append(clock() - committing[event.seq])
                counter.hit()

            bus, cls = _latency_side(cfg, schema, durable_name, handle)
            sides.append((bus, cls, samples, committing, counter))
        await sides[0][0].migrate()
        pool = await asyncpg.create_pool(cfg.dsn, min_size=writers, max_size=writers)
        pending: set[asyncio.Task[Any]] = set()

        def runner(
            bus: Bus,
            cls: type[BenchEvent],
            samples: list[float],
            committing: dict[int, float],
            counter: Counter,
        ) -> Callable[[], Awaitable[Measure]]:
            async def transaction(i: int) -> None:
                async with pool.acquire() as conn:
                    tx = conn.transaction()
                    await tx.start()
                    await bus.publish(make_event(cls, i), connection=conn)
                    await asyncio.sleep(hold)
                    committing[i] = clock()
                    await tx.commit()

            async def send(i: int) -> None:  # not awaited in line: each holds its transaction
                task = asyncio.create_task(transaction(i))
                pending.add(task)
                task.add_done_callback(pending.discard)

            async def run() -> Measure:
                committing.clear()
                return await _latency_run(TX_RATE, count, send, samples, counter)

            return run

        try:
            await _run_sides(result, cfg, sides, runner)
        finally:
            await pool.close()
    result.notes.append(
        f"{count} transactions per repetition, {writers} connections; latency from the"
        " COMMIT sent to the handler"
    )
    return result


async def _tuples_inserted(conn: asyncpg.Connection, schema: str) -> int:
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    found = await conn.fetchval(
        "SELECT coalesce(sum(n_tup_ins), 0) FROM pg_stat_user_tables WHERE schemaname = $1",
        schema,
    )
    return int(found)


async def _settled(stats: asyncpg.Connection, schema: str, at_least: int) -> int:
    """n_tup_ins of ``schema`` once the backends reported (they do when they exit)."""
    last = -1
    for _ in range(50):
        now = await _tuples_inserted(stats, schema)
        if now == last and now >= at_least:
            return now
        last = now
        await asyncio.sleep(0.2)
    return last


async def bench_durable_rows(cfg: Config) -> Result:
    """Rows written into pgbus's schema per event, two durable subscriptions, success path."""
    result = Result(
        "durable_rows",
        "rows inserted into the durable schema per event (pg_stat_user_tables.n_tup_ins),"
        " two durable subscriptions, publish_many to handled",
        "rows/event",
        higher_is_better=False,
        target=f"<= {ROWS_TARGET:g}",
        check=lambda p, _b: p <= ROWS_TARGET,
        has_ratio=False,
    )
    if not durable_available():
        result.skipped = "not available: pgbus.durable is not installed"
        return result
    durable: Any = importlib.import_module("pgbus.durable")
    n = max(cfg.batch, cfg.durable_events - cfg.durable_events % cfg.batch)
    async with _durable_schema(cfg.dsn) as schema:
        cls = event_class(new_channel("rows"))
        counters = (Counter(), Counter())

        def make_bus() -> Bus:
            """A bus of its own per repetition: stopping it makes its backends report."""
            plugin = durable.DurablePlugin(schema=schema, prune_interval=None)
            bus = Bus(cfg.dsn, load_entrypoints=False, plugins=[plugin])
            for name, counter in zip(("a", "b"), counters, strict=True):

                async def handle(event: BenchEvent, counter: Counter = counter) -> None:  # noqa: ARG001
                    counter.hit()

                bus.subscribe(cls, durable=name)(handle)
            return bus

        await make_bus().migrate()
        stats: asyncpg.Connection = await asyncpg.connect(cfg.dsn)

        async def run() -> Measure:
            bus = make_bus()
            before = await _tuples_inserted(stats, schema)
            for counter in counters:
                counter.arm(n)
            async with bus:
                for start in range(0, n, cfg.batch):
                    events = [make_event(cls, i) for i in range(start, start + cfg.batch)]
                    await bus.publish_many(events)
                lost = sum([await c.wait() or 0 for c in counters])
            return Measure((await _settled(stats, schema, before + n) - before) / n, lost)

        async def nothing() -> Measure:
            return Measure(1.0, 0)

        try:
            await interleave(
                result, cfg.reps, [("pgbus", run), ("baseline", nothing)], cfg.progress
            )
        finally:
            await stats.close()
    result.notes.append(f"{n} events per repetition in calls of {cfg.batch}; baseline: 1 row")
    return result


async def bench_publish_concurrent(cfg: Config, *, durable_mode: bool) -> Result:
    """64 tasks calling publish() at once vs raw asyncpg on a pool of the same size."""
    raw_what = "journal INSERTs" if durable_mode else "pg_notify"
    result = Result(
        "durable_publish_64" if durable_mode else "publish_64",
        f"{PUBLISHERS} concurrent tasks: {'durable ' if durable_mode else ''}publish() (pgbus)"
        f" vs raw asyncpg {raw_what}, one per statement, on a pool of the same size (baseline)",
        "events/s",
        higher_is_better=True,
        **ratio_target(3.0),
    )
    if durable_mode and not durable_available():
        result.skipped = "not available: pgbus.durable is not installed"
        return result
    durable: Any = importlib.import_module("pgbus.durable") if durable_mode else None
    per_task = max(5, (cfg.durable_events if durable_mode else cfg.publish_events) // PUBLISHERS)
    size = 10
    async with _durable_schema(cfg.dsn) as schema:
        cls = event_class(new_channel("c64"))
        plugins = [durable.DurablePlugin(schema=schema, pool_max_size=size)] if durable else []
        bus = Bus(cfg.dsn, load_entrypoints=False, plugins=plugins, pool_max_size=size)
        raw = await asyncpg.create_pool(cfg.dsn, min_size=size, max_size=size)
        if durable_mode:
            await bus.migrate()
            async with raw.acquire() as conn:
                await _business_table(conn, schema)
        payload = envelope_template()
        statement = (
            f'INSERT INTO "{schema}".own_journal (channel, event_id, type, payload)'  # noqa: S608
            " VALUES ($1, $2, 'BenchEvent', $3)"
            if durable_mode
            else NOTIFY_ONE
        )

        async def pgbus_task(t: int) -> None:
            for i in range(per_task):
                await bus.publish(make_event(cls, t * per_task + i))

        async def raw_task(t: int) -> None:  # noqa: ARG001 - same shape
            for _ in range(per_task):
                if durable_mode:
                    await raw.execute(statement, cls.pgbus_channel, uuid.uuid4().hex, payload)
                else:
                    await raw.execute(statement, cls.pgbus_channel, payload)

        def runner(task: Callable[[int], Awaitable[None]]) -> Callable[[], Awaitable[Measure]]:
            async def run() -> Measure:
                watch = Stopwatch()
                await asyncio.gather(*(task(t) for t in range(PUBLISHERS)))
                return watch.measure(PUBLISHERS * per_task, None)

            return run

        try:
            async with bus:
                await interleave(
                    result,
                    cfg.reps,
                    [("pgbus", runner(pgbus_task)), ("baseline", runner(raw_task))],
                    cfg.progress,
                )
        finally:
            await raw.close()
    result.notes.append(f"{PUBLISHERS} tasks x {per_task} events; pools of {size} connections")
    return result


# --------------------------------------------------------------------------- 8. relay

#: Where the relay scenarios find a broker: ``$PGBUS_BENCH_NATS`` (a ``nats://`` URL with
#: JetStream), ``$PGBUS_BENCH_KAFKA`` (``host:port``), else these, if they answer.
BENCH_NATS: Final = "nats://127.0.0.1:4222"
BENCH_KAFKA: Final = "127.0.0.1:9092"


def relay_available(broker: str) -> bool:
    """Whether ``pgbus-relay`` and the broker's client are installed."""
    client = {"nats": "nats", "kafka": "aiokafka"}[broker]
    return all(importlib.util.find_spec(name) is not None for name in ("pgbus_relay", client))


async def _answers(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


@contextlib.asynccontextmanager
async def _bench_broker(broker: str) -> AsyncIterator[str | None]:
    """The relay's ``to=`` URL (without a stream), or ``None`` when no broker is found.

    NATS: ``$PGBUS_BENCH_NATS``, else 127.0.0.1:4222, else a ``nats-server -js`` of its
    own (from ``$PATH`` or Debian's ``/usr/sbin``) on a free port, stopped afterwards.
    """
    if broker == "kafka":
        address = os.environ.get("PGBUS_BENCH_KAFKA", BENCH_KAFKA)
        host, _, kafka_port = address.rpartition(":")
        yield f"kafka://{address}" if await _answers(host, int(kafka_port)) else None
        return
    url = os.environ.get("PGBUS_BENCH_NATS", BENCH_NATS)
    if await _answers("127.0.0.1", 4222) or "PGBUS_BENCH_NATS" in os.environ:
        yield url
        return
    binary = shutil.which("nats-server") or (
        "/usr/sbin/nats-server" if os.access("/usr/sbin/nats-server", os.X_OK) else None
    )
    if binary is None:
        yield None
        return
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="pgbus-bench-nats-") as store:
        proc = await asyncio.create_subprocess_exec(
            binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", store,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while not await _answers("127.0.0.1", port):
                if time.monotonic() > deadline or proc.returncode is not None:
                    raise ClusterError("nats-server did not start within 30 s")
                await asyncio.sleep(0.05)
            yield f"nats://127.0.0.1:{port}"
        finally:
            proc.terminate()
            await proc.wait()


class _Relayed:
    """A plugin counting the events its subscriptions handled, with publish-to-done times."""

    def __init__(self, names: set[str], counter: Counter, samples: list[float]) -> None:
        self.names, self.counter, self.samples = names, counter, samples

    @hookimpl
    def pgbus_on_handled(self, subscription: Any, delivery: Any, duration: float) -> None:  # noqa: ARG002 - hook signature
        if subscription.name in self.names:
            published = delivery.published_at
            if published is None:  # the relay's channel subscription: its raw envelope
                published = json.loads(delivery.message.payload)["ts"]
            self.samples.append(time.time() - published)
            self.counter.hit()


async def bench_relay(cfg: Config, broker: str, *, rate: int | None = None) -> Result:
    """The relay to ``broker``: throughput (or paced latency) against durable delivery."""
    title = {"nats": "NATS JetStream", "kafka": "Kafka"}[broker]
    if rate is None:
        result = Result(
            f"relay_{broker}",
            f"relay to {title}, publish_many to broker ack (pgbus) vs a durable subscription,"
            f" publish_many to handled (baseline), {cfg.batch} per call",
            "events/s",
            higher_is_better=True,
            target="(reported)",
        )
    else:
        result = Result(
            f"relay_{broker}_latency_{rate // 1000}k",
            f"latency publish -> {title} ack at {rate:,} events/s (p99, pgbus) vs publish ->"
            " durable handler done (baseline)",
            "µs",
            higher_is_better=False,
            target="(reported)",
        )
    if not relay_available(broker):
        result.skipped = f"not available: pip install './plugins/pgbus-relay[{broker}]'"
        return result
    async with _bench_broker(broker) as url:
        if url is None:
            result.skipped = f"no {title} broker (set PGBUS_BENCH_{broker.upper()})"
            return result
        await _relay_sides(cfg, result, broker, url, rate)
    return result


async def _relay_sides(
    cfg: Config, result: Result, broker: str, url: str, rate: int | None
) -> None:
    durable: Any = importlib.import_module("pgbus.durable")
    relay_module: Any = importlib.import_module("pgbus_relay")
    tag = uuid.uuid4().hex[:10]
    n = max(cfg.batch, cfg.durable_events - cfg.durable_events % cfg.batch)
    async with _durable_schema(cfg.dsn) as schema:
        sides = []
        for relaying in (True, False):
            cls = event_class(new_channel("relay" if relaying else "dur"))
            counter, samples = Counter(), list[float]()
            bus = Bus(cfg.dsn, load_entrypoints=False, plugins=[durable.DurablePlugin(schema)])
            if relaying:
                to = f"{url}?stream=PGBUS_BENCH_{tag.upper()}" if broker == "nats" else url
                topic = f"pgbus-bench-{tag}" if broker == "kafka" else "{channel}"
                relay = relay_module.Relay(bus, to=to, channels=[cls.pgbus_channel], topic=topic)
                names = {relay.subscription(cls.pgbus_channel)}
            else:

                async def handle(event: BenchEvent) -> None:  # noqa: ARG001 - counted by _Relayed
                    return None

                bus.subscribe(cls, durable="bench", name="bench")(handle)
                names = {"bench"}
            bus.plugins.register(_Relayed(names, counter, samples))
            sides.append((bus, cls, counter, samples))
        await sides[0][0].migrate()
        pending: set[asyncio.Task[Any]] = set()

        def runner(
            bus: Bus, cls: type[BenchEvent], counter: Counter, samples: list[float]
        ) -> Callable[[], Awaitable[Measure]]:
            async def send(i: int) -> None:  # not awaited in line: a publish may take longer
                task = asyncio.create_task(bus.publish(make_event(cls, i)))
                pending.add(task)
                task.add_done_callback(pending.discard)

            async def run() -> Measure:
                if rate is not None:
                    count = max(50, int(rate * cfg.latency_seconds))
                    return await _latency_run(rate, count, send, samples, counter)
                samples.clear()
                counter.arm(n)
                watch = Stopwatch()
                for start in range(0, n, cfg.batch):
                    await bus.publish_many(
                        [make_event(cls, i) for i in range(start, start + cfg.batch)]
                    )
                lost = await counter.wait()
                measure = watch.measure(n, lost, counter.last_arrival)
                if samples:
                    micro = [s * 1e6 for s in samples]
                    measure.details["p50_us"] = percentile(micro, 0.50)
                    measure.details["p99_us"] = percentile(micro, 0.99)
                return measure

            return run

        await _run_sides(result, cfg, sides, runner)
    result.notes.append(
        f"{url.partition('?')[0]}; relay: {relay_module.Relay.__name__} with its defaults"
        " (64 in flight); baseline: a durable subscription in the same process"
    )


# ------------------------------------------------------------------------------ run


BENCHES: Final[dict[str, Callable[[Config], Awaitable[Result]]]] = {
    "publish": bench_publish,
    "publish_many": bench_publish_many,
    "receive": bench_receive,
    "receive_metrics": bench_receive_metrics,
    "receive_batch": lambda cfg: bench_receive(cfg, batch=100),
    "receive_dashboard": bench_receive_dashboard,
    "otel_metrics": lambda cfg: bench_otel(cfg, "otel_metrics"),
    "otel_unsampled": lambda cfg: bench_otel(cfg, "otel_unsampled"),
    "otel_sampled": lambda cfg: bench_otel(cfg, "otel_sampled"),
    "latency_1k": lambda cfg: bench_latency(cfg, 1_000),
    "latency_5k": lambda cfg: bench_latency(cfg, 5_000),
    "request": bench_request,
    "fanout": bench_fanout,
    "memory": bench_memory,
    "durable_publish": lambda cfg: bench_durable(cfg, receive=False),
    "durable_receive": lambda cfg: bench_durable(cfg, receive=True),
    "durable_writers": bench_durable_writers,
    "durable_rows": bench_durable_rows,
    "durable_latency_1k": bench_durable_latency,
    "durable_latency_tx": bench_durable_latency_tx,
    "publish_64": lambda cfg: bench_publish_concurrent(cfg, durable_mode=False),
    "durable_publish_64": lambda cfg: bench_publish_concurrent(cfg, durable_mode=True),
    "relay_nats": lambda cfg: bench_relay(cfg, "nats"),
    "relay_nats_latency_1k": lambda cfg: bench_relay(cfg, "nats", rate=1_000),
    "relay_kafka": lambda cfg: bench_relay(cfg, "kafka"),
    "relay_kafka_latency_1k": lambda cfg: bench_relay(cfg, "kafka", rate=1_000),
}


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "asyncpg": asyncpg.__version__,
        "pydantic": pydantic.VERSION,
        "pgbus": __version__,
    }


async def run_benches(cfg: Config, names: Sequence[str]) -> dict[str, Any]:
    """Run the scenarios ``names`` in order and return the report as JSON data."""
    report: dict[str, Any] = {"machine": machine(), "quick": cfg.quick, "reps": cfg.reps}
    conn: asyncpg.Connection = await asyncpg.connect(cfg.dsn)
    try:
        report["machine"]["postgresql"] = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    results: list[Result] = []
    started = time.perf_counter()
    for name in names:
        cfg.progress(f"{name}: starting")
        try:
            result = await BENCHES[name](cfg)
        except Exception as exc:
            logger.exception("scenario %s failed", name)
            result = Result(name, name, "", higher_is_better=True, target="")
            result.error = f"{type(exc).__name__}: {exc}"
        results.append(result)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["scenarios"] = [r.to_json() for r in results]
    report["ok"] = all(r.ok for r in results)
    return report


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1000:  # noqa: PLR2004 - thousands separators from here
        return f"{value:,.0f}"
    if abs(value) >= 10:  # noqa: PLR2004
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cell(stats: dict[str, Any]) -> str:
    if stats["median"] is None:
        return "-"
    text = _fmt(stats["median"])
    if len(stats["values"]) > 1:
        text += f" [{_fmt(stats['min'])} - {_fmt(stats['max'])}]"
    return text


#: How the table labels the details of a scenario: ``key: (label, unit)``.
DETAILS: Final = {
    "cpu_us_per_event": ("CPU per event", "µs"),
    "p50": ("p50", "µs"),
    "p99": ("p99", "µs"),
    "max": ("max", "µs"),
    "sent_per_s": ("rate achieved", "events/s"),
    "rss_small_mb": ("RSS after the small count", "MB"),
    "rss_large_mb": ("RSS after the large count", "MB"),
}


def render(report: dict[str, Any]) -> None:
    """Print the report as a table on stdout."""
    from rich.console import Console  # noqa: PLC0415 - only the table needs rich
    from rich.table import Table  # noqa: PLC0415

    m = report["machine"]
    console = Console(highlight=False, markup=False, width=None if sys.stdout.isatty() else 130)
    console.print(
        f"pgbus {m['pgbus']} bench: PostgreSQL {m['postgresql']}, Python {m['python']},"
        f" asyncpg {m['asyncpg']}, pydantic {m['pydantic']}, {m['cpus']} CPUs;"
        f" {report['reps']} interleaved repetitions{' (quick)' if report['quick'] else ''},"
        " median [min - max]"
    )
    table = Table(show_lines=False)
    table.add_column("scenario")
    table.add_column("unit")
    table.add_column("pgbus", justify="right")
    table.add_column("baseline", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("target")
    table.add_column("lost", justify="right")
    for s in report["scenarios"]:
        if s["error"] or s["skipped"]:
            table.add_row(s["name"], s["unit"], "-", "-", "-", s["error"] or s["skipped"], "-")
            continue
        met = {True: " (met)", False: " (MISSED)", None: ""}[s["met"]]
        table.add_row(
            s["name"],
            s["unit"],
            _cell(s["pgbus_stats"]),
            _cell(s["baseline_stats"]),
            "-" if s["ratio"] is None else f"{s['ratio']:.2f}",
            s["target"] + met,
            "-" if s["lost"] is None else str(s["lost"]),
        )
        pd, bd = s["pgbus_stats"]["details"], s["baseline_stats"]["details"]
        for key in pd:
            if key in bd and key != "p99":  # p99 is the scenario's own figure
                label, unit = DETAILS.get(key, (key, ""))
                ratio = pd[key] / bd[key] if bd[key] else None
                table.add_row(
                    f"  {label}",
                    unit,
                    _fmt(pd[key]),
                    _fmt(bd[key]),
                    "-" if ratio is None else f"{ratio:.2f}",
                    "",
                    "",
                )
        for name, peer in s["peers"].items():
            median = peer["median"]
            ratio = s["pgbus"] / median if s["pgbus"] and median else None
            table.add_row(
                f"  vs {name}",
                s["unit"],
                "",
                _cell(peer),
                "-" if ratio is None else f"{ratio:.2f}",
                "(peer)",
                "-" if peer["lost"] is None else str(peer["lost"]),
            )
    console.print(table)
    for s in report["scenarios"]:
        console.print(f"{s['name']}: {s['title']}")
        for note in s["notes"]:
            console.print(f"    {note}")
    console.print(f"{report['seconds']} s; {'ok' if report['ok'] else 'FAILED'}")


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table (what ``docs/performance.md`` shows).

    :param report: what :func:`run_benches` returned.
    :returns: the table, one scenario per row, details and peers on rows of their own.
    """
    rows = [
        "| scenario | unit | pgbus | baseline | ratio | target | lost |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for s in report["scenarios"]:
        if s["error"] or s["skipped"]:
            rows.append(
                f"| {s['name']} | {s['unit']} | - | - | - | {s['error'] or s['skipped']} | - |"
            )
            continue
        met = {True: " (met)", False: " (**missed**)", None: ""}[s["met"]]
        lost = "-" if s["lost"] is None else str(s["lost"])
        ratio = "-" if s["ratio"] is None else f"{s['ratio']:.2f}"
        rows.append(
            f"| **{s['name']}** | {s['unit']} | {_cell(s['pgbus_stats'])}"
            f" | {_cell(s['baseline_stats'])} | {ratio} | {s['target']}{met} | {lost} |"
        )
        pd, bd = s["pgbus_stats"]["details"], s["baseline_stats"]["details"]
        for key in pd:
            if key in bd and key != "p99":
                label, unit = DETAILS.get(key, (key, ""))
                r = f"{pd[key] / bd[key]:.2f}" if bd[key] else "-"
                rows.append(f"| ↳ {label} | {unit} | {_fmt(pd[key])} | {_fmt(bd[key])} | {r} | | |")
        for name, peer in s["peers"].items():
            r = f"{s['pgbus'] / peer['median']:.2f}" if s["pgbus"] and peer["median"] else "-"
            plost = "-" if peer["lost"] is None else str(peer["lost"])
            rows.append(f"| ↳ vs {name} | {s['unit']} | | {_cell(peer)} | {r} | (peer) | {plost} |")
    return "\n".join(rows) + "\n"


@contextlib.contextmanager
def _server(dsn: str | None) -> Iterator[str]:
    if dsn:
        yield dsn
        return
    with local_server() as found:
        yield found


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m pgbus.bench``."""
    p = argparse.ArgumentParser(
        prog="python -m pgbus.bench",
        description="Measure pgbus side by side with raw asyncpg (medians of interleaved reps).",
    )
    p.add_argument("--dsn", help="the database (default: $PGBUS_DSN, a local or throwaway server)")
    p.add_argument("--quick", action="store_true", help="small counts: a smoke test")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--reps", type=int, help="repetitions per scenario (default 5; quick 1)")
    p.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        help="run only this scenario (repeatable)",
    )
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    p.add_argument("--channel", help=argparse.SUPPRESS)
    p.add_argument("--milestones", help=argparse.SUPPRESS)
    return p


def run(
    *,
    dsn: str | None = None,
    quick: bool = False,
    as_json: bool = False,
    as_markdown: bool = False,
    reps: int | None = None,
    scenarios: Sequence[str] | None = None,
) -> int:
    """Run the benchmark and print the table (or the JSON object).

    :param dsn: the database; by default ``$PGBUS_DSN``, a server on
        ``127.0.0.1:5432``, or a throwaway cluster (:func:`pgbus.server.local_server`).
    :param quick: small counts, one repetition: a smoke test of every scenario.
    :param as_json: print ``{"scenarios": [...], ...}`` instead of a table.
    :param as_markdown: print a Markdown table instead.
    :param reps: repetitions per scenario.
    :param scenarios: the scenarios to run (default: all, in order).
    :returns: the exit status: 0 when every scenario ran and lost nothing, else 1.
    :raises ServerNotFound: when no server was given or found.

    .. versionadded:: 0.1.0
    """
    names = list(dict.fromkeys(scenarios)) if scenarios else list(SCENARIOS)

    def progress(message: str) -> None:
        sys.stderr.write(f"\r\x1b[K{message}" if sys.stderr.isatty() else f"{message}\n")
        sys.stderr.flush()

    with _server(dsn or os.environ.get("PGBUS_DSN")) as found:
        cfg = Config.make(found, quick=quick, reps=reps, progress=progress)
        report = asyncio.run(run_benches(cfg, names))
    if sys.stderr.isatty():
        sys.stderr.write("\r\x1b[K")
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
    elif as_markdown:
        sys.stdout.write(markdown(report))
    else:
        render(report)
    return 0 if report["ok"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    """The entry point of ``python -m pgbus.bench``.

    :param argv: the arguments (default: ``sys.argv[1:]``).
    :returns: the exit status.

    .. versionadded:: 0.1.0
    """
    args = parser().parse_args(argv)
    if args.memory_child:
        milestones = [int(x) for x in (args.milestones or "").split(",") if x]
        asyncio.run(memory_child(args.memory_child, args.dsn, args.channel, milestones))
        return 0
    try:
        return run(
            dsn=args.dsn,
            quick=args.quick,
            as_json=args.json,
            as_markdown=args.markdown,
            reps=args.reps,
            scenarios=args.scenario,
        )
    except ServerNotFound as exc:
        sys.stderr.write(f"pgbus bench: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
