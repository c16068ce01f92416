"""Client-side group commit: concurrent publishes gathered into one statement.

While ``lanes`` statements are in flight, the next callers wait together; when a lane is
free it sends everything that waits (up to ``max_items``) as one statement. Each caller
still gets its own outcome: when a gathered statement fails, each caller's part is sent
again on its own, so a failing event fails only its caller.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

T = TypeVar("T")


class Coalescer(Generic[T]):
    """Gathers the items of concurrent :meth:`submit` calls into shared sends."""

    def __init__(
        self,
        send: Callable[[Sequence[T]], Awaitable[None]],
        *,
        lanes: int,
        max_items: int = 1000,
    ) -> None:
        self._send = send
        self._lanes = lanes
        self._max_items = max_items
        self._waiting: list[tuple[Sequence[T], asyncio.Future[None]]] = []
        self._running: set[asyncio.Task[None]] = set()  # strong references
        self._busy = 0
        #: Statements sent, and the calls they carried (for benchmarks).
        self.sends = 0
        self.calls = 0

    async def submit(self, items: Sequence[T]) -> None:
        """Send ``items``, possibly in one statement with other callers' items.

        :raises Exception: what sending ``items`` on their own raised.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((items, future))
        if self._busy < self._lanes:
            self._busy += 1  # counted here and uncounted by the lane itself: no gap
            task = asyncio.create_task(self._lane(), name="pgbus-publish-lane")
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        await future

    async def _lane(self) -> None:
        waiting = self._waiting
        try:
            while waiting:
                batch: list[tuple[Sequence[T], asyncio.Future[None]]] = [waiting.pop(0)]
                count = len(batch[0][0])
                while waiting and count + len(waiting[0][0]) <= self._max_items:
                    count += len(waiting[0][0])
                    batch.append(waiting.pop(0))
                await self._flush(batch)
        finally:
            self._busy -= 1

    async def _flush(self, batch: list[tuple[Sequence[T], asyncio.Future[None]]]) -> None:
        self.sends += 1
        self.calls += len(batch)
        try:
            try:
                await self._send([item for items, _ in batch for item in items])
            except Exception as exc:
                if len(batch) == 1:
                    _settle(batch[0][1], exc)
                    return
                for items, future in batch:  # one caller's failure must not fail the others
                    try:
                        await self._send(items)
                    except Exception as own:
                        _settle(future, own)
                    else:
                        _settle(future, None)
                return
            for _, future in batch:
                _settle(future, None)
        except BaseException as exc:  # cancelled (the loop is closing)
            for _, future in batch:
                _settle(future, exc)
            raise


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled meanwhile, or already settled
        return
    if error is None:
        future.set_result(None)
    elif isinstance(error, asyncio.CancelledError):
        future.cancel()
    else:
        future.set_exception(error)
