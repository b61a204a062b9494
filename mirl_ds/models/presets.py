"""Encoder presets (SPEC §2.1) with their default MIRL segmentation and decoder sizes.

One line per preset, as timm does. ``timm_arch`` names the timm model whose parameter layout
the encoder matches exactly (None for the deep MIRL presets, which timm does not register:
export builds a timm ``VisionTransformer`` with the same depth/width/heads instead).
"""
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class VitPreset:
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    segments: int        # MIRL's G
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int
    timm_arch: str | None = None
    in_chans: int = 3

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    def with_overrides(self, **overrides) -> "VitPreset":
        """A copy with the non-None overrides applied (the config's model.* fields)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


PRESETS: dict[str, VitPreset] = {
    # Paper-scale encoders, 224 px, patch 16.
    "vit_small":  VitPreset(224, 16, 384, 12, 6, 4.0, 2, 384, 2, 12, "vit_small_patch16_224"),
    "vit_base":   VitPreset(224, 16, 768, 12, 12, 4.0, 2, 512, 2, 16, "vit_base_patch16_224"),
    "vit_large":  VitPreset(224, 16, 1024, 24, 16, 4.0, 4, 512, 2, 16, "vit_large_patch16_224"),
    # The deep MIRL encoders. ViT-S-54 uses 12 heads (head dim 32), unlike timm's ViT-S.
    "vit_s54":    VitPreset(224, 16, 384, 54, 12, 4.0, 6, 384, 1, 12),
    "vit_b24":    VitPreset(224, 16, 768, 24, 12, 4.0, 4, 512, 2, 16),
    "vit_b48":    VitPreset(224, 16, 768, 48, 12, 4.0, 6, 512, 2, 16),
    # Tiny encoders for tests and the CPU demo.
    "vit_test":   VitPreset(32, 8, 32, 4, 2, 2.0, 2, 32, 1, 2),
    "vit_tiny_deep": VitPreset(32, 4, 64, 12, 4, 4.0, 6, 64, 1, 4),
    "vit_demo":   VitPreset(64, 8, 128, 12, 4, 4.0, 4, 128, 1, 4),
}


def get_preset(name: str) -> VitPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown encoder preset {name!r}; choose one of {', '.join(PRESETS)}") from None
