"""Frozen-VGG perceptual loss for pixel reconstructions (MIRL supplementary).

The VGG is built with timm (``features_only=True``: the tapped activations are the
ReLU outputs just before each max-pool, i.e. relu1_2, relu2_2, relu3_3, relu4_3,
relu5_3 for vgg16 at feature indices 0..4).  Weights are loaded only from a file
the user names; nothing is ever downloaded.  Inputs are ImageNet-normalised
images, which is what torchvision's (and timm's) VGG weights expect.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

import timm
import torch
import torch.nn as nn

__all__ = ["VGGPerceptualLoss", "paste_visible", "load_vgg_state_dict"]

# conv weight/bias (and, for the *_bn variants, BatchNorm weight/bias/running stats)
_FEATURE_KEY = re.compile(r"^features[._](\d+)\.([A-Za-z_]+)$")
_PREFIXES = ("module.", "model.", "vgg.", "backbone.")


def _missing_file_message(path: str) -> str:
    return (
        f"objective.perceptual.weights_path={path} does not exist: download VGG weights "
        "(e.g. torchvision's vgg16 state dict) to that path or turn the perceptual loss off"
    )


def _unwrap(obj: object, path: str) -> Mapping[str, torch.Tensor]:
    """Accept a plain state dict, {'state_dict': ...} or {'model': ...}."""
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                return inner
            if isinstance(inner, nn.Module):
                return inner.state_dict()
        return obj
    raise ValueError(
        f"objective.perceptual.weights_path={path} holds a {type(obj).__name__}, not a state dict: "
        "save a VGG state dict (torch.save(model.state_dict(), path)) to that path"
    )


def _feature_tensors(sd: Mapping[str, torch.Tensor]) -> dict[tuple[int, str], torch.Tensor]:
    """Map (layer index, tensor name) -> tensor for every ``features.{i}.*`` key.

    Both timm's and torchvision's VGG name the convolutions ``features.{i}``;
    timm's features_only wrapper names them ``features_{i}``; a ``module.`` (DDP)
    style prefix is stripped.  Classifier / head / pre_logits keys are ignored.
    """
    out: dict[tuple[int, str], torch.Tensor] = {}
    for key, value in sd.items():
        if not isinstance(key, str) or not torch.is_tensor(value):
            continue
        name = key
        stripped = True
        while stripped:
            stripped = False
            for p in _PREFIXES:
                if name.startswith(p):
                    name = name[len(p):]
                    stripped = True
        m = _FEATURE_KEY.match(name)
        if m:
            out[(int(m.group(1)), m.group(2))] = value
    return out


def load_vgg_state_dict(net: nn.Module, weights_path: str) -> int:
    """Load VGG ``features.*`` tensors from ``weights_path`` into ``net`` (a timm VGG,
    full or features_only); every one of net's ``features`` tensors must be found.
    Returns the number of tensors loaded."""
    path = os.fspath(weights_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(_missing_file_message(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling / IO failure
        raise ValueError(
            f"objective.perceptual.weights_path={path} could not be read by torch.load "
            f"({type(e).__name__}, see the chained error): save a VGG state dict with "
            "torch.save(model.state_dict(), path) to that path"
        ) from e
    source = _feature_tensors(_unwrap(obj, path))

    target = net.state_dict()
    wanted: dict[str, tuple[int, str]] = {}
    for key in target:
        m = _FEATURE_KEY.match(key)
        if m:
            wanted[key] = (int(m.group(1)), m.group(2))
    found = {k: source[idx] for k, idx in wanted.items() if idx in source}
    if len(found) != len(wanted):
        missing = sorted(k for k, idx in wanted.items() if idx not in source)
        raise ValueError(
            f"objective.perceptual.weights_path={path} matches {len(found)} of the "
            f"{len(wanted)} expected VGG features.* conv tensors (missing e.g. "
            f"{', '.join(missing[:3])}): point it at a state dict of the configured VGG "
            "architecture (timm or torchvision naming, features.{i}.weight/bias)"
        )
    bad = [k for k, v in found.items() if tuple(v.shape) != tuple(target[k].shape)]
    if bad:
        k = bad[0]
        raise ValueError(
            f"objective.perceptual.weights_path={path} has {len(bad)} conv tensors of the wrong "
            f"shape (e.g. {k}: {tuple(found[k].shape)} vs expected {tuple(target[k].shape)}): "
            "point it at weights of the configured VGG architecture or change objective.perceptual.arch"
        )
    with torch.no_grad():
        for k, v in found.items():
            target[k].copy_(v.to(dtype=target[k].dtype))
    return len(found)


def _build_vgg_features(arch: str, layers: tuple[int, ...]) -> nn.Module:
    """timm VGG trunk (``features_only``) without paying for a random init: built on
    the meta device and materialised uninitialised, since load_vgg_state_dict then
    overwrites every features.* tensor (the *_bn variants' running stats included)."""
    try:
        net = timm.create_model(arch, pretrained=False, features_only=True, out_indices=layers, device="meta")
        return net.to_empty(device="cpu")
    except TypeError:  # a timm without the device kwarg
        return timm.create_model(arch, pretrained=False, features_only=True, out_indices=layers)


class VGGPerceptualLoss(nn.Module):
    """Sum over the tapped VGG layers of mean((f_l(x) - f_l(x_hat))^2).

    For each layer this is the squared L2 distance of the activations divided by
    C*H*W, averaged over the batch.  The VGG is frozen and always in eval mode.
    """

    def __init__(self, weights_path: str, arch: str = "vgg16", layers: tuple[int, ...] = (1, 2, 3, 4)):
        super().__init__()
        if not str(arch).startswith("vgg"):
            raise ValueError(f"objective.perceptual.arch={arch} is not a timm VGG: use e.g. vgg16 or vgg11")
        self.arch = arch
        self.layers = tuple(int(i) for i in layers)
        if not self.layers:
            raise ValueError("objective.perceptual.layers is empty: list at least one VGG feature index (0..4)")
        path = os.fspath(weights_path)
        # check the file before paying for the model build
        if not os.path.isfile(path):
            raise FileNotFoundError(_missing_file_message(path))
        self.weights_path = path
        self.vgg = _build_vgg_features(arch, self.layers)
        # every features.* tensor is overwritten here (a partial match raises); the
        # trunk was materialised uninitialised, so it must hold nothing else
        unmatched = [k for k in self.vgg.state_dict() if not _FEATURE_KEY.match(k)]
        if unmatched:
            raise RuntimeError(f"timm {arch} trunk has tensors outside features.*: {unmatched[:3]}")
        load_vgg_state_dict(self.vgg, path)
        for p in self.vgg.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "VGGPerceptualLoss":
        # frozen feature extractor: stay in eval mode whatever the parent asks
        return super().train(False)

    def forward(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if x_hat.shape != x.shape:
            raise ValueError(f"x_hat {tuple(x_hat.shape)} and x {tuple(x.shape)} must have the same shape")
        with torch.no_grad():
            target_feats = self.vgg(x.detach())
        pred_feats = self.vgg(x_hat)
        loss = x_hat.new_zeros((), dtype=torch.float32)
        for fp, ft in zip(pred_feats, target_feats):
            loss = loss + (fp.float() - ft.float()).pow(2).mean()
        return loss


def paste_visible(pred_img: torch.Tensor, img: torch.Tensor, mask_img: torch.Tensor) -> torch.Tensor:
    """Replace the reconstruction at visible pixels with the ground truth.

    ``mask_img`` is [N,1,H,W] (broadcast over channels), 1 on masked pixels and 0
    on visible ones: returns ``pred_img * mask + img * (1 - mask)``.
    """
    mask = mask_img.to(dtype=pred_img.dtype)
    return pred_img * mask + img * (1 - mask)
