"""`mirl-ds probe`: linear and non-linear probes on a frozen encoder, with cached features."""
import json

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from mirl_ds.build import build_pretrain_model
from mirl_ds.cli import main
from mirl_ds.config import dump_config, load_config
from mirl_ds.data.sharding import shard_dataset
from mirl_ds.data.synthetic import SyntheticSpec, generate_synthetic_imagefolder
from mirl_ds.engine.init_encoder import read_encoder
from mirl_ds.probe import build_probe, run_probe

TRAIN, VAL, CLASSES = 4 * 16, 4 * 8, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny pre-trained checkpoint (as `mirl-ds demo` saves it) and 4-class synthetic shards."""
    root = tmp_path_factory.mktemp("probe")
    cfg = load_config(["demo"], ["model.preset=vit_test", "objective.segments=2"])
    torch.manual_seed(0)
    model = build_pretrain_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):   # a few steps, so the encoder is not its initialisation
        loss = model(torch.randn(4, 3, 32, 32)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = root / "pretrain_model.pt"
    torch.save({"model": model.state_dict(), "config": dump_config(cfg)}, ckpt)
    spec = SyntheticSpec(num_classes=CLASSES, train_per_class=16, val_per_class=8, image_size=32)
    generate_synthetic_imagefolder(root / "synthetic", spec)
    for split in ("train", "val"):
        shard_dataset(root / "synthetic", root / "shards", source_kind="synthetic", split=split,
                      prefix=split, max_count=20, progress=False)
    return {"ckpt": str(ckpt), "train": str(root / "shards" / "train.manifest.json"),
            "val": str(root / "shards" / "val.manifest.json"), "root": root}


@pytest.fixture
def encoder_calls(monkeypatch):
    """Images passed through any ViT's forward_features (the frozen encoder's only entry)."""
    seen = {"images": 0}
    original = VisionTransformer.forward_features

    def counting(self, x):
        seen["images"] += len(x)
        return original(self, x)

    monkeypatch.setattr(VisionTransformer, "forward_features", counting)
    return seen


def fresh_probe(setup, kind, **kw):
    """The probe exactly as run_probe builds it before training (same seed, same checkpoint)."""
    torch.manual_seed(0)
    return build_probe(setup["ckpt"], kind, CLASSES, **kw)[0]


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert not changed, f"changed: {changed}"


def test_linear_probe_keeps_the_encoder_bit_identical_and_encodes_each_image_once(
        setup, encoder_calls, tmp_path):
    epochs = 4
    result = run_probe(setup["ckpt"], setup["train"], setup["val"], "linear", epochs=epochs,
                       warmup_epochs=1, batch_size=16, lr=1.0, out_dir=tmp_path)
    probe, before = result["model"], fresh_probe(setup, "linear")

    assert_same_tensors(before.encoder.state_dict(), probe.encoder.state_dict())
    pretrained, _, _ = read_encoder(setup["ckpt"])
    assert torch.equal(probe.encoder.blocks[3].attn.qkv.weight, pretrained["blocks.3.attn.qkv.weight"])
    assert not any(p.requires_grad for p in probe.encoder.parameters())
    assert not torch.equal(before.head[1].weight, probe.head[1].weight)   # the head did train
    # Cached: every image went through the encoder once, not once per epoch.
    assert encoder_calls["images"] == result["encoder_images"] == TRAIN + VAL
    assert result["cache"]["train"]["shape"] == [TRAIN, 32] and result["cache"]["train"]["storage"] == "memory"

    written = json.loads((tmp_path / "probe.json").read_text())
    assert written["kind"] == "linear" and written["encoder_unchanged"] is True
    assert [row["epoch"] for row in written["epochs"]] == list(range(1, epochs + 1))
    assert all(0 <= row["val_top1"] <= row["val_top5"] <= 100 for row in written["epochs"])
    assert written["val_images"] == VAL and written["best"]["val_top1"] >= written["top1"]
    assert "52 tensors loaded" in written["init"] and written["settings"]["optimizer"] == "lars"
    assert written["epochs"][-1]["train_loss"] < written["epochs"][0]["train_loss"]
    assert (tmp_path / "probe_head.pt").exists() and not (tmp_path / "feature_cache").exists()


def test_nonlinear_probe_trains_its_block_on_cached_tokens_with_the_encoder_unchanged(
        setup, encoder_calls, tmp_path):
    result = run_probe(setup["ckpt"], setup["train"], setup["val"], "nonlinear", num_blocks=1,
                       epochs=3, warmup_epochs=1, batch_size=16, lr=1e-3, out_dir=tmp_path,
                       cache_max_memory=0)    # force the on-disk memory-mapped token cache
    probe, before = result["model"], fresh_probe(setup, "nonlinear", num_blocks=1)

    assert_same_tensors(before.encoder.state_dict(), probe.encoder.state_dict())
    assert len(probe.blocks) == 1
    assert not torch.equal(before.blocks[0].attn.qkv.weight, probe.blocks[0].attn.qkv.weight)
    assert encoder_calls["images"] == TRAIN + VAL
    tokens = result["cache"]["train"]
    assert tokens["shape"] == [TRAIN, 1 + 16, 32] and tokens["storage"] == "disk"
    assert not (tmp_path / "feature_cache").exists()    # the memory map is removed afterwards
    losses = [row["train_loss"] for row in result["epochs"]]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert result["settings"]["optimizer"] == "adamw" and result["settings"]["num_blocks"] == 1


def test_augmented_probe_recomputes_training_features_every_epoch(setup, encoder_calls, tmp_path):
    epochs, batch = 2, 16
    result = run_probe(setup["ckpt"], setup["train"], setup["val"], "linear", epochs=epochs,
                       warmup_epochs=0, batch_size=batch, augment=True, out_dir=tmp_path)
    probe = result["model"]

    assert_same_tensors(fresh_probe(setup, "linear").encoder.state_dict(), probe.encoder.state_dict())
    assert result["cache"]["train"] is None
    # The training images are encoded every epoch; the (un-augmented) val features once.
    assert encoder_calls["images"] == result["encoder_images"] == epochs * TRAIN + VAL
    assert len(result["epochs"]) == epochs


def test_cli_probe_runs_and_writes_its_report(setup, tmp_path, capsys):
    rc = main(["probe", setup["ckpt"], "--train", setup["train"], "--val", setup["val"],
               "--kind", "linear", "--epochs", "1", "--batch", "16", "--out", str(tmp_path)])
    assert rc == 0
    assert "linear probe: top-1" in capsys.readouterr().out
    assert json.loads((tmp_path / "probe.json").read_text())["settings"]["epochs"] == 1


def _no_encoder_checkpoint(setup):
    path = setup["root"] / "no_encoder.pt"
    cfg = load_config(["demo"], ["model.preset=vit_test", "objective.segments=2"])
    torch.save({"model": {"decoder_pred.weight": torch.zeros(4, 4)}, "config": dump_config(cfg)}, path)
    return str(path)


@pytest.mark.parametrize("bad", ["missing_manifest", "no_encoder"])
def test_cli_probe_bad_input_is_one_sentence_and_exit_2(setup, tmp_path, capsys, bad):
    ckpt, train = setup["ckpt"], setup["train"]
    if bad == "missing_manifest":
        train = str(tmp_path / "nowhere.manifest.json")
    else:
        ckpt = _no_encoder_checkpoint(setup)
    rc = main(["probe", ckpt, "--train", train, "--val", setup["val"], "--epochs", "1",
               "--batch", "16", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert ("nowhere.manifest.json" in err[0]) if bad == "missing_manifest" else ("no encoder" in err[0])
