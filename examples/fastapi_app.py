"""A FastAPI app on pgbus: POST /orders publishes, GET /events streams what arrives (SSE).

The bus lives as long as the app (FastAPI's lifespan). Every event any process publishes
on "orders" reaches every browser connected to /events, through server-sent events. Run
several copies of the app on different ports: an order posted to one shows up on all.

    pip install 'pgbus[examples]'          # fastapi, uvicorn
    export PGBUS_DSN=postgresql://postgres@127.0.0.1:5432/postgres
    uvicorn --app-dir examples fastapi_app:app --port 8000
    # open http://127.0.0.1:8000/ , or:
    curl -N http://127.0.0.1:8000/events &
    curl -X POST http://127.0.0.1:8000/orders -H 'content-type: application/json' \
         -d '{"order_id": 1, "item": "tea"}'
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent

import pgbus


class OrderPlaced(pgbus.Event, channel="orders"):
    """A customer placed an order."""

    order_id: int
    item: str


class Broadcast:
    """Hands every received event to each connected browser's queue."""

    def __init__(self, max_pending: int = 100) -> None:
        self.clients: set[asyncio.Queue[OrderPlaced]] = set()
        self.max_pending = max_pending

    async def on_order(self, event: OrderPlaced) -> None:
        for queue in self.clients:
            with contextlib.suppress(asyncio.QueueFull):  # a stalled browser misses events
                queue.put_nowait(event)

    @contextlib.contextmanager
    def client(self) -> Iterator[asyncio.Queue[OrderPlaced]]:
        queue: asyncio.Queue[OrderPlaced] = asyncio.Queue(self.max_pending)
        self.clients.add(queue)
        try:
            yield queue
        finally:
            self.clients.discard(queue)


broadcast = Broadcast()


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    bus = pgbus.Bus()  # the database comes from $PGBUS_DSN
    bus.subscribe(OrderPlaced)(broadcast.on_order)
    async with bus:  # LISTEN before the first request; stop cleanly at shutdown
        app.state.bus = bus
        yield


app = FastAPI(title="pgbus + FastAPI", lifespan=lifespan)


@app.post("/orders", status_code=202)
async def place_order(order: OrderPlaced, request: Request) -> dict[str, str]:
    """Publish the order; every process listening on "orders" receives it."""
    bus: pgbus.Bus = request.app.state.bus
    return {"id": await bus.publish(order)}


@app.get("/events", response_class=EventSourceResponse)
async def events() -> AsyncIterator[ServerSentEvent]:
    """Stream each OrderPlaced to the browser as it arrives."""
    with broadcast.client() as queue:
        yield ServerSentEvent(event="ready", data={"clients": len(broadcast.clients)})
        while True:
            order = await queue.get()
            yield ServerSentEvent(event="OrderPlaced", data=order)


@app.get("/ready")
async def ready(request: Request) -> dict[str, bool]:
    """Whether the bus is listening (for a load balancer's health check)."""
    bus: pgbus.Bus = request.app.state.bus
    return {"listening": bus.connected}


PAGE = """<!doctype html>
<title>pgbus orders</title>
<form id="f"><input name="item" placeholder="item" required> <button>Order</button></form>
<ul id="log"></ul>
<script>
let n = 0;
const log = (text) => {
  const item = document.createElement("li");
  item.textContent = text;
  document.getElementById("log").prepend(item);
};
const source = new EventSource("/events");
source.addEventListener("OrderPlaced", (e) => {
  const order = JSON.parse(e.data);
  log(`order ${order.order_id}: ${order.item}`);
});
document.getElementById("f").onsubmit = async (e) => {
  e.preventDefault();
  const item = new FormData(e.target).get("item");
  await fetch("/orders", {method: "POST", headers: {"content-type": "application/json"},
    body: JSON.stringify({order_id: Date.now() % 100000 + (n++), item})});
};
</script>
"""


@app.get("/", response_class=HTMLResponse)
async def page() -> str:
    """A page that posts orders and lists those that arrive."""
    return PAGE


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, port=8000)
