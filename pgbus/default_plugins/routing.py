"""The built-in router: typed subscriptions by event type, untyped ones get everything.

A typed subscription receives a delivery whose event is an instance of one of its event
types (subclasses included). An untyped subscription (``subscribe("channel")``) receives
every notification on its channel as a :class:`~pgbus.Message`. Routes are computed once
per event class and cached.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pgbus import hookimpl

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pgbus._events import Delivery
    from pgbus._subscription import Subscription
    from pgbus.types import Router


@hookimpl(trylast=True)
def pgbus_router(channel: str, subscriptions: Sequence[Subscription]) -> Router:  # noqa: ARG001 - part of the hook's signature
    """Route by event type; cache the route of each event class."""
    untyped = tuple(s for s in subscriptions if not s.event_types)
    routes: dict[type, tuple[Subscription, ...]] = {}

    def route(delivery: Delivery) -> Sequence[Subscription]:
        event = delivery.event
        if event is None:
            return untyped
        cls = type(event)
        found = routes.get(cls)
        if found is None:
            found = routes[cls] = tuple(
                s for s in subscriptions if not s.event_types or issubclass(cls, s.event_types)
            )
        return found

    return route
