"""The events the publisher and the worker share: the contract between the two processes."""

from decimal import Decimal

import pgbus


class OrderPlaced(pgbus.Event, channel="orders"):
    """A customer placed an order."""

    order_id: int
    total: Decimal
