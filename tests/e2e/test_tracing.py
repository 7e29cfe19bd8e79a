"""A traced request: router and shard spans join the client's trace, exported over OTLP/gRPC."""

import json
import time
from concurrent import futures

import grpc
import pytest
import requests
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.e2e.server import EAGER, LauncherProcess, free_port

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver that keeps (service, span) pairs."""

    def __init__(self):
        self.spans = []

    def Export(self, request, context):
        for resource_spans in request.resource_spans:
            attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                self.spans += [(attrs.get("service.name"), span) for span in scope_spans.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def collector():
    servicer, port = Collector(), free_port()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield servicer, f"http://127.0.0.1:{port}"
    server.stop(None)


def test_router_and_shard_spans_share_the_incoming_trace(bundled_model_dir, collector):
    servicer, endpoint = collector
    env = {"OTEL_BSP_SCHEDULE_DELAY": "100"}  # export promptly
    with LauncherProcess(bundled_model_dir, "--otlp-endpoint", endpoint, "--json-output", *EAGER, env=env) as launcher:
        r = requests.post(
            launcher.url + "/generate",
            json={"inputs": "The capital of France is", "parameters": {"max_new_tokens": 3}},
            headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
            timeout=60,
        )
        assert r.status_code == 200
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not {"sluice.router", "sluice.shard"} <= {
            service for service, span in servicer.spans if span.trace_id.hex() == TRACE_ID
        }:
            time.sleep(0.1)
        log_lines = [line for line in launcher.log().splitlines() if line.strip()]
    records = [json.loads(line) for line in log_lines]  # --json-output: every line of every process
    assert {"launcher", "router", "shard-0"} <= {r["process"] for r in records}
    ours = [(service, span) for service, span in servicer.spans if span.trace_id.hex() == TRACE_ID]
    (http,) = [span for service, span in ours if span.name == "POST /generate"]
    assert http.parent_span_id.hex() == PARENT_ID
    attributes = {a.key for a in http.attributes}
    assert {"queue_time", "inference_time", "time_per_token", "validation_time", "total_time"} <= attributes
    steps = [span for service, span in ours if service == "sluice.router" and span.name == "step"]
    shard_steps = [span for service, span in ours if service == "sluice.shard" and span.name == "shard.step"]
    assert len(steps) == 3 and len(shard_steps) == 3  # one prefill, two decodes
    assert {s.parent_span_id for s in steps} == {http.span_id}
    assert {s.parent_span_id for s in shard_steps} == {s.span_id for s in steps}
