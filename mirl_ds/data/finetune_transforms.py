"""Fine-tuning and evaluation transforms: timm's own pieces behind thin, documented wrappers.

Fine-tuning follows the MAE/BEiT recipe (SPEC §6): timm's ``create_transform`` --
RandomResizedCrop(scale (0.08, 1)) + flip + RandAugment (``rand-m9-mstd0.5-inc1``) + ToTensor +
Normalize + random erasing -- per image, and timm's ``Mixup`` (mixup 0.8 / cutmix 1.0, label
smoothing 0.1) per batch.  Evaluation is timm's ``Resize(floor(size / crop_pct))`` +
``CenterCrop(size)``.

:class:`DraftDecoder` turns a sample's raw JPEG bytes into the PIL image those transforms take,
decoding at a reduced JPEG draft size when that cannot lose resolution for any output the
transform may produce:

* eval: the shorter side decoded at 1/s must still be at least the resize target
  (``floor(size / crop_pct)``, 256 for 224): a large photo (e.g. 2000 x 1500) decodes at 1/4;
* train: timm's random crop is drawn *inside* the transform, so the draft must suit the
  smallest crop it can draw -- ``sqrt(scale_min * W * H * ratio_min)`` by
  ``sqrt(scale_min * W * H / ratio_max)`` (the 10-try loop) or the image's shorter side
  (the fallback) -- decoded at 1/s, that must still be at least ``size``.  With timm's
  ``scale_min = 0.08`` this only drafts large images (about 4x the output side or more).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import timm.data
import torch
from torch import nn

from .decode import _draft, _load, open_image, pick_draft_scale

__all__ = [
    "DEFAULT_AUTO_AUGMENT",
    "DraftDecoder",
    "build_eval_transform",
    "build_finetune_criterion",
    "build_finetune_transform",
    "build_mixup",
    "eval_decoder",
    "finetune_decoder",
]

DEFAULT_AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
TIMM_TRAIN_SCALE = (0.08, 1.0)
TIMM_TRAIN_RATIO = (3 / 4, 4 / 3)


def build_finetune_transform(size: int = 224, auto_augment: str | None = DEFAULT_AUTO_AUGMENT,
                             re_prob: float = 0.25, interpolation: str = "bicubic",
                             mean: Sequence[float] = timm.data.IMAGENET_DEFAULT_MEAN,
                             std: Sequence[float] = timm.data.IMAGENET_DEFAULT_STD, *,
                             color_jitter: float | None = None, re_mode: str = "pixel",
                             re_count: int = 1,
                             scale: Sequence[float] = TIMM_TRAIN_SCALE,
                             ratio: Sequence[float] = TIMM_TRAIN_RATIO) -> Callable:
    """The fine-tuning transform, PIL image -> normalised float tensor ``[3, size, size]``:
    ``timm.data.create_transform(is_training=True, ...)`` with MAE's fine-tuning settings
    (RandAugment ``auto_augment``, random erasing with probability ``re_prob`` in 'pixel'
    mode, bicubic, no colour jitter -- timm disables it under RandAugment anyway)."""
    return timm.data.create_transform(
        input_size=size, is_training=True, auto_augment=auto_augment,
        interpolation=interpolation, re_prob=re_prob, re_mode=re_mode, re_count=re_count,
        color_jitter=color_jitter, mean=tuple(mean), std=tuple(std),
        scale=tuple(scale), ratio=tuple(ratio))


def build_eval_transform(size: int = 224, crop_pct: float = 0.875, interpolation: str = "bicubic",
                         mean: Sequence[float] = timm.data.IMAGENET_DEFAULT_MEAN,
                         std: Sequence[float] = timm.data.IMAGENET_DEFAULT_STD) -> Callable:
    """The evaluation transform, PIL image -> normalised float tensor ``[3, size, size]``:
    ``timm.data.create_transform(is_training=False, crop_pct=crop_pct)`` -- resize the shorter
    side to ``floor(size / crop_pct)`` (256 for 224), centre crop ``size``."""
    return timm.data.create_transform(
        input_size=size, is_training=False, crop_pct=crop_pct, interpolation=interpolation,
        mean=tuple(mean), std=tuple(std))


def build_mixup(mixup: float = 0.8, cutmix: float = 1.0, label_smoothing: float = 0.1, *,
                num_classes: int, cutmix_minmax: Sequence[float] | None = None,
                prob: float = 1.0, switch_prob: float = 0.5,
                mode: str = "batch") -> "timm.data.Mixup | None":
    """timm's ``Mixup`` for a batch ``(images [N,3,H,W] float, labels [N] int64)`` -> the mixed
    images and soft targets ``[N, num_classes]`` (label-smoothed one-hots, mixed with ``lam``).
    ``N`` must be even (timm mixes the batch with its flip).

    Returns None when mixup, cutmix and cutmix_minmax are all off (nothing to mix); use
    :func:`build_finetune_criterion` for the matching loss either way.
    """
    if not (mixup > 0 or cutmix > 0 or cutmix_minmax is not None):
        return None
    return timm.data.Mixup(
        mixup_alpha=mixup, cutmix_alpha=cutmix,
        cutmix_minmax=tuple(cutmix_minmax) if cutmix_minmax is not None else None,
        prob=prob, switch_prob=switch_prob, mode=mode,
        label_smoothing=label_smoothing, num_classes=num_classes)


def build_finetune_criterion(mixup_fn, label_smoothing: float = 0.1) -> nn.Module:
    """The loss that goes with the targets: soft-target cross-entropy after ``Mixup`` (its
    targets already carry the smoothing), else label-smoothing cross-entropy, else plain."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()
    if label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=label_smoothing)
    return nn.CrossEntropyLoss()


_AUGMENT_TRIES = 4
_POSTERIZE_ZERO_BITS = "bits must be between"


class DraftDecoder:
    """Raw image bytes -> ``transform(PIL RGB image)``, decoded at JPEG draft factor
    ``s`` in {1, 2, 4, 8}: the largest with ``min_side(W, H) / s >= need`` for the image's
    full size ``(W, H)``.  Corrupt bytes raise :class:`~mirl_ds.data.decode.CorruptImage`.

    Build it with :func:`finetune_decoder` or :func:`eval_decoder`, which pick ``min_side`` and
    ``need`` for timm's train and eval transforms.  ``last_draft_scale`` is the factor used.
    """

    def __init__(self, transform: Callable, need: int,
                 min_side: Callable[[int, int], float] = lambda w, h: min(w, h), *,
                 draft: bool = True, max_draft_scale: int = 8):
        self.transform = transform
        self.need = int(need)
        self.min_side = min_side
        self.draft = bool(draft)
        self.max_draft_scale = int(max_draft_scale)
        self.last_draft_scale = 1

    def reseed(self, seed) -> None:
        """Seed what timm's transforms draw from — Python's ``random`` (crop, RandAugment's
        magnitudes, erasing), numpy's global generator (RandAugment's op choice) and torch's
        (erasing's noise) — so the augmentation of a sample is a function of its stream position
        (the loader calls this before each sample; a resumed run augments identically)."""
        import random

        import numpy as np

        value = int(np.random.SeedSequence(list(seed) if isinstance(seed, (list, tuple)) else seed)
                    .generate_state(1)[0])
        random.seed(value)
        np.random.seed(value)
        torch.default_generator.manual_seed(value)   # CPU only: torch.manual_seed also queues CUDA seeding (~ms)

    def draft_scale(self, width: int, height: int) -> int:
        side = self.min_side(width, height)
        if not self.draft:
            return 1
        return pick_draft_scale(side, side, self.need, self.need, self.max_draft_scale)

    def __call__(self, data: bytes, key: str | None = None) -> torch.Tensor:
        img = open_image(data, key)
        s = _draft(img, self.draft_scale(*img.size))
        img = _load(img, data, key)
        if img.mode != "RGB":
            img = img.convert("RGB")
        self.last_draft_scale = s
        for attempt in range(_AUGMENT_TRIES):
            try:
                return self.transform(img)
            except ValueError as e:
                # timm's RandAugment ("inc1") posterizes to 4 - int(4 * level / 10) bits, 0 at the
                # top magnitude that mstd noise reaches, which Pillow >= 9 refuses (older Pillow
                # made the image black).  The sample is not lost: augment it again (the random
                # stream goes on, so the next draw differs and stays a function of the position).
                if _POSTERIZE_ZERO_BITS not in str(e) or attempt == _AUGMENT_TRIES - 1:
                    raise


def _smallest_rrc_side(width: int, height: int, scale: Sequence[float],
                       ratio: Sequence[float]) -> float:
    """The smallest side any RandomResizedCrop box of a width x height image can have
    (rounding allowance of one pixel included)."""
    area = width * height
    loop_min = min(math.sqrt(area * scale[0] * ratio[0]), math.sqrt(area * scale[0] / ratio[1]))
    return max(1.0, min(loop_min - 1.0, width, height))


def finetune_decoder(size: int = 224, transform: Callable | None = None, *,
                     scale: Sequence[float] = TIMM_TRAIN_SCALE,
                     ratio: Sequence[float] = TIMM_TRAIN_RATIO, **transform_kwargs) -> DraftDecoder:
    """Bytes -> fine-tuning sample: :func:`build_finetune_transform` (or ``transform``, whose
    random crop must use ``scale``/``ratio``) after a draft that keeps even the smallest
    possible crop at least ``size`` pixels per side."""
    transform = transform or build_finetune_transform(size, scale=scale, ratio=ratio,
                                                      **transform_kwargs)
    return DraftDecoder(transform, size,
                        lambda w, h: _smallest_rrc_side(w, h, scale, ratio))


def eval_decoder(size: int = 224, crop_pct: float = 0.875, transform: Callable | None = None,
                 **transform_kwargs) -> DraftDecoder:
    """Bytes -> evaluation sample: :func:`build_eval_transform` after a draft that keeps the
    shorter side at least ``floor(size / crop_pct)``."""
    transform = transform or build_eval_transform(size, crop_pct=crop_pct, **transform_kwargs)
    return DraftDecoder(transform, math.floor(size / crop_pct))
