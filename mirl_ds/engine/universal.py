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

from .checkpoints import CLIENT_KEY, NoCheckpoint, list_tags

__all__ = ["UniversalError", "convert", "is_universal", "stored_state", "add_name_aliases"]


class UniversalError(ValueError):
    """A checkpoint that cannot be turned into (or used as) a universal checkpoint."""


def is_universal(path: str | os.PathLike) -> bool:
    """A folder written by :func:`convert` (per-parameter ``zero/`` folders + model-state files)."""
    path = Path(path)
    return (path / "zero").is_dir() and bool(glob.glob(str(path / "*model_states.pt")))


def _tag_folder(src: str) -> Path:
    """``src`` as a ``global_step<N>`` folder: itself, or its newest tag when it is a checkpoint dir."""
    path = Path(src).resolve()
    if not path.is_dir():
        raise NoCheckpoint(f"{src}: no such checkpoint folder")
    if glob.glob(str(path / "*model_states.pt")):
        return path
    latest = path / "latest"
    tag = latest.read_text().strip() if latest.is_file() else next(iter(list_tags(str(path))), None)
    if tag is None or not (path / tag).is_dir():
        raise NoCheckpoint(f"{src}: neither a checkpoint (global_step<N>/) nor a folder of them; point it "
                           f"at one, e.g. runs/<run>/checkpoints/global_step1000")
    return path / tag


def stored_state(tag_dir: str | os.PathLike) -> dict:
    """The project's client state (step, config text, …) saved with a checkpoint."""
    files = sorted(glob.glob(os.path.join(tag_dir, "*mp_rank_*_model_states.pt")))
    if not files:
        raise NoCheckpoint(f"{tag_dir}: no DeepSpeed model-state file (mp_rank_*_model_states.pt) in it")
    state = torch.load(files[0], map_location="cpu", weights_only=False).get(CLIENT_KEY)
    if state is None:
        raise UniversalError(f"{files[0]} holds no mirl_ds state: it was not written by mirl_ds.pretrain")
    return state


def _model_on_meta(config_text: str):
    from ..build import build_pretrain_model
    from ..config.loader import config_from_text

    with torch.device("meta"):
        return build_pretrain_model(config_from_text(config_text))


def add_name_aliases(universal_dir: str | os.PathLike, config_text: str) -> int:
    """Symlink every parameter folder under its name in the other layout; returns how many."""
    from .pipeline import pipeline_to_model_names

    zero = Path(universal_dir) / "zero"
    added = 0
    for piped, plain in pipeline_to_model_names(_model_on_meta(config_text)).items():
        for have, alias in ((piped, plain), (plain, piped)):
            if (zero / have).is_dir() and not (zero / alias).exists():
                os.symlink(have, zero / alias)      # relative: the folder can be moved or copied
                added += 1
                break
    return added


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

    tag_dir = _tag_folder(src)
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
