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
    presence_penalty: float = 0.0  # subtracted once from every token present among the generated ones
    min_p: float = 0.0  # after temperature, drop tokens below min_p times the top token's probability
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs added to the raw logits first


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
    presence: torch.Tensor | None = None  # [N] float32, 0.0 for rows without one; None if no row has one


@dataclass(frozen=True, slots=True)
class LogitBias:
    """Each row's logit_bias as a dense [N, K] pair, padded with (token 0, bias 0.0)."""

    tokens: torch.Tensor  # [N, K] int64
    values: torch.Tensor  # [N, K] float32


@dataclass(frozen=True, slots=True)
class TokenBitmask:
    """Which tokens a grammar allows next, for the constrained rows of a sampling batch: bit t % 32
    of word t // 32 of a row is set when token t is allowed (llguidance's packed layout)."""

    rows: torch.Tensor | None  # [G] int64, the batch rows constrained; None when all N are, in order
    bitmask: torch.Tensor  # [G, ceil(vocab / 32)] int32, on the logits' device


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
    min_p: torch.Tensor | None = None  # [N] float32, 0.0 = off (and where not sampling)
    logit_bias: LogitBias | None = None
    grammar: TokenBitmask | None = None  # set by the runner from the grammar matchers (shard/grammar.py)


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
    # (k + 0.5) / 2**24 for the top 24 bits k; at k = 2**24 - 1 float32 rounds it to 1.0, whose
    # Exp(1) noise -log(1) = 0 made `logits - noise.log()` NaN at filtered (-inf) tokens, which
    # argmax then picked: keep it below 1, at the largest float32 under 1 (no other value moves).
    return ((_lsr(z, 40).float() + 0.5) / float(1 << 24)).clamp_(max=1.0 - 2.0**-24)


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


def _apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop the tokens whose probability is below min_p [N] times the row's top probability (vLLM's
    min_p), compared in log space: logit < max logit + log(min_p). min_p 0 gives -inf: keeps all."""
    threshold = logits.amax(-1, keepdim=True) + min_p.log()[:, None]
    return logits.masked_fill(logits < threshold, _MASK_NEG_INF)


def _apply_penalties(logits: torch.Tensor, p: Penalties) -> torch.Tensor:
    """Repetition penalty over every token seen (prompt included, as transformers does), and
    frequency (once per occurrence) and presence (once per token) penalties over the generated
    ones, for all rows at once: index_put builds the masks from the flattened histories, with no
    loop and no sync."""
    n, vocab = logits.shape
    if p.repetition is not None:
        seen = torch.zeros(n, vocab, dtype=torch.bool, device=logits.device)
        seen.index_put_((p.rows, p.tokens), torch.ones_like(p.rows, dtype=torch.bool))
        penalty = p.repetition[:, None]
        logits = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
    if p.frequency is not None or p.presence is not None:
        counts = torch.zeros(n, vocab, dtype=logits.dtype, device=logits.device)
        counts.index_put_((p.rows, p.tokens), p.generated.to(logits.dtype), accumulate=True)
        if p.frequency is not None:
            logits = logits - p.frequency[:, None] * counts
        if p.presence is not None:
            logits = logits - p.presence[:, None] * (counts > 0).to(logits.dtype)
    return logits


_BYTE_TO_LOGITS: dict[torch.device, torch.Tensor] = {}


def _byte_to_logits(device: torch.device) -> torch.Tensor:
    """[256, 8] float32: for each byte value, 0.0 where bit j is set and -inf where it is not."""
    table = _BYTE_TO_LOGITS.get(device)
    if table is None:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
        table = _BYTE_TO_LOGITS[device] = torch.where(bits == 1, 0.0, _MASK_NEG_INF).to(device)
    return table


def apply_token_bitmask(logits: torch.Tensor, mask: TokenBitmask) -> torch.Tensor:
    """logits [N, vocab] -> a new tensor where each constrained row's forbidden tokens are -inf.

    The same torch ops on CPU and CUDA: the int32 words are read as little-endian bytes (byte b
    of the row holds tokens 8b .. 8b + 7, lowest bit first), and each byte looks up its eight
    additive values (0 or -inf) in a 256-entry table, an index_select that is several times
    faster on a CPU than shifting and masking bits (0.4 ms for 32 rows of 49152 on one core)."""
    g, vocab = mask.bitmask.shape[0], logits.shape[-1]
    as_bytes = mask.bitmask.view(torch.uint8).reshape(-1).long()  # [G * 4 * words]
    additive = _byte_to_logits(logits.device).index_select(0, as_bytes).view(g, -1)[:, :vocab]  # [G, vocab]
    if mask.rows is None:  # every row: add the logits into the fresh mask, one [N, vocab] allocation
        return additive.add_(logits).contiguous()
    return logits.index_add(0, mask.rows, additive)


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
        distribution (after logit bias, grammar mask, penalties, watermark, temperature and the
        min-p/top-k/top-p/typical filters), or under `logits` themselves, unchanged, for the rows
        that ask for raw logprobs: the model's own distribution, before the bias (as vLLM's) and
        the grammar mask. The mask comes before every step that could pick a token (the bias
        before it cannot lift a -inf)."""
        vocab, raw = logits.shape[-1], logits
        if batch.logit_bias is not None:
            logits = logits.scatter_add(-1, batch.logit_bias.tokens, batch.logit_bias.values)
        if batch.grammar is not None:
            logits = apply_token_bitmask(logits, batch.grammar)
        if batch.penalties is not None:
            logits = _apply_penalties(logits, batch.penalties)
        if batch.watermark is not None:
            green = watermark_greenlist(batch.prev_tokens, vocab, self.config.watermark_gamma)
            logits = logits + (green & batch.watermark[:, None]) * self.config.watermark_delta
        if batch.do_sample is not None:
            logits = logits / batch.temperature[:, None]
            if batch.min_p is not None:
                logits = _apply_min_p(logits, batch.min_p)
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
