"""The CPU demo is the real thing, small: the synthetic images are sharded like ImageNet, a tiny
MIRL ViT pre-trains under DeepSpeed with 2 CPU ranks as 2 pipeline stages (segments 0–1 on rank
0, 2–3 on rank 1), checkpoints, and the reconstruction quintuplet is drawn from the checkpoint.

1. ``cfg.data.root``: the synthetic ImageFolder set (generated once), sharded into
   ``<root>-shards/`` with ``mirl-ds shard``'s code (resumable, so a re-run reuses them).
2. ``deepspeed --num_gpus <ranks> --module mirl_ds.pretrain …`` — the command ``mirl-ds launch``
   builds — on ``ds_configs/cpu_test.json`` with ``parallel.pipeline_stages=<ranks>``.  Each run
   starts afresh (``checkpoint.resume=none``, old checkpoints of the run folder removed).  Rank
   0's progress lines are shown; DeepSpeed's full output goes to ``<run_dir>/deepspeed.log``.
3. The newest checkpoint's weights, read across the pipeline's layer files
   (:func:`mirl_ds.engine.weights.read_weights`), go into the plain model, which draws
   ``<run_dir>/reconstructions.png`` and is saved as ``<run_dir>/pretrain_model.pt``.
4. Fine-tuning twice with the same recipe, data, seed and steps (``finetune_demo``:
   ``deepspeed --module mirl_ds.finetune`` on the same ranks, data-parallel): once from the
   pre-training checkpoint, once from random initialisation; both are evaluated on the held-out
   val shards (raw and EMA weights) and printed side by side
   (``<run_dir>/finetune/comparison.json``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from .build import build_pretrain_model, pretrain_input_size
from .config import RunConfig, dump_config
from .data.synthetic import generate_synthetic_imagefolder
from .data.transforms import pretrain_transform
from .log import get_logger
from .viz.reconstruction import save_quintuplet_png

log = get_logger()
CPU_DS_CONFIG = Path(__file__).resolve().parents[1] / "ds_configs" / "cpu_test.json"


class DemoFailed(ValueError):
    """Pre-training stopped with an error; the message is the rank's own one sentence."""


def demo_shards(cfg: RunConfig) -> Path:
    """The synthetic images as WebDataset shards, train and val; returns the train manifest
    (``val.manifest.json`` lies beside it)."""
    from .data.sharding import shard_dataset

    root = Path(cfg.data.root)
    generate_synthetic_imagefolder(root, cfg.data.synthetic)
    manifest = demo_manifest(cfg)
    for split in ("train", "val"):
        shard_dataset(root, manifest.parent, source_kind="synthetic", split=split, prefix=split, max_count=64,
                      progress=False)
    return manifest


def demo_manifest(cfg: RunConfig) -> Path:
    """Where the demo's train manifest lies: ``<data.root>-shards/train.manifest.json``."""
    root = Path(cfg.data.root)
    return root.with_name(root.name + "-shards") / "train.manifest.json"


def _deepspeed(module: str, config: Path, overrides: list[str], ranks: int, log_path: Path, what: str) -> None:
    """``deepspeed --num_gpus <ranks> --module <module>`` on the CPU DeepSpeed config, as
    ``mirl-ds launch`` builds it; rank 0's progress lines are shown, the rest goes to ``log_path``."""
    from .engine.launch import build_launch_command, deepspeed_executable, free_port, remove_shm_buffers

    port = free_port()
    cmd = build_launch_command([config], overrides, CPU_DS_CONFIG, num_gpus=ranks, master_port=port,
                               module=module)
    cmd[0] = deepspeed_executable()
    log.info("launching: " + " ".join(cmd))
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // ranks)), PYTHONUNBUFFERED="1")
    errors = []
    try:
        with open(log_path, "w") as full_log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            for line in proc.stdout:
                full_log.write(line)
                if line.startswith("[rank 0]"):
                    print(line, end="", flush=True)
                elif line.startswith("error: "):
                    errors.append(line[len("error: "):].strip())
            proc.wait()
    finally:
        remove_shm_buffers(port)
    if proc.returncode != 0:
        reason = errors[0] if errors else f"the launcher exited with {proc.returncode}"
        raise DemoFailed(f"{what} stopped: {reason} (DeepSpeed's output: {log_path})")


def _launch(cfg: RunConfig, manifest: Path, ranks: int) -> None:
    run_dir = Path(cfg.logging.run_dir)
    overrides = ["data.source=shards", f"data.shards={manifest}", f"parallel.pipeline_stages={ranks}",
                 "checkpoint.resume=none"]
    config = run_dir / "demo_pretrain.yaml"
    config.write_text(dump_config(cfg))
    _deepspeed("mirl_ds.pretrain", config, overrides, ranks, run_dir / "deepspeed.log", "pre-training")


def _loss_summary(run_dir: Path) -> tuple[float, float, int]:
    losses = [json.loads(line)["loss"] for line in (run_dir / "losses.jsonl").read_text().splitlines()]
    window = max(1, min(20, len(losses) // 4))
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    log.info(f"loss fell from {first:.4f} (mean of the first {window} steps) to {last:.4f} "
             f"(mean of the last {window})")
    return first, last, len(losses)


def run_demo(cfg: RunConfig, ranks: int = 2, finetune: bool = True, finetune_overrides=()) -> dict:
    from .engine.weights import read_weights

    run_dir = Path(cfg.logging.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "losses.jsonl").unlink(missing_ok=True)
    ckpt = Path(cfg.checkpoint.dir)
    if ckpt.resolve().is_relative_to(run_dir.resolve()):
        shutil.rmtree(ckpt, ignore_errors=True)          # a fresh demo, not a resumed one
    shutil.rmtree(run_dir / "finetune", ignore_errors=True)
    if finetune:      # a bad fine-tuning override is refused now, not after the pre-training
        _finetune_config(cfg, demo_manifest(cfg), ckpt, run_dir / "finetune", list(finetune_overrides))
    manifest = demo_shards(cfg)
    _launch(cfg, manifest, ranks)
    first, last, steps = _loss_summary(run_dir)

    weights, layout = read_weights(ckpt)
    model = build_pretrain_model(cfg)
    model.load_state_dict(weights)
    torch.save({"model": model.state_dict(), "config": dump_config(cfg)}, run_dir / "pretrain_model.pt")
    log.info(f"read the trained weights from the {layout} checkpoint in {ckpt}")
    picture = None
    if cfg.objective.degradation.kind == "none":  # the quintuplet is drawn for masking alone
        picture = _draw(model, cfg, run_dir / "reconstructions.png")
        log.info(f"wrote {picture} (original | masked | reconstruction | residual | main component)")
    result = {"first_loss": first, "last_loss": last, "steps": steps, "picture": picture and str(picture)}
    if finetune:
        result["finetune"] = compare_finetuning(cfg, manifest, ckpt, ranks, list(finetune_overrides))
    return result


def finetune_overrides_for(cfg: RunConfig, manifest: Path, init: Path | None, run_dir: Path) -> list[str]:
    """``finetune_demo`` on the pre-training's encoder shape, data, normalisation and seed."""
    # The encoder's shape: every model key but the decoder's, which fine-tuning drops.
    model = [f"model.{k}={v}" for k, v in vars(cfg.model).items() if v is not None and not k.startswith("decoder_")]
    val = manifest.with_name("val.manifest.json")
    return model + [f"seed={cfg.seed}", f"data.mean={list(cfg.data.mean)}", f"data.std={list(cfg.data.std)}",
                    "data.source=shards", f"data.shards={manifest}", f"finetune.val_shards={val}",
                    f"finetune.init={init if init is not None else 'null'}", f"logging.run_dir={run_dir}",
                    f"checkpoint.dir={run_dir / 'checkpoints'}", "checkpoint.resume=none"]


def _finetune_config(cfg: RunConfig, manifest: Path, init: Path | None, run_dir: Path, overrides: list[str]):
    """The fine-tuning run config, checked as `mirl-ds finetune` checks it (ConfigError)."""
    from .config import load_config
    from .engine.launch import check_entry_config

    ft_cfg = load_config(["finetune_demo"], finetune_overrides_for(cfg, manifest, init, run_dir) + overrides)
    check_entry_config("mirl_ds.finetune", ft_cfg)
    return ft_cfg


def compare_finetuning(cfg: RunConfig, manifest: Path, ckpt: Path, ranks: int, overrides: list[str]) -> dict:
    """The same fine-tuning from the pre-trained encoder and from random initialisation; the last
    and the best evaluation of each (raw and EMA top-1 on the val shards), printed side by side."""
    root = Path(cfg.logging.run_dir) / "finetune"
    runs = {}
    for label, init in (("pretrained", ckpt), ("scratch", None)):
        run_dir = root / label
        run_dir.mkdir(parents=True, exist_ok=True)
        ft_cfg = _finetune_config(cfg, manifest, init, run_dir, overrides)
        config = run_dir / "demo_finetune.yaml"
        config.write_text(dump_config(ft_cfg))
        _deepspeed("mirl_ds.finetune", config, [], ranks, run_dir / "deepspeed.log", f"fine-tuning ({label})")
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        best = json.loads((run_dir / "best.json").read_text())
        runs[label] = {"last": metrics[-1], "best": best, "run_dir": str(run_dir)}
    comparison = {"steps": runs["pretrained"]["last"]["step"], "val_images": runs["pretrained"]["last"]["raw"]["samples"],
                  **runs}
    (root / "comparison.json").write_text(json.dumps(comparison, indent=1) + "\n")
    print(comparison_table(comparison), flush=True)
    return comparison


def comparison_table(c: dict) -> str:
    def row(name: str, run: dict) -> str:
        last, best = run["last"], run["best"]
        ema = f"{last['ema']['top1']:8.2f}" if "ema" in last else "       -"
        best_ema = f"{best['ema']['top1']:10.2f}" if best.get("ema") else "         -"
        return f"  {name:<26}{last['raw']['top1']:8.2f}{ema}{best['raw']['top1']:10.2f}{best_ema}"

    return "\n".join([
        f"fine-tuned for {c['steps']} steps (same recipe, data and seed), top-1 % on {c['val_images']} val images:",
        f"  {'':<26}{'raw':>8}{'EMA':>8}{'best raw':>10}{'best EMA':>10}",
        row("from MIRL pre-training", c["pretrained"]),
        row("from random initialisation", c["scratch"])])


def demo_loader(cfg: RunConfig) -> DataLoader:
    """The synthetic training images with the pre-training transform (for the picture)."""
    dataset = ImageFolder(str(Path(cfg.data.root) / "train"),
                          transform=pretrain_transform(cfg.data, pretrain_input_size(cfg)))
    return DataLoader(dataset, batch_size=min(8, cfg.data.micro_batch_size), shuffle=True,
                      generator=torch.Generator().manual_seed(cfg.seed))


@torch.no_grad()
def _draw(model, cfg: RunConfig, path: Path) -> Path:
    model.eval()
    imgs, _ = next(iter(demo_loader(cfg)))
    out = model(imgs, generator=torch.Generator().manual_seed(cfg.seed))
    return save_quintuplet_png(path, imgs, out, model.patch, cfg.data.mean, cfg.data.std)
