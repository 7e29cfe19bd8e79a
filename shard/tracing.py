"""OpenTelemetry for a shard: a span per step, joined to the router's trace."""

from opentelemetry import propagate, trace

tracer = trace.get_tracer("sluice.shard")  # a proxy: follows the provider set up later, if any


def setup_tracing(service_name: str, otlp_endpoint: str | None, rank: int):
    """Install an exporting tracer provider; without an endpoint nothing is recorded."""
    if not otlp_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name, "shard.rank": rank}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)))
    trace.set_tracer_provider(provider)
    return provider


def start_step_span(trace_context: dict[str, str], attributes: dict) -> trace.Span:
    return tracer.start_span("shard.step", context=propagate.extract(trace_context), attributes=attributes)
