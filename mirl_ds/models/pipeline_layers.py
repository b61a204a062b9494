"""A :class:`SegmentedAutoencoder` cut into a flat sequence of layers for pipeline parallelism.

Layer ``2g`` is the shared mask token (tied across stages by the pipeline engine), layer
``2g + 1`` is segment g: its encoder blocks and its decoder (segment 0 also holds the patch
embedding, the masking and the first memory).  A stage therefore always holds whole segments
when the layers are split evenly into a number of stages that divides G.

Between layers flows a tuple of three tensors whose shapes are fixed for a given boundary
(pipeline engines send shapes once):

    (floats, ids_restore, mask)

* ``floats`` [N, F] — every floating tensor the later segments need, flattened per sample and
  concatenated: ``x`` [N, 1+K, D] (the running encoder tokens), the memories ``m_g … m_0``
  [N, 1+K, d] the deeper decoders cross-attend to (none without DID) and every prediction so far
  ``ŷ_0 … ŷ_g`` [N, L, p²C] (for the loss on the last stage);
* ``ids_restore`` [N, L] and ``mask`` [N, L] — integer tensors (int64), no gradient.

One floating tensor, not 2g + 2: DeepSpeed's pipeline engine runs one ``backward`` per floating
tensor a stage sends, each through the whole stage (``retain_graph``), so a stage that sent x,
its memories and its predictions separately ran its backward 2g + 2 times.  The packed tensor is
used further on, so it gets a gradient (the engine asserts that).

The first layer takes ``(images, seed)``; ``seed`` ([1] int64) seeds the generator of the
degradation and the mask, so a pipelined and a plain model given the same seed see the same
masks.  The last layer returns ``(mask, ŷ_0, …, ŷ_{G-1})`` and :class:`LossHead` turns that and
the clean images into the loss.
"""
from __future__ import annotations

import torch
from torch import nn

from .encoder import embed_visible, run_blocks
from .masked_modeling import MaskedBatch, MaskedModeling
from .mirl import SegmentedAutoencoder


class MaskToken(nn.Module):
    """The decoders' shared mask token as a module whose ``weight`` the pipeline ties.

    Its forward hands the token to the segment layer after it (same stage: the token never
    crosses a boundary).  Being a layer with its own forward (not a tied ``forward_fn``) matters:
    DeepSpeed's pipeline saves and loads only layers that are modules, so each stage's copy of
    the token is written to and restored from its ``layer_<2g>`` file."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(value.detach().clone())

    def forward(self, inputs: tuple) -> tuple:
        return (*inputs, self.weight)


class SegmentLayer(nn.Module):
    """Segment g of the model; parameter names follow the model's (see :meth:`model_key`)."""

    def __init__(self, model: SegmentedAutoencoder, g: int, checkpoint_blocks: bool = False):
        super().__init__()
        self.g, self.num_segments = g, model.num_segments
        self.lo, _ = model.segment_bounds[g]
        self.blocks = nn.ModuleList(model.encoder.blocks[slice(*model.segment_bounds[g])])
        self.norm = model.segment_norm(g)
        self.decoder = model.decoders[g]
        self.decoder_pos_embed = nn.Parameter(model.decoder_pos_embed.detach().clone(), requires_grad=False)
        self.uses_memory = model.uses_memory
        self.checkpoint_blocks = checkpoint_blocks
        self.embed_dim = model.encoder.embed_dim
        self.decoder_dim = self.decoder.embed.out_features
        self.pred_dim = self.decoder.pred.bias.shape[0]          # p²C
        if g == 0:
            enc = model.encoder
            self.patch_embed, self.cls_token, self.pos_embed = enc.patch_embed, enc.cls_token, enc.pos_embed
            if model.uses_memory:
                self.norm_low, self.decoder_embed0 = model.norm_low, model.decoder_embed0
            self.degradation = model.degradation
            self.mask_ratio, self.patch = model.mask_ratio, model.patch

    # -- names ---------------------------------------------------------------------------
    def model_key(self, key: str) -> str:
        """This layer's state-dict key -> the :class:`SegmentedAutoencoder` key it mirrors."""
        head, _, rest = key.partition(".")
        if head == "blocks":
            i, _, rest = rest.partition(".")
            return f"encoder.blocks.{self.lo + int(i)}.{rest}"
        if head == "norm":
            last = self.g == self.num_segments - 1
            return f"encoder.norm.{rest}" if last else f"segment_norms.{self.g}.{rest}"
        if head == "decoder":
            return f"decoders.{self.g}.{rest}"
        if head in ("patch_embed", "cls_token", "pos_embed"):
            return f"encoder.{key}"
        return key      # decoder_pos_embed, norm_low, decoder_embed0, degradation.*

    # -- forward -------------------------------------------------------------------------
    def _first(self, imgs: torch.Tensor, seed: torch.Tensor):
        generator = torch.Generator(device=imgs.device).manual_seed(int(seed.reshape(-1)[0]))
        inputs, ids_keep, ids_restore, mask = MaskedModeling.degrade_and_mask(self, imgs, generator)
        x = embed_visible(self, inputs, ids_keep)
        memories = [self.decoder_embed0(self.norm_low(x))] if self.uses_memory else []
        return x, ids_restore.long(), mask.long(), memories, []

    def forward(self, inputs: tuple) -> tuple:
        *inputs, mask_token = inputs
        if self.g == 0:
            x, ids_restore, mask, memories, preds = self._first(*inputs)
        else:
            floats, ids_restore, mask = inputs
            x, memories, preds = self._unpack(floats, ids_restore.shape[1])
        x = run_blocks(self.blocks, x, self.checkpoint_blocks)
        m_g = self.decoder.embed(self.norm(x))
        memory = torch.cat(memories, dim=1) if self.decoder.uses_memory else None
        preds.append(self.decoder(m_g, ids_restore, mask_token, self.decoder_pos_embed, memory))
        if self.g == self.num_segments - 1:
            return (mask, *preds)
        if self.uses_memory:
            memories.insert(0, m_g)
        floats = torch.cat([t.reshape(t.shape[0], -1) for t in (x, *memories, *preds)], dim=1)
        return floats, ids_restore.contiguous(), mask.contiguous()

    def _unpack(self, floats: torch.Tensor, num_patches: int):
        """(x, memories, predictions) of the previous segment's packed output.  Their shapes follow
        from its width F = T·D + n·T·d + g·L·P: T = 1 + K tokens, n = g + 1 memories with DID
        (m_0 from z_0 and one per earlier segment; 0 without), g predictions of L patches × p²C."""
        n, width = floats.shape
        g, n_mem, pred_dim = self.g, (self.g + 1 if self.uses_memory else 0), self.pred_dim
        pred_width = g * num_patches * pred_dim
        tokens = (width - pred_width) // (self.embed_dim + n_mem * self.decoder_dim)
        sizes = [tokens * self.embed_dim] + [tokens * self.decoder_dim] * n_mem + [num_patches * pred_dim] * g
        parts = floats.split(sizes, dim=1)
        x = parts[0].reshape(n, tokens, self.embed_dim)
        memories = [t.reshape(n, tokens, self.decoder_dim) for t in parts[1:1 + n_mem]]
        preds = [t.reshape(n, num_patches, pred_dim) for t in parts[1 + n_mem:]]
        return x, memories, preds


class LossHead:
    """The last stage's loss: the target from the clean images and the mask, then the model's own
    reconstruction loss.  It carries only the model's loss settings (no parameters) and runs the
    model's methods on them, so the pipelined loss is the plain model's loss by construction."""

    def __init__(self, model: SegmentedAutoencoder):
        for name in ("objective", "num_segments", "pair_weights", "omega", "coarse_sigma", "patch",
                     "zoom_in", "norm_pix_loss"):
            setattr(self, name, getattr(model, name))
        self.last_terms: dict[str, float] = {}

    def __call__(self, outputs: tuple, imgs: torch.Tensor) -> torch.Tensor:
        mask, *preds = outputs
        mask = mask.to(preds[0].dtype)
        target = MaskedModeling.make_target(self, imgs.to(preds[0].dtype), mask)
        batch = MaskedBatch(None, None, None, mask, target)
        loss, terms = SegmentedAutoencoder.reconstruction_loss(self, preds, batch, imgs)
        self.last_terms = {k: float(v.detach()) for k, v in terms.items()}
        return loss


def segment_layers(model: SegmentedAutoencoder, checkpoint_blocks: bool = False, token_layer=None) -> list:
    """The model as ``[mask token, segment 0, mask token, segment 1, …]``.  ``token_layer`` is
    what stands at the mask-token places: by default one shared :class:`MaskToken` (the layers
    then run in sequence without any pipeline engine, see :func:`run_layers`); the pipeline
    passes its tied-layer spec."""
    token = token_layer if token_layer is not None else MaskToken(model.mask_token)
    layers: list = []
    for g in range(model.num_segments):
        layers += [token, SegmentLayer(model, g, checkpoint_blocks)]
    return layers


def run_layers(layers: list, imgs: torch.Tensor, seed: torch.Tensor) -> tuple:
    """What the pipeline computes, in one process (tests, and a check of the layer contract)."""
    x: tuple = (imgs, seed)
    for layer in layers:
        x = layer(x)
    return x
