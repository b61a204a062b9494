"""Input degradations of "Beyond Masking" (zoom-in, zoom-out, fisheye, blur, de-colorise).

Each pre-training objective corrupts the input image and asks the model to reconstruct the
clean one. Everything here works on batched float tensors ``[N, C, H, W]`` and draws its
random parameters *per image* (the paper degrades every sample differently, and one draw per
batch would make the task much easier to solve from batch statistics). The code is vectorised
over the batch; where the work genuinely depends on a per-sample size (zoom-out's resize), we
loop over the handful of *distinct* sizes, never over the samples.

Layout: pure functions that apply a degradation given explicit parameters, ``sample_*``
functions that draw those parameters, and the parameter-free ``Degradation`` module that ties
the two together on ImageNet-normalised tensors.

Randomness always comes from an optional ``torch.Generator`` so that a seeded run is
reproducible. Parameters are drawn on the generator's device (a CPU generator cannot fill a
CUDA tensor) and then moved to the images' device.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN, IMAGENET_DEFAULT_STD as IMAGENET_STD

from .choices import DEGRADATION_KINDS as KINDS


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------

def _sample_device(generator: torch.Generator | None) -> torch.device:
    """Where random numbers must be drawn: torch refuses a generator on another device."""
    return generator.device if generator is not None else torch.device("cpu")


def _check_images(imgs: torch.Tensor, what: str) -> None:
    if imgs.dim() != 4:
        raise ValueError(f"{what} expects images shaped [N, C, H, W], got shape {tuple(imgs.shape)}")


def _check_per_sample(t: torch.Tensor, n: int, name: str, what: str) -> None:
    if t.shape != (n,):
        raise ValueError(f"{what}: {name} must have shape [{n}] (one value per image), "
                         f"got shape {tuple(t.shape)}")


def _as_options(values: int | float | Sequence, name: str) -> list:
    """A single value or a non-empty sequence of values -> list of options."""
    options = [values] if isinstance(values, (int, float)) else list(values)
    if not options:
        raise ValueError(f"{name} needs at least one option")
    return options


def _pick(options: Sequence, n: int, dtype: torch.dtype,
          generator: torch.Generator | None) -> torch.Tensor:
    """[N] values, each drawn uniformly from ``options`` independently per sample."""
    device = _sample_device(generator)
    table = torch.tensor(list(options), dtype=dtype, device=device)  # [K]
    idx = torch.randint(len(options), (n,), generator=generator, device=device)  # [N]
    return table[idx]


# --------------------------------------------------------------------------------------------
# (a) zoom-in
# --------------------------------------------------------------------------------------------

def centre_crop(imgs: torch.Tensor, size: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, size, size]: the centre of the view, i.e. the zoom-in input.

    The data pipeline has already RandomResizedCropped the clean view to S' (e.g. 288); the
    model sees only its centre ``size`` (e.g. 224) and reconstructs the whole view. The crop
    must be exactly centred, so (H - size) and (W - size) must be even.
    """
    _check_images(imgs, "centre_crop")
    _, _, h, w = imgs.shape
    for dim, extent in (("height", h), ("width", w)):
        if size < 1 or size > extent:
            raise ValueError(f"centre_crop: crop size {size} must be between 1 and the image "
                             f"{dim} {extent}")
        if (extent - size) % 2:
            raise ValueError(f"centre_crop: image {dim} {extent} minus crop size {size} is odd, "
                             f"so the crop cannot be exactly centred")
    top, left = (h - size) // 2, (w - size) // 2
    return imgs[:, :, top:top + size, left:left + size]


# --------------------------------------------------------------------------------------------
# (b) zoom-out
# --------------------------------------------------------------------------------------------

def _mirror_index(offset: torch.Tensor, size: int) -> torch.Tensor:
    """Source index in [0, size) for a signed offset from the image's first row/column.

    Symmetric reflection ('symmetric' padding in numpy: the pixel just outside an edge repeats
    the edge pixel) extended periodically with period 2*size, so any canvas size is covered
    however small the image. Offsets 0..S-1 map to themselves, S..2S-1 to S-1..0, and so on.
    """
    m = torch.remainder(offset, 2 * size)  # in [0, 2S), non-negative even for negative offsets
    return torch.where(m < size, m, 2 * size - 1 - m)


def _place_mirrored(small: torch.Tensor, top: torch.Tensor, left: torch.Tensor,
                    height: int, width: int) -> torch.Tensor:
    """[n, C, S, S] images -> [n, C, height, width] canvases, image at (top, left), mirror fill."""
    n, c, s, _ = small.shape
    rows = torch.arange(height, device=small.device)  # [H]
    cols = torch.arange(width, device=small.device)  # [W]
    row_src = _mirror_index(rows[None, :] - top[:, None], s)  # [n, H]
    col_src = _mirror_index(cols[None, :] - left[:, None], s)  # [n, W]
    # Two gathers (rows, then columns) instead of one 2-D fancy index: each is a plain
    # torch.gather along one dim, which keeps memory at [n, C, H, S] for the intermediate.
    x = torch.gather(small, 2, row_src[:, None, :, None].expand(n, c, height, s))  # [n, C, H, S]
    return torch.gather(x, 3, col_src[:, None, None, :].expand(n, c, height, width))  # [n,C,H,W]


def zoom_out(imgs: torch.Tensor, sizes: torch.Tensor, top: torch.Tensor,
             left: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, H, W]: each image shrunk to sizes[n]^2 and put on a mirrored canvas.

    The shrunk image has its top-left corner at (top[n], left[n]); the rest of the canvas is
    filled with mirrored copies of it, because the paper found black or foreign borders make
    the image's edge trivially easy to find (and the task too easy).
    """
    _check_images(imgs, "zoom_out")
    n, _, h, w = imgs.shape
    for name, t in (("sizes", sizes), ("top", top), ("left", left)):
        _check_per_sample(t, n, name, "zoom_out")
    sizes, top, left = (t.to(device=imgs.device, dtype=torch.long) for t in (sizes, top, left))
    if n and (sizes.min() < 1 or sizes.max() > min(h, w)):
        raise ValueError(f"zoom_out: every size must be between 1 and min(H, W) = {min(h, w)}, "
                         f"got sizes {sizes.tolist()}")
    if n and ((top < 0).any() or (top > h - sizes).any()
              or (left < 0).any() or (left > w - sizes).any()):
        raise ValueError(f"zoom_out: each square must lie inside the {h}x{w} canvas "
                         f"(0 <= top <= H - size, 0 <= left <= W - size), got sizes "
                         f"{sizes.tolist()}, top {top.tolist()}, left {left.tolist()}")

    out = torch.empty_like(imgs)  # [N, C, H, W]
    # Images that share a size are resized together; a batch only has a handful of sizes.
    for s in torch.unique(sizes).tolist():
        idx = torch.nonzero(sizes == s).squeeze(1)  # [n_s]
        # Antialiasing matters: plain bilinear downscaling by ~2x aliases badly. It runs in
        # float32 because torch's antialiased kernel lacks half/bfloat16 support on CPU.
        small = F.interpolate(imgs[idx].float(), size=(s, s), mode="bilinear",
                              align_corners=False, antialias=True)  # [n_s, C, s, s]
        small = small.to(imgs.dtype)
        out[idx] = _place_mirrored(small, top[idx], left[idx], h, w)
    return out


def sample_zoom_out(n: int, height: int, width: int,
                    sizes: int | Sequence[int] = (96, 128, 160, 192),
                    generator: torch.Generator | None = None):
    """Per-sample zoom-out parameters -> (sizes [N], top [N], left [N]), all int64.

    The size is drawn uniformly from ``sizes`` (a single int fixes it), and the top-left corner
    uniformly among the positions that keep the whole square inside the canvas.
    """
    options = [int(s) for s in _as_options(sizes, "zoom-out sizes")]
    if min(options) < 1 or max(options) > min(height, width):
        raise ValueError(f"zoom-out sizes {options} must be between 1 and the canvas side "
                         f"{min(height, width)}")
    device = _sample_device(generator)
    size = _pick(options, n, torch.long, generator)  # [N]
    # Uniform integer in [0, H - size] per sample: torch.randint has no per-sample bound.
    u = torch.rand(2, n, generator=generator, device=device)  # [2, N]
    top = (u[0] * (height - size + 1)).floor().long().clamp(max=height - size)
    left = (u[1] * (width - size + 1)).floor().long().clamp(max=width - size)
    return size, top, left


# --------------------------------------------------------------------------------------------
# (c) fisheye distortion
# --------------------------------------------------------------------------------------------

def fisheye(imgs: torch.Tensor, centres: torch.Tensor, twist: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, H, W]: the standard fisheye warp, one centre and twist per image.

    ``centres`` [N, 2] is in grid_sample's normalised (x, y) coordinates, [-1, 1]. Each output
    pixel at normalised position g samples the input at ``g + (c - g) * ||c - g|| * twist``:
    the pull towards c grows with the squared distance, so the centre stays put and the
    periphery is stretched outwards. Input content near the borders far from c is then never
    sampled, which is the "information missing" the paper notes for this objective. Sample
    points are convex combinations of g and c, so they stay on the canvas; zero padding only
    touches the outermost half pixel (and c itself if it lies there).
    """
    _check_images(imgs, "fisheye")
    n, c, h, w = imgs.shape
    if centres.shape != (n, 2):
        raise ValueError(f"fisheye: centres must have shape [{n}, 2], got {tuple(centres.shape)}")
    _check_per_sample(twist, n, "twist", "fisheye")
    centres = centres.to(device=imgs.device, dtype=imgs.dtype)
    twist = twist.to(device=imgs.device, dtype=imgs.dtype)

    # Identity grid of pixel centres (align_corners=False), so twist=0 reproduces the input.
    theta = torch.eye(2, 3, device=imgs.device, dtype=imgs.dtype).expand(n, 2, 3)  # [N, 2, 3]
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)  # [N, H, W, 2] as (x, y)
    delta = centres[:, None, None, :] - grid  # [N, H, W, 2]
    dist = delta.norm(dim=-1, keepdim=True)  # [N, H, W, 1]
    grid = grid + delta * dist * twist[:, None, None, None]
    return F.grid_sample(imgs, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def sample_fisheye(n: int, twist_range: tuple[float, float] = (0.15, 0.25),
                   generator: torch.Generator | None = None):
    """Per-sample fisheye parameters -> (centres [N, 2] ~ U(-1, 1)^2, twist [N] ~ U(range))."""
    lo, hi = twist_range
    if hi < lo:
        raise ValueError(f"twist range {twist_range} must be (low, high) with low <= high")
    device = _sample_device(generator)
    centres = torch.rand(n, 2, generator=generator, device=device) * 2 - 1
    twist = lo + (hi - lo) * torch.rand(n, generator=generator, device=device)
    return centres, twist


# --------------------------------------------------------------------------------------------
# (d) blur
# --------------------------------------------------------------------------------------------

def noisy_box_kernels(kernel_sizes: torch.Tensor, channels: int, noise_std: float = 0.5,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Fresh random blur kernels -> [N, C, K, K], K = max(kernel_sizes), float32.

    Each image and channel gets its own "noisy box": ``|1 + noise_std * eps|`` over its centred
    k x k support (zero outside it, so mixed sizes share one K x K tensor), normalised to sum
    to 1 so that a constant image stays constant and brightness is preserved. Kernels live on
    the generator's device.
    """
    n = kernel_sizes.shape[0]
    device = _sample_device(generator)
    ks = kernel_sizes.to(device=device, dtype=torch.long)  # [N]
    big = int(ks.max()) if n else 1
    eps = torch.randn(n, channels, big, big, generator=generator, device=device)  # [N, C, K, K]
    weights = (1 + noise_std * eps).abs()
    # Centred support of each sample's own size: |i - K//2| <= k//2 along both axes.
    offset = (torch.arange(big, device=device) - big // 2).abs()  # [K]
    inside = offset[None, :] <= (ks // 2)[:, None]  # [N, K]
    support = inside[:, :, None] & inside[:, None, :]  # [N, K, K]
    weights = weights * support[:, None]
    return weights / weights.sum(dim=(-2, -1), keepdim=True)


def depthwise_blur(imgs: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] convolved with per-image, per-channel [N, C, K, K] kernels (K odd).

    All N*C kernels run as ONE grouped convolution by folding the batch into the channel
    axis. Borders are reflect-padded so they do not darken as zero padding would.
    """
    n, c, h, w = imgs.shape
    big = kernels.shape[-1]
    pad = big // 2
    if pad >= h or pad >= w:
        raise ValueError(f"blur: kernel size {big} is too large for {h}x{w} images "
                         f"(reflect padding needs kernel_size // 2 < H and W)")
    x = imgs.reshape(1, n * c, h, w)  # [1, N*C, H, W]
    if pad:
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect")  # [1, N*C, H+2p, W+2p]
    weight = kernels.to(device=imgs.device, dtype=imgs.dtype).reshape(n * c, 1, big, big)
    return F.conv2d(x, weight, groups=n * c).reshape(n, c, h, w)


def random_kernel_blur(imgs: torch.Tensor, kernel_sizes: torch.Tensor, noise_std: float = 0.5,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, H, W]: per-image random depthwise blur, no bias.

    ``kernel_sizes`` [N] are odd; size 1 is the identity. The convolution is linear and its
    kernel sums to 1, which is what lets it commute with per-channel normalisation.
    """
    _check_images(imgs, "random_kernel_blur")
    _check_per_sample(kernel_sizes, imgs.shape[0], "kernel_sizes", "random_kernel_blur")
    if kernel_sizes.numel() and (bool((kernel_sizes < 1).any())
                                 or bool((kernel_sizes % 2 == 0).any())):
        raise ValueError(f"random_kernel_blur: kernel sizes must be odd and positive (a centred "
                         f"kernel needs a middle tap), got {kernel_sizes.tolist()}")
    kernels = noisy_box_kernels(kernel_sizes, imgs.shape[1], noise_std, generator)
    return depthwise_blur(imgs, kernels)


def sample_blur_sizes(n: int, kernel_size: int | Sequence[int] = 9,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample kernel sizes [N] (int64): fixed (an int, 9 is the paper's best) or drawn
    uniformly from a sequence (the paper's "rand." setting is (5, 7, 9, 11))."""
    options = [int(k) for k in _as_options(kernel_size, "blur kernel sizes")]
    if any(k < 1 or k % 2 == 0 for k in options):
        raise ValueError(f"blur kernel sizes must be odd and positive, got {options}")
    return _pick(options, n, torch.long, generator)


# --------------------------------------------------------------------------------------------
# (e) de-colorise
# --------------------------------------------------------------------------------------------

def decolorize(imgs: torch.Tensor, saturation: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] RGB in pixel space [0, 1] -> same, with HSV saturation scaled per image.

    Exactly RGB -> HSV, S *= f, HSV -> RGB, in closed form: every channel of an HSV colour is
    c = V - V * S * g(H) for a hue-only function g, so scaling S by f while keeping H and V is
    c' = V - f * (V - c) with V = max over channels. f = 0 gives grey (three equal channels).
    """
    _check_images(imgs, "decolorize")
    if imgs.shape[1] != 3:
        raise ValueError(f"decolorize needs RGB images (3 channels), got {imgs.shape[1]}")
    _check_per_sample(saturation, imgs.shape[0], "saturation", "decolorize")
    f = saturation.to(device=imgs.device, dtype=imgs.dtype)[:, None, None, None]  # [N,1,1,1]
    value = imgs.amax(dim=1, keepdim=True)  # [N, 1, H, W]
    return value - f * (value - imgs)


def sample_saturation(n: int, choices: float | Sequence[float] = (0.0, 0.3, 0.6),
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample saturation factors [N] (float32), each drawn uniformly from ``choices``."""
    options = [float(f) for f in _as_options(choices, "saturation choices")]
    if any(f < 0 or not math.isfinite(f) for f in options):
        raise ValueError(f"saturation factors must be finite and >= 0, got {options}")
    return _pick(options, n, torch.float32, generator)


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------

class Degradation(torch.nn.Module):
    """Parameter-free module: ImageNet-normalised clean images -> degraded model inputs.

    ``kind`` is one of ``KINDS``. For "zoom_in" the incoming view is larger than the model
    input (S' > input_size) and the output is its centre crop; every other kind keeps the
    input_size x input_size shape.

    Why only de-colorise leaves normalised space: the spatial degradations (crop, zoom-out,
    fisheye) only move or interpolate pixels with weights summing to 1, and blur is a linear
    filter whose kernel sums to 1, so they all commute with the per-channel affine map
    (x - mean) / std. (Fisheye's zero padding is the one, tiny, exception: in the outermost
    half pixel it blends with the mean colour rather than with black.)
    HSV saturation, by contrast, depends on the max over channels of the *pixel* values, so
    de-colorise must un-normalise, apply, and re-normalise.
    """

    def __init__(self, kind: str, *, input_size: int,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 zoom_out_sizes: int | Sequence[int] = (96, 128, 160, 192),
                 twist_range: tuple[float, float] = (0.15, 0.25),
                 blur_kernel_sizes: int | Sequence[int] = (9,), blur_noise_std: float = 0.5,
                 saturations: float | Sequence[float] = (0.0, 0.3, 0.6)):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown degradation kind {kind!r}; valid kinds are "
                             f"{', '.join(KINDS)}")
        if len(mean) != len(std):
            raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} differ in length")
        self.kind = kind
        self.input_size = int(input_size)
        self.zoom_out_sizes = tuple(int(s) for s in _as_options(zoom_out_sizes, "zoom_out_sizes"))
        self.twist_range = (float(twist_range[0]), float(twist_range[1]))
        self.blur_kernel_sizes = tuple(int(k) for k in _as_options(blur_kernel_sizes,
                                                                   "blur_kernel_sizes"))
        self.blur_noise_std = float(blur_noise_std)
        self.saturations = tuple(float(f) for f in _as_options(saturations, "saturations"))
        # Fail at construction, not at the first batch, on settings this kind will use (the
        # others keep their paper defaults, which need not fit a small test input_size).
        if kind == "zoom_out" and (max(self.zoom_out_sizes) > self.input_size
                                   or min(self.zoom_out_sizes) < 1):
            raise ValueError(f"zoom_out_sizes {self.zoom_out_sizes} must be between 1 and "
                             f"input_size {self.input_size}")
        if kind == "blur" and any(k < 1 or k % 2 == 0 for k in self.blur_kernel_sizes):
            raise ValueError(f"blur_kernel_sizes {self.blur_kernel_sizes} must be odd and positive")
        # Non-persistent buffers: they follow .to(device) but stay out of checkpoints, so the
        # module adds nothing to the model's state_dict.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, input_size={self.input_size}"

    def forward(self, imgs: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """[N, C, S', S'] (zoom_in) or [N, C, S, S] (others) normalised -> [N, C, S, S]."""
        _check_images(imgs, f"Degradation({self.kind!r})")
        if self.kind == "zoom_in":
            return centre_crop(imgs, self.input_size)
        n, _, h, w = imgs.shape
        if h != self.input_size or w != self.input_size:
            raise ValueError(f"Degradation({self.kind!r}) expects {self.input_size}x"
                             f"{self.input_size} images, got {h}x{w}")
        dev = imgs.device
        if self.kind == "none":
            return imgs
        if self.kind == "zoom_out":
            sizes, top, left = sample_zoom_out(n, h, w, self.zoom_out_sizes, generator)
            return zoom_out(imgs, sizes.to(dev), top.to(dev), left.to(dev))
        if self.kind == "fisheye":
            centres, twist = sample_fisheye(n, self.twist_range, generator)
            return fisheye(imgs, centres.to(dev), twist.to(dev))
        if self.kind == "blur":
            sizes = sample_blur_sizes(n, self.blur_kernel_sizes, generator)
            return random_kernel_blur(imgs, sizes.to(dev), self.blur_noise_std, generator)
        # decolorize: the only kind that needs pixel space (see the class docstring).
        mean = self.mean.to(imgs.dtype)
        std = self.std.to(imgs.dtype)
        saturation = sample_saturation(n, self.saturations, generator).to(dev)
        pixels = imgs * std + mean  # [N, 3, S, S] in [0, 1]
        return (decolorize(pixels, saturation) - mean) / std
