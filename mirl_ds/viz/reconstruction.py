"""The supplementary's Figure 1 quintuplet: ground truth, masked input, reconstruction,
residual and main component, one row per image."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..models.masked_modeling import PretrainOutput
from ..models.patches import patch_mean_std, patchify, unpatchify

COLUMNS = ("original", "masked", "reconstruction", "residual", "main component")


def _to_pixels(x: torch.Tensor, mean, std) -> torch.Tensor:
    """ImageNet-normalised [N, 3, H, W] -> [0, 1] pixels."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x * s + m).clamp(0, 1)


@torch.no_grad()
def quintuplet(imgs: torch.Tensor, out: PretrainOutput, patch: int) -> list[torch.Tensor]:
    """Five [N, 3, H, W] images in normalised space (residual centred on 0).

    Predictions of per-patch-normalised targets are mapped back with the ground-truth
    patch's mean and std (MAE's visualisation). The reconstruction is the first MIRL pair's
    sum (or the single decoder) with the visible patches pasted back; the main component is
    the shallowest decoder alone and the residual the deepest one.
    """
    imgs = imgs.float().cpu()
    n = imgs.shape[0]  # may be the first rows of the batch ``out`` was computed on
    raw = patchify(imgs, patch)
    mean, std = patch_mean_std(raw)
    preds = [p[:n].float().cpu() for p in out.preds]
    main, residual = preds[0], preds[-1]
    recon = main + residual if len(preds) > 1 else main
    mask = out.batch.mask[:n].float().cpu().unsqueeze(-1)                       # [N, L, 1]
    c = imgs.shape[1]
    to_img = lambda p: unpatchify(p, patch, c)                               # noqa: E731
    recon_px = recon * std + mean
    return [
        imgs,
        to_img(raw * (1 - mask)),                                            # masked patches black
        to_img(recon_px * mask + raw * (1 - mask)),
        to_img(residual * std),                                              # no mean: a residual
        to_img(main * std + mean),
    ]


def save_quintuplet_png(path: str | Path, imgs: torch.Tensor, out: PretrainOutput, patch: int,
                        mean, std, max_rows: int = 6, scale: int = 3) -> Path:
    """Write the picture; returns its path. ``scale`` upsamples tiny demo images for viewing."""
    panels = quintuplet(imgs[:max_rows], out, patch)
    # The residual has no mean of its own: show it around mid-grey.
    panels = [_to_pixels(p, mean, std) if i != 3 else
              (0.5 + p * torch.tensor(std).view(1, -1, 1, 1)).clamp(0, 1)
              for i, p in enumerate(panels)]
    n, _, h, w = panels[0].shape
    gap, header = 4, 14
    canvas = Image.new("RGB", (len(panels) * (w * scale + gap) + gap,
                               header + n * (h * scale + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    for j, (title, panel) in enumerate(zip(COLUMNS, panels)):
        x0 = gap + j * (w * scale + gap)
        draw.text((x0, 1), title, fill="black")
        arr = (panel.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        for i in range(n):
            tile = Image.fromarray(arr[i]).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (x0, header + gap + i * (h * scale + gap)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
