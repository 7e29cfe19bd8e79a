"""Prometheus metrics under TGI's `tgi_*` names and buckets, so TGI dashboards work unchanged.

prometheus-client appends `_total` to every counter; TGI's exporter does not. To keep the
exact names, TGI's counters are exposed as monotonic gauges (`rate()` works the same).
Sluice's own additions are prefixed `sluice_`.
"""

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest

DURATION_BUCKETS = [0.0001 * 1.5**k for k in range(1, 36)]  # 0.15 ms .. ~146 s, as TGI


def _linear(limit: int) -> list[float]:
    step = max(limit / 100, 1.0)
    return [step * k for k in range(1, 101)]


class Metrics:
    def __init__(self, max_input_tokens: int, max_total_tokens: int):
        r = self.registry = CollectorRegistry()

        def counter(name, doc, labels=()):
            return Gauge(name, doc, labels, registry=r)

        def duration(name, doc, labels=()):
            return Histogram(name, doc, labels, buckets=DURATION_BUCKETS, registry=r)

        self.request_count = counter("tgi_request_count", "Requests received on generation routes")
        self.request_success = counter("tgi_request_success", "Requests that finished successfully")
        self.request_failure = counter("tgi_request_failure", "Failed requests by cause", ["err"])
        self.request_duration = duration("tgi_request_duration", "End-to-end request time (s)")
        self.request_validation_duration = duration("tgi_request_validation_duration", "Validation time (s)")
        self.request_queue_duration = duration("tgi_request_queue_duration", "Time waiting in the queue (s)")
        self.request_inference_duration = duration("tgi_request_inference_duration", "Time from batching to end (s)")
        self.request_mean_time_per_token_duration = duration(
            "tgi_request_mean_time_per_token_duration", "Inference time per generated token (s)"
        )
        self.request_generated_tokens = Histogram(
            "tgi_request_generated_tokens",
            "Generated tokens per request",
            buckets=_linear(max_total_tokens),
            registry=r,
        )
        self.request_input_length = Histogram(
            "tgi_request_input_length", "Prompt tokens per request", buckets=_linear(max_input_tokens), registry=r
        )
        self.request_max_new_tokens = Histogram(
            "tgi_request_max_new_tokens", "max_new_tokens per request", buckets=_linear(max_total_tokens), registry=r
        )
        self.queue_size = Gauge("tgi_queue_size", "Requests waiting to be scheduled", registry=r)
        self.batch_current_size = Gauge("tgi_batch_current_size", "Requests in the running batch", registry=r)
        self.batch_max_total_tokens = Gauge("tgi_batch_max_total_tokens", "Tokens the KV cache holds", registry=r)
        self.batch_current_max_tokens = Gauge(
            "tgi_batch_current_max_tokens", "Prompt + max_new_tokens summed over the running batch", registry=r
        )
        self.batch_concat = counter("tgi_batch_concat", "New requests joined a running batch", ["reason"])
        self.batch_next_size = Histogram(
            "tgi_batch_next_size", "Requests admitted per step", buckets=[2**k for k in range(11)], registry=r
        )
        self.batch_inference_count = counter("tgi_batch_inference_count", "Steps sent to the shards", ["method"])
        self.batch_inference_success = counter("tgi_batch_inference_success", "Steps that succeeded", ["method"])
        self.batch_inference_failure = counter("tgi_batch_inference_failure", "Steps that failed", ["method"])
        self.batch_inference_duration = duration("tgi_batch_inference_duration", "Step round trip (s)", ["method"])
        self.batch_forward_duration = duration("tgi_batch_forward_duration", "Shard forward time (s)", ["method"])
        self.batch_sample_duration = duration(
            "sluice_batch_sample_duration",
            "Shard time after the forward (s): on a GPU the wait for it, then sampling and the step's outputs",
            ["method"],
        )
        self.batch_decode_duration = duration(
            "tgi_batch_decode_duration", "Router time applying a step's tokens (s)", ["method"]
        )
        self.kv_blocks_free = Gauge("sluice_kv_blocks_free", "Free KV-cache blocks", registry=r)
        self.kv_blocks_total = Gauge("sluice_kv_blocks_total", "KV-cache blocks in the pool", registry=r)
        self.preemptions = counter("sluice_preemptions", "Requests preempted to free KV blocks")
        self.shard_restarts = counter(
            "sluice_shard_restarts", "Times the shard group came back into service after it was lost (restarted)"
        )
        self.requests_resumed = counter(
            "sluice_requests_resumed",
            "Requests in flight when the shards were lost, recomputed (prompt + tokens generated) once they came back",
        )
        self.prompt_tokens_computed = counter("sluice_prompt_tokens_computed", "Prompt tokens computed by the shards")
        self.prefix_cache_hit_tokens = counter(
            "sluice_prefix_cache_hit_tokens", "Prompt tokens read from the prefix cache"
        )

    def watch(self, scheduler) -> None:
        """The gauges of the scheduler's state, read from it when scraped (one source, no copies
        to keep up to date): queue, batch, KV blocks, preemptions, prefix-cache hits."""
        blocks = scheduler.kv_cache_manager
        self.queue_size.set_function(lambda: len(scheduler.waiting))
        self.batch_current_size.set_function(lambda: len(scheduler.running))
        self.batch_current_max_tokens.set_function(
            lambda: sum(len(r.prompt_ids) + r.max_new_tokens for r in scheduler.running)
        )
        self.kv_blocks_free.set_function(lambda: blocks.num_free_blocks)
        self.kv_blocks_total.set_function(lambda: blocks.num_blocks)
        self.preemptions.set_function(lambda: scheduler.num_preemptions)
        self.prefix_cache_hit_tokens.set_function(lambda: scheduler.num_prefix_hit_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
