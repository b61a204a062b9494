"""The ViT encoder: timm's own ``VisionTransformer``, so parameter names are timm's.

MIRL/MAE use it piecewise (patch embedding, visible-token selection, blocks, norm) rather than
through its ``forward``; classification and export use it whole.
"""
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.models.vision_transformer import VisionTransformer

from .patches import keep_tokens
from .pos_embed import sincos_2d
from .presets import VitPreset


def build_vit(spec: VitPreset, *, depth: int | None = None, num_classes: int = 0,
              global_pool: str = "token", drop_path_rate: float = 0.0) -> VisionTransformer:
    """A timm ``VisionTransformer`` shaped by ``spec`` with MAE's initialisation.

    ``depth`` overrides the preset's (truncated pre-training builds only the first k blocks).
    ``global_pool='avg'`` gives MAE's fine-tuning head (mean of patch tokens + ``fc_norm``).
    """
    vit = VisionTransformer(
        img_size=spec.img_size, patch_size=spec.patch_size, in_chans=spec.in_chans,
        embed_dim=spec.embed_dim, depth=spec.depth if depth is None else depth,
        num_heads=spec.num_heads, mlp_ratio=spec.mlp_ratio, qkv_bias=True,
        num_classes=num_classes, global_pool=global_pool, drop_path_rate=drop_path_rate,
    )
    init_mae_style(vit)
    return vit


def init_mae_style(vit: VisionTransformer) -> None:
    """MAE's ``initialize_weights``: frozen sin-cos position embedding, xavier-uniform Linear
    layers and flattened patch projection, normal(0.02) cls token, unit LayerNorms."""
    grid = vit.patch_embed.grid_size[0]
    vit.pos_embed.data.copy_(sincos_2d(vit.embed_dim, grid, cls_token=True))
    vit.pos_embed.requires_grad_(False)
    w = vit.patch_embed.proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.normal_(vit.cls_token, std=0.02)
    vit.apply(init_linear_and_norm)


def init_linear_and_norm(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def embed_visible(vit: VisionTransformer, imgs: torch.Tensor, ids_keep: torch.Tensor | None):
    """z_0: patch tokens + position embedding, visible ones only, cls token in front.

    imgs [N, C, H, W], ids_keep [N, K] (None keeps every token) -> [N, 1+K, D].
    """
    x = vit.patch_embed(imgs) + vit.pos_embed[:, 1:, :]  # [N, L, D]
    if ids_keep is not None:
        x = keep_tokens(x, ids_keep)
    cls = (vit.cls_token + vit.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
    return torch.cat([cls, x], dim=1)


def run_blocks(blocks, x: torch.Tensor, recompute: bool = False) -> torch.Tensor:
    """Encoder blocks in sequence; ``recompute`` (activation checkpointing, when gradients are
    on) keeps only each block's input and recomputes the block in the backward pass.
    Non-reentrant: the reentrant implementation breaks on multi-tensor pipeline stage outputs."""
    recompute = recompute and torch.is_grad_enabled()
    for blk in blocks:
        x = checkpoint(blk, x, use_reentrant=False) if recompute else blk(x)
    return x
