"""What a decoder is asked to reconstruct, and how much each patch counts.

Every objective reduces to ``loss = Σ_{n,i} w[n,i] · err[n,i]`` with ``err`` the per-patch
mean squared error and ``w`` summing to one — MAE's "mean over masked patches" is
``w = mask / mask.sum()``. Keeping the weights explicit lets zoom-in weigh centre and border
differently and lets every objective share one loss routine.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .patches import normalised_patches, patch_mean_std, patchify, unpatchify


@dataclass
class ReconstructionTarget:
    patches: torch.Tensor         # [N, L', p*p*C] target (per-patch normalised or raw)
    weights: torch.Tensor         # [N, L'] non-negative, sums to 1
    patch: int
    view_size: int | None = None  # zoom-in: predictions are resized to the whole view first

    def project(self, pred: torch.Tensor) -> torch.Tensor:
        """Bring a decoder prediction [N, L, p*p*C] onto the target's patch grid."""
        if self.view_size is None:
            return pred
        img = unpatchify(pred, self.patch, channels=pred.shape[-1] // self.patch**2)
        # "area" as in the Beyond Masking code; linear, so resizing a sum of predictions
        # equals the sum of resized predictions (MIRL pairs stay exact).
        img = F.interpolate(img, size=(self.view_size, self.view_size), mode="area")
        return patchify(img, self.patch)

    def error(self, pred: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor:
        """Per-patch MSE [N, L'] of a prediction against ``patches`` (default: the target)."""
        target = self.patches if patches is None else patches
        return (self.project(pred) - target).pow(2).mean(dim=-1)

    def loss(self, pred: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor:
        return (self.error(pred, patches) * self.weights).sum()


def mask_weights(mask: torch.Tensor) -> torch.Tensor:
    """Masked patches count equally; with no masking (ratio 0) every patch counts."""
    w = mask if mask.sum() > 0 else torch.ones_like(mask)
    return w / w.sum()


def plain_target(imgs: torch.Tensor, patch: int, mask: torch.Tensor,
                 normalise: bool) -> ReconstructionTarget:
    t = patchify(imgs, patch)
    return ReconstructionTarget(normalised_patches(t) if normalise else t, mask_weights(mask), patch)


def zoom_in_target(view: torch.Tensor, patch: int, input_size: int, mask: torch.Tensor,
                   normalise: bool, centre_weight: float, border_weight: float) -> ReconstructionTarget:
    """The integrated (m)+(a) objective: the input is the centre of ``view``; the prediction,
    resized to the whole view, is scored on the centre (masked patches only, if masking) with
    ``centre_weight`` and on the outer band with ``border_weight``."""
    n, _, size, _ = view.shape
    grid, margin = size // patch, (size - input_size) // 2 // patch
    t = patchify(view, patch)
    centre = torch.zeros(grid, grid, device=view.device)
    centre[margin:grid - margin, margin:grid - margin] = 1
    centre = centre.flatten().expand(n, -1)                                   # [N, L']
    inner = torch.zeros_like(centre)
    inner[centre.bool()] = (mask if mask.sum() > 0 else torch.ones_like(mask)).flatten()
    border = 1 - centre
    weights = centre_weight * inner / inner.sum() + border_weight * border / border.sum()
    return ReconstructionTarget(normalised_patches(t) if normalise else t, weights, patch, size)


def gaussian_blur(imgs: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian low-pass (reflect padding), the coarse component of an image."""
    radius = max(1, int(3 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=imgs.dtype, device=imgs.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    c = imgs.shape[1]
    out = F.pad(imgs, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(out, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def coarse_fine_targets(imgs: torch.Tensor, patch: int, sigma: float, eps: float = 1e-6):
    """Coarse (Gaussian low-pass) and fine (image minus coarse, a Laplacian-of-Gaussian-like
    band) patch targets. Both are scaled with the *image's* per-patch mean and std, so that
    coarse + fine is exactly the usual normalised target."""
    full = patchify(imgs, patch)
    mean, std = patch_mean_std(full, eps)
    coarse = patchify(gaussian_blur(imgs, sigma), patch)
    return (coarse - mean) / std, (full - coarse) / std
