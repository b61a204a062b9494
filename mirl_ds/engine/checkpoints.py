"""DeepSpeed checkpoints with the project's state, pruning, and falling back past a damaged one.

Layout: ``<checkpoint.dir>/global_step<N>/`` (DeepSpeed's own files: ``mp_rank_*`` or
``layer_*``, ZeRO shards) and DeepSpeed's ``latest`` file naming the newest tag.  The project's
state rides in ``client_state["mirl_ds"]``: step, epoch, every data-parallel rank's loader
position, the resolved config text and the seed.  DeepSpeed writes ``client_state`` once per
model replica group, so loader positions of all data-parallel ranks are gathered before saving.

Two other kinds of folder load too: a *universal* checkpoint (:mod:`mirl_ds.engine.universal`,
for another pipeline/data-parallel degree), as ``checkpoint.resume=<its folder>``; and any
checkpoint as ``checkpoint.init_from`` — weights only (DeepSpeed's ``load_module_only``), the
optimizer, schedule and data starting afresh.
"""
from __future__ import annotations

import os
import re
import shutil

import torch.distributed as dist

from ..log import get_logger

log = get_logger()
CLIENT_KEY = "mirl_ds"
_TAG_RE = re.compile(r"^global_step(\d+)$")


class NoCheckpoint(FileNotFoundError):
    pass


def tag_for(step: int) -> str:
    return f"global_step{step}"


def list_tags(ckpt_dir: str) -> list[str]:
    """Checkpoint tags in ``ckpt_dir``, newest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [(int(m.group(1)), d) for d in os.listdir(ckpt_dir)
            if (m := _TAG_RE.match(d)) and os.path.isdir(os.path.join(ckpt_dir, d))]
    return [d for _, d in sorted(tags, reverse=True)]


def save(engine, ckpt_dir: str, step: int, state: dict, keep_last: int) -> str:
    """Save on every rank (collective), then rank 0 removes all but the newest ``keep_last``."""
    tag = tag_for(step)
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={CLIENT_KEY: state})
    dist.barrier()
    if dist.get_rank() == 0 and keep_last > 0:
        for old in list_tags(ckpt_dir)[keep_last:]:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    dist.barrier()
    return tag


def _load_tag(engine, base: str, tag: str, weights_only: bool):
    """``engine.load_checkpoint`` of ``base/tag``, native or universal."""
    from .universal import converted_from_zero3, is_universal

    universal = is_universal(os.path.join(base, tag))
    if universal and not engine.zero_optimization():
        raise NoCheckpoint(f"{base}/{tag} is a universal checkpoint, which DeepSpeed loads through a ZeRO "
                           f"optimizer: use a DeepSpeed config with zero_optimization.stage 1, 2 or 3")
    if universal and converted_from_zero3(os.path.join(base, tag)) != (engine.zero_optimization_stage() == 3):
        # DeepSpeed 0.19 writes and reads the optimizer's common state differently for ZeRO-3.
        raise NoCheckpoint(f"{base}/{tag} was converted from a ZeRO-{'3' if converted_from_zero3(os.path.join(base, tag)) else '1/2'} "
                           f"checkpoint, and DeepSpeed resumes universal checkpoints only within ZeRO-3 or within "
                           f"ZeRO-1/2: use a DeepSpeed config of that family (any pipeline/data-parallel layout)")
    # DeepSpeed reads "checkpoint": {"load_universal": ...} only when loading, so it is set here
    # per folder: a run may resume its own native checkpoints and start from a universal one.
    engine._config.load_universal_checkpoint = universal
    return engine.load_checkpoint(base, tag=tag, load_module_only=weights_only,
                                  load_optimizer_states=not weights_only,
                                  load_lr_scheduler_states=not weights_only)


def _split(path: str, what: str) -> tuple[str, list[str]]:
    """A checkpoint path as (base dir, tags to try newest first): a ``global_step<N>`` or
    universal folder is itself; a folder of checkpoints offers its tags."""
    from .universal import is_universal

    path = os.path.abspath(path)
    if (_TAG_RE.match(os.path.basename(path)) or is_universal(path)) and os.path.isdir(path):
        return os.path.dirname(path), [os.path.basename(path)]
    tags = list_tags(path)
    if not tags:
        raise NoCheckpoint(f"{what}={path}: no global_step<N> checkpoint in it; point it at a checkpoint "
                           f"folder (global_step<N>, or <tag>_universal from `mirl-ds universal`)")
    return path, tags


def load(engine, ckpt_dir: str, resume: str) -> dict | None:
    """Resume per ``checkpoint.resume``: ``none`` -> None; ``auto`` -> the newest loadable tag in
    ``ckpt_dir`` (None if there is none); a path -> that checkpoint folder (``<dir>/<tag>``) or a
    checkpoint dir (its ``latest``).  A tag that fails to load is skipped with a warning and the
    previous one tried (all ranks agree: a failure anywhere counts for all)."""
    if resume == "none":
        return None
    if resume == "auto":
        base, tags = ckpt_dir, list_tags(ckpt_dir)
        if not tags:
            return None
    else:
        base, tags = _split(resume, "checkpoint.resume")
    return _load_first_good(engine, base, tags, weights_only=False)


def load_weights(engine, path: str) -> dict:
    """``checkpoint.init_from``: the model weights of checkpoint ``path`` (native or universal,
    newest tag of a folder of them); returns that checkpoint's mirl_ds state (for the log)."""
    base, tags = _split(path, "checkpoint.init_from")
    return _load_first_good(engine, base, tags[:1], weights_only=True)


def _load_first_good(engine, base: str, tags: list[str], weights_only: bool) -> dict:
    error = None
    for i, tag in enumerate(tags):
        error = None
        try:
            _, client = _load_tag(engine, base, tag, weights_only)
            state = (client or {}).get(CLIENT_KEY)
            if state is None:
                error = "it holds no mirl_ds state (not written by mirl_ds.pretrain)"
        except Exception as e:  # noqa: BLE001 - a damaged checkpoint: try the previous one
            error = f"{type(e).__name__}: {e}"
        flag = any_rank(error is not None)
        if not flag:
            return state
        if dist.get_rank() == 0:
            log.warning("checkpoint %s/%s could not be loaded (%s); %s", base, tag,
                        error or "failed on another rank",
                        f"falling back to {tags[i + 1]}" if i + 1 < len(tags) else "no older one left")
    raise NoCheckpoint(f"none of the checkpoints in {base} ({', '.join(tags)}) could be loaded (last error: "
                       f"{error or 'on another rank'}); start afresh with checkpoint.resume=none, point it at a "
                       f"good one, or for a checkpoint of another pipeline/data-parallel layout convert it with "
                       f"`mirl-ds universal <checkpoint>` and load the result")


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (a collective)."""
    import torch

    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
