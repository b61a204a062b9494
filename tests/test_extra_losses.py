"""Perceptual (frozen VGG) loss, visible-patch pasting, feature-level InfoNCE and
the masked-feature predictor (MIRL supplementary)."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from mirl_ds.models.feature_loss import FeaturePredictor, info_nce_masked
from mirl_ds.models.perceptual_loss import VGGPerceptualLoss, paste_visible

VGG11_CONVS = (0, 3, 6, 8, 11, 13, 16, 18)  # features.{i} conv indices of vgg11


# --------------------------------------------------------------------------- helpers
def _timm_vgg11_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A randomly initialised timm vgg11's full state dict (features + pre_logits +
    head).  mlp_ratio shrinks the 7x7 pre_logits conv so the file stays small."""
    torch.manual_seed(seed)
    model = timm.create_model("vgg11", pretrained=False, num_classes=10, mlp_ratio=1 / 512)
    return model.state_dict()


def _torchvision_vgg11_state_dict(seed: int = 1) -> dict[str, torch.Tensor]:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(seed)
    with torch.device("meta"):  # skip the slow init of the 25088x4096 classifier
        model = torchvision.models.vgg11(weights=None)
    # keep the classifier.* key names (they must be ignored) but make them tiny
    model.classifier = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Dropout(), nn.Linear(4, 4), nn.ReLU(),
                                     nn.Dropout(), nn.Linear(4, 10))
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model.state_dict()


@pytest.fixture(scope="module")
def timm_sd() -> dict[str, torch.Tensor]:
    return _timm_vgg11_state_dict()


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory, timm_sd) -> str:
    path = tmp_path_factory.mktemp("vgg") / "vgg11_timm.pth"
    torch.save(timm_sd, path)
    return str(path)


def _images(seed: int, n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g)


def _features_of(loss: VGGPerceptualLoss) -> dict[str, torch.Tensor]:
    """loss.vgg's tensors renamed to the features.{i}.* naming of a saved file."""
    return {k.replace("features_", "features.", 1): v for k, v in loss.vgg.state_dict().items()}


# --------------------------------------------------------------------------- perceptual: weight loading
def test_perceptual_missing_weights_file_raises_file_not_found_naming_path(tmp_path):
    path = tmp_path / "nowhere" / "vgg16.pth"
    with pytest.raises(FileNotFoundError) as ei:
        VGGPerceptualLoss(str(path), arch="vgg11")
    msg = str(ei.value)
    assert str(path) in msg
    assert "objective.perceptual.weights_path" in msg


def test_perceptual_file_without_conv_weights_raises_value_error(tmp_path):
    path = tmp_path / "not_vgg.pth"
    torch.save({"classifier.0.weight": torch.randn(4, 4), "head.fc.bias": torch.randn(4)}, path)
    with pytest.raises(ValueError) as ei:
        VGGPerceptualLoss(str(path), arch="vgg11")
    msg = str(ei.value)
    assert str(path) in msg
    assert "0 of the 16" in msg  # 8 convs x (weight, bias) expected, none found


def test_perceptual_unreadable_file_raises_value_error(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a torch checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        VGGPerceptualLoss(str(path), arch="vgg11")


def test_perceptual_wrong_architecture_weights_raise_value_error(tmp_path, timm_sd):
    path = tmp_path / "vgg11.pth"
    torch.save(timm_sd, path)
    with pytest.raises(ValueError) as ei:  # vgg13 has convs at indices vgg11 lacks
        VGGPerceptualLoss(str(path), arch="vgg13")
    assert str(path) in str(ei.value)


def test_perceptual_loads_timm_state_dict_exactly(timm_weights, timm_sd):
    loss = VGGPerceptualLoss(timm_weights, arch="vgg11", layers=(0, 1, 2, 3, 4))
    loaded = _features_of(loss)
    assert set(loaded) == {f"features.{i}.{t}" for i in VGG11_CONVS for t in ("weight", "bias")}
    for k, v in loaded.items():
        assert torch.equal(v, timm_sd[k]), k
    # a differently seeded model must not compare equal (the check can fail)
    other = _timm_vgg11_state_dict(seed=123)
    assert not torch.equal(loaded["features.0.weight"], other["features.0.weight"])


@pytest.mark.parametrize("wrap", ["state_dict", "model", "module_prefix"])
def test_perceptual_loads_wrapped_checkpoints(tmp_path, timm_sd, wrap):
    if wrap == "module_prefix":
        obj = {f"module.{k}": v for k, v in timm_sd.items()}
    else:
        obj = {wrap: timm_sd, "epoch": 3}
    path = tmp_path / f"{wrap}.pth"
    torch.save(obj, path)
    loss = VGGPerceptualLoss(str(path), arch="vgg11", layers=(0, 1))
    assert torch.equal(_features_of(loss)["features.3.weight"], timm_sd["features.3.weight"])


def test_perceptual_loads_torchvision_state_dict(tmp_path):
    sd = _torchvision_vgg11_state_dict()
    assert any(k.startswith("classifier.") for k in sd)
    path = tmp_path / "vgg11_tv.pth"
    torch.save(sd, path)
    loss = VGGPerceptualLoss(str(path), arch="vgg11")
    loaded = _features_of(loss)
    for i in VGG11_CONVS:
        assert torch.equal(loaded[f"features.{i}.weight"], sd[f"features.{i}.weight"])
        assert torch.equal(loaded[f"features.{i}.bias"], sd[f"features.{i}.bias"])


# --------------------------------------------------------------------------- perceptual: loss behaviour
def test_perceptual_loss_zero_for_identical_and_positive_otherwise(timm_weights):
    loss = VGGPerceptualLoss(timm_weights, arch="vgg11")
    x = _images(0)
    same = loss(x.clone(), x)
    assert same.dim() == 0
    assert same.item() == pytest.approx(0.0, abs=1e-12)
    assert loss(_images(1), x).item() > 0


def test_perceptual_gradient_reaches_x_hat_but_vgg_frozen_and_eval(timm_weights):
    loss = VGGPerceptualLoss(timm_weights, arch="vgg11")
    parent = nn.ModuleDict({"proj": nn.Linear(2, 2), "perc": loss})
    parent.train()  # a training loop switching its whole model to train mode
    assert parent["proj"].training
    assert not any(m.training for m in loss.modules())
    x = _images(0)
    x_hat = (x + 0.5 * _images(1)).requires_grad_(True)
    loss(x_hat, x).backward()
    assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0
    for name, p in loss.named_parameters():
        assert not p.requires_grad, name
        assert p.grad is None, name


def test_perceptual_loss_equals_hand_computation(timm_weights, timm_sd):
    # feature indices 0 and 1 of vgg11: relu(conv0(x)) and relu(conv3(maxpool(.)))
    loss = VGGPerceptualLoss(timm_weights, arch="vgg11", layers=(0, 1))
    x, x_hat = _images(0, n=3), _images(5, n=3)

    def feats(z):
        f0 = F.relu(F.conv2d(z, timm_sd["features.0.weight"], timm_sd["features.0.bias"], padding=1))
        f1 = F.relu(F.conv2d(F.max_pool2d(f0, 2), timm_sd["features.3.weight"], timm_sd["features.3.bias"],
                             padding=1))
        return f0, f1

    expected = 0.0
    for a, b in zip(feats(x), feats(x_hat)):
        n, c, h, w = a.shape
        # squared L2 per image divided by C*H*W, averaged over the batch
        expected += sum(((a[i] - b[i]) ** 2).sum() / (c * h * w) for i in range(n)) / n
    assert loss(x_hat, x).item() == pytest.approx(float(expected), rel=1e-5)


def test_paste_visible_keeps_visible_pixels_exactly():
    g = torch.Generator().manual_seed(0)
    pred, img = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    mask = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    out = paste_visible(pred, img, mask)
    vis = (mask == 0).expand_as(img)
    assert vis.any() and (~vis).any()
    assert torch.equal(out[vis], img[vis])
    assert torch.equal(out[~vis], pred[~vis])


# --------------------------------------------------------------------------- InfoNCE
def _info_nce_reference(pred, target, weights, temperature):
    n, l, _ = pred.shape
    num, den = 0.0, 0.0
    for i in range(l):
        for a in range(n):
            logits = torch.stack([F.cosine_similarity(pred[a, i], target[m, i], dim=0) for m in range(n)])
            ce = F.cross_entropy((logits / temperature)[None], torch.tensor([a]))
            num += weights[a, i] * ce
            den += weights[a, i]
    return num / den


def test_info_nce_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 5, 8, generator=g), torch.randn(4, 5, 8, generator=g)
    weights = (torch.rand(4, 5, generator=g) > 0.4).float()
    weights[0, 0] = 1.0
    for t in (0.2, 1.0):
        got = info_nce_masked(pred, target, weights, temperature=t)
        ref = _info_nce_reference(pred, target, weights, t)
        assert got.item() == pytest.approx(ref.item(), rel=1e-5)


def test_info_nce_perfect_predictor_beats_shuffled():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(8, 6, 16, generator=g)
    weights = torch.ones(8, 6)
    perfect = info_nce_masked(target.clone(), target, weights, temperature=0.05)
    shuffled = info_nce_masked(target.roll(1, dims=0), target, weights, temperature=0.05)
    assert perfect.item() < 0.1 < math.log(8) < shuffled.item()


def test_info_nce_zero_weight_positions_do_not_affect_loss():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 6, 8, generator=g), torch.randn(4, 6, 8, generator=g)
    weights = torch.zeros(4, 6)
    weights[:, :3] = 1.0
    base = info_nce_masked(pred, target, weights)
    perturbed = pred.clone()
    perturbed[:, 3:] += 10 * torch.randn(4, 3, 8, generator=g)
    assert torch.equal(info_nce_masked(perturbed, target, weights), base)
    # ...while perturbing a weighted position does change it
    perturbed[:, 0] += 10 * torch.randn(4, 8, generator=g)
    assert not torch.allclose(info_nce_masked(perturbed, target, weights), base)


def test_info_nce_no_gradient_into_target():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(4, 5, 8, generator=g).requires_grad_(True)
    target = torch.randn(4, 5, 8, generator=g).requires_grad_(True)
    info_nce_masked(pred, target, torch.ones(4, 5)).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert target.grad is None


# --------------------------------------------------------------------------- FeaturePredictor
def test_feature_predictor_shape_and_every_parameter_gets_gradient():
    torch.manual_seed(0)
    head = FeaturePredictor(32, depth=2, num_heads=4)
    assert len(head.blocks) == 2
    x = torch.randn(3, 7, 32)
    out = head(x)
    assert out.shape == (3, 7, 32)
    (out - torch.randn_like(out)).pow(2).mean().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
