"""The pre-training model's weights from a checkpoint of any layout, under the plain model's names.

Layouts (:func:`read_weights` tells which it found):

* ``pipeline`` — a DeepSpeed pipeline checkpoint: one ``layer_<i>-model_states.pt`` per layer,
  renamed with :func:`mirl_ds.engine.pipeline.pipeline_to_model_names` (the model is rebuilt on
  the ``meta`` device from the config text the checkpoint keeps).  These files hold the weights
  in the training precision (bf16 under bf16).
* ``zero`` — a DeepSpeed checkpoint with ZeRO optimizer shards of a plain model (stages 1–3):
  the fp32 master weights gathered by DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint``.
* ``deepspeed`` — a DeepSpeed checkpoint without ZeRO shards: the ``module`` of
  ``mp_rank_00_model_states.pt``.
* ``universal`` — a folder from ``mirl-ds universal``: ``zero/<name>/fp32.pt`` per parameter
  (the fp32 master weights; frozen tensors such as the fixed sin-cos position embeddings are not
  optimizer state and are absent unless DeepSpeed kept them).
* ``file`` — a ``.pt``/``.pth`` file: ``{"model": state_dict}`` (MAE's format, and what
  ``mirl-ds demo`` writes), ``{"module": state_dict}``, or a bare state dict.

A checkpoint *folder* (``runs/x/checkpoints``) means its newest tag (``latest``).
"""
from __future__ import annotations

import contextlib
import glob
import io
import os
import re
from pathlib import Path

import torch

from .checkpoints import NoCheckpoint, list_tags

__all__ = ["read_weights", "resolve_tag_folder", "stored_state"]

_LAYER_FILE = re.compile(r"^layer_(\d+)-model_states\.pt$")


def resolve_tag_folder(path: str | os.PathLike) -> Path:
    """``path`` as one checkpoint folder: itself if it holds DeepSpeed's model-state files (or is
    universal), else the tag named by its ``latest`` file, else its newest ``global_step<N>``."""
    path = Path(path).resolve()
    if not path.is_dir():
        raise NoCheckpoint(f"{path}: no such checkpoint folder")
    if glob.glob(str(path / "*model_states.pt")):
        return path
    latest = path / "latest"
    tag = latest.read_text().strip() if latest.is_file() else next(iter(list_tags(str(path))), None)
    if tag is None or not (path / tag).is_dir():
        raise NoCheckpoint(f"{path}: neither a checkpoint (global_step<N>/) nor a folder of them; point it "
                           f"at one, e.g. runs/<run>/checkpoints/global_step1000")
    return path / tag


def stored_state(tag_dir: str | os.PathLike) -> dict:
    """The project's client state (step, config text, …) saved with a DeepSpeed checkpoint."""
    from .checkpoints import CLIENT_KEY

    files = sorted(glob.glob(os.path.join(tag_dir, "*mp_rank_*_model_states.pt")))
    if not files:
        raise NoCheckpoint(f"{tag_dir}: no DeepSpeed model-state file (mp_rank_*_model_states.pt) in it")
    state = torch.load(files[0], map_location="cpu", weights_only=False).get(CLIENT_KEY)
    if state is None:
        raise NoCheckpoint(f"{files[0]} holds no mirl_ds state: it was not written by mirl_ds.pretrain")
    return state


def model_on_meta(config_text: str):
    """The pre-training model of a stored config, without materialising any weight."""
    from ..build import build_pretrain_model
    from ..config.loader import config_from_text

    with torch.device("meta"):
        return build_pretrain_model(config_from_text(config_text))


def _from_pipeline(tag_dir: Path, files: list[str]) -> dict[str, torch.Tensor]:
    from .pipeline import pipeline_to_model_names

    names = pipeline_to_model_names(model_on_meta(stored_state(tag_dir)["config"]))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        index = int(_LAYER_FILE.match(os.path.basename(f)).group(1))
        layer = torch.load(f, map_location="cpu", weights_only=True)
        tied = index % 2 == 0       # even layers are the mask token's copies, one per stage
        for key, value in layer.items():
            name = names["tied_modules.mask_token.weight" if tied else f"{index}.{key}"]
            out.setdefault(name, value.float())   # copies (token, decoder pos-embed) are identical
    return out


def _param_shapes(folder: Path) -> dict[str, torch.Size]:
    """Parameter shapes DeepSpeed recorded in a checkpoint's model-state files."""
    shapes: dict[str, torch.Size] = {}
    for f in sorted(folder.glob("*model_states.pt")):
        for group in torch.load(f, map_location="cpu", weights_only=False).get("param_shapes") or []:
            shapes.update(group)
    return shapes


def _from_universal(folder: Path) -> dict[str, torch.Tensor]:
    shapes = _param_shapes(folder)      # ZeRO-3 conversions store the parameters flattened
    out = {}
    for d in sorted((folder / "zero").iterdir()):
        # Plain-model names only: the pipeline aliases start with a layer index or tied_modules.
        if d.name[0].isdigit() or d.name.startswith("tied_modules.") or not (d / "fp32.pt").exists():
            continue
        saved = torch.load(d / "fp32.pt", map_location="cpu", weights_only=False)
        # {"param": tensor, …} from ZeRO-1/2 conversions; the bare tensor from ZeRO-3 ones.
        tensor = (saved["param"] if isinstance(saved, dict) else saved).float()
        shape = shapes.get(d.name)
        out[d.name] = tensor.view(shape) if shape is not None and tensor.numel() == shape.numel() else tensor
    return out


def _from_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one sentence
        raise NoCheckpoint(f"{path} is not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    for key in ("model", "module", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise NoCheckpoint(f"{path} holds no state dict (expected {{'model': state_dict}}, "
                           f"{{'module': state_dict}} or a state dict)")
    return {k: v.float() if v.is_floating_point() else v for k, v in obj.items()}


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """``(state_dict, layout)``: the pre-training model's tensors named as in the plain model."""
    path = Path(path)
    if path.is_file():
        return _from_file(path), "file"
    from .universal import is_universal

    tag_dir = resolve_tag_folder(path)
    if is_universal(tag_dir):
        return _from_universal(tag_dir), "universal"
    layers = sorted(f for f in glob.glob(str(tag_dir / "layer_*-model_states.pt"))
                    if _LAYER_FILE.match(os.path.basename(f)))
    if layers:
        return _from_pipeline(tag_dir, layers), "pipeline"
    files = sorted(glob.glob(str(tag_dir / "*mp_rank_*_model_states.pt")))   # ZeRO-3: zero_pp_rank_<r>_…
    module = torch.load(files[0], map_location="cpu", weights_only=False).get("module") or {}
    # The module as saved: every tensor in the training precision (ZeRO-3: empty placeholders).
    out = {k: v.float() if v.is_floating_point() else v for k, v in module.items() if v.numel()}
    if glob.glob(str(tag_dir / "*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):      # its progress chatter
            master = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        # The fp32 master weights win; frozen tensors ZeRO-1 does not keep come from the module.
        out.update({k: v.float() for k, v in master.items()})
        return out, "zero"
    if not out:
        raise NoCheckpoint(f"{files[0]} holds no model weights and there are no ZeRO shards beside it")
    return out, "deepspeed"
