"""``mirl-ds export``: exported weights load into timm with strict=True and compute what ours do."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

from mirl_ds.build import build_pretrain_model
from mirl_ds.cli import main
from mirl_ds.config import dump_config, load_config
from mirl_ds.config.validate import encoder_spec
from mirl_ds.export import load_exported
from mirl_ds.models.classifier import build_classifier, encoder_weights
from mirl_ds.models.presets import PRESETS


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    """What `mirl-ds demo` writes: the tiny pre-training model and its config text."""
    torch.manual_seed(0)
    cfg = load_config(["demo"], ["model.preset=vit_test", "objective.segments=2"])
    model = build_pretrain_model(cfg).eval()
    path = tmp_path_factory.mktemp("demo") / "pretrain_model.pt"
    torch.save({"model": model.state_dict(), "config": dump_config(cfg)}, path)
    return path, model, cfg


def read_export(out):
    sd = load_file(str(out)) if out.suffix == ".safetensors" else torch.load(out, weights_only=True)
    return sd, json.loads(out.with_name(out.name + ".json").read_text())


def trained_classifier(spec, num_classes, global_pool="avg"):
    """A classifier whose head and norms are not at their initial values (a fresh head is zero)."""
    torch.manual_seed(1)
    clf = build_classifier(spec, num_classes, global_pool=global_pool)
    with torch.no_grad():
        for name, p in clf.named_parameters():
            if name.startswith(("head.", "fc_norm.", "norm.")):
                p.normal_(0, 0.5)
    return clf.eval()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretraining_encoder_loads_into_timm_strictly_with_the_same_features(demo_checkpoint, tmp_path,
                                                                             suffix, capsys):
    path, model, cfg = demo_checkpoint
    out = tmp_path / f"encoder{suffix}"
    assert main(["export", str(path), str(out)]) == 0
    assert "timm.models.vision_transformer.VisionTransformer(" in capsys.readouterr().out
    sd, info = read_export(out)
    assert info["what"] == "encoder" and info["layout"] == "file" and info["num_heads_from"] == "config"
    assert info["timm_arch"] is None      # vit_test is no registered timm model
    assert info["timm_kwargs"]["num_classes"] == 0 and info["timm_kwargs"]["global_pool"] == "token"
    assert not any(k.startswith(("decoder", "mask_token", "segment_norms", "encoder.")) for k in sd)

    vit = VisionTransformer(**info["timm_kwargs"]).eval()
    vit.load_state_dict(sd, strict=True)
    spec = encoder_spec(cfg)
    assert (vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads) == \
        (spec.embed_dim, spec.depth, spec.num_heads)
    x = torch.randn(3, 3, spec.img_size, spec.img_size)
    with torch.no_grad():
        assert torch.equal(vit.forward_features(x), model.encoder.forward_features(x))
        # forward(): the normed cls token, MAE's linear-probe feature.
        assert torch.equal(vit(x), model.encoder.forward_features(x)[:, 0])


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_classifier_export_reproduces_the_logits_in_timm(tmp_path, suffix):
    cfg = load_config(None, ["model.preset=vit_test"])
    clf = trained_classifier(encoder_spec(cfg), num_classes=7)
    src = tmp_path / "finetuned.pt"
    torch.save({"model": clf.state_dict(), "config": dump_config(cfg)}, src)
    out = tmp_path / f"classifier{suffix}"
    assert main(["export", str(src), str(out)]) == 0
    sd, info = read_export(out)
    assert info["what"] == "classifier" and info["source_kind"] == "classifier"
    assert (info["timm_kwargs"]["num_classes"], info["timm_kwargs"]["global_pool"]) == (7, "avg")
    vit = VisionTransformer(**info["timm_kwargs"]).eval()
    vit.load_state_dict(sd, strict=True)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(vit(x), clf(x))
        assert torch.equal(load_exported(out)(x), clf(x))


def test_vit_small_classifier_goes_to_timms_registered_model(tmp_path):
    clf = trained_classifier(PRESETS["vit_small"], num_classes=3)
    src = tmp_path / "vit_small_ft.pth"
    torch.save({"module": clf.state_dict()}, src)          # no config: heads from the width
    out = tmp_path / "vit_small.safetensors"
    assert main(["export", str(src), str(out)]) == 0
    sd, info = read_export(out)
    assert info["timm_arch"] == "vit_small_patch16_224"
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=3, global_pool="avg").eval()
    vit.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(vit(x), clf(x))


def test_checkpoint_without_config_takes_num_heads_from_the_command_line(tmp_path, capsys):
    spec = PRESETS["vit_test"]                            # 32 wide, 2 heads of 16
    clf = trained_classifier(spec, num_classes=4)
    src = tmp_path / "bare.pth"
    torch.save(clf.state_dict(), src)                     # a bare state dict, no config
    assert main(["export", str(src), str(tmp_path / "guess.pth")]) == 0
    assert "--num-heads" in capsys.readouterr().out      # the guess (1 head of 64) is said
    out = tmp_path / "told.pth"
    assert main(["export", str(src), str(out), "--num-heads", "2"]) == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_exported(out)(x), clf(x))


def test_encoder_of_a_classifier_keeps_its_fc_norm_and_avg_pooling(tmp_path):
    cfg = load_config(None, ["model.preset=vit_test"])
    clf = trained_classifier(encoder_spec(cfg), num_classes=5)
    src = tmp_path / "finetuned.pt"
    torch.save({"model": clf.state_dict(), "config": dump_config(cfg)}, src)
    out = tmp_path / "encoder.safetensors"
    assert main(["export", str(src), str(out), "--what", "encoder"]) == 0
    sd, info = read_export(out)
    assert "head.weight" not in sd and "fc_norm.weight" in sd
    vit = VisionTransformer(**info["timm_kwargs"]).eval()
    vit.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(vit(x), clf.forward_head(clf.forward_features(x), pre_logits=True))


def test_mae_format_checkpoint_exports_its_encoder_without_the_decoder(demo_checkpoint, tmp_path):
    path, model, cfg = demo_checkpoint
    mae = {**encoder_weights(model.state_dict()), "decoder_embed.weight": torch.zeros(8, 32),
           "decoder_pred.weight": torch.zeros(192, 8), "mask_token": torch.zeros(1, 1, 8)}
    src = tmp_path / "mae.pth"
    torch.save({"model": mae}, src)
    out = tmp_path / "mae_encoder.pth"
    assert main(["export", str(src), str(out), "--num-heads", "2"]) == 0
    sd, info = read_export(out)
    assert info["source_kind"] == "mae" and set(sd) == set(encoder_weights(model.state_dict()))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_exported(out).forward_features(x), model.encoder.forward_features(x))


@pytest.mark.parametrize("case", ["missing", "suffix", "classifier_of_pretraining", "no_encoder"])
def test_bad_input_is_one_sentence_and_exit_2(demo_checkpoint, tmp_path, capsys, case):
    path = demo_checkpoint[0]
    if case == "no_encoder":
        path = tmp_path / "other.pth"
        torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, path)
    argv = {"missing": [str(tmp_path / "nope"), str(tmp_path / "x.pth")],
            "suffix": [str(path), str(tmp_path / "x.bin")],
            "classifier_of_pretraining": [str(path), str(tmp_path / "x.pth"), "--what", "classifier"],
            "no_encoder": [str(path), str(tmp_path / "x.pth")]}[case]
    assert main(["export", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not (tmp_path / "x.pth").exists()


def test_frozen_pos_embed_absent_from_the_checkpoint_is_regenerated(demo_checkpoint, tmp_path, capsys):
    """A universal checkpoint holds optimizer state only: the frozen sin-cos embedding is missing."""
    path, model, cfg = demo_checkpoint
    sd = {k: v for k, v in model.state_dict().items() if k != "encoder.pos_embed"}
    src = tmp_path / "no_pos_embed.pt"
    torch.save({"model": sd, "config": dump_config(cfg)}, src)
    out = tmp_path / "encoder.pth"
    assert main(["export", str(src), str(out)]) == 0
    assert "regenerated" in capsys.readouterr().out
    exported, info = read_export(out)
    assert info["regenerated"] == ["pos_embed"]
    assert torch.equal(exported["pos_embed"], model.encoder.pos_embed)
