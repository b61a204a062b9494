"""The CPU demo (2 DeepSpeed ranks as 2 pipeline stages) and its reconstruction picture."""
import json
import subprocess
import sys

import torch
from PIL import Image

from mirl_ds.build import build_pretrain_model
from mirl_ds.config import load_config
from mirl_ds.demo import run_demo
from mirl_ds.models.patches import patchify
from mirl_ds.viz.reconstruction import quintuplet


def tiny_demo_overrides(tmp_path, steps):
    return ["model.preset=vit_test", "objective.segments=2", f"optim.max_steps={steps}",
            f"data.root={tmp_path}/data", f"logging.run_dir={tmp_path}/run", "logging.log_every=5",
            "data.synthetic.train_per_class=16", "data.synthetic.val_per_class=2",
            "data.synthetic.image_size=32", "data.micro_batch_size=16"]


def test_demo_pretrains_as_two_pipeline_stages_then_finetunes_from_it_and_from_scratch(tmp_path, capsys):
    cfg = load_config(["demo"], tiny_demo_overrides(tmp_path, 40) + [f"checkpoint.dir={tmp_path}/run/ckpt"])
    result = run_demo(cfg, ranks=2, finetune_overrides=["optim.max_steps=4", "data.micro_batch_size=16"])
    assert result["steps"] == 40 and result["last_loss"] < 0.9 * result["first_loss"]
    picture = Image.open(result["picture"])
    assert picture.size[0] > 5 * 32  # five columns
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file() and (run / "deepspeed.log").is_file()
    assert "pipeline_stages: 2" in (run / "config.yaml").read_text()
    assert (run / "ckpt" / "global_step40" / "layer_03-model_states.pt").is_file()   # 2 segments, 4 layers
    # The saved plain-model weights are the pipeline checkpoint's, renamed.
    saved = torch.load(run / "pretrain_model.pt", weights_only=False)["model"]
    last_layer = torch.load(run / "ckpt" / "global_step40" / "layer_03-model_states.pt", weights_only=True)
    assert torch.equal(saved["decoders.1.pred.bias"], last_layer["decoder.pred.bias"])

    # Fine-tuning twice on the same data, seed and budget: from the pipeline checkpoint (every
    # encoder tensor loaded) and from random initialisation, evaluated on every val image.
    comparison = result["finetune"]
    assert comparison == json.loads((run / "finetune" / "comparison.json").read_text())
    assert comparison["steps"] == 4 and comparison["val_images"] == 8 * 2
    report = json.loads((run / "finetune" / "pretrained" / "init_report.json").read_text())
    encoder = [k for k in saved if k.startswith("encoder.")]
    assert report["layout"] == "pipeline" and report["missing"] == ["fc_norm.weight", "fc_norm.bias", "head.weight",
                                                                     "head.bias"]
    assert len(report["loaded"]) + len(report["unused"]) == len(encoder)    # unused: the encoder's norm
    assert not (run / "finetune" / "scratch" / "init_report.json").exists()
    for label in ("pretrained", "scratch"):
        last = comparison[label]["last"]
        assert last["step"] == 4 and last["raw"]["samples"] == last["ema"]["samples"] == 16
        config = (run / "finetune" / label / "config.yaml").read_text()
        assert "preset: vit_test" in config and "seed: 0" in config
    printed = capsys.readouterr().out
    assert "from MIRL pre-training" in printed and "from random initialisation" in printed


def test_quintuplet_pastes_visible_patches_and_splits_main_and_residual():
    torch.manual_seed(0)
    cfg = load_config(None, ["model.preset=vit_tiny_deep"])
    model = build_pretrain_model(cfg)
    imgs = torch.randn(2, 3, 32, 32)
    out = model(imgs, generator=torch.Generator().manual_seed(0))
    original, masked, recon, residual, main = quintuplet(imgs, out, model.patch)
    visible = (1 - out.batch.mask).bool()
    p = model.patch
    assert torch.equal(patchify(recon, p)[visible], patchify(imgs, p)[visible])
    assert torch.all(patchify(masked, p)[~visible] == 0)
    # At masked patches the reconstruction is the main component plus the residual (in pixels).
    raw = patchify(imgs, p)
    std = (raw.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
    expected = patchify(main, p) + patchify(residual, p)
    assert torch.allclose(patchify(recon, p)[~visible], expected[~visible], atol=1e-5)
    assert torch.allclose(patchify(residual, p), out.preds[-1].detach() * std, atol=1e-5)


def test_demo_command_reports_bad_override_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mirl_ds", "demo", "objective.segments=3"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "objective.segments=3 is odd" in result.stderr and "Traceback" not in result.stderr


def test_bad_finetuning_override_is_refused_before_pretraining(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mirl_ds", "demo", f"logging.run_dir={tmp_path}/run",
                             "--finetune-set", "finetune.auto_augment=none"], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "finetune.auto_augment='none' is not a timm augmentation policy" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "losses.jsonl").exists()


def test_non_finite_loss_stops_the_demo_with_one_sentence(tmp_path):
    overrides = tiny_demo_overrides(tmp_path, 3) + ["optim.lr=1e30", "optim.warmup_epochs=0"]
    result = subprocess.run([sys.executable, "-m", "mirl_ds", "demo", *overrides],
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "pre-training stopped: the loss is" in result.stderr and "lower optim.lr" in result.stderr
    assert "Traceback" not in result.stderr
