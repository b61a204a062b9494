"""The single-process CPU demo: pre-train a tiny MIRL ViT on the synthetic images, print the
loss falling, and draw the reconstruction quintuplet."""
import math
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from .build import build_pretrain_model, pretrain_input_size
from .config import RunConfig, dump_config
from .data.synthetic import generate_synthetic_imagefolder
from .data.transforms import pretrain_transform
from .log import get_logger
from .train.optim import build_optimizer, set_lr
from .train.schedule import lr_at, peak_lr
from .viz.reconstruction import save_quintuplet_png

log = get_logger()


class NonFiniteLoss(ValueError):
    """The loss became NaN/Inf: a bad setting (usually the learning rate), reported by the CLI
    as one sentence like every other bad-input error."""


def demo_loader(cfg: RunConfig) -> DataLoader:
    root = Path(cfg.data.root)
    if cfg.data.source == "synthetic":
        generate_synthetic_imagefolder(root, cfg.data.synthetic)
    dataset = ImageFolder(str(root / "train"), transform=pretrain_transform(cfg.data, pretrain_input_size(cfg)))
    gen = torch.Generator().manual_seed(cfg.seed)
    return DataLoader(dataset, batch_size=cfg.data.micro_batch_size, shuffle=True, drop_last=True,
                      num_workers=cfg.data.num_workers, generator=gen)


def run_demo(cfg: RunConfig) -> dict:
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.logging.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    loader = demo_loader(cfg)
    model = build_pretrain_model(cfg)
    steps_per_epoch = len(loader)
    total = cfg.optim.max_steps or int(cfg.optim.epochs * steps_per_epoch)
    warmup = int(cfg.optim.warmup_epochs * steps_per_epoch)
    peak = peak_lr(cfg.optim, cfg.data.micro_batch_size)
    optimizer = build_optimizer(model, cfg.optim, peak)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(f"demo: {cfg.objective.name} on {cfg.model.preset} ({n_params / 1e6:.2f}M trainable "
             f"params, {model.depth} blocks), {len(loader.dataset)} synthetic images, "
             f"{total} steps of {cfg.data.micro_batch_size}, peak lr {peak:.2e}")
    losses, step, t0 = [], 0, time.perf_counter()
    model.train()
    while step < total:
        for imgs, _ in loader:
            if step >= total:
                break
            set_lr(optimizer, lr_at(step, total, warmup, peak, cfg.optim))
            out = model(imgs)
            if not math.isfinite(out.loss.item()):
                raise NonFiniteLoss(f"the loss became {out.loss.item()} at step {step}; lower optim.lr "
                                    f"(now {peak:.2e}) or set optim.grad_clip")
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            model.after_optimizer_step()
            losses.append(out.loss.item())
            step += 1
            if step % cfg.logging.log_every == 0 or step == total:
                terms = " ".join(f"{k} {v.item():.3f}" for k, v in out.terms.items())
                rate = step * cfg.data.micro_batch_size / (time.perf_counter() - t0)
                log.info(f"step {step:4d}/{total}  loss {out.loss.item():.4f}  ({terms})  "
                         f"lr {optimizer.param_groups[0]['lr']:.2e}  {rate:.0f} img/s")
    window = max(1, min(20, len(losses) // 4))
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    log.info(f"loss fell from {first:.4f} (mean of the first {window} steps) to {last:.4f} "
             f"(mean of the last {window})")
    torch.save({"model": model.state_dict(), "config": dump_config(cfg)}, run_dir / "pretrain_model.pt")
    picture = None
    if cfg.objective.degradation.kind == "none":  # the quintuplet is drawn for masking alone
        picture = _draw(model, loader, cfg, run_dir / "reconstructions.png")
        log.info(f"wrote {picture} (original | masked | reconstruction | residual | main component)")
    return {"first_loss": first, "last_loss": last, "steps": total, "picture": picture and str(picture)}


@torch.no_grad()
def _draw(model, loader: DataLoader, cfg: RunConfig, path: Path) -> Path:
    model.eval()
    imgs, _ = next(iter(loader))
    out = model(imgs, generator=torch.Generator().manual_seed(cfg.seed))
    return save_quintuplet_png(path, imgs, out, model.patch, cfg.data.mean, cfg.data.std)
