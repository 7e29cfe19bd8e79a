"""Token limits: TGI's defaults derived from the model, and its startup checks."""

from dataclasses import dataclass

from router.config import RouterConfig


@dataclass(frozen=True, slots=True)
class ValidationLimits:
    """What a request may ask for, as validation checks it."""

    max_best_of: int
    max_stop_sequences: int
    max_top_n_tokens: int
    max_input_tokens: int
    max_total_tokens: int
    max_client_batch_size: int = 4  # prompts per /v1/completions request
    encoder_decoder: bool = False  # the model's prompt is its encoder's input (T5): it has no logprobs


@dataclass(frozen=True, slots=True)
class Limits:
    max_input_tokens: int
    max_total_tokens: int
    max_batch_prefill_tokens: int


def resolve_limits(config: RouterConfig, max_position_embeddings: int) -> Limits:
    """Fill in unset limits as TGI does; raise ValueError naming the flags on a conflict."""
    max_total = config.max_total_tokens or min(4096, max_position_embeddings)
    max_input = config.max_input_tokens or max_total - 1
    prefill = config.max_batch_prefill_tokens or max_input + 50
    if max_total > max_position_embeddings:
        raise ValueError(f"--max-total-tokens ({max_total}) exceeds the model's {max_position_embeddings} positions")
    if max_input >= max_total:
        raise ValueError(f"--max-input-tokens ({max_input}) must be < --max-total-tokens ({max_total})")
    if prefill < 1:
        raise ValueError(f"--max-batch-prefill-tokens must be positive, got {prefill}")
    return Limits(max_input, max_total, prefill)


def check_pool(limits: Limits, max_batch_total_tokens: int, request_tokens: int | None = None) -> None:
    """The KV pool (after warmup, capped by --max-batch-total-tokens) must hold the limits: one
    request's KV, `request_tokens` (what a request of max_total_tokens holds at once: all of them,
    the default, or fewer with a sliding window), and a prefill."""
    needed = limits.max_total_tokens if request_tokens is None else request_tokens
    if needed > max_batch_total_tokens:
        held = "" if needed == limits.max_total_tokens else f", of which a request holds {needed} at once"
        raise ValueError(
            f"the KV cache holds {max_batch_total_tokens} tokens, fewer than --max-total-tokens "
            f"({limits.max_total_tokens}){held}: lower it, or give the cache more memory"
        )
    if limits.max_batch_prefill_tokens > max_batch_total_tokens:
        raise ValueError(
            f"--max-batch-prefill-tokens ({limits.max_batch_prefill_tokens}) must be <= the KV cache's "
            f"{max_batch_total_tokens} tokens (--max-batch-total-tokens)"
        )
