"""``faststream_pgbus.fastapi.PgbusRouter``: a FastAPI router that runs a PgbusBroker.

::

    router = PgbusRouter("postgresql://localhost/app")

    @router.subscriber("orders")
    async def on_order(order: Order, db: Annotated[Db, Depends(get_db)]) -> None: ...

    app = FastAPI()
    app.include_router(router)  # the broker starts and stops with the app
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from fastapi.datastructures import Default
from faststream._internal.fastapi.router import StreamRouter

from faststream_pgbus._broker import PgbusBroker, PgbusMessage, PgbusPublisher, PgbusSubscriber

if TYPE_CHECKING:
    from collections.abc import Iterable

    from fastapi import params
    from fastapi.types import IncEx

__all__ = ["PgbusRouter"]


class PgbusRouter(StreamRouter[PgbusMessage]):
    """A FastAPI ``APIRouter`` with a :class:`~faststream_pgbus.PgbusBroker`.

    ``PgbusRouter(dsn, **bus_options)``; FastAPI's router options (``prefix``, ``tags``,
    ``lifespan``, ``schema_url``, …) are taken as FastStream's routers take them.
    Handlers get FastAPI's dependency injection.
    """

    broker_class = PgbusBroker
    broker: PgbusBroker

    def __init__(self, dsn: str | None = None, **options: Any) -> None:
        options.setdefault("context", None)
        super().__init__(dsn, **options)

    def subscriber(  # type: ignore[override]
        self,
        channel: str,
        *,
        dependencies: Iterable[params.Depends] = (),
        response_model: Any = Default(None),  # noqa: B008 - FastAPI's marker
        response_model_include: IncEx | None = None,
        response_model_exclude: IncEx | None = None,
        response_model_by_alias: bool = True,
        response_model_exclude_unset: bool = False,
        response_model_exclude_defaults: bool = False,
        response_model_exclude_none: bool = False,
        **options: Any,
    ) -> PgbusSubscriber:
        """Subscribe a handler to ``channel`` (options as ``PgbusBroker.subscriber``)."""
        return cast(
            "PgbusSubscriber",
            super().subscriber(
                channel,
                dependencies=dependencies,
                response_model=response_model,
                response_model_include=response_model_include,
                response_model_exclude=response_model_exclude,
                response_model_by_alias=response_model_by_alias,
                response_model_exclude_unset=response_model_exclude_unset,
                response_model_exclude_defaults=response_model_exclude_defaults,
                response_model_exclude_none=response_model_exclude_none,
                **options,
            ),
        )

    def publisher(  # type: ignore[override]
        self, channel: str, **options: Any
    ) -> PgbusPublisher:
        """A publisher on ``channel`` (options as ``PgbusBroker.publisher``)."""
        return self.broker.publisher(channel, **options)
