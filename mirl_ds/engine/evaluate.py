"""Top-1 / top-5 accuracy of a classifier on a validation shard set, summed over ranks.

Every validation sample counts exactly once (:class:`mirl_ds.data.eval_stream.EvalStream`:
whole shards per rank, the last batch may be short); undecodable samples are counted and
reported beside the accuracy, not hidden in it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["evaluate", "eval_stream"]


def eval_stream(cfg, val_manifest: str, dp_rank: int = 0, dp_size: int = 1):
    from ..build import pretrain_input_size
    from ..data.eval_stream import EvalStream
    from ..data.finetune_transforms import eval_decoder

    decode = eval_decoder(pretrain_input_size(cfg), mean=cfg.data.mean, std=cfg.data.std)
    return EvalStream(val_manifest, batch_size=cfg.data.micro_batch_size, decode=decode, dp_rank=dp_rank,
                      dp_size=dp_size)


@torch.no_grad()
def evaluate(model: nn.Module, stream, dtype: torch.dtype = torch.float32) -> dict:
    """``{"top1", "top5" (percent), "samples", "skipped"}`` over all ranks' shards (a collective
    when torch.distributed is initialised)."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(4, dtype=torch.float64)    # samples, top-1 hits, top-5 hits, skipped
    for batch in stream:
        logits = model(batch["images"].to(dtype)).float()
        labels = batch["labels"]
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(labels[:, None])
        counts += torch.tensor([len(labels), hits[:, 0].sum().item(), hits.any(dim=1).sum().item(), 0.0],
                               dtype=torch.float64)
    counts[3] = sum(stream.skipped.values())
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    model.train(was_training)
    n = max(counts[0].item(), 1.0)
    return {"top1": 100.0 * counts[1].item() / n, "top5": 100.0 * counts[2].item() / n,
            "samples": int(counts[0].item()), "skipped": int(counts[3].item())}


def _classifier_from(cfg, weights: dict, kind: str, source: str):
    from ..config.validate import encoder_spec
    from ..models.classifier import build_classifier

    if "head.weight" not in weights:
        raise ValueError(f"{source} holds no classifier ({kind} weights without head.weight): evaluate a "
                         f"fine-tuning checkpoint (mirl-ds finetune), not a pre-training one")
    model = build_classifier(encoder_spec(cfg), weights["head.weight"].shape[0],
                             global_pool=cfg.finetune.global_pool)
    model.load_state_dict(weights)
    return model


def evaluate_checkpoint(path: str, val_manifest: str | None = None, batch_size: int | None = None,
                        out: str | None = None) -> dict:
    """``mirl-ds eval``: top-1/top-5 of a fine-tuning checkpoint's raw and EMA weights (a DeepSpeed
    checkpoint folder, or a ``best_*.pt`` file), written as JSON to ``out`` (default
    ``<run_dir>/eval.json`` of the run's config)."""
    import json
    import os
    from pathlib import Path

    from ..config.loader import config_from_text
    from .weights import read_weights, resolve_tag_folder, stored_state

    if Path(path).is_file():
        obj = torch.load(path, map_location="cpu", weights_only=False)
        text, candidates = obj.get("config"), {"raw": obj["model"]}
    else:
        state = stored_state(resolve_tag_folder(path))
        text, (raw, _) = state["config"], read_weights(path)
        candidates = {"raw": raw, **({"ema": state["ema"]} if state.get("ema") else {})}
    if not text:
        raise ValueError(f"{path} keeps no run config; evaluate a checkpoint written by mirl-ds finetune")
    cfg = config_from_text(text)
    if batch_size:
        cfg.data.micro_batch_size = batch_size
    val = val_manifest or cfg.finetune.val_shards
    if not val:
        raise ValueError("no validation shards: pass --val <manifest> (mirl-ds shard … --split val)")
    results = {"checkpoint": str(path), "val_shards": val}
    for kind, weights in candidates.items():
        model = _classifier_from(cfg, {k: v.float() for k, v in weights.items()}, kind, path)
        results[kind] = evaluate(model, eval_stream(cfg, val))
    out = out or os.path.join(cfg.logging.run_dir, "eval.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    results["written"] = out
    return results
