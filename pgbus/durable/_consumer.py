"""The durable consumer: one per durable subscription of a Bus, a member of its group.

Its loop, woken by NOTIFY on the subscription's channels (and after every reconnect,
and every ``poll_interval`` as a safety net):

1. **ack** the batch handled before: take the handled and the dead-lettered events out
   of it (an empty batch is deleted);
2. **pump**: cut what committed in the journal since the subscription's snapshot into
   batches of journal ids (one row per ``batch_size`` events; one member at a time:
   ``FOR UPDATE SKIP LOCKED`` on the subscription row), and move the snapshot on;
3. **claim**: take the next batch, in order, with a lease (``FOR UPDATE SKIP LOCKED``,
   so the members of a group never take the same batch), with its events;
4. hand the deliveries to the subscription's queue (its middleware, retries, timeouts
   and ``concurrency`` apply) and wait for each outcome.

The first three are one statement, one round trip (the function ``step``); a key-ordered
subscription acks in a statement of its own first (its claim waits for the member
holding the first batch, which must not wait for this member's ack in turn).

A plain subscription (no ``key=``, no ``batch=``) pipelines: while it handles a batch,
the next ``step`` (the acks of the batch before, a pump, the claim of the next batch)
is already on its way, so the round trip overlaps the handling. The member claims under
two names by turns (a claim takes back its claimer's own batches, and must not take the
batch in hand); acks go under the name their batch was claimed under. The batch
claimed ahead is handed over only once the one in hand is settled (journal order), its
lease is renewed with it, and stopping hands it back.

A member that dies leaves its claimed batch; after the lease it goes to the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import asyncpg

from pgbus._events import Batch, DeadLetter, Message

if TYPE_CHECKING:
    from pgbus._bus import Bus
    from pgbus._events import Decoder, Delivery
    from pgbus._subscription import Router, Subscription
    from pgbus.durable._plugin import DurablePlugin

logger = logging.getLogger(__name__)

#: What the driver raises when a statement or a connection fails.
DRIVER_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

#: Outcomes of one delivery (RETRY: nacked, handled again from a batch of its own).
OK, DEAD, AGAIN, RETRY = "ok", "dead", "again", "retry"


def member_id() -> str:
    """A name for one consumer, unique across processes and machines."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Outcomes:
    """The outcomes a batch in hand waits for: a count, and one waiter for the last."""

    __slots__ = ("pending", "waiter")

    def __init__(self) -> None:
        self.pending = 0
        self.waiter: asyncio.Future[None] | None = None

    def done_one(self) -> None:
        self.pending -= 1
        waiter = self.waiter
        if self.pending <= 0 and waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout: float) -> bool:  # noqa: ASYNC109 - the renewal period
        """Wait up to ``timeout`` s for every outcome; whether they all arrived."""
        if self.pending <= 0:
            return True
        waiter = self.waiter
        if waiter is None or waiter.done():
            waiter = self.waiter = asyncio.get_running_loop().create_future()
        await asyncio.wait([waiter], timeout=timeout)
        return self.pending <= 0


class Inflight:
    """A delivery handed to a subscription, waiting for its outcome."""

    __slots__ = ("batch", "journal_id", "outcome", "retry")

    def __init__(self, journal_id: int, batch: Outcomes | None = None) -> None:
        self.journal_id = journal_id
        self.outcome: str | None = None
        self.batch = batch
        if batch is not None:
            batch.pending += 1
        #: For RETRY: seconds until the next attempt, that attempt's number, and the
        #: retry batch it goes into (the journal id of its handler batch's first event).
        self.retry: tuple[float, int, int] = (0.0, 1, journal_id)

    @property
    def done(self) -> bool:
        """Whether its outcome is set."""
        return self.outcome is not None

    def resolve(self, outcome: str) -> None:
        """Set the outcome (the first one wins)."""
        if self.outcome is None:
            self.outcome = outcome
            if self.batch is not None:
                self.batch.done_one()


class Consumer:
    """Feeds one durable subscription from the journal."""

    def __init__(self, plugin: DurablePlugin, bus: Bus, sub: Subscription) -> None:
        self.plugin = plugin
        self.bus = bus
        self.sub = sub
        self.group: str = sub.durable  # type: ignore[assignment]  # only durable subs get one
        self.member = member_id()
        #: The names this member claims under: a plain subscription claims its next
        #: batch while it handles one (pipelined), under the other name, so that claim
        #: never takes the batch in hand back (a claim takes the claimer's own batches).
        self.names = (self.member, f"{self.member}+")
        self._pipelined = sub.key is None and sub.batch is None
        self.types = sorted({t.pgbus_type for t in sub.event_types}) if sub.event_types else None
        #: Journal ids per batch row: a batch handler's batch fits in one (so it is
        #: claimed, acknowledged and retried as one row).
        self.cut = max(plugin.batch_size, sub.batch or 0)
        #: A batch handler's deliveries gathered from the batch in hand, not yet queued.
        self._gathered: list[Delivery] = []
        #: Whether the last pump found less than a batch: a batch handler then gives the
        #: events that follow ``batch_wait`` to arrive before the next pump.
        self._lull = True
        self.wakeup = asyncio.Event()
        self.handled = 0
        self.duplicates = 0
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._routes: dict[str, tuple[Decoder, Router]] = {}
        self._stopping = False
        self._need_pump = True
        self._batches_low = True
        #: Per claiming name: handled events to ack (an ack takes out only the batches
        #: claimed under its name), and nacked events to persist with the next ack:
        #: journal id, delay, next attempt, and the retry batch (events with the same
        #: one are retried together).
        self._acks: dict[str, list[int]] = {n: [] for n in self.names}
        self._retries: dict[str, list[tuple[int, float, int, int]]] = {n: [] for n in self.names}
        self._timers: set[asyncio.TimerHandle] = set()
        self._due_unknown = True
        self._task: asyncio.Task[None] | None = None
        self._claimed: list[int] = []
        #: The name the batch in hand was claimed under.
        self._claimed_by = self.member
        #: The claim of the next batch made while the one in hand is handled, and its
        #: result once it returned: the name it was made under, its first row, its rows.
        self._prefetch: asyncio.Task[None] | None = None
        self._next: tuple[str, Any, list[Any]] | None = None
        #: The batch in hand: rows acked without a handler, and those awaiting one.
        self._batch_acks: list[int] = []
        self._waiting: list[tuple[int, str, Inflight]] = []
        self._outcomes = Outcomes()

    def __repr__(self) -> str:
        return f"<Consumer {self.group!r} member {self.member}>"

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the loop; the subscription's nacks are persisted by :meth:`defer`."""
        self.sub.deferrer = self.defer
        self._task = asyncio.create_task(self._run(), name=f"pgbus-durable-{self.group}")

    def defer(self, delivery: Delivery, delay: float) -> bool:
        """Persist the retry of a nacked delivery (the subscription's ``deferrer``).

        It leaves its batch, at the next ack, for a batch of its own due after
        ``delay`` seconds, so the events behind it go on and a restart keeps it. A batch
        handler's batch is retried as one: its events go into one batch row together.

        :returns: whether the delivery was one of this consumer's (else not persisted).
        """
        parts = delivery.deliveries if isinstance(delivery, Batch) else [delivery]
        found = [self.plugin.find(self.group, d.id) for d in parts]
        inflights = [i for i in found if i is not None and not i.done]
        if not inflights:
            return False
        together = inflights[0].journal_id
        for inflight in inflights:
            inflight.retry = (delay, delivery.attempt + 1, together)
            inflight.resolve(RETRY)
        return True

    def _wake_in(self, delay: float) -> None:
        """Look for work in ``delay`` seconds (a retry falls due), and for the next due then."""
        if self._stopping:
            return

        def due() -> None:
            self._timers.discard(handle)
            self._due_unknown = True
            self.wake()

        loop = asyncio.get_running_loop()
        if any(t.when() <= loop.time() + delay for t in self._timers):
            return  # a look comes before then, and finds this one next
        handle = loop.call_later(delay, due)
        self._timers.add(handle)

    def wake(self) -> None:
        """Look for work now (a NOTIFY arrived, or the listener reconnected)."""
        self._need_pump = True
        self.wakeup.set()

    async def stop(self, timeout: float) -> None:  # noqa: ASYNC109 - a drain deadline
        """Finish the batch in hand (up to ``timeout`` s), ack it, release the rest.

        Cut short (the bus's stop deadline came first) or out of time, it still acks
        what was handled and hands the rest back, before it returns or re-raises.
        """
        self._stopping = True
        self.wakeup.set()
        self.sub.deferrer = None
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        task = self._task
        if task is None:
            return
        interrupted = False
        try:
            if not task.done():
                await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            logger.warning(
                "durable subscription %s: batch not finished within %.1f s of stop()",
                self.group,
                timeout,
            )
        except asyncio.CancelledError:
            interrupted = True
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        elif not task.cancelled() and task.exception() is not None:
            logger.error(
                "durable subscription %s: consumer died", self.group, exc_info=task.exception()
            )
        await self._hand_back()
        if interrupted:
            raise asyncio.CancelledError

    async def _hand_back(self) -> None:
        """After the loop: ack what was handled, release what was not (not after the lease)."""
        await self._claim_ahead_returned()  # it carries acks: they must not go twice
        if self._claimed:  # cut short mid-batch: what was handled is acked, not released
            self._claimed = self._settle()
        await self._flush_acks()
        left = len(self._claimed)
        if self._claimed:
            await self._release(self._claimed_by, self._claimed)
            self._claimed = []
        left += await self._release_next()
        if left:
            logger.warning(
                "durable subscription %s: %d unfinished events handed back for later",
                self.group,
                left,
            )

    async def _release(self, name: str, ids: list[int]) -> None:
        """Hand claimed rows back for the group (a failure leaves them to the lease)."""
        with contextlib.suppress(*DRIVER_ERRORS):
            await asyncio.wait_for(
                self._execute(self.plugin.sql.release, self.group, name, ids), timeout=5.0
            )

    async def _claim_ahead_returned(self) -> None:
        """After the loop: wait (a while) for the claim ahead; its error goes nowhere."""
        task, self._prefetch = self._prefetch, None
        if task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait([task], timeout=5.0)
            if not task.done():  # its claim, if it commits, is left to the lease
                task.cancel()
            elif not task.cancelled():
                task.exception()  # retrieved: the loop is over, the error has no one to go to

    async def _release_next(self) -> int:
        """Hand back the batch claimed ahead (once its claim returned); how many rows."""
        await self._claim_ahead_returned()
        taken, self._next = self._next, None
        if taken is None:
            return 0
        name, _, rows = taken
        ids = [row["journal_id"] for row in rows]
        if ids:
            await self._release(name, ids)
        return len(ids)

    # -- the loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping:
            self.wakeup.clear()
            try:
                busy = await self._step()
            except DRIVER_ERRORS as exc:
                attempt += 1
                delay = self.bus.plugins.backoff(attempt, exc)
                delay = self.plugin.poll_interval if delay is None else delay
                level = logging.WARNING if attempt & (attempt - 1) == 0 else logging.DEBUG
                logger.log(
                    level,
                    "durable subscription %s: %s (attempt %d, next in %.2f s)",
                    self.group,
                    exc,
                    attempt,
                    delay,
                )
                await self._wait(delay)
                continue
            except Exception:
                logger.exception("durable subscription %s: consumer failed", self.group)
                await self._wait(self.plugin.poll_interval)
                continue
            attempt = 0
            if not busy:
                if not await self._wait(self.plugin.poll_interval):  # the safety-net poll:
                    self._due_unknown = True  # count the retries of every member again
                self._need_pump = True  # woken, or the safety-net poll
        await self._claim_ahead_returned()  # it carries acks: they must not go twice
        await self._flush_acks()
        await self._release_next()  # stopping, or unsubscribed: the others take it

    async def _flush_acks(self) -> None:
        """Ack what is handled and not yet acked (a claim usually does it)."""
        with contextlib.suppress(*DRIVER_ERRORS):
            await asyncio.wait_for(self._ack(), timeout=5.0)

    async def _wait(self, timeout: float) -> bool:  # noqa: ASYNC109 - an idle wait
        """Wait to be woken, or ``timeout`` seconds; whether it was woken."""
        if self._stopping:
            return True
        try:  # in this task (wait_for would wrap the wait in a task: two more loop turns)
            async with asyncio.timeout(timeout):
                await self.wakeup.wait()
        except TimeoutError:
            return False
        return True

    async def _step(self) -> bool:
        """Pump, claim and handle one batch; ``True`` when there may be more to do now."""
        if self.sub not in self.bus.subscriptions:  # unsubscribed: this member leaves
            self._stopping = True
            return False
        got = await self._next_batch()
        if got is None:
            return False
        pump, head, rows = got
        pumped = self._pumped(head) if pump else 0
        self._batches_low = len(rows) < self.cut
        if self._due_unknown:  # after a restart or an ack of retries: when is the next due
            await self._look_at_retries()
        if rows:
            await self._handle(rows)
            return True
        if pumped is None:  # another member is pumping: look again in a moment
            await self._wait(self.plugin.busy_retry)
            return True
        return self._need_pump

    async def _next_batch(self) -> tuple[bool, dict[str, Any], list[Any]] | None:
        """The batch claimed ahead, else a claim now: whether it pumped, its head, rows.

        ``None`` when stopping.
        """
        taken = None
        if not self._stopping:  # else what was claimed ahead is handed back
            taken, self._next = self._next, None  # claimed while the batch before was handled
        if taken is not None and not taken[2]:  # nothing claimed ahead
            self._batches_low = True
            if self._unacked():
                taken = None  # the acks go now, with a claim of their own
        if taken is not None:
            self._claimed_by, head, rows = taken
            return False, head, rows  # a claim ahead never pumps
        # Cut new batches only when woken (or a pump left more behind) and when the
        # claimed batches run low: few wait, so claiming stays cheap.
        pump = self._need_pump and self._batches_low
        if pump:
            self._need_pump = False
            if self.sub.batch is not None and self._lull and self.sub.batch_wait > 0:
                await asyncio.sleep(self.sub.batch_wait)  # let a batch's worth arrive
        if self._stopping:
            return None
        self._claimed_by = self._name_to_claim()
        others = tuple(n for n in self.names if n != self._claimed_by)
        if self._pipelined and any(self._has_acks(n) for n in others):
            await self._ack(others)  # left by a failed claim: not left until the next one
        head, rows = await self._fetch(self._claimed_by, pump=pump)
        return pump, head, rows

    def _pumped(self, head: Any) -> int | None:
        """What the pump cut into batches (``None``: another member is pumping)."""
        pumped: int | None = head["pumped"]
        if pumped is not None:
            self._lull = pumped < self.cut
        # Pump until a pump finds nothing in a snapshot of its own: one that went on with
        # a batch begun earlier used that batch's snapshot, and what committed since
        # (whose NOTIFYs woke an earlier pump) is still to come.
        if pumped is None or pumped > 0 or head["resumed"]:
            self._need_pump = True
        return pumped

    async def _look_at_retries(self) -> None:
        """Wake when the first persisted retry is due; count them (the delayed gauge)."""
        pool = await self.plugin.pool()
        row = await pool.fetchrow(self.plugin.sql.next_due, self.group)
        self._due_unknown = False
        if row is None:  # pragma: no cover - an aggregate always returns a row
            return
        self.sub.deferred = row[1]
        if row[0] is not None:
            self._wake_in(row[0])

    def _has_acks(self, name: str) -> bool:
        """Whether handled or nacked events claimed under ``name`` wait for their ack."""
        return bool(self._acks[name] or self._retries[name])

    def _unacked(self) -> bool:
        """Whether handled or nacked events wait for their ack."""
        return any(self._has_acks(n) for n in self.names)

    def _name_to_claim(self) -> str:
        """The name a claim between batches goes under: the one with acks to send.

        Else the last batch's: a claim under it takes again what that batch left claimed.
        """
        unacked = (n for n in self.names if self._has_acks(n))
        return next(unacked, self._claimed_by)

    def _claim_ahead(self) -> None:
        """Claim the next batch while the one in hand is handled (a plain subscription).

        Under the other name: a claim takes its claimer's own batches, this one must not
        take back the batch in hand. It sends that name's acks (the batch before).

        Only with a full batch in hand (a backlog): a claim sent before a small batch is
        handled sees less than one sent after it, and holds up the acks' round trip, so
        at low rates it would add latency and statements.
        """
        if self._batches_low or not self._pipelined or self._stopping:
            return
        if self._prefetch is not None or self._next is not None:
            return
        name = self.names[self._claimed_by == self.names[0]]

        async def claim() -> None:  # no pump: batches are cut when they run low
            head, rows = await self._fetch(name, pump=False)
            self._next = (name, head, rows)

        self._prefetch = asyncio.create_task(claim(), name=f"pgbus-durable-{self.group}-next")

    async def _claimed_ahead(self) -> None:
        """Wait for the claim made ahead; raise its error (the batch in hand is settled)."""
        task = self._prefetch
        if task is None:
            return
        await asyncio.wait([task])  # not cancelled with this task: stop() hands it back
        self._prefetch = None
        task.result()

    async def _fetch(self, name: str, *, pump: bool) -> tuple[dict[str, Any], list[Any]]:
        """Ack the events handled since the last claim, pump if ``pump``, claim a batch.

        :returns: the first row (its ``pumped``: how many were cut into batches, NULL
            when another member is pumping; ``resumed``: whether the pump went on with a
            batch begun earlier, in that batch's snapshot) and the claimed rows.
        """
        ordered = self.sub.key is not None
        if ordered:
            await self._ack()
        acks, retries = ([], []) if ordered else (list(self._acks[name]), list(self._retries[name]))
        ids, delays, attempts, together = self._retry_columns(retries)
        pool = await self.plugin.pool()
        async with pool.acquire() as conn:
            rows: list[Any] = await conn.fetch(
                self.plugin.sql.step,
                self.group,
                name,
                self.plugin.lease,
                ordered,
                pump,
                list(self.sub.channels),
                self.types,
                max(self.plugin.pump_size, self.cut),
                self.cut,
                acks + ids,
                ids,
                delays,
                attempts,
                together,
            )
        self._acked(name, acks, retries, delays)
        head = {"pumped": rows[0]["pumped"], "resumed": rows[0]["resumed"]}
        return head, [row for row in rows if row["journal_id"] is not None]

    @staticmethod
    def _retry_columns(
        retries: list[tuple[int, float, int, int]],
    ) -> tuple[list[int], list[float], list[int], list[int]]:
        """The retries to persist as columns: journal ids, delays, attempts, batches."""
        if not retries:
            return [], [], [], []
        ids, delays, attempts, together = zip(*retries, strict=True)
        return list(ids), list(delays), list(attempts), list(together)

    def _acked(
        self,
        name: str,
        acks: list[int],
        retries: list[tuple[int, float, int, int]],
        delays: list[float],
    ) -> None:
        """Forget what an ack persisted; wake when its first retry falls due."""
        del self._acks[name][: len(acks)]
        del self._retries[name][: len(retries)]
        if delays:
            self._wake_in(min(delays))
            self._due_unknown = True  # count the retries waiting again

    async def _ack(self, names: tuple[str, ...] | None = None) -> None:
        """Ack what is handled under ``names`` (all by default)."""
        for name in self.names if names is None else names:
            acks, retries = list(self._acks[name]), list(self._retries[name])
            if acks or retries:
                ids, delays, attempts, together = self._retry_columns(retries)
                await self._execute(
                    self.plugin.sql.ack,
                    self.group,
                    acks + ids,
                    ids,
                    delays,
                    attempts,
                    name,
                    together,
                )
                self._acked(name, acks, retries, delays)

    async def _execute(self, query: str, *args: Any) -> None:
        pool = await self.plugin.pool()
        async with pool.acquire() as conn:
            await conn.execute(query, *args)

    # -- handling a batch ----------------------------------------------------------------

    async def _handle(self, rows: list[Any]) -> None:
        self._claimed = [row["journal_id"] for row in rows]
        self._batch_acks = []
        self._waiting = []
        self._outcomes = Outcomes()
        self._claim_ahead()
        failure: BaseException | None = None
        for row in rows:
            journal_id: int = row["journal_id"]
            try:
                inflight = await self._offer(row)
            except DRIVER_ERRORS as exc:  # the rest stays claimed by us: taken again next
                failure = exc
                break
            if inflight is None:
                self._batch_acks.append(journal_id)
            else:
                self._waiting.append((journal_id, row["event_id"], inflight))
        await self._queue_gathered()  # after a failure too: what waits must be handled
        await self._wait_outcomes()
        offered = {w[0] for w in self._waiting}  # the rows after a failure stay claimed
        again = [j for j in self._settle() if j in offered]
        if again:  # what was decided leaves the batch first: others take only the rest
            # (only this batch's acks: the claim ahead, maybe in flight, carries the others)
            await self._ack((self._claimed_by,))
            await self._execute(self.plugin.sql.release, self.group, self._claimed_by, again)
        self._claimed = []
        if failure is not None:
            await self._release_next()  # taken again in order, after the rows left behind
            raise failure
        await self._claimed_ahead()

    def _settle(self) -> list[int]:
        """Queue the acks of the batch's outcomes so far; return the claims to hand back.

        Run when the batch is done, and by :meth:`stop` when it cancelled the batch: an
        event handled before the deadline is acked then, never released to run again.
        """
        decided = set(self._batch_acks)
        for journal_id, event_id, inflight in self._waiting:
            self.plugin.forget(self.group, event_id)
            outcome = inflight.outcome or AGAIN
            if outcome == AGAIN:
                continue
            decided.add(journal_id)
            if outcome == RETRY:
                self._retries[self._claimed_by].append((journal_id, *inflight.retry))
            elif outcome == OK:
                self.handled += 1
                self._remember(event_id)
        self._waiting, self._batch_acks = [], []
        retried = {r[0] for r in self._retries[self._claimed_by]}
        acks = self._acks[self._claimed_by]
        acks.extend(j for j in self._claimed if j in decided and j not in retried)
        return [j for j in self._claimed if j not in decided]

    async def _offer(self, row: Any) -> Inflight | None:
        """Hand one claimed row to the subscription; ``None`` when it needs no handler."""
        journal_id: int = row["journal_id"]
        event_id: str | None = row["event_id"]
        payload: str | None = row["payload"]
        if payload is None or event_id is None:  # pruned by age meanwhile
            return None
        # a batch claimed again (its ack was lost): skip what was handled; a first
        # claim is never a duplicate (after a seek back it is a replay, wanted)
        if row["deliveries"] > 1 and event_id in self._recent:
            self.duplicates += 1
            logger.debug("durable subscription %s: skipping duplicate %s", self.group, event_id)
            return None
        channel: str = row["channel"]
        message = Message(channel, payload, row["pid"], time.time(), row["stored_at"], event_id)
        if row["deliveries"] > self.plugin.max_deliveries:
            error = RuntimeError(
                f"delivered {row['deliveries'] - 1} times without an outcome (did the"
                " process die while handling it?)"
            )
            return await self._give_up(message, event_id, journal_id, error)
        return await self._hand_over(message, event_id, journal_id, row)

    async def _hand_over(
        self, message: Message, event_id: str, journal_id: int, row: Any
    ) -> Inflight | None:
        """Decode and route one event; queue it for the handler if it is routed here."""
        decode, route = self._route(message.channel)
        try:
            delivery = decode(message)
        except Exception as exc:
            logger.warning("durable subscription %s: %s", self.group, exc)
            await self.bus.plugins.on_decode_error(message, exc)
            return await self._give_up(message, event_id, journal_id, exc)
        try:
            wanted = self.sub in route(delivery)
        except Exception as exc:  # a plugin's router or the subscription's where=
            logger.exception("durable subscription %s: routing %s failed", self.group, event_id)
            return await self._give_up(message, event_id, journal_id, exc)
        if not wanted:
            return None
        if delivery.id is None:
            delivery.id = event_id
        # the attempt a nack persisted; claimed before: a redelivery
        delivery.attempt = row["attempt"]
        delivery.redelivered = row["deliveries"] > 1 or delivery.attempt > 1
        inflight = self.plugin.track(self.group, delivery.id, journal_id, self._outcomes)
        if self.sub.batch is None:
            await self.sub.put(delivery)
            return inflight
        self._gathered.append(delivery)
        if len(self._gathered) >= self.sub.batch:
            await self._queue_gathered()
        return inflight

    async def _queue_gathered(self) -> None:
        """Queue a batch handler's gathered deliveries as one batch (its events' attempt)."""
        gathered, self._gathered = self._gathered, []
        if gathered:
            await self.sub.put(Batch.of(gathered))

    async def _give_up(
        self, message: Message, event_id: str, journal_id: int, error: BaseException
    ) -> Inflight:
        """Dead-letter an event without its handler, through the bus's dead-letter hook.

        The durable plugin's own hook stores it (and resolves the outcome); the other
        implementations (the in-memory list, the log) see it like any dead letter.
        """
        inflight = self.plugin.track(self.group, event_id, journal_id, self._outcomes)
        dead = DeadLetter(message.channel, message.payload, error, 0, self.sub.name, id=event_id)
        try:
            await self.bus.plugins.on_dead_letter(dead)
        finally:
            self.plugin.forget(self.group, event_id)
        inflight.resolve(AGAIN)  # unless the durable plugin stored it: then it is DEAD
        return inflight

    def _route(self, channel: str) -> tuple[Decoder, Router]:
        """The decoder and the router of ``channel``, from the plugins, as the bus's own.

        The router is given this subscription only: a delivery it routes nowhere (not an
        event type the subscription takes, refused by its ``where=``, or by a plugin's
        router) is acknowledged without a handler, like one nobody subscribed to.
        """
        found = self._routes.get(channel)
        if found is None:
            types = [t for t in self.sub.event_types if t.pgbus_channel == channel]
            decoder = self.bus.plugins.decoder(channel, types)
            router = self.bus.plugins.router(channel, [self.sub])
            if decoder is None or router is None:  # pragma: no cover - built-ins always answer
                msg = f"no plugin provides a decoder and a router for channel {channel!r}"
                raise RuntimeError(msg)
            found = self._routes[channel] = (decoder, router)
        return found

    async def _wait_outcomes(self) -> None:
        """Wait for every outcome, renewing the lease of the claims meanwhile."""
        outcomes = self._outcomes
        renew_every = max(self.plugin.lease / 3, 0.05)
        while not await outcomes.wait(renew_every):
            if self.sub not in self.bus.subscriptions:  # unsubscribed meanwhile
                for _, _, inflight in self._waiting:
                    inflight.resolve(AGAIN)
                self._stopping = True
                return
            try:
                await self._renew()
            except DRIVER_ERRORS as exc:
                logger.warning("durable subscription %s: lease renewal: %s", self.group, exc)

    async def _renew(self) -> None:
        """Renew the lease of the batch in hand, and of the one claimed ahead."""
        await self._execute(
            self.plugin.sql.renew, self.group, self._claimed_by, self.plugin.lease, self._claimed
        )
        ahead = self._next
        if ahead is not None and ahead[2]:
            ids = [row["journal_id"] for row in ahead[2]]
            await self._execute(self.plugin.sql.renew, self.group, ahead[0], self.plugin.lease, ids)

    def _remember(self, event_id: str) -> None:
        recent = self._recent
        recent[event_id] = None
        if len(recent) > self.plugin.dedup_window:
            recent.popitem(last=False)
