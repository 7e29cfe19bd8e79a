"""Decode steps replayed from CUDA graphs captured at bucketed batch sizes.

A decode step on a GPU launches a few hundred small kernels; eagerly, their launch cost is the
step time at small batches. Warmup captures the model's forward once per bucket (largest first,
all sharing one memory pool) over static input buffers. A decode-only step of N rows copies its
inputs into the first N rows of the smallest bucket B >= N, pads the rest (slot -1: nothing is
stored; context length 0: nothing is read) and replays; only the model's hidden states come from
the graph, the LM head and the sampler run eagerly on the real rows.

The attention kernels are graph-safe: their grids depend on shapes only (see triton_attention).
"""

import logging
import time

import torch

from shard.context import DecodeMeta, ForwardContext, forward_context

log = logging.getLogger(__name__)


class DecodeGraphs:
    def __init__(
        self,
        model_forward,  # (input_ids [T], positions [T]) -> hidden [T, hidden]
        buckets: list[int],
        max_blocks: int,
        max_context_len: int,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
    ):
        self.buckets = sorted(set(buckets))
        self.max_context_len = max_context_len
        n, i64, i32 = self.buckets[-1], torch.int64, torch.int32
        self.input_ids = torch.zeros(n, dtype=i64, device=device)
        self.positions = torch.zeros(n, dtype=i64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=i64, device=device)
        self.context_lens = torch.zeros(n, dtype=i32, device=device)
        self.block_tables = torch.zeros((n, max_blocks), dtype=i32, device=device)
        self.kv_caches = kv_caches
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # bucket -> hidden [bucket, hidden], the graph's output
        self._capture(model_forward)

    def _context(self, size: int) -> ForwardContext:
        decode = DecodeMeta(self.context_lens[:size], self.block_tables[:size], self.max_context_len)
        return ForwardContext(self.slot_mapping[:size], None, decode, self.kv_caches)

    @torch.inference_mode()
    def _capture(self, model_forward) -> None:
        start, pool = time.perf_counter(), None
        self.context_lens.fill_(1)  # while capturing, every row reads one (arbitrary) position
        for size in reversed(self.buckets):
            ids, pos = self.input_ids[:size], self.positions[:size]
            with forward_context(self._context(size)):
                model_forward(ids, pos)  # once eagerly: Triton compiles, cuBLAS picks its kernels
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[size] = model_forward(ids, pos)
            pool = graph.pool()
            self.graphs[size] = graph
        self.context_lens.zero_()
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s in %.1f s", self.buckets, time.perf_counter() - start)

    def bucket(self, num_rows: int) -> int | None:
        """The smallest captured batch size holding `num_rows` rows, None when there is none."""
        return next((b for b in self.buckets if b >= num_rows), None)

    def run(self, bucket: int, input_ids: torch.Tensor, positions: torch.Tensor, context: ForwardContext):
        """Hidden states [N, hidden] of a decode-only step of N <= bucket rows."""
        n, d = input_ids.shape[0], context.decode
        width = d.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(context.slot_mapping)
        self.slot_mapping[n:bucket].fill_(-1)
        self.context_lens[:n].copy_(d.context_lens)
        self.context_lens[n:bucket].zero_()
        self.block_tables[:n, :width].copy_(d.block_tables)  # columns past a row's length are never read
        self.graphs[bucket].replay()
        return self.outputs[bucket][:n]
