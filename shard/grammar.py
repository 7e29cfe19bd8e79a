"""Grammar-constrained decoding on the sampling rank: one llguidance matcher per constrained request.

Rank 0 alone decides the tokens (it samples and broadcasts the ids to the other ranks), so rank 0
alone holds matchers; the other ranks ignore NewRequest.grammar.

A constrained request's life:
- it arrives (`Grammars.add`): registered at once; its matcher is made on the grammar thread, a
  deep copy of a template compiled once per grammar text (an LRU of templates), then advanced over
  the tokens it generated before a preemption (the replay);
- in each step where it produces a token (`Grammars.start`): the grammar thread fills its next-token
  bitmask with llguidance's parallel fill, which releases the GIL, while the model thread runs the
  forward; `PendingMasks.wait` then hands the sampler the bitmask, on the logits' device;
- after sampling (`PendingMasks.accept`): the matcher consumes the sampled token; once it is stopped
  (the grammar admits nothing more), that token's output carries grammar_completed;
- when forgotten (`Grammars.remove`), or on ClearCache, its matcher is dropped.

EOS is allowed only where the grammar accepts: the llguidance tokenizer knows the model's EOS ids.
Steps are processed one at a time, in order (the router may send step N+1 before N's answer, but
the shard reads it after N is done), so a step's masks always follow every token sampled before.

Failures stay with their request and are logged with its id: a grammar that does not compile, a
tokenizer that could not be built, a replay or a sampled token the matcher refuses (none of which
should happen: the router validated the grammar, the mask allowed the token). The request's output
is then EOS with grammar_completed (its mask allows only EOS; a refused token is reported as EOS),
so the router ends it. Nothing here raises into a step.
"""

import logging
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np
import torch

from shard.sampler import TokenBitmask

log = logging.getLogger(__name__)

GRAMMAR_CACHE_SIZE = 256  # compiled grammars kept (a template matcher each, a few KB to MBs)


def load_tokenizer(model_dir: Path, vocab_size: int, eos_token_ids: Sequence[int]) -> llguidance.LLTokenizer:
    """llguidance's view of the model's tokenizer: its fast tokenizer, `vocab_size` wide (the
    logits' width, which may exceed the tokenizer's), with the model's EOS ids. About a second."""
    import llguidance.hf
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=list(eos_token_ids) or None)


class GrammarCache:
    """Compiled grammars by their text: `matcher` deep-copies a template compiled on first use; the
    least recently used templates go past `size`. Grammars that fail to compile are remembered too."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, size: int = GRAMMAR_CACHE_SIZE):
        self.tokenizer = tokenizer
        self.size = size
        self._templates: OrderedDict[str, llguidance.LLMatcher | str] = OrderedDict()  # or the error

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher at the grammar's start; raises ValueError if the grammar does not compile."""
        template = self._templates.get(grammar)
        if template is None:
            template = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
            if template.is_error():
                template = template.get_error()
            self._templates[grammar] = template
            if len(self._templates) > self.size:
                self._templates.popitem(last=False)
        else:
            self._templates.move_to_end(grammar)
        if isinstance(template, str):
            raise ValueError(f"the grammar does not compile: {template}")
        return template.deep_copy()

    def __len__(self) -> int:
        return len(self._templates)


@dataclass(slots=True, eq=False)
class _Entry:
    """A constrained request: its matcher once made, or why it failed."""

    req_id: int
    grammar: str
    replay: list[int]  # tokens generated before a preemption, consumed when the matcher is made
    matcher: llguidance.LLMatcher | None = None
    error: str = ""  # set once the request failed: its masks then allow only EOS
    reported: bool = False

    def fail(self, error: str) -> None:
        if not self.error:
            self.error = error


class Grammars:
    """Rank 0's matchers, by request id, and the grammar thread that makes them and fills masks."""

    def __init__(
        self,
        model_dir: Path,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        device: torch.device,
        tokenizer: llguidance.LLTokenizer | None = None,  # built from model_dir when not given
        cache_size: int = GRAMMAR_CACHE_SIZE,
    ):
        self.vocab_size, self.words = vocab_size, -(-vocab_size // 32)
        self.eos_token_ids = list(eos_token_ids)
        self.device = device
        self.entries: dict[int, _Entry] = {}
        self._ids = np.zeros(0, dtype=np.int64)  # the keys of `entries`, for vectorized lookups
        self._unbuilt: list[_Entry] = []  # registered, matcher not made yet
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        self._executor: llguidance.LLExecutor | None = None  # made on the grammar thread
        self._host = torch.zeros(0, self.words, dtype=torch.int32)  # [rows, words] fill buffer
        if tokenizer is None:  # built on the grammar thread: the first constrained request need not wait
            self._cache: Future = self._thread.submit(self._load, model_dir, cache_size)
        else:
            self._cache = Future()
            self._cache.set_result(GrammarCache(tokenizer, cache_size))

    def _load(self, model_dir: Path, cache_size: int) -> GrammarCache:
        try:
            return GrammarCache(load_tokenizer(model_dir, self.vocab_size, self.eos_token_ids), cache_size)
        except Exception as e:
            log.warning("no llguidance tokenizer from %s (%s): constrained requests will end at once", model_dir, e)
            raise

    # -- requests come and go (model thread) ---------------------------------------------------
    def add(self, req_id: int, grammar: str, generated: Sequence[int] = ()) -> None:
        """Register a request (replacing any under that id): `grammar` is llguidance's JSON grammar,
        "" for none; `generated` are the tokens it produced before a preemption, to replay."""
        self.remove(req_id)
        if not grammar:
            return
        entry = _Entry(req_id, grammar, list(generated))
        self.entries[req_id] = entry
        self._unbuilt.append(entry)
        self._ids = np.fromiter(self.entries, dtype=np.int64, count=len(self.entries))

    def remove(self, req_id: int) -> None:
        if self.entries.pop(req_id, None) is not None:
            self._ids = np.fromiter(self.entries, dtype=np.int64, count=len(self.entries))

    def clear(self) -> None:
        self.entries.clear()
        self._unbuilt.clear()
        self._ids = np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.entries)

    # -- a step (model thread, with the work on the grammar thread) ----------------------------------
    def start(self, req_ids: np.ndarray) -> "PendingMasks | None":
        """Begin the step's grammar work on the grammar thread and return at once: make the matchers
        of new requests, then fill the masks of the constrained rows among `req_ids` ([N] the
        requests producing a token, in sampling order). None when there is nothing to do."""
        if not self.entries:
            return None
        constrained = np.flatnonzero(np.isin(req_ids, self._ids))  # [G] indices into the N rows
        unbuilt, self._unbuilt = [e for e in self._unbuilt if self.entries.get(e.req_id) is e], []
        if not len(constrained) and not unbuilt:
            return None
        entries = [self.entries[r] for r in req_ids[constrained].tolist()]
        if self._host.shape[0] < len(entries):
            rows, pin = max(len(entries), 2 * self._host.shape[0]), self.device.type == "cuda"
            self._host = torch.zeros(rows, self.words, dtype=torch.int32, pin_memory=pin)  # pinned: async H2D
        host = self._host[: len(entries)]  # [G, words]
        future = self._thread.submit(self._prepare, unbuilt, entries, host.numpy())
        return PendingMasks(future, constrained, entries, len(req_ids), host, self)

    def _prepare(self, unbuilt: list[_Entry], entries: list[_Entry], bitmask: np.ndarray) -> None:
        """Grammar thread: make the new matchers, then fill `bitmask` [G, words] for `entries`."""
        for entry in unbuilt:
            self._build(entry)
        if entries:
            self._fill(entries, bitmask)

    def _build(self, entry: _Entry) -> None:
        try:
            matcher = self._cache.result().matcher(entry.grammar)
        except Exception as e:
            entry.fail(f"{type(e).__name__}: {e}")
            return
        entry.matcher = matcher
        if entry.replay and not matcher.consume_tokens(entry.replay):
            entry.fail(f"replaying the {len(entry.replay)} tokens generated before: {matcher.get_error()}")

    def _fill(self, entries: list[_Entry], bitmask: np.ndarray) -> None:
        """Row g of `bitmask` [G, words]: the tokens entries[g]'s grammar allows next; only EOS for
        a failed request. All rows at once on llguidance's threads; row by row if that fails, so
        that a faulty matcher fails its request only."""
        live = [(e.matcher, g) for g, e in enumerate(entries) if e.matcher is not None and not e.error]
        try:
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            llg_numpy.fill_next_token_bitmask_par(self._executor, live, bitmask)
        except Exception:
            log.exception("the parallel grammar mask fill failed; filling row by row")
            for matcher, g in live:
                try:
                    llg_numpy.fill_next_token_bitmask(matcher, bitmask, g)
                except Exception as e:
                    entries[g].fail(f"filling its mask: {type(e).__name__}: {e}")
        for g, entry in enumerate(entries):
            if entry.matcher is None or entry.error:
                self._eos_only(bitmask[g])

    def _eos_only(self, row: np.ndarray) -> None:
        """Allow only EOS in `row` [words] int32 (every token if the model has no EOS: the request
        ends with this token anyway)."""
        words = row.view(np.uint32)
        words[:] = 0 if self.eos_token_ids else 0xFFFFFFFF
        for t in self.eos_token_ids:
            words[t // 32] |= np.uint32(1 << (t % 32))


class PendingMasks:
    """One step's grammar work, started before the forward: `wait` before sampling, `accept` after."""

    def __init__(
        self,
        future: Future,
        constrained: np.ndarray,  # [G] indices of the constrained rows among the N producing ones
        entries: list[_Entry],  # [G]
        num_rows: int,  # N
        host: torch.Tensor,  # [G, words] int32, filled by `future`
        grammars: Grammars,
    ):
        self.future, self.constrained, self.entries = future, constrained, entries
        self.num_rows, self.host, self.grammars = num_rows, host, grammars

    def _join(self) -> None:
        try:
            self.future.result()
        except Exception as e:  # a bug in _prepare: fail the step's constrained requests, not the step
            log.exception("grammar work failed")
            for g, entry in enumerate(self.entries):
                entry.fail(f"{type(e).__name__}: {e}")
                self.grammars._eos_only(self.host[g].numpy())

    def wait(self) -> TokenBitmask | None:
        """The constrained rows' bitmask on the grammars' device, once filled; None if no row is."""
        self._join()
        if not self.entries:
            return None
        device = self.grammars.device
        rows = None
        if len(self.entries) < self.num_rows:
            rows = torch.from_numpy(self.constrained).to(device, non_blocking=True)
        return TokenBitmask(rows, self.host.to(device, non_blocking=True))

    def accept(self, token_ids: list[int]) -> tuple[list[bool], list[int]]:
        """After sampling, `token_ids` [N]: each constrained matcher consumes its row's token.
        Returns ([N] grammar_completed: the grammar is stopped or the request failed, [N] the
        tokens to report: `token_ids`, but EOS for a token a matcher refused)."""
        self._join()
        completed, reported = [False] * self.num_rows, list(token_ids)
        eos = self.grammars.eos_token_ids
        for g, entry in zip(self.constrained.tolist(), self.entries):
            if entry.matcher is not None and not entry.error:
                token = token_ids[g]
                if not entry.matcher.consume_token(token):
                    entry.fail(f"token {token} refused: {entry.matcher.get_error()}")
                    reported[g] = eos[0] if eos else token
            if entry.error and not entry.reported:
                entry.reported = True
                log.error("request %d: its grammar failed, ending it: %s", entry.req_id, entry.error)
            completed[g] = bool(entry.error) or entry.matcher.is_stopped()
        return completed, reported
