"""Pure-PyTorch oracles for every op in ``sparseinfer.ops``: slow, obvious, and what the tests trust."""

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm, step for step: fp32 statistics, round, then scale by the weight."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def select_active(
    scores: torch.Tensor, threshold: float = 0.0, top_k: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictor scores (B, m) -> (row_mask bool (B, m), union int32 (n,) ascending).

    ``top_k > 0``: each row keeps its ``top_k`` largest scores, ties to the lower index and NaN counting as
    the largest (a stable descending sort: torch.topk leaves ties unspecified); otherwise a neuron is active
    in a row when its score > ``threshold``. The union lists the neurons active in at least one row.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, m), got shape {tuple(scores.shape)}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    B, m = scores.shape
    if top_k > 0:
        k = min(top_k, m)
        idx = scores.float().sort(dim=-1, descending=True, stable=True).indices[:, :k]  # (B, k)
        row_mask = torch.zeros(B, m, dtype=torch.bool, device=scores.device)
        row_mask.scatter_(1, idx, True)
    else:
        row_mask = scores.float() > threshold  # (B, m)
    union = row_mask.any(0).nonzero().flatten().to(torch.int32)  # (n,) ascending
    return row_mask, union


def sparse_ffn(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_up: torch.Tensor | None,
    w_out_t: torch.Tensor,
    active: torch.Tensor,
    row_mask: torch.Tensor | None,
    activation: str,
    threshold: float,
) -> torch.Tensor:
    """down_proj(h ⊙ mask) over only the neurons in ``active``, fp32 math, result in x's dtype.

    x (B, d); w_in / w_up / w_out_t (m, d) (w_out_t = down_proj.weight.T, one row per neuron); active int32
    (n,) indices; row_mask None or bool (B, m) zeroing h[b, i] where false.
    """
    idx = active.long()  # (n,)
    x32 = x.float()  # (B, d)
    z = x32 @ w_in.index_select(0, idx).float().t()  # (B, n)
    if activation in ("relu", "drelu"):
        h = torch.relu(z)
    elif activation == "relu2":
        h = torch.relu(z).square()
    elif activation == "silu":
        h = torch.nn.functional.silu(z)
    elif activation == "fatrelu":
        h = torch.where(z > threshold, z, torch.zeros_like(z))
    else:
        raise ValueError(f"unknown activation {activation!r}")
    if w_up is not None:
        up = x32 @ w_up.index_select(0, idx).float().t()  # (B, n)
        h = h * (torch.relu(up) if activation == "drelu" else up)
    if row_mask is not None:
        h = h * row_mask.index_select(1, idx).to(h.dtype)  # (B, n)
    return (h @ w_out_t.index_select(0, idx).float()).to(x.dtype)  # (B, d)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` in fp32, rounded to x's dtype."""
    y = x.float() @ weight.float().t()  # (B, k)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
