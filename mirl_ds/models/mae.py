"""MAE (facebookresearch/mae ``models_mae.py``): the baseline, and MIRL with one segment.

Written out on its own, in MAE's names, so that the segmented model can be checked against it.
"""
import torch
from torch import nn
from timm.models.vision_transformer import Block
from functools import partial

from .encoder import init_linear_and_norm, run_blocks
from .masked_modeling import MaskedModeling, PretrainOutput
from .patches import restore_sequence
from .pos_embed import sincos_2d
from .presets import VitPreset


class MaskedAutoencoder(MaskedModeling):
    def __init__(self, spec: VitPreset, *, decoder_dim: int = 512, decoder_depth: int = 8,
                 decoder_heads: int = 16, norm_pix_loss: bool = False, **kwargs):
        super().__init__(spec, norm_pix_loss=norm_pix_loss, **kwargs)
        grid = spec.img_size // spec.patch_size
        self.decoder_embed = nn.Linear(spec.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_2d(decoder_dim, grid), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, spec.mlp_ratio, qkv_bias=True,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6)) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, spec.patch_size**2 * spec.in_chans)
        for m in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            m.apply(init_linear_and_norm)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_encoder(self, batch) -> torch.Tensor:
        x = self.embed(batch)                      # [N, 1+K, D]
        return self.encoder.norm(run_blocks(self.encoder.blocks, x, self.checkpoint_blocks))

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        x = restore_sequence(x, self.mask_token, ids_restore) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]   # [N, L, p*p*C]

    def forward(self, imgs: torch.Tensor, generator: torch.Generator | None = None) -> PretrainOutput:
        batch = self.prepare(imgs, generator)
        latent = self.forward_encoder(batch)
        pred = self.forward_decoder(latent, batch.ids_restore)
        terms = {"reconstruction": batch.target.loss(pred)}
        terms.update(self.extra_losses(latent, [pred], batch, imgs))
        return PretrainOutput(sum(terms.values()), terms, [pred], batch)
