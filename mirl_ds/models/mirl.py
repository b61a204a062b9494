"""Masked Image Residual Learning (MIRL), and the segmented ablations of the paper.

The encoder's blocks are cut into G equal segments. Segment g has its own LayerNorm and
decoder H_g; with DID, H_g cross-attends to the memories ``[m_{g-1}, …, m_1, m_0]`` of all
shallower segments (m_0 from the tokens before block 0), never to its own segment. MIRL pairs
shallow decoder g with deep decoder G-g+1 and supervises them only through their sum, so the
deep decoder learns the residual of the image the shallow one leaves.

The forward pass is written as ``prepare → (run_segment → decode) × G → loss`` so that a
pipeline can cut it at segment boundaries.
"""
import torch
from torch import nn

from .decoder import SegmentDecoder
from .encoder import init_linear_and_norm, run_blocks
from .masked_modeling import MaskedBatch, MaskedModeling, PretrainOutput
from .objectives import (SEGMENTED_OBJECTIVES, coarse_fine_assignment, independent_losses,
                         residual_pair_losses)
from .pos_embed import sincos_2d
from .presets import VitPreset
from .targets import coarse_fine_targets


class SegmentedAutoencoder(MaskedModeling):
    def __init__(self, spec: VitPreset, *, objective: str = "mirl", segments: int | None = None,
                 did: str = "every", weight_norm_pred: bool = True, decoder_dim: int | None = None,
                 decoder_depth: int | None = None, decoder_heads: int | None = None,
                 pair_weights: list[float] | None = None, omega: float | None = None,
                 coarse_sigma: float = 2.0, norm_pix_loss: bool = True, **kwargs):
        super().__init__(spec, norm_pix_loss=norm_pix_loss, **kwargs)
        if objective not in SEGMENTED_OBJECTIVES:
            raise ValueError(f"objective {objective!r} is not one of {SEGMENTED_OBJECTIVES}")
        self.objective = objective
        self.num_segments = g_count = segments or spec.segments
        if self.depth % g_count:
            raise ValueError(f"encoder depth {self.depth} is not divisible by {g_count} segments")
        if objective != "multi_decoder" and g_count % 2:
            raise ValueError(f"objective {objective!r} pairs shallow with deep decoders and needs an "
                             f"even number of segments, got {g_count}")
        per = self.depth // g_count
        self.segment_bounds = [(g * per, (g + 1) * per) for g in range(g_count)]
        self.pair_weights = pair_weights or [2.0 / g_count] * (g_count // 2)
        self.omega = omega
        self.coarse_sigma = coarse_sigma

        d_enc = spec.embed_dim
        d_dec = decoder_dim or spec.decoder_dim
        # Segments 1..G-1 get their own norm; the last segment's is the encoder's ``norm``.
        self.segment_norms = nn.ModuleList(nn.LayerNorm(d_enc, eps=1e-6) for _ in range(g_count - 1))
        self.uses_memory = did != "off"
        if self.uses_memory:
            self.norm_low = nn.LayerNorm(d_enc, eps=1e-6)   # z_0 before block 0
            self.decoder_embed0 = nn.Linear(d_enc, d_dec)   # z_0 -> m_0
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d_dec))   # shared by all decoders
        grid = spec.img_size // spec.patch_size
        self.decoder_pos_embed = nn.Parameter(sincos_2d(d_dec, grid), requires_grad=False)
        self.decoders = nn.ModuleList(
            SegmentDecoder(d_enc, d_dec, decoder_depth or spec.decoder_depth,
                           decoder_heads or spec.decoder_heads, spec.patch_size**2 * spec.in_chans,
                           did=did, mlp_ratio=spec.mlp_ratio, weight_norm_pred=weight_norm_pred)
            for _ in range(g_count))
        for m in (self.segment_norms, self.decoders, *self.first_memory_layers()):
            m.apply(init_linear_and_norm)
        nn.init.normal_(self.mask_token, std=0.02)

    # -- the pieces a pipeline stage runs ------------------------------------------------
    def segment_norm(self, g: int) -> nn.Module:
        return self.encoder.norm if g == self.num_segments - 1 else self.segment_norms[g]

    def first_memory_layers(self) -> list[nn.Module]:
        return [self.norm_low, self.decoder_embed0] if self.uses_memory else []

    def first_memory(self, z0: torch.Tensor) -> list[torch.Tensor]:
        """[m_0] from the tokens before block 0 (empty without DID)."""
        return [self.decoder_embed0(self.norm_low(z0))] if self.uses_memory else []

    def run_segment(self, g: int, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.segment_bounds[g]
        return run_blocks(self.encoder.blocks[lo:hi], x, self.checkpoint_blocks)

    def decode(self, g: int, x: torch.Tensor, memories: list[torch.Tensor],
               ids_restore: torch.Tensor, shared: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Segment g's output -> (ŷ_g [N, L, p*p*C], m_g [N, 1+K, d]).

        ``memories`` is ``[m_{g-1}, …, m_0]`` (0-indexed g: all shallower segments and z_0);
        ``shared`` is :meth:`shared_decoder_inputs`, made once per forward pass.
        """
        dec = self.decoders[g]
        m_g = dec.embed(self.segment_norm(g)(x))
        memory = torch.cat(memories, dim=1) if dec.uses_memory else None
        token, pos = shared if shared is not None else self.shared_decoder_inputs()
        return dec(m_g, ids_restore, token, pos, memory), m_g

    def shared_decoder_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mask token and decoder position embedding every decoder uses, as one view each per
        forward pass: the G decoders' gradients meet in the view and reach the Parameter once,
        and no Parameter is handed to a submodule's forward as an input (ZeRO-3 hooks inputs)."""
        return self.mask_token.view_as(self.mask_token), self.decoder_pos_embed.view_as(self.decoder_pos_embed)

    def reconstruction_loss(self, preds: list[torch.Tensor], batch: MaskedBatch, imgs: torch.Tensor):
        if self.objective == "mirl":
            return residual_pair_losses(preds, batch.target, self.pair_weights, self.omega)
        if self.objective == "multi_decoder":
            return independent_losses(preds, None, batch.target)
        coarse, fine = coarse_fine_targets(imgs, self.patch, self.coarse_sigma)
        targets = coarse_fine_assignment(coarse, fine, self.num_segments,
                                         coarse_first=self.objective == "coarse_to_fine")
        return independent_losses(preds, targets, batch.target)

    def reconstructions(self, preds: list[torch.Tensor]) -> list[torch.Tensor]:
        """Full-image reconstructions: each MIRL pair's sum, or each independent decoder."""
        if self.objective != "mirl":
            return preds
        g_count = len(preds)
        return [preds[g] + preds[g_count - 1 - g] for g in range(g_count // 2)]

    # -- the whole model -------------------------------------------------------------------
    def forward(self, imgs: torch.Tensor, generator: torch.Generator | None = None) -> PretrainOutput:
        batch = self.prepare(imgs, generator)
        x = self.embed(batch)                       # z_0 [N, 1+K, D]
        memories = self.first_memory(x)             # newest first: [m_{g-1}, …, m_0]
        shared = self.shared_decoder_inputs()
        preds = []
        for g in range(self.num_segments):
            x = self.run_segment(g, x)
            pred, m_g = self.decode(g, x, memories, batch.ids_restore, shared)
            preds.append(pred)
            memories.insert(0, m_g)
        loss, terms = self.reconstruction_loss(preds, batch, imgs)
        extra = self.extra_losses(self.encoder.norm(x), self.reconstructions(preds), batch, imgs)
        terms.update(extra)
        return PretrainOutput(loss + sum(extra.values()), terms, preds, batch)
