"""The torch decode attention gives the same rows whether it groups them by length or not."""

import torch

from shard.kernels import reference


def test_decode_rows_sorted_by_length_are_grouped_without_changing_results():
    g = torch.Generator().manual_seed(0)
    num_reqs, heads, kv_heads, head_dim, block = 21, 6, 2, 16, 4
    lens = sorted(torch.randint(1, 60, (num_reqs,), generator=g).tolist())
    k_cache, v_cache = (torch.randn(400, block, kv_heads, head_dim, generator=g) for _ in range(2))
    tables = torch.randperm(400, generator=g)[: num_reqs * 15].view(num_reqs, 15).int()
    query = torch.randn(num_reqs, heads, head_dim, generator=g)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    grouped = reference.attention_decode(query, k_cache, v_cache, context_lens, tables, 0.25, max(lens))
    perm = torch.randperm(num_reqs, generator=g)  # unsorted: one padded batch
    single = reference.attention_decode(
        query[perm], k_cache, v_cache, context_lens[perm], tables[perm], 0.25, max(lens)
    )
    torch.testing.assert_close(grouped[perm], single, rtol=1e-5, atol=1e-6)
    for i in (0, num_reqs - 1):  # and each row is its own attention
        n = lens[i]
        k = k_cache[tables[i]].reshape(-1, kv_heads, head_dim)[:n].repeat_interleave(3, dim=1)
        v = v_cache[tables[i]].reshape(-1, kv_heads, head_dim)[:n].repeat_interleave(3, dim=1)
        p = (torch.einsum("hd,lhd->hl", query[i], k) * 0.25).softmax(-1)
        torch.testing.assert_close(grouped[i], torch.einsum("hl,lhd->hd", p, v), rtol=1e-5, atol=1e-6)
