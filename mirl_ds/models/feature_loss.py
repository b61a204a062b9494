"""Feature-level InfoNCE loss and masked-feature predictor (MIRL supplementary B.1).

For each token position i, the prediction z_hat[n, i] and the momentum encoder's
target z+[n, i] of the same image are the positive pair; the targets at the same
position of the other images in the (local) batch, z+[m, i] with m != n, are the
negatives.  Similarities are cosine similarities divided by a temperature.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from .encoder import init_linear_and_norm

__all__ = ["info_nce_masked", "FeaturePredictor"]


def info_nce_masked(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    temperature: float = 0.2,
) -> torch.Tensor:
    """Per-position InfoNCE over the batch, weighted mean over (n, i).

    pred, target: [N, L, D]; weights: [N, L] (typically the mask, 1 on masked
    tokens).  Returns sum(weights * loss) / sum(weights) (0 if all weights are 0).
    ``target`` is detached here: no gradient reaches the momentum encoder.
    """
    if pred.dim() != 3 or pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must both be [N, L, D]")
    n, l, _ = pred.shape
    if tuple(weights.shape) != (n, l):
        raise ValueError(f"weights {tuple(weights.shape)} must be [N, L] = {(n, l)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    p = F.normalize(pred.float(), dim=-1)
    t = F.normalize(target.detach().float(), dim=-1)
    logits = torch.einsum("nld,mld->lnm", p, t) / temperature  # [L, N, N]
    labels = torch.arange(n, device=pred.device).repeat(l)  # row (l, n) -> class n
    loss = F.cross_entropy(logits.reshape(l * n, n), labels, reduction="none")
    loss = loss.view(l, n).transpose(0, 1)  # [N, L]
    w = weights.detach().to(loss.dtype)
    return (loss * w).sum() / w.sum().clamp_min(1e-8)


class FeaturePredictor(nn.Module):
    """``depth`` transformer blocks + LayerNorm + Linear(dim, dim) predicting the
    (masked) target features from decoder tokens: [N, T, D] -> [N, T, D]."""

    def __init__(self, dim: int, depth: int = 2, num_heads: int = 8, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"FeaturePredictor dim={dim} is not divisible by num_heads={num_heads}")
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            [Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(dim)
        self.head = nn.Linear(dim, dim)
        self.apply(init_linear_and_norm)  # MAE-style, as the rest of the model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))
