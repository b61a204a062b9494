"""Fine-tuning: MAE's layer-decay groups, the EMA, the encoder from every checkpoint layout, and
the DeepSpeed fine-tuning run (raw + EMA evaluation, best weights kept, exact resume, eval)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mirl_ds.config import load_config
from mirl_ds.config.validate import encoder_spec
from mirl_ds.models.classifier import build_classifier

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = ["model.preset=vit_test", "objective.segments=2"]


def test_layer_decay_scales_block_i_by_decay_to_depth_minus_i_and_spares_1d_params_weight_decay():
    from mirl_ds.train.optim import build_finetune_optimizer

    cfg = load_config(["demo"], [])
    model = build_classifier(encoder_spec(cfg), 8)
    model.pos_embed.requires_grad_(True)
    decay, depth = 0.65, len(model.blocks)
    opt = build_finetune_optimizer(model, cfg.optim, decay, lr=1.0)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        g = group_of[id(p)]
        if name.startswith("blocks."):
            i = int(name.split(".")[1])
            assert g["lr_scale"] == pytest.approx(decay ** (depth + 1 - (i + 1))), name
        elif name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
            assert g["lr_scale"] == pytest.approx(decay ** (depth + 1)), name     # layer 0
        else:
            assert g["lr_scale"] == pytest.approx(1.0), name                      # norm, fc_norm, head
        assert g["weight_decay"] == (0.0 if p.ndim == 1 or name in ("cls_token", "pos_embed") else 0.05), name


def test_ema_follows_the_raw_weights_with_the_configured_decay():
    from mirl_ds.engine.finetune_loop import make_ema

    model = torch.nn.Linear(3, 2)
    ema = make_ema(model, 0.9)
    expected = {}
    for step in range(1, 5):        # as the loop calls it: the number of optimizer steps so far
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        ema.update(model, step=step)
        for k, v in model.state_dict().items():
            # timm's ModelEmaV3: the first update copies, then ema = d * ema + (1 - d) * w
            expected[k] = v.clone() if step == 1 else 0.9 * expected[k] + 0.1 * v
            assert torch.allclose(ema.module.state_dict()[k], expected[k], atol=1e-6)
    assert not torch.allclose(ema.module.weight, model.weight)          # it lags behind
    assert make_ema(model, 0.0) is None


# -- real DeepSpeed runs -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    """A small synthetic set (4 classes, 32 px) as train and val shards."""
    from mirl_ds.data.sharding import shard_dataset
    from mirl_ds.data.synthetic import SyntheticSpec, generate_synthetic_imagefolder

    root = tmp_path_factory.mktemp("ft_data")
    generate_synthetic_imagefolder(root / "synthetic", SyntheticSpec(num_classes=4, train_per_class=16,
                                                                     val_per_class=8, image_size=32, seed=0))
    out = {}
    for split in ("train", "val"):
        shard_dataset(root / "synthetic", root / "shards", source_kind="synthetic", split=split, prefix=split,
                      max_count=32, progress=False)
        out[split] = str(root / "shards" / f"{split}.manifest.json")
    return out


def deepspeed(module: str, tmp: Path, ranks: int, ds_config: Path, *args: str) -> str:
    from mirl_ds.engine.launch import deepspeed_executable, free_port, remove_shm_buffers

    port = free_port()
    cmd = [deepspeed_executable(), "--num_gpus", str(ranks), "--master_port", str(port),
           "--module", module, "--deepspeed_config", str(ds_config), *args]
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
                             capture_output=True, text=True, timeout=600)
    finally:
        remove_shm_buffers(port)          # DeepSpeed's CPU all-reduce buffers, 66 MB a rank
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return out.stdout + out.stderr


def zero_json(tmp: Path, stage: int) -> Path:
    path = tmp / f"zero{stage}.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                "train_batch_size": "auto", "zero_optimization": {"stage": stage},
                                "bf16": {"enabled": False}}))
    return path


def classifier_from(src, cfg):
    from mirl_ds.engine.init_encoder import init_classifier

    torch.manual_seed(0)
    model = build_classifier(encoder_spec(cfg), 4)
    return model.state_dict(), init_classifier(model, src)


def assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (what, k)


def test_encoder_is_the_same_from_pipeline_universal_mae_format_and_zero3_checkpoints(shards, tmp_path):
    from mirl_ds.engine.universal import convert
    from mirl_ds.engine.weights import read_weights

    cfg = load_config(["demo"], TINY)
    common = ["--config", "demo", "data.source=shards", f"data.shards={shards['train']}", *TINY,
              "optim.max_steps=2", "checkpoint.save_every=100"]
    # A 2-stage pipeline, its universal form, and MAE's format (timm names at the top level
    # beside the decoder's) all give the same encoder.
    deepspeed("mirl_ds.pretrain", tmp_path, 2, zero_json(tmp_path, 1), *common, "parallel.pipeline_stages=2",
              "data.micro_batch_size=4", f"checkpoint.dir={tmp_path / 'pp2'}", f"logging.run_dir={tmp_path / 'r1'}")
    weights, _ = read_weights(tmp_path / "pp2")
    torch.save({"model": {k.removeprefix("encoder."): v for k, v in weights.items()}}, tmp_path / "mae.pth")
    piped, report = classifier_from(tmp_path / "pp2", cfg)
    for src, layout in ((convert(str(tmp_path / "pp2")), "universal"), (tmp_path / "mae.pth", "file")):
        other, other_report = classifier_from(src, cfg)
        assert other_report.layout == layout
        assert_same(piped, other, layout)
    # The report is exact: every encoder tensor loaded, the head fresh, the pre-training parts dropped.
    assert report.layout == "pipeline"
    assert set(report.missing) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert set(report.unused) == {"norm.weight", "norm.bias"}          # avg pooling: timm's norm is Identity
    assert set(report.loaded) == set(piped) - set(report.missing)
    assert report.dropped and not any(k.startswith("encoder.") for k in report.dropped)
    assert any(k.startswith("decoders.") for k in report.dropped)

    # ZeRO-3 shards of two data-parallel ranks, and their universal form.
    deepspeed("mirl_ds.pretrain", tmp_path, 2, zero_json(tmp_path, 3), *common, "data.micro_batch_size=2",
              f"checkpoint.dir={tmp_path / 'z3'}", f"logging.run_dir={tmp_path / 'r2'}")
    sharded, z3_report = classifier_from(tmp_path / "z3", cfg)
    assert z3_report.layout == "zero" and set(z3_report.loaded) == set(report.loaded)
    assert not torch.equal(sharded["blocks.0.attn.qkv.weight"], piped["blocks.0.attn.qkv.weight"])  # trained
    other, _ = classifier_from(convert(str(tmp_path / "z3")), cfg)
    assert_same(sharded, other, "universal from ZeRO-3")


def finetune_args(shards, tmp: Path, *extra: str) -> list[str]:
    return ["--config", "finetune_demo", *TINY, f"data.shards={shards['train']}",
            f"finetune.val_shards={shards['val']}", "finetune.init=null", "data.micro_batch_size=8",
            "optim.max_steps=4", "checkpoint.save_every=2", f"checkpoint.dir={tmp / 'ckpt'}",
            f"logging.run_dir={tmp / 'run'}", "logging.log_every=1", "finetune.eval_every=2", *extra]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "losses.jsonl").read_text().splitlines())}


def test_finetuning_evaluates_raw_and_ema_keeps_the_best_and_resumes_exactly(shards, tmp_path):
    cpu = ROOT / "ds_configs" / "cpu_test.json"
    deepspeed("mirl_ds.finetune", tmp_path, 2, cpu, *finetune_args(shards, tmp_path / "a"))
    run = tmp_path / "a" / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4]
    for m in metrics:
        assert m["raw"]["samples"] == m["ema"]["samples"] == 32 and 0 <= m["raw"]["top1"] <= 100
    assert (run / "best_raw.pt").is_file() and (run / "best_ema.pt").is_file()
    uninterrupted = losses(run)
    assert sorted(uninterrupted) == [1, 2, 3, 4]

    # The same run resumed from its step-2 checkpoint repeats steps 3 and 4 exactly.
    deepspeed("mirl_ds.finetune", tmp_path, 2, cpu,
              *finetune_args(shards, tmp_path / "b", f"checkpoint.resume={tmp_path / 'a' / 'ckpt' / 'global_step2'}"))
    resumed = losses(tmp_path / "b" / "run")
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == uninterrupted[step]

    # mirl-ds eval of the final checkpoint gives the run's own last evaluation.
    out = subprocess.run([str(BIN / "mirl-ds"), "eval", str(tmp_path / "a" / "ckpt"), "--out",
                          str(tmp_path / "eval.json")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["raw"]["top1"] == pytest.approx(metrics[-1]["raw"]["top1"])
    assert evaluated["ema"]["top1"] == pytest.approx(metrics[-1]["ema"]["top1"])


def test_finetuning_trains_in_bf16_with_zero3_and_keeps_whole_best_weights(shards, tmp_path):
    deepspeed("mirl_ds.finetune", tmp_path, 2, ROOT / "ds_configs" / "zero3_bf16.json",
              *finetune_args(shards, tmp_path, "optim.max_steps=2", "finetune.ema_decay=0"))
    assert sorted(losses(tmp_path / "run")) == [1, 2]
    best = torch.load(tmp_path / "run" / "best_raw.pt", weights_only=False)["model"]
    model = build_classifier(encoder_spec(load_config(["demo"], TINY)), 4)
    model.load_state_dict(best)          # whole tensors, gathered from the ZeRO-3 shards
    assert not (tmp_path / "run" / "best_ema.pt").exists()
