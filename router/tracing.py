"""OpenTelemetry for the router: a span per HTTP request (joining an incoming `traceparent`)
and one per engine step, exported over OTLP/gRPC only when an endpoint is configured."""

from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, SpanKind

tracer = trace.get_tracer("sluice.router")  # a proxy: follows the provider set up later, if any


def setup_tracing(service_name: str, otlp_endpoint: str | None):
    """Install an exporting tracer provider; without an endpoint nothing is recorded.
    Returns the provider (call `shutdown()` to flush) or None."""
    if not otlp_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)))
    trace.set_tracer_provider(provider)
    return provider


def start_request_span(name: str, headers) -> Span:
    """A server span for one HTTP request, child of the client's `traceparent` if it sent one."""
    return tracer.start_span(name, context=propagate.extract(headers), kind=SpanKind.SERVER)


def start_step_span(request_spans: list[Span], attributes: dict) -> tuple[Span, dict[str, str]]:
    """A span for one engine step: a child of its oldest traced request, linked to the others.
    Returns the span and the W3C carrier to send to the shards."""
    contexts = [s.get_span_context() for s in request_spans if s.get_span_context().is_valid]
    parent = trace.set_span_in_context(trace.NonRecordingSpan(contexts[0])) if contexts else None
    span = tracer.start_span("step", context=parent, links=[Link(c) for c in contexts[1:]], attributes=attributes)
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return span, carrier
