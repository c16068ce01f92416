"""The publisher: sends a few orders, which every running worker receives.

python examples/two_processes/publisher.py [COUNT]
"""

import asyncio
import sys
from decimal import Decimal

from events import OrderPlaced

import pgbus


async def main(count: int) -> None:
    async with pgbus.Bus() as bus:  # a bus that only publishes needs no subscriptions
        for order_id in range(1, count + 1):
            await bus.publish(OrderPlaced(order_id=order_id, total=Decimal("9.90") * order_id))
            print(f"publisher: sent order {order_id}")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3))
