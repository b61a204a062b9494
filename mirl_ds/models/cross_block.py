"""MIRL's decoder block with Densely Interconnected Decoding (DID).

``x += attn(norm1(x)); x += cross_attn(norm2(x), norm3(mem)); x += mlp(norm4(x))`` — the DID
cross-attention sits between self-attention and MLP, with the memory of all shallower
segments as keys/values (official MIRL code).
"""
import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import Mlp
from timm.models.vision_transformer import Attention


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``x`` over a separate memory.

    Separate ``q: Linear(d, d)`` and ``kv: Linear(d, 2d)`` (both with bias) and an output
    projection, as in the official code.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape       # queries  [N, T, D]
        m = memory.shape[1]     # memory   [N, M, D]
        h = self.num_heads
        q = self.q(x).reshape(n, t, h, d // h).transpose(1, 2)                 # [N, h, T, d/h]
        k, v = self.kv(memory).reshape(n, m, 2, h, d // h).permute(2, 0, 3, 1, 4)  # 2×[N, h, M, d/h]
        out = F.scaled_dot_product_attention(q, k, v)                          # [N, h, T, d/h]
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class CrossBlock(nn.Module):
    """Self-attention, DID cross-attention to the memory, MLP; pre-norm residual branches."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        norm = lambda: nn.LayerNorm(dim, eps=1e-6)  # noqa: E731 - four identical norms
        self.norm1 = norm()
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.norm2 = norm()
        self.norm3 = norm()
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm4 = norm()
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), self.norm3(memory))
        return x + self.mlp(self.norm4(x))
