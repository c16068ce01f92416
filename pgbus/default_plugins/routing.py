"""The built-in router: by event type, then by each subscription's ``where`` predicate.

A typed subscription receives a delivery whose event is an instance of one of its event
types (subclasses included); one subscription may list several types. An untyped
subscription (``subscribe("channel")``) receives every notification on its channel as a
:class:`~pgbus.Message`. The subscriptions of each event class are computed once and
cached.

A subscription with ``where=predicate`` receives only the deliveries whose event (or
message, when untyped) the predicate accepts::

    @bus.subscribe(OrderPlaced, where=lambda e: e.total > 100)
    async def big_orders(event: OrderPlaced) -> None: ...

The predicate runs in the dispatcher, once per delivery, before anything is queued: keep
it quick and free of I/O. A predicate that raises is logged (with its traceback) and the
delivery is not routed to that subscription.

Replace the router by registering a plugin that implements
:func:`~pgbus.hookspecs.pgbus_router`; this one runs last.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pgbus._markers import hookimpl

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pgbus._events import Delivery
    from pgbus._subscription import Router, Subscription

logger = logging.getLogger(__name__)


def _accepts(sub: Subscription, what: Any) -> bool:
    where = sub.where
    if where is None:
        return True
    try:
        return bool(where(what))
    except Exception:
        logger.exception("subscription %s: its where= predicate raised; not routed there", sub.name)
        return False


def _select(found: tuple[Subscription, ...], delivery: Delivery) -> Sequence[Subscription]:
    event = delivery.event
    return [s for s in found if _accepts(s, event if s.event_types else delivery.message)]


@hookimpl(trylast=True)
def pgbus_router(channel: str, subscriptions: Sequence[Subscription]) -> Router:  # noqa: ARG001 - part of the hook's signature
    """Route by event type, then by ``where``; cache the candidates of each event class."""
    untyped = tuple(s for s in subscriptions if not s.event_types)
    untyped_filtered = any(s.where is not None for s in untyped)
    # event class -> (subscriptions, whether any of them has a predicate)
    routes: dict[type, tuple[tuple[Subscription, ...], bool]] = {}

    def route(delivery: Delivery) -> Sequence[Subscription]:
        event = delivery.event
        if event is None:
            return _select(untyped, delivery) if untyped_filtered else untyped
        cls = type(event)
        found = routes.get(cls)
        if found is None:
            subs = tuple(
                s for s in subscriptions if not s.event_types or issubclass(cls, s.event_types)
            )
            found = routes[cls] = (subs, any(s.where is not None for s in subs))
        if found[1]:
            return _select(found[0], delivery)
        return found[0]

    return route
