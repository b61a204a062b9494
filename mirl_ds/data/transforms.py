"""The demo's pre-training transform on an ImageFolder: MAE's RandomResizedCrop(scale (0.2, 1),
bicubic) + flip + normalise. (Shards use ``decode.PretrainDecoder``; evaluation ``decode.EvalDecoder``
and ``finetune_transforms``.)"""
from torchvision import transforms as T

from ..config.schema import DataConfig


def pretrain_transform(data: DataConfig, size: int) -> T.Compose:
    ops = [T.RandomResizedCrop(size, scale=tuple(data.crop_scale),
                               interpolation=T.InterpolationMode.BICUBIC)]
    if data.hflip:
        ops.append(T.RandomHorizontalFlip())
    return T.Compose(ops + [T.ToTensor(), T.Normalize(data.mean, data.std)])

