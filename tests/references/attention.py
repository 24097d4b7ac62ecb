"""Float64 references for the kernels: plain torch, written for clarity, not speed."""

from __future__ import annotations

import torch


def gather_cache(cache: torch.Tensor, b: int, length: int, page_table: torch.Tensor | None) -> torch.Tensor:
    """The first ``length`` token rows of sequence b as [Hkv, length, D] (contiguous or paged cache)."""
    if page_table is None:
        return cache[b, :, :length]
    page_size = cache.shape[2]
    pos = torch.arange(length, device=cache.device)
    pages = page_table.to(cache.device)[b, pos // page_size].long()
    return cache[pages, :, pos % page_size].transpose(0, 1)


def decode_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
    page_table: torch.Tensor | None = None, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out [B, Sq, Hq, D] and natural-log LSE [B, Sq, Hq], both float64.

    The Sq new tokens are the last Sq positions of each sequence and are causal among themselves.
    """
    batch, sq, hq, d = q.shape
    hkv = k_cache.shape[1]
    group = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    out = torch.empty(batch, sq, hq, d, dtype=torch.float64)
    lse = torch.empty(batch, sq, hq, dtype=torch.float64)
    for b in range(batch):
        n = int(lengths[b])
        k = gather_cache(k_cache, b, n, page_table).double().cpu().repeat_interleave(group, 0)  # [Hq, n, D]
        v = gather_cache(v_cache, b, n, page_table).double().cpu().repeat_interleave(group, 0)
        qb = q[b].double().cpu().transpose(0, 1)  # [Hq, Sq, D]
        s = (qb @ k.transpose(1, 2)) * scale  # [Hq, Sq, n]
        key_pos = torch.arange(n)
        query_pos = n - sq + torch.arange(sq)
        s = s.masked_fill(key_pos[None, None, :] > query_pos[None, :, None], float("-inf"))
        lse_b = torch.logsumexp(s, -1)
        out[b] = (torch.softmax(s, -1) @ v).transpose(0, 1)
        lse[b] = lse_b.transpose(0, 1)
    return out, lse
