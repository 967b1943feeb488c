"""The hardware-affinity metrics of PAPER.md, on boolean active masks (True = active).

reuse_ratio(masks, k): with A_t the active set of token t,
    reuse(t) = |A_t ∩ (A_{t-1} ∪ … ∪ A_{t-k})| / |A_t|,   averaged over tokens.
  Choices: only tokens t ≥ k count (their window is complete; the first k tokens of a sequence would be biased
  low by a shorter window), tokens with an empty A_t are skipped (the ratio is 0/0), windows never cross a
  sequence boundary ((S, T, m) input), and the mean pools all counted tokens of all sequences. NaN when no
  token counts.

coactivation_gap(masks):
    M_ij = (#tokens with i and j active) / (#tokens with i active), M_ii = 0
    gap  = (1/m) Σ_i max_j M_ij − (1/m²) Σ_i Σ_j M_ij
  Choice: neurons never active on these tokens have no row M_i (0/0), so the matrix is restricted to the m'
  neurons active at least once (both rows and columns; m' replaces m). NaN when m' < 2.

Both stream over tokens in chunks: reuse keeps a (chunk + k, m) window, co-activation accumulates the m × m
co-count matrix (float64 for the 7B's m = 11008: 1 GB) as masks chunkᵀ @ chunk.
"""

from __future__ import annotations

import torch


def reuse_ratio(active_masks: torch.Tensor, k: int, chunk: int = 1024) -> float:
    """Mean reuse over tokens for window ``k`` ≥ 1; masks (T, m) for one sequence or (S, T, m)."""
    if k < 1:
        raise ValueError(f"k (the reuse window) must be ≥ 1, got {k}")
    masks = active_masks if active_masks.dim() == 3 else active_masks.unsqueeze(0)
    if masks.dim() != 3:
        raise ValueError(f"active_masks must be (T, m) or (S, T, m), got shape {tuple(active_masks.shape)}")
    total, counted = 0.0, 0
    for seq in masks:
        T = seq.shape[0]
        for start in range(k, T, chunk):
            end = min(T, start + chunk)
            block = seq[start - k : end].to(torch.int32)  # (k + c, m): the chunk with its k-token history
            # window[t] = how many of the k tokens before token start+t had neuron i active
            csum = torch.cat([torch.zeros_like(block[:1]), block.cumsum(0)])  # (k + c + 1, m)
            window = csum[k : k + end - start] - csum[: end - start]  # (c, m)
            current = block[k:].bool()  # (c, m)
            sizes = current.sum(-1)  # (c,) |A_t|
            reused = (current & (window > 0)).sum(-1)  # (c,) |A_t ∩ window union|
            keep = sizes > 0
            total += float((reused[keep].double() / sizes[keep].double()).sum())
            counted += int(keep.sum())
    return total / counted if counted else float("nan")


def coactivation_counts(active_masks: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """C (m, m) float64 with C_ij = #tokens where i and j are both active (C_ii = #tokens where i is)."""
    masks = active_masks.reshape(-1, active_masks.shape[-1])  # (N, m)
    m = masks.shape[1]
    counts = torch.zeros(m, m, dtype=torch.float64, device=masks.device)
    for s in range(0, masks.shape[0], chunk):
        # float32 matmul is exact here: entries are integers ≤ chunk < 2^24
        block = masks[s : s + chunk].to(torch.float32)  # (c, m)
        counts += (block.T @ block).double()
    return counts


def coactivation_gap(active_masks: torch.Tensor, chunk: int = 4096) -> float:
    """The top-average co-activation gap of masks (N, m) (or (S, T, m): tokens pooled)."""
    counts = coactivation_counts(active_masks, chunk)
    alive = counts.diagonal() > 0
    counts = counts[alive][:, alive]  # (m', m')
    m = counts.shape[0]
    if m < 2:
        return float("nan")
    M = counts / counts.diagonal()[:, None]  # row i divided by count_i
    M.fill_diagonal_(0.0)
    return float(M.max(dim=1).values.mean() - M.sum() / (m * m))
