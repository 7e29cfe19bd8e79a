"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous vocab range."""

import torch
from torch import nn

from shard import dist
from shard.quantization.base import LinearMethod, UnquantizedLinearMethod


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // dist.tp_size())  # last rank zero-padded
        self.vocab_start = dist.tp_rank() * self.rows_per_rank
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        end = min(self.vocab_start + self.rows_per_rank, self.vocab_size)
        param.data.zero_()
        param.data[: end - self.vocab_start].copy_(loaded[self.vocab_start : end])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        if dist.tp_size() == 1:
            return nn.functional.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows_per_rank)
        out = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        return dist.all_reduce(out.masked_fill_(outside.unsqueeze(-1), 0))


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to logits; the full vocab is gathered on rank 0 only. Its weight may
    be the embedding's (tied): `head_method` computes from its own processed copy (oneDNN-packed,
    or quantized), and the dense weight stays for the embedding."""

    def __init__(self, vocab_size: int, hidden_size: int, quant: LinearMethod | None = None):
        super().__init__(vocab_size, hidden_size)
        self.head_method = quant or UnquantizedLinearMethod()
        self.head: nn.Module | None = None

    def process_weights_after_loading(self) -> None:
        head = nn.Module()
        head.weight = self.weight  # the same tensor: processing `head` leaves this module's weight in place
        self.head_method.process_after_loading(head)
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:  # [T, hidden] -> [T, vocab]
        if self.head is None:
            logits = nn.functional.linear(hidden, self.weight)
        else:
            logits = self.head_method.apply(self.head, hidden, None)
        logits = dist.gather_last_dim(logits)
        return None if logits is None else logits[:, : self.vocab_size]
