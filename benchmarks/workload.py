"""Workloads: deterministic prompts of exact token lengths, output lengths and arrival times.

Prompts are random token ids drawn (with a seeded RNG) from the part of the model's vocabulary
whose tokens are a space followed by ASCII letters and encode back to themselves. A sequence of
such tokens decodes to text that re-encodes to exactly the same ids, so every system under test
sees the same prompt and the same length whether it takes token ids (`/v1/completions`,
`model.generate`) or text (`/generate_stream`, `pipeline`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer

_WORD = re.compile(r" [A-Za-z]{2,}")


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request of a workload: the prompt (ids and its exact text) and how many tokens to generate."""

    index: int
    prompt_ids: tuple[int, ...]
    prompt_text: str
    max_tokens: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


@lru_cache(maxsize=4)
def _tokenizer(model_dir: str) -> Tokenizer:
    return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))


@lru_cache(maxsize=4)
def round_trip_vocab(model_dir: str) -> tuple[int, ...]:
    """Token ids that decode to ' <letters>' and encode back to the same single id."""
    tok = _tokenizer(model_dir)
    ids = []
    for i in range(tok.get_vocab_size()):
        text = tok.decode([i])
        if _WORD.fullmatch(text) and tok.encode(text, add_special_tokens=False).ids == [i]:
            ids.append(i)
    return tuple(ids)


def make_requests(
    model_dir: str | Path,
    num: int,
    prompt_len: tuple[int, int],
    output_len: tuple[int, int],
    seed: int = 0,
) -> list[RequestSpec]:
    """`num` requests with prompt and output lengths uniform in the inclusive ranges given.

    Deterministic for a given (model, num, ranges, seed); a workload's first k requests do not
    depend on `num`, so a subset is a prefix.
    """
    vocab = round_trip_vocab(str(model_dir))
    tok = _tokenizer(str(model_dir))
    rng = random.Random(seed)
    specs = []
    for index in range(num):
        length = rng.randint(*prompt_len)
        ids = tuple(rng.choice(vocab) for _ in range(length))
        max_tokens = rng.randint(*output_len)
        text = tok.decode(list(ids))
        if tok.encode(text, add_special_tokens=False).ids != list(ids):  # guaranteed by the vocabulary filter
            raise AssertionError(f"prompt {index} does not round-trip through the tokenizer")
        specs.append(RequestSpec(index, ids, text, max_tokens))
    return specs


def nano_vllm_requests(model_dir: str | Path, num: int = 256, seed: int = 0) -> list[RequestSpec]:
    """The nano-vllm bench.py shape: prompt and output lengths uniform in [100, 1024], EOS ignored."""
    return make_requests(model_dir, num, (100, 1024), (100, 1024), seed)


def poisson_arrivals(num: int, rate: float, seed: int = 0) -> list[float]:
    """Send times (s from the start) of a Poisson process at `rate` requests/s; all zero if rate is inf."""
    if rate == float("inf"):
        return [0.0] * num
    rng = random.Random(seed)
    t, times = 0.0, []
    for _ in range(num):
        times.append(t)
        t += rng.expovariate(rate)
    return times
