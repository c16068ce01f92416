"""pgbus-audit: one log line for every event published and every event handled.

A plugin is a module (or object) with functions named after hooks of
:mod:`pgbus.hookspecs`, marked with ``pgbus.hookimpl``. This one is registered through
the ``pgbus`` entry-point group in its pyproject.toml, so an installed copy is loaded by
every ``pgbus.Bus`` (unless ``Bus(load_entrypoints=False)``, or blocked by name with
``Bus(disable_plugins=["audit"])`` or ``PGBUS_DISABLE_PLUGINS=audit``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import pgbus

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pgbus.types import Outgoing

logger = logging.getLogger("pgbus_audit")


@pgbus.hookimpl
def pgbus_on_published(outgoing: Sequence[Outgoing]) -> None:
    """Log each event (or raw payload) sent."""
    for out in outgoing:
        logger.info("published %s on %s", out.id or "a raw payload", out.channel)


@pgbus.hookimpl
def pgbus_on_handled(
    subscription: pgbus.Subscription, delivery: pgbus.Delivery, duration: float
) -> None:
    """Log each event a handler finished with."""
    logger.info(
        "%s handled %s on %s in %.1f ms",
        subscription.name,
        delivery.id or "a raw payload",
        delivery.channel,
        duration * 1000,
    )
