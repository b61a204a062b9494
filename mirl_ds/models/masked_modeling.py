"""What MAE and MIRL share: degrade, mask, encode visible tokens, build the target, and the
optional extra losses (feature-level InfoNCE, VGG perceptual)."""
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from timm.utils import ModelEmaV3

from .encoder import build_vit, embed_visible
from .feature_loss import FeaturePredictor, info_nce_masked
from .patches import patch_mean_std, patchify, random_masking, restore_sequence, unpatchify
from .perceptual_loss import VGGPerceptualLoss, paste_visible
from .presets import VitPreset
from .targets import ReconstructionTarget, plain_target, zoom_in_target


@dataclass
class MaskedBatch:
    """One batch after degradation and masking, before the encoder."""
    inputs: torch.Tensor        # [N, C, h, w] what the encoder sees (degraded)
    ids_keep: torch.Tensor | None  # [N, K] visible token indices (None: all visible)
    ids_restore: torch.Tensor   # [N, L]
    mask: torch.Tensor          # [N, L] 1 = masked
    target: ReconstructionTarget


class PretrainOutput(NamedTuple):
    """A named tuple, not a dataclass: ZeRO-3 attaches its backward hooks (which re-gather the
    model's own parameters, e.g. the mask token) to the tensors of tuples, lists and dicts only."""
    loss: torch.Tensor                       # the scalar that is back-propagated
    terms: dict[str, torch.Tensor]           # per pair / per decoder / extra-loss values
    preds: list[torch.Tensor]                # ŷ_g per decoder, [N, L, p*p*C], g = 1..G
    batch: MaskedBatch


@dataclass(frozen=True)
class ZoomIn:
    """Integrated (m)+(a): the input is the centre ``input_size`` of the view."""
    input_size: int
    centre_weight: float = 0.8
    border_weight: float = 0.2


@dataclass(frozen=True)
class FeatureLoss:
    weight: float = 1.0
    temperature: float = 0.2
    momentum: float = 0.996
    predictor_depth: int = 2


@dataclass(frozen=True)
class PerceptualLoss:
    weights_path: str
    weight: float = 1.0
    arch: str = "vgg16"
    layers: tuple[int, ...] = (1, 2, 3, 4)


class MaskedModeling(nn.Module):
    def __init__(self, spec: VitPreset, *, mask_ratio: float = 0.75, norm_pix_loss: bool = True,
                 pretrain_depth: int | None = None, degradation: nn.Module | None = None,
                 zoom_in: ZoomIn | None = None, feature_loss: FeatureLoss | None = None,
                 perceptual_loss: PerceptualLoss | None = None):
        super().__init__()
        self.spec = spec
        self.patch = spec.patch_size
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        # Activation checkpointing of the encoder blocks (parallel.activation_checkpointing).
        self.checkpoint_blocks = False
        # Truncated pre-training builds only the first k blocks; the rest are fresh at fine-tuning.
        self.encoder = build_vit(spec, depth=pretrain_depth)
        self.degradation = degradation
        self.zoom_in = zoom_in
        self.feature_loss_cfg = feature_loss
        if feature_loss is not None:
            d = spec.embed_dim
            self.feature_mask_token = nn.Parameter(torch.zeros(1, 1, d))
            nn.init.normal_(self.feature_mask_token, std=0.02)
            self.feature_predictor = FeaturePredictor(d, feature_loss.predictor_depth, spec.num_heads,
                                                      spec.mlp_ratio)
            # timm's EMA holds a frozen copy; it is a submodule so it is checkpointed with the model.
            self.momentum_encoder = ModelEmaV3(self.encoder, decay=feature_loss.momentum)
            self.momentum_encoder.requires_grad_(False)  # moved by the EMA only, never the optimizer
        self.perceptual_cfg = perceptual_loss
        if perceptual_loss is not None:
            self.perceptual = VGGPerceptualLoss(perceptual_loss.weights_path, perceptual_loss.arch,
                                                tuple(perceptual_loss.layers))

    @property
    def depth(self) -> int:
        return len(self.encoder.blocks)

    # -- batch preparation ---------------------------------------------------------------
    def prepare(self, imgs: torch.Tensor, generator: torch.Generator | None = None) -> MaskedBatch:
        """Degrade, draw the masks and build the reconstruction target for a clean batch."""
        inputs, ids_keep, ids_restore, mask = self.degrade_and_mask(imgs, generator)
        return MaskedBatch(inputs, ids_keep, ids_restore, mask, self.make_target(imgs, mask))

    def degrade_and_mask(self, imgs: torch.Tensor, generator: torch.Generator | None = None):
        """The encoder's input and the mask: ``(inputs, ids_keep, ids_restore, mask)``.  A
        pipeline's first stage runs this; the last builds the target with :meth:`make_target`."""
        inputs = imgs if self.degradation is None else self.degradation(imgs, generator=generator)
        n = inputs.shape[0]
        length = (inputs.shape[-1] // self.patch) ** 2
        if self.mask_ratio > 0:
            ids_keep, ids_restore, mask = random_masking(n, length, self.mask_ratio, inputs.device,
                                                         generator)
        else:
            ids_keep = None
            ids_restore = torch.arange(length, device=inputs.device).expand(n, -1)
            mask = torch.zeros(n, length, device=inputs.device)
        return inputs, ids_keep, ids_restore, mask

    def make_target(self, imgs: torch.Tensor, mask: torch.Tensor) -> ReconstructionTarget:
        if self.zoom_in is None:
            return plain_target(imgs, self.patch, mask, self.norm_pix_loss)
        z = self.zoom_in
        return zoom_in_target(imgs, self.patch, z.input_size, mask, self.norm_pix_loss,
                              z.centre_weight, z.border_weight)

    def embed(self, batch: MaskedBatch) -> torch.Tensor:
        """z_0 [N, 1+K, D]: visible tokens + position embedding, cls in front."""
        return embed_visible(self.encoder, batch.inputs, batch.ids_keep)

    # -- extra losses ----------------------------------------------------------------------
    def extra_losses(self, latent: torch.Tensor, recons: list[torch.Tensor], batch: MaskedBatch,
                     imgs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weighted feature-level and perceptual losses; ``latent`` is the encoder's final
        normalised output [N, 1+K, D], ``recons`` the full reconstructions [N, L, p*p*C]
        (one per MIRL pair; the perceptual loss is their mean)."""
        terms = {}
        if self.feature_loss_cfg is not None:
            terms["feature"] = self.feature_loss_cfg.weight * self._feature_loss(latent, batch)
        if self.perceptual_cfg is not None:
            per = [self._perceptual_loss(r, batch, imgs) for r in recons]
            terms["perceptual"] = self.perceptual_cfg.weight * sum(per) / len(per)
        return terms

    def _feature_loss(self, latent: torch.Tensor, batch: MaskedBatch) -> torch.Tensor:
        x = restore_sequence(latent, self.feature_mask_token, batch.ids_restore)
        pred = self.feature_predictor(x + self.encoder.pos_embed)[:, 1:, :]   # [N, L, D]
        with torch.no_grad():
            target = self.momentum_encoder.module.forward_features(batch.inputs)[:, 1:, :]
        weights = batch.mask if batch.mask.sum() > 0 else torch.ones_like(batch.mask)
        return info_nce_masked(pred, target, weights, self.feature_loss_cfg.temperature)

    def _perceptual_loss(self, recon: torch.Tensor, batch: MaskedBatch, imgs: torch.Tensor) -> torch.Tensor:
        """VGG distance between the image and the reconstruction with visible patches pasted
        back (supplementary B.1). Normalised predictions are mapped back to pixels with the
        target patches' own mean and std, as MAE's visualisation does."""
        raw = patchify(imgs, self.patch)
        if self.norm_pix_loss:
            mean, std = patch_mean_std(raw)
            recon = recon * std + mean
        mask_img = unpatchify(batch.mask.unsqueeze(-1).expand(-1, -1, self.patch**2), self.patch, 1)
        fake = paste_visible(unpatchify(recon, self.patch, imgs.shape[1]), imgs, mask_img)
        return self.perceptual(fake, imgs)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Move the momentum encoder towards the encoder (call after each optimizer step)."""
        if self.feature_loss_cfg is not None:
            self.momentum_encoder.update(self.encoder)
