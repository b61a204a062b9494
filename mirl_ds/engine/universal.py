"""Universal checkpoints: resume a run on another topology (pipeline stages, data-parallel ranks).

A native checkpoint is cut the way its run was: one ``layer_*`` file per pipeline layer, one
optimizer shard per ZeRO rank.  DeepSpeed's ``ds_to_universal`` rewrites a ZeRO (stage 1–3)
checkpoint as one folder per parameter, ``zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt``, which
an engine of any data-parallel degree loads with ``"checkpoint": {"load_universal": true}``.

DeepSpeed finds a parameter's folder by the engine's own parameter name, and those differ
between the pipelined model (``"3.blocks.0.attn.qkv.weight"``) and the plain one
(``"encoder.blocks.6.attn.qkv.weight"``).  :func:`convert` therefore runs DeepSpeed's converter
and then adds, next to every parameter folder, a symlink under its name in the other layout
(:func:`mirl_ds.engine.pipeline.pipeline_to_model_names`), so one universal folder resumes as
pp=1 and as any pp that divides G.  The model is rebuilt on the ``meta`` device from the config
text stored in the checkpoint to get the names, so no weights are materialised.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import io
import os
import sys
from pathlib import Path

import torch

from .weights import model_on_meta, resolve_tag_folder, stored_state

__all__ = ["UniversalError", "convert", "converted_from_zero3", "is_universal", "add_name_aliases"]


class UniversalError(ValueError):
    """A checkpoint that cannot be turned into (or used as) a universal checkpoint."""


def is_universal(path: str | os.PathLike) -> bool:
    """A folder written by :func:`convert` (per-parameter ``zero/`` folders + model-state files)."""
    path = Path(path)
    return (path / "zero").is_dir() and bool(glob.glob(str(path / "*model_states.pt")))


def add_name_aliases(universal_dir: str | os.PathLike, config_text: str) -> int:
    """Symlink every parameter folder under its name in the other layout; returns how many."""
    from .pipeline import pipeline_to_model_names

    zero = Path(universal_dir) / "zero"
    added = 0
    for piped, plain in pipeline_to_model_names(model_on_meta(config_text)).items():
        for have, alias in ((piped, plain), (plain, piped)):
            if (zero / have).is_dir() and not (zero / alias).exists():
                os.symlink(have, zero / alias)      # relative: the folder can be moved or copied
                added += 1
                break
    return added


def converted_from_zero3(universal_dir: str | os.PathLike) -> bool:
    """Whether a universal folder came from a ZeRO-3 checkpoint (its per-rank model-state files)."""
    return bool(glob.glob(os.path.join(universal_dir, "zero_pp_rank_*_model_states.pt")))


def _check_zero_shards(tag_dir: Path) -> None:
    if not glob.glob(str(tag_dir / "*optim_states.pt")):
        raise UniversalError(
            f"{tag_dir} has no ZeRO optimizer shards (*optim_states.pt): it was saved with "
            f"zero_optimization.stage 0, and DeepSpeed's universal checkpoint is built from ZeRO shards; "
            f"train with a ZeRO config (ds_configs/pipeline_zero1_bf16.json, zero2_bf16.json, zero3_bf16.json)")


def convert(src: str, out: str | None = None, *, quiet: bool = True) -> Path:
    """Write the universal form of checkpoint ``src`` (a ``global_step<N>`` folder, or a
    checkpoint dir meaning its ``latest``) to ``out`` (default ``<tag>_universal`` beside it).
    DeepSpeed's converter also writes ``latest_universal`` in ``out``'s parent."""
    from deepspeed.checkpoint import ds_to_universal

    tag_dir = resolve_tag_folder(src)
    _check_zero_shards(tag_dir)
    state = stored_state(tag_dir)
    out_dir = Path(out).resolve() if out else tag_dir.with_name(tag_dir.name + "_universal")
    if out_dir.exists():
        raise UniversalError(f"{out_dir} already exists; remove it or pass another output folder")
    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(out_dir), num_extract_workers=2,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)   # checkpoints saved before mirl_ds set the marker
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter if quiet else sys.stdout), \
            contextlib.redirect_stderr(chatter if quiet else sys.stderr):   # tqdm bars
        ds_to_universal.main(args)
    add_name_aliases(out_dir, state["config"])
    return out_dir
