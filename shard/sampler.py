"""Batched logits processing and sampling on the device, with no host synchronization.

Every row of a batch carries its own parameters. Randomness comes from a counter-based hash
of (seed, position, token id), so a seeded request draws the same tokens whatever batch it
is in, on any device, and after a preemption.
"""

from dataclasses import dataclass

import torch

from shard import kernels

_MASK_NEG_INF = float("-inf")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    seed: int = 0
    watermark: bool = False
    top_n_tokens: int = 0
    raw_logprobs: bool = False  # logprobs under the model's distribution rather than the processed one


@dataclass(frozen=True, slots=True)
class SamplerConfig:
    watermark_gamma: float = 0.5
    watermark_delta: float = 2.0


@dataclass(frozen=True, slots=True)
class Penalties:
    """The tokens each penalized row has seen, flattened for index_put (one entry per occurrence)."""

    repetition: torch.Tensor | None  # [N] float32, 1.0 for rows without one; None if no row has one
    frequency: torch.Tensor | None  # [N] float32, 0.0 for rows without one; None if no row has one
    rows: torch.Tensor  # [K] int64, the batch row of each occurrence
    tokens: torch.Tensor  # [K] int64
    generated: torch.Tensor  # [K] float32, 1 for a generated token, 0 for a prompt token


@dataclass(frozen=True, slots=True)
class SamplingBatch:
    """One step's sampling inputs for the N rows that produce a token, as device tensors. A field
    is None when no row of the batch uses it, so a greedy batch costs an argmax and a logsumexp."""

    do_sample: torch.Tensor | None  # [N] bool
    temperature: torch.Tensor | None  # [N] float32, 1.0 where not sampling
    top_k: torch.Tensor | None  # [N] int64, 0 = off; None (with top_p) when no row filters so
    top_p: torch.Tensor | None  # [N] float32, 1.0 = off
    typical_p: torch.Tensor | None  # [N] float32, 1.0 = off; None when no row filters so
    seeds: torch.Tensor | None  # [N] int64
    positions: torch.Tensor | None  # [N] int64, the position of the token being sampled
    watermark: torch.Tensor | None  # [N] bool
    prev_tokens: torch.Tensor | None  # [N] int64, each sequence's last token (for the watermark)
    penalties: Penalties | None
    max_top_n: int = 0
    raw_logprobs: torch.Tensor | None = None  # [N] bool: logprobs under the unprocessed logits


def signed_seed(c: int) -> int:
    """A uint64 seed as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _lsr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def hash_uniform(a: torch.Tensor, b: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """a, b [N] int64 -> [N, vocab_size] float32 uniform in (0, 1), a pure function of its inputs."""
    v = torch.arange(vocab_size, device=a.device, dtype=torch.int64)
    z = a[:, None] * signed_seed(0x9E3779B97F4A7C15) + b[:, None] * signed_seed(0xD1B54A32D192ED03) + v * 0x2545F491
    z = (z ^ _lsr(z, 30)) * signed_seed(0xBF58476D1CE4E5B9)  # splitmix64 finalizer (int64 wraps)
    z = (z ^ _lsr(z, 27)) * signed_seed(0x94D049BB133111EB)
    z = z ^ _lsr(z, 31)
    return (_lsr(z, 40).float() + 0.5) / float(1 << 24)


def watermark_greenlist(prev_tokens: torch.Tensor, vocab_size: int, gamma: float) -> torch.Tensor:
    """[N] previous tokens -> [N, vocab] bool: the green list, a gamma fraction seeded by the previous token."""
    return hash_uniform(prev_tokens, torch.full_like(prev_tokens, 0x5EED), vocab_size) < gamma


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens outside each row's top-k and nucleus; top_k 0 and top_p 1 disable them."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    k = torch.where(top_k > 0, top_k, logits.shape[-1])
    remove = rank[None, :] >= k[:, None]
    probs = sorted_logits.masked_fill(remove, _MASK_NEG_INF).softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # keep a token while the mass before it is < top_p
    remove |= mass_before >= top_p[:, None]
    remove[:, 0] = False
    return logits.scatter(-1, order, sorted_logits.masked_fill(remove, _MASK_NEG_INF))


def _apply_typical_p(logits: torch.Tensor, typical_p: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling (Meister et al.), as transformers' TypicalLogitsWarper."""
    logp = logits.log_softmax(-1)
    p = logp.exp()
    entropy = -(p * logp).nan_to_num().sum(-1, keepdim=True)
    deviation = (-logp - entropy).abs()
    sorted_dev, order = deviation.sort(dim=-1)
    sorted_p = p.gather(-1, order)
    cutoff = (sorted_p.cumsum(-1) < typical_p[:, None]).sum(-1, keepdim=True).clamp(max=logits.shape[-1] - 1)
    remove_sorted = sorted_dev > sorted_dev.gather(-1, cutoff)
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, _MASK_NEG_INF)


def _apply_penalties(logits: torch.Tensor, p: Penalties) -> torch.Tensor:
    """Repetition penalty over every token seen (prompt included, as transformers does) and
    frequency penalty over the generated ones, for all rows at once: index_put builds the
    masks from the flattened histories, with no loop and no sync."""
    n, vocab = logits.shape
    if p.repetition is not None:
        seen = torch.zeros(n, vocab, dtype=torch.bool, device=logits.device)
        seen.index_put_((p.rows, p.tokens), torch.ones_like(p.rows, dtype=torch.bool))
        penalty = p.repetition[:, None]
        logits = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
    if p.frequency is not None:
        counts = torch.zeros(n, vocab, dtype=logits.dtype, device=logits.device)
        counts.index_put_((p.rows, p.tokens), p.generated.to(logits.dtype), accumulate=True)
        logits = logits - p.frequency[:, None] * counts
    return logits


@dataclass(slots=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [N] int64
    logprobs: torch.Tensor  # [N] float32
    top_ids: torch.Tensor | None  # [N, max_top_n] int64
    top_logprobs: torch.Tensor | None  # [N, max_top_n] float32


class Sampler:
    """Turns the logits of the rows that produce a token into tokens and log-probabilities."""

    def __init__(self, config: SamplerConfig = SamplerConfig()):
        self.config = config

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits [N, vocab] float32 -> the N tokens, with log-probabilities under the processed
        distribution (after penalties, watermark, temperature and the top-k/p/typical filters),
        or under `logits` themselves for the rows that ask for raw logprobs."""
        vocab, raw = logits.shape[-1], logits
        if batch.penalties is not None:
            logits = _apply_penalties(logits, batch.penalties)
        if batch.watermark is not None:
            green = watermark_greenlist(batch.prev_tokens, vocab, self.config.watermark_gamma)
            logits = logits + (green & batch.watermark[:, None]) * self.config.watermark_delta
        if batch.do_sample is not None:
            logits = logits / batch.temperature[:, None]
            if batch.top_k is not None:
                logits = _apply_top_k_top_p(logits, batch.top_k, batch.top_p)
            if batch.typical_p is not None:
                logits = _apply_typical_p(logits, batch.typical_p)
        token_ids, log_total = kernels.argmax_logsumexp(logits)
        log_total = log_total[:, None]  # [N, 1]: log-probabilities are logits - log_total
        if batch.do_sample is not None:
            noise = -hash_uniform(batch.seeds, batch.positions, vocab).log()  # Exp(1): argmax(p / E) ~ Categorical(p)
            sampled = (logits - noise.log()).argmax(-1)
            token_ids = torch.where(batch.do_sample, sampled, token_ids)
        chosen = (logits.gather(-1, token_ids[:, None]) - log_total).squeeze(-1)
        top_logprobs = top_ids = None
        if batch.max_top_n:
            top_logits, top_ids = logits.topk(batch.max_top_n, dim=-1)
            top_logprobs = top_logits - log_total
        if batch.raw_logprobs is not None and logits is not raw:  # else both distributions are one
            chosen, top_ids, top_logprobs = _raw_logprobs(
                raw, batch.raw_logprobs, token_ids, chosen, top_ids, top_logprobs
            )
        return SamplerOutput(token_ids, chosen, top_ids, top_logprobs)


def _raw_logprobs(raw, wants, token_ids, chosen, top_ids, top_logprobs):
    """The rows of `wants` [N] bool get the token's and the top tokens' log-probabilities under
    `raw` [N, vocab], the logits before any processing."""
    log_total = raw.logsumexp(-1, keepdim=True)
    chosen = torch.where(wants, (raw.gather(-1, token_ids[:, None]) - log_total).squeeze(-1), chosen)
    if top_ids is not None:
        raw_top, raw_ids = raw.topk(top_ids.shape[-1], dim=-1)
        top_ids = torch.where(wants[:, None], raw_ids, top_ids)
        top_logprobs = torch.where(wants[:, None], raw_top - log_total, top_logprobs)
    return chosen, top_ids, top_logprobs
