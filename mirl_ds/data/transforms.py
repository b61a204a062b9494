"""Image transforms. Pre-training: MAE's RandomResizedCrop(scale (0.2, 1), bicubic) + flip +
normalise. Evaluation: resize to size/0.875, centre crop."""
from torchvision import transforms as T

from ..config.schema import DataConfig


def pretrain_transform(data: DataConfig, size: int) -> T.Compose:
    ops = [T.RandomResizedCrop(size, scale=tuple(data.crop_scale),
                               interpolation=T.InterpolationMode.BICUBIC)]
    if data.hflip:
        ops.append(T.RandomHorizontalFlip())
    return T.Compose(ops + [T.ToTensor(), T.Normalize(data.mean, data.std)])


def eval_transform(data: DataConfig, size: int) -> T.Compose:
    return T.Compose([T.Resize(int(size / 0.875), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(size), T.ToTensor(), T.Normalize(data.mean, data.std)])
