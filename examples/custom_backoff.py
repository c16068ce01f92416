"""Replace pgbus's reconnection strategy with a plugin: a fixed interval, or a circuit breaker.

A strategy is one synchronous hook, ``pgbus_reconnect_backoff(attempt, error)``: return
the seconds to wait before connection attempt ``attempt`` (1, 2, … since the last good
connection), or ``None`` to give up. Any registered strategy runs before the built-in
one (capped exponential backoff with full jitter), so registering it is all it takes.
The same hook paces the retries of a publish whose pool connection broke.

Run it with no setup: without PGBUS_DSN and with nothing on 127.0.0.1:5432, it starts a
throwaway PostgreSQL (from the machine's binaries or the `embedded` extra) and removes it.
"""

import asyncio
import logging

import pgbus
from pgbus.server import local_server


class FixedInterval:
    """Retry every ``interval`` seconds, forever (like pgln's ``SetReconnectInterval``)."""

    def __init__(self, interval: float = 2.0) -> None:
        self.interval = interval

    @pgbus.hookimpl
    def pgbus_reconnect_backoff(self) -> float:  # pluggy passes only the arguments named
        return self.interval


class CircuitBreaker:
    """A few quick retries; then the circuit opens for ``cooldown`` seconds; repeat.

    After ``max_opens`` open circuits in a row it gives up: the bus reports a terminal
    error (the ``pgbus_on_terminal_error`` hook; ``bus.run_forever()`` raises it), and a
    process supervisor can restart the service.
    """

    def __init__(
        self, quick: int = 3, delay: float = 0.2, cooldown: float = 30.0, max_opens: int = 4
    ) -> None:
        self.quick = quick
        self.delay = delay
        self.cooldown = cooldown
        self.max_opens = max_opens

    @pgbus.hookimpl
    def pgbus_reconnect_backoff(self, attempt: int, error: BaseException | None) -> float | None:
        opened, step = divmod(attempt - 1, self.quick + 1)
        if opened >= self.max_opens:
            return None  # give up
        if step == self.quick:
            logging.getLogger("example").warning(
                "circuit open for %.0f s after %d failed attempts: %s",
                self.cooldown,
                attempt,
                error,
            )
            return self.cooldown
        return self.delay


class ExitOnGiveUp:
    """React to the terminal error: here, log it (a service might exit non-zero)."""

    @pgbus.hookimpl
    def pgbus_on_terminal_error(self, error: pgbus.ListenerError) -> None:
        logging.getLogger("example").error("pgbus gave up: %s", error)


async def main(dsn: str) -> None:
    # Delays for attempts 1, 2, 3, …: 0.2, 0.2, 0.2, 30 (open), 0.2, 0.2, 0.2, 30, …, None.
    breaker = CircuitBreaker()

    bus = pgbus.Bus(dsn, plugins=[breaker, ExitOnGiveUp()])
    got: asyncio.Queue[str] = asyncio.Queue()

    @bus.subscribe("heartbeat")
    async def on_beat(message: pgbus.Message) -> None:
        await got.put(message.payload)

    async with bus:
        await bus.notify("heartbeat", "hello")
        print(await asyncio.wait_for(got.get(), timeout=5))
        print(bus.status.as_dict()["state"], "- strategy:", type(breaker).__name__)

    # The fixed interval, configured the same way:
    async with pgbus.Bus(dsn, plugins=[FixedInterval(interval=1.0)]) as bus2:
        print("ready:", bus2.ready)


if __name__ == "__main__":
    with local_server() as dsn:
        asyncio.run(main(dsn))
