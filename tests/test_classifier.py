"""Classification side: fine-tuning ViT, probes, and weights moved from pre-training by name."""
import pytest
import torch

from mirl_ds.build import build_pretrain_model
from mirl_ds.config import load_config
from mirl_ds.config.validate import encoder_spec
from mirl_ds.models.classifier import (LinearProbe, NonLinearProbe, build_classifier, encoder_weights,
                                       load_weights_by_name)


@pytest.fixture(scope="module")
def pretrained():
    torch.manual_seed(0)
    cfg = load_config(None, ["model.preset=vit_tiny_deep"])
    return cfg, build_pretrain_model(cfg)


def test_pretrained_encoder_moves_into_the_classifier_by_name(pretrained):
    cfg, model = pretrained
    clf = build_classifier(encoder_spec(cfg), num_classes=5)
    report = load_weights_by_name(clf, encoder_weights(model.state_dict()))
    assert torch.equal(clf.blocks[7].mlp.fc1.weight, model.encoder.blocks[7].mlp.fc1.weight)
    # MAE's fine-tuning head: global pool + fresh fc_norm and head; the encoder's norm is unused.
    assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert sorted(report.unused) == ["norm.bias", "norm.weight"]
    assert not any(k.startswith(("decoder", "segment_norms", "mask_token")) for k in report.loaded)


def test_mae_format_checkpoint_loads_the_same_encoder(pretrained):
    cfg, model = pretrained
    mae_format = {"model": {**encoder_weights(model.state_dict()),
                            "decoder_embed.weight": torch.zeros(3, 3), "mask_token": torch.zeros(1, 1, 3)}}
    a, b = build_classifier(encoder_spec(cfg), 5), build_classifier(encoder_spec(cfg), 5)
    load_weights_by_name(a, encoder_weights(model.state_dict()))
    report = load_weights_by_name(b, encoder_weights(mae_format))
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in report.loaded)
    assert "decoder_embed.weight" not in report.unused  # decoders are dropped before loading


def test_truncated_pretraining_leaves_the_deeper_blocks_fresh():
    cfg = load_config(None, ["model.preset=vit_tiny_deep", "objective.pretrain_depth=6"])
    model = build_pretrain_model(cfg)
    assert len(model.encoder.blocks) == 6
    clf = build_classifier(encoder_spec(cfg), 5)
    report = load_weights_by_name(clf, encoder_weights(model.state_dict()))
    assert any(k.startswith("blocks.11.") for k in report.missing)
    assert not any(k.startswith("blocks.5.") for k in report.missing)


def test_checkpoint_of_another_model_shape_is_refused(pretrained):
    _, model = pretrained
    other = build_classifier(encoder_spec(load_config(None, ["model.preset=vit_test"])), 5)
    with pytest.raises(ValueError, match="another model config"):
        load_weights_by_name(other, encoder_weights(model.state_dict()))


def test_linear_probe_trains_only_its_head_and_keeps_the_encoder_frozen(pretrained):
    cfg, model = pretrained
    encoder = build_classifier(encoder_spec(cfg), 0, global_pool="token")
    load_weights_by_name(encoder, encoder_weights(model.state_dict()))
    probe = LinearProbe(encoder, num_classes=4).train()
    before = {k: v.clone() for k, v in probe.encoder.state_dict().items()}
    opt = torch.optim.SGD([p for p in probe.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(probe(torch.randn(8, 3, 32, 32)), torch.arange(8) % 4)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not probe.encoder.training
    assert all(torch.equal(before[k], v) for k, v in probe.encoder.state_dict().items())
    assert not probe.head[0].affine and [n for n, p in probe.named_parameters() if p.requires_grad] == \
        ["head.1.weight", "head.1.bias"]


def test_nonlinear_probe_trains_k_blocks_on_a_frozen_encoder(pretrained):
    cfg, _ = pretrained
    encoder = build_classifier(encoder_spec(cfg), 0, global_pool="token")
    probe = NonLinearProbe(encoder, num_classes=4, num_blocks=2)
    logits = probe(torch.randn(3, 3, 32, 32))
    logits.sum().backward()
    assert logits.shape == (3, 4)
    assert all(p.grad is None for p in probe.encoder.parameters())
    assert all(p.grad is not None for p in probe.blocks.parameters())
