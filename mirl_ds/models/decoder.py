"""One MIRL segment decoder H_g (also MAE's decoder when DID is off)."""
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from timm.models.vision_transformer import Block

from .choices import DID_PLACEMENTS
from .cross_block import CrossBlock
from .patches import restore_sequence


class NormalizedLinear(nn.Module):
    """Linear layer with weight normalisation and the gain frozen at 1: ``W = V / ||V||_row``.

    The official MIRL presets wrap the prediction layer this way; with the gain fixed there
    is nothing to learn in it, so it is not a parameter at all.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        nn.init.xavier_uniform_(self.weight_v)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class SegmentDecoder(nn.Module):
    """Embeds a segment's tokens, fills in mask tokens, decodes with (optional) DID blocks.

    The embedded tokens *before* mask tokens are added (cls + visible) are this segment's
    memory m_g for the deeper decoders.
    """

    def __init__(self, encoder_dim: int, dim: int, depth: int, num_heads: int, out_dim: int,
                 *, did: str = "every", mlp_ratio: float = 4.0, weight_norm_pred: bool = False):
        super().__init__()
        if did not in DID_PLACEMENTS:
            raise ValueError(f"DID placement {did!r} is not one of {DID_PLACEMENTS}")
        self.embed = nn.Linear(encoder_dim, dim)
        cross = [did == "every" or (did == "first" and i == 0) for i in range(depth)]
        self.blocks = nn.ModuleList(
            CrossBlock(dim, num_heads, mlp_ratio) if c else
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for c in cross)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = NormalizedLinear(dim, out_dim) if weight_norm_pred else nn.Linear(dim, out_dim)
        self.uses_memory = any(cross)

    def forward(self, memory_g: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                pos_embed: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
        """memory_g [N, 1+K, d] (this segment, embedded), memory [N, M, d] (shallower segments)
        -> prediction [N, L, p*p*C] with the cls row dropped."""
        x = restore_sequence(memory_g, mask_token, ids_restore) + pos_embed  # [N, 1+L, d]
        for blk in self.blocks:
            x = blk(x, memory) if isinstance(blk, CrossBlock) else blk(x)
        return self.pred(self.norm(x))[:, 1:, :]

