"""Classification models on the pre-trained encoder: fine-tuning ViT, linear and non-linear
probes (SPEC §2.5), and moving weights into them by name."""
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from timm.models.vision_transformer import Block, VisionTransformer

from .encoder import build_vit
from .presets import VitPreset


def build_classifier(spec: VitPreset, num_classes: int, *, global_pool: str = "avg",
                     drop_path_rate: float = 0.0) -> VisionTransformer:
    """timm's ViT with a head. ``global_pool='avg'`` is MAE's fine-tuning default: mean of the
    patch tokens, then ``fc_norm`` (timm then makes ``norm`` an identity, as MAE deletes it);
    ``'token'`` classifies the cls token after ``norm``."""
    return build_vit(spec, num_classes=num_classes, global_pool=global_pool, drop_path_rate=drop_path_rate)


class _FrozenEncoderProbe(nn.Module):
    """A frozen encoder: no gradients, and always in eval mode (its statistics never move)."""

    def __init__(self, encoder: VisionTransformer):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self


class LinearProbe(_FrozenEncoderProbe):
    """MAE's linear probe: frozen encoder -> pooled feature -> BatchNorm (no affine) -> Linear."""

    def __init__(self, encoder: VisionTransformer, num_classes: int):
        super().__init__(encoder)
        dim = encoder.embed_dim
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        """The frozen, pooled feature [N, D] (cacheable: it never changes during probing)."""
        with torch.no_grad():
            return self.encoder.forward_head(self.encoder.forward_features(imgs), pre_logits=True)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from features [N, D] (live or cached): the only trainable part."""
        return self.head(features)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(imgs))


class NonLinearProbe(_FrozenEncoderProbe):
    """Beyond Masking §5: frozen encoder + k trainable Transformer blocks + a linear head on
    the mean of the patch tokens."""

    def __init__(self, encoder: VisionTransformer, num_classes: int, num_blocks: int = 2):
        super().__init__(encoder)
        dim, heads = encoder.embed_dim, encoder.blocks[0].attn.num_heads
        self.blocks = nn.Sequential(*[Block(dim, heads, qkv_bias=True,
                                            norm_layer=partial(nn.LayerNorm, eps=1e-6))
                                      for _ in range(num_blocks)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def tokens(self, imgs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.encoder.forward_features(imgs)      # [N, 1+L, D], frozen

    def classify(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits from the frozen tokens [N, 1+L, D] (live or cached): blocks, norm, head."""
        x = self.blocks(tokens)
        return self.head(self.norm(x[:, 1:, :].mean(dim=1)))

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.classify(self.tokens(imgs))


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)   # copied into the target
    missing: list[str] = field(default_factory=list)  # target keys the source lacks (fresh init)
    unused: list[str] = field(default_factory=list)   # source keys the target has no place for


def encoder_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder part of a pre-training state dict, in timm names.

    Accepts this project's models (``encoder.*``) and MAE-format checkpoints (timm names at
    the top level beside ``decoder_*``); decoders, norms of intermediate segments and the
    momentum encoder are left out.
    """
    state_dict = state_dict.get("model", state_dict)
    if any(k.startswith("encoder.") for k in state_dict):
        return {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    encoder_roots = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.", "fc_norm.", "head.")
    return {k: v for k, v in state_dict.items() if k.startswith(encoder_roots)}


def load_weights_by_name(target: nn.Module, source: dict[str, torch.Tensor]) -> LoadReport:
    """Copy every source tensor whose name and shape match a target tensor; report the rest.
    Missing target tensors keep their fresh initialisation; a name whose shape differs means
    the checkpoint belongs to another model shape, which is refused."""
    own = target.state_dict()
    report = LoadReport()
    matched = {}
    for name, value in source.items():
        if name not in own:
            report.unused.append(name)
        elif own[name].shape != value.shape:
            raise ValueError(f"weight {name} has shape {tuple(value.shape)} in the checkpoint but "
                             f"{tuple(own[name].shape)} in the model: the checkpoint was made for "
                             f"another model config; use the config it was trained with")
        else:
            matched[name] = value
            report.loaded.append(name)
    report.missing = [k for k in own if k not in matched]
    target.load_state_dict(matched, strict=False)
    return report
