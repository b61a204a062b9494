"""A classification ViT initialised from a pre-training checkpoint of any layout.

The source is anything :func:`mirl_ds.engine.weights.read_weights` reads: a DeepSpeed
checkpoint folder (pipeline ``layer_*`` files, ZeRO-1/2/3 shards, universal) or a file
(``{"model": state_dict}`` in this project's names or MAE's timm names).  Its encoder part, in
timm names, goes into the classifier by name (:func:`mirl_ds.models.classifier.load_weights_by_name`);
everything else of the pre-training model (decoders, mask token, the intermediate segments'
norms, the momentum encoder) is *dropped* and listed as such.

Options for the paper's initialisation studies (MIRL §3, Observation I):

* ``reinit_last=k`` — load everything, then re-initialise the last k encoder blocks;
* ``pretrained_blocks=k`` — a truncated pre-training: only blocks ``0..k-1`` come from the
  checkpoint, the deeper blocks start fresh.

A position embedding made for another image size is resampled to the model's grid (timm's
``resample_abs_pos_embed``, bicubic, the cls token kept), as MAE's ``interpolate_pos_embed``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..models.classifier import LoadReport, encoder_weights, load_weights_by_name
from ..models.encoder import init_linear_and_norm

__all__ = ["InitReport", "init_classifier", "read_encoder", "stored_config_text"]

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


@dataclass
class InitReport(LoadReport):
    layout: str = ""
    dropped: list[str] = field(default_factory=list)        # pre-training-only tensors (decoders, …)
    reinitialised: list[str] = field(default_factory=list)  # loaded, then re-initialised (reinit_last)
    resized: list[str] = field(default_factory=list)        # position embedding resampled

    def summary(self) -> str:
        return (f"{len(self.loaded)} tensors loaded from the {self.layout} checkpoint, "
                f"{len(self.missing)} fresh ({', '.join(self.missing) or 'none'}), "
                f"{len(self.unused)} unused ({', '.join(self.unused) or 'none'}), "
                f"{len(self.dropped)} pre-training-only dropped, "
                f"{len(self.reinitialised)} re-initialised, resampled: {', '.join(self.resized) or 'none'}")


def stored_config_text(path: str | os.PathLike) -> str | None:
    """The pre-training config text a checkpoint keeps (None for a file without one)."""
    from .weights import resolve_tag_folder, stored_state

    path = Path(path)
    if path.is_file():
        obj = torch.load(path, map_location="cpu", weights_only=False)
        return obj.get("config") if isinstance(obj, dict) and isinstance(obj.get("config"), str) else None
    return stored_state(resolve_tag_folder(path)).get("config")


def read_encoder(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str], str]:
    """``(encoder tensors in timm names, dropped source names, layout)`` of a checkpoint."""
    from .weights import read_weights

    weights, layout = read_weights(path)
    encoder = encoder_weights(weights)
    prefixed = any(k.startswith("encoder.") for k in weights)
    kept = {f"encoder.{k}" for k in encoder} if prefixed else set(encoder)
    return encoder, sorted(set(weights) - kept), layout


def _resample_pos_embed(source: dict, model: nn.Module, report: InitReport) -> None:
    from timm.layers import resample_abs_pos_embed

    old, new = source.get("pos_embed"), getattr(model, "pos_embed", None)
    if old is None or new is None or old.shape == new.shape:
        return
    grid = model.patch_embed.grid_size
    source["pos_embed"] = resample_abs_pos_embed(old, new_size=list(grid), num_prefix_tokens=1)
    report.resized.append(f"pos_embed {tuple(old.shape)} -> {tuple(new.shape)}")


def init_classifier(model: nn.Module, path: str | os.PathLike, *, reinit_last: int = 0,
                    pretrained_blocks: int | None = None) -> InitReport:
    """Load the encoder of checkpoint ``path`` into ``model`` (a timm ``VisionTransformer``)."""
    encoder, dropped, layout = read_encoder(path)
    report = InitReport(layout=layout, dropped=dropped)
    if pretrained_blocks is not None:
        deep = [k for k in encoder if (m := _BLOCK.match(k)) and int(m.group(1)) >= pretrained_blocks]
        for k in deep:
            del encoder[k]
        report.dropped += sorted(deep)
    _resample_pos_embed(encoder, model, report)
    loaded = load_weights_by_name(model, encoder)
    report.loaded, report.missing, report.unused = loaded.loaded, loaded.missing, loaded.unused
    if reinit_last:
        depth = len(model.blocks)
        if not 0 < reinit_last <= depth:
            raise ValueError(f"finetune.reinit_last={reinit_last} must be between 1 and the depth {depth}")
        for block in model.blocks[depth - reinit_last:]:
            block.apply(init_linear_and_norm)
        fresh = tuple(f"blocks.{i}." for i in range(depth - reinit_last, depth))
        report.reinitialised = [k for k in report.loaded if k.startswith(fresh)]
        report.loaded = [k for k in report.loaded if not k.startswith(fresh)]
    return report
