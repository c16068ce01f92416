"""faststream_pgbus.fastapi.PgbusRouter: the broker runs with the FastAPI app."""

from __future__ import annotations

import asyncio
import itertools
from typing import Annotated

import httpx
import pydantic
from fastapi import Depends, FastAPI
from faststream_pgbus.fastapi import PgbusRouter

_names = itertools.count()


class Order(pydantic.BaseModel):
    """The body a handler receives."""

    order_id: int


async def source() -> str:
    """A FastAPI dependency (module level: the annotations are resolved by name)."""
    return "fastapi-di"


async def test_fastapi_router_runs_handlers_with_fastapi_dependencies() -> None:
    """An endpoint publishes; the router's subscriber gets it with a FastAPI dependency."""
    router = PgbusRouter(f"memory://fastapi-{next(_names)}")
    got: list[tuple[Order, str]] = []
    done = asyncio.Event()

    @router.subscriber("orders")
    async def on_order(order: Order, where: Annotated[str, Depends(source)]) -> None:
        got.append((order, where))
        done.set()

    @router.post("/orders")
    async def place(order: Order) -> dict[str, bool]:
        await router.broker.publish(order, channel="orders")
        await asyncio.wait_for(done.wait(), 10)
        return {"ok": True}

    app = FastAPI()
    app.include_router(router)
    transport = httpx.ASGITransport(app=app)
    async with (
        router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://app") as client,
    ):
        response = await client.post("/orders", json={"order_id": 9})
    assert response.json() == {"ok": True}
    assert got == [(Order(order_id=9), "fastapi-di")]
