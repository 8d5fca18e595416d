"""W3C trace context across the outbox, with OpenTelemetry spans when it is installed.

The ``traceparent`` (and ``tracestate``) header travels from the producer's
outbox row through the relay to the handler unchanged: it is an ordinary
message header. With ``opentelemetry-api`` installed (``pip install
outbox-relay-inbox[otel]``), ``publish`` fills it in from the current span when
the caller did not, and the consumer runs each handler in a span that continues
the producer's trace. Without it, these functions do nothing.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

__all__ = ["consume_span", "inject_trace_headers", "tracing_enabled"]

try:  # an optional dependency: everything here is a no-op without it
    from opentelemetry import propagate, trace
except ImportError:  # pragma: no cover - exercised when the extra is not installed
    propagate = None  # type: ignore[assignment]
    trace = None  # type: ignore[assignment]

_TRACE_HEADERS = ("traceparent", "tracestate")


def inject_trace_headers(headers: dict[str, Any]) -> None:
    """Add the current trace context to ``headers`` unless the caller set ``traceparent``."""
    if propagate is None or "traceparent" in headers or not _tracing_configured():
        return
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    for name in _TRACE_HEADERS:
        if name in carrier:
            headers[name] = carrier[name]


def tracing_enabled() -> bool:
    """True when ``consume_span`` makes spans (OpenTelemetry installed and an SDK configured)."""
    return trace is not None and propagate is not None and _tracing_configured()


def _tracing_configured() -> bool:
    """True once an SDK tracer provider is set; the API's default one makes no spans."""
    assert trace is not None
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


@contextlib.contextmanager
def consume_span(
    group: str, topic: str, message_id: str, headers: Mapping[str, Any]
) -> Iterator[None]:
    """Run the body in a consumer span that continues the producer's trace, if any."""
    if trace is None or propagate is None or not _tracing_configured():
        yield
        return
    carrier = {k: str(v) for k, v in headers.items() if k in _TRACE_HEADERS}
    context = propagate.extract(carrier)
    tracer = trace.get_tracer("outbox.consumer")
    with tracer.start_as_current_span(
        f"{topic} process",
        context=context,
        kind=trace.SpanKind.CONSUMER,
        attributes={
            "messaging.system": "rabbitmq",
            "messaging.operation": "process",
            "messaging.destination.name": topic,
            "messaging.message.id": message_id,
            "messaging.consumer.group.name": group,
        },
    ):
        yield
