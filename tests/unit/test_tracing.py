"""Trace context travels from the producer's span to the handler's span (OpenTelemetry)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import outbox
from outbox.tracing import consume_span

otel = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def tracer_provider() -> None:
    provider = otel.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(provider)


def test_publish_inside_a_span_records_its_traceparent(sqlite_engine: sa.Engine) -> None:
    tracer = trace.get_tracer("test")
    with (
        tracer.start_as_current_span("place order") as span,
        Session(sqlite_engine) as s,
        s.begin(),
    ):
        message = outbox.publish(s, "orders.created", {})
    trace_id = format(span.get_span_context().trace_id, "032x")

    assert message.headers["traceparent"].split("-")[1] == trace_id


def test_an_explicit_traceparent_is_kept(sqlite_engine: sa.Engine) -> None:
    given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("x"), Session(sqlite_engine) as s, s.begin():
        message = outbox.publish(s, "orders.created", {}, headers={"traceparent": given})

    assert message.headers["traceparent"] == given


def test_consume_span_continues_the_producers_trace() -> None:
    EXPORTER.clear()
    headers = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}

    with consume_span("billing", "orders.created", "m-1", headers):
        pass

    [span] = EXPORTER.get_finished_spans()
    assert format(span.context.trace_id, "032x") == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert span.parent is not None
    assert format(span.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert span.attributes["messaging.consumer.group.name"] == "billing"
