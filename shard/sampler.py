"""Batched logits processing and sampling on the device, with no host synchronization.

Every row of a batch carries its own parameters. Randomness comes from a counter-based hash
of (seed, position, token id), so a seeded request draws the same tokens whatever batch it
is in, on any device, and after a preemption.
"""

from dataclasses import dataclass

import torch

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


@dataclass(frozen=True, slots=True)
class SamplerConfig:
    watermark_gamma: float = 0.5
    watermark_delta: float = 2.0


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


def _lsr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def hash_uniform(a: torch.Tensor, b: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """a, b [N] int64 -> [N, vocab_size] float32 uniform in (0, 1), a pure function of its inputs."""
    v = torch.arange(vocab_size, device=a.device, dtype=torch.int64)
    z = a[:, None] * _signed(0x9E3779B97F4A7C15) + b[:, None] * _signed(0xD1B54A32D192ED03) + v * 0x2545F491
    z = (z ^ _lsr(z, 30)) * _signed(0xBF58476D1CE4E5B9)  # splitmix64 finalizer (int64 wraps)
    z = (z ^ _lsr(z, 27)) * _signed(0x94D049BB133111EB)
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

    def __call__(
        self,
        logits: torch.Tensor,  # [N, vocab] float32
        params: list[SamplingParams],
        histories: list[list[int]],  # tokens of each sequence so far (prompt + generated)
        num_prompt_tokens: list[int],
    ) -> SamplerOutput:
        device, vocab = logits.device, logits.shape[-1]
        logits = self._apply_penalties(logits, params, histories, num_prompt_tokens)
        if any(p.watermark for p in params):
            prev = torch.tensor([h[-1] for h in histories], device=device)
            green = watermark_greenlist(prev, vocab, self.config.watermark_gamma)
            on = torch.tensor([p.watermark for p in params], device=device)
            logits = logits + (green & on[:, None]) * self.config.watermark_delta
        sampling = [p.do_sample for p in params]
        if any(sampling):
            temp = torch.tensor(
                [p.temperature if p.do_sample and p.temperature > 0 else 1.0 for p in params], device=device
            )
            logits = logits / temp[:, None]
            if any(p.do_sample and (p.top_k > 0 or 0 < p.top_p < 1) for p in params):
                top_k = torch.tensor([p.top_k if p.do_sample else 0 for p in params], device=device)
                top_p = torch.tensor(
                    [p.top_p if p.do_sample and 0 < p.top_p < 1 else 1.0 for p in params], device=device
                )
                logits = _apply_top_k_top_p(logits, top_k, top_p)
            if any(p.do_sample and 0 < p.typical_p < 1 for p in params):
                typical = torch.tensor(
                    [p.typical_p if p.do_sample and 0 < p.typical_p < 1 else 1.0 for p in params], device=device
                )
                logits = _apply_typical_p(logits, typical)
        logprobs = logits.log_softmax(-1)
        token_ids = logits.argmax(-1)
        if any(sampling):
            seeds = torch.tensor([_signed(p.seed % (1 << 64)) for p in params], device=device)
            positions = torch.tensor([len(h) for h in histories], device=device)
            noise = -hash_uniform(seeds, positions, vocab).log()  # Exp(1): argmax(p / E) ~ Categorical(p)
            sampled = (logprobs.exp() / noise).argmax(-1)
            token_ids = torch.where(torch.tensor(sampling, device=device), sampled, token_ids)
        chosen = logprobs.gather(-1, token_ids[:, None]).squeeze(-1)
        max_top_n = max(p.top_n_tokens for p in params)
        top_logprobs, top_ids = logprobs.topk(max_top_n, dim=-1) if max_top_n else (None, None)
        return SamplerOutput(token_ids, chosen, top_ids, top_logprobs)

    @staticmethod
    def _apply_penalties(logits, params, histories, num_prompt_tokens):
        """Repetition penalty over every token seen (prompt included, as transformers does) and
        frequency penalty over the generated ones, for all rows at once: the histories go to the
        device in one copy and index_put builds the masks, with no loop and no sync."""
        rep = [p.repetition_penalty if p.repetition_penalty not in (0.0, 1.0) else 1.0 for p in params]
        freq = [p.frequency_penalty for p in params]
        if all(r == 1.0 for r in rep) and not any(freq):
            return logits
        device, (n, vocab) = logits.device, logits.shape
        rows, tokens, generated = [], [], []
        for i, history in enumerate(histories):
            if rep[i] != 1.0 or freq[i]:
                rows += [i] * len(history)
                tokens += history
                generated += [0] * num_prompt_tokens[i] + [1] * (len(history) - num_prompt_tokens[i])
        rows_t = torch.tensor(rows, device=device)
        tokens_t = torch.tensor(tokens, device=device)
        if any(r != 1.0 for r in rep):
            seen = torch.zeros(n, vocab, dtype=torch.bool, device=device).index_put_(
                (rows_t, tokens_t), torch.ones_like(rows_t, dtype=torch.bool)
            )
            penalty = torch.tensor(rep, device=device)[:, None]
            logits = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
        if any(freq):
            counts = torch.zeros(n, vocab, dtype=logits.dtype, device=device)
            counts.index_put_(
                (rows_t, tokens_t), torch.tensor(generated, dtype=logits.dtype, device=device), accumulate=True
            )
            logits = logits - torch.tensor(freq, dtype=logits.dtype, device=device)[:, None] * counts
        return logits
