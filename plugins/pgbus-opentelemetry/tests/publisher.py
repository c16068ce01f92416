"""Publish one event inside a "checkout" span; print the spans this process made as JSON.

Run by test_opentelemetry.py as the publishing process: ``python publisher.py DSN CHANNEL``.
"""

from __future__ import annotations

import asyncio
import json
import sys

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pgbus_opentelemetry import OpenTelemetryPlugin

import pgbus


async def main(dsn: str, channel: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    class Order(pgbus.Event, channel=channel):
        n: int

    plugins = [OpenTelemetryPlugin(tracer_provider=provider)]
    async with pgbus.Bus(dsn, load_entrypoints=False, plugins=plugins) as bus:
        with provider.get_tracer("shop").start_as_current_span("checkout"):
            await bus.publish(Order(n=1))
    spans = [
        {
            "name": span.name,
            "kind": span.kind.name,
            "trace_id": span.context.trace_id,
            "span_id": span.context.span_id,
            "parent_id": span.parent.span_id if span.parent else None,
            "attributes": dict(span.attributes or {}),
        }
        for span in exporter.get_finished_spans()
    ]
    sys.stdout.write(json.dumps(spans))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
