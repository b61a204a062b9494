"""``mirl-ds probe``: linear and non-linear probing of a frozen pre-trained encoder (SPEC §2.5).

A probe is a single process on one device (a GPU when there is one, else the CPU): only a small
head trains on top of a frozen encoder, so neither DeepSpeed nor data parallelism is needed.

Recipes
-------
* ``linear`` — MAE's linear probe: the pooled feature (mean of the patch tokens + ``fc_norm``,
  or the cls token after ``norm``) -> ``BatchNorm1d(affine=False)`` -> Linear.  LARS (timm's
  ``Lars``; momentum 0.9, trust coefficient 0.001, the trust ratio applied to the weight matrix
  and not to the bias, as MAE's own LARS), base lr 0.1 (lr = base × batch / 256), weight decay
  0, cosine after a linear warm-up of 10 of MAE's 90 epochs.
* ``nonlinear`` — Beyond Masking §5: k (default 2) trainable Transformer blocks on the frozen
  token sequence, then LayerNorm + Linear on the mean of the patch tokens.  The paper gives no
  optimiser recipe; the defaults here are AdamW β=(0.9, 0.999), base lr 5e-4 (MAE's ViT-B
  fine-tuning base lr) × batch / 256, weight decay 0.05 (none on 1-D parameters), the same
  90 epochs, 10 of them warm-up.

Warm-up scales with ``epochs`` unless given: 10/90 of the epochs, as MAE's 10 of 90.

Feature caching
---------------
With the encoder frozen and no augmentation, every epoch would feed the encoder the same
pixels and get the same features, so they are computed once: the linear probe's pooled
``[N, D]`` features, the non-linear probe's token sequences ``[N, 1+L, D]`` (what its blocks
take).  A cache larger than ``cache_max_memory`` bytes is written to a ``.npy`` memory map under
``<out_dir>/feature_cache/`` (removed at the end) rather than held in memory.  Validation
features (always the evaluation transform) are cached the same way.  With ``augment=True``
(MAE's RandomResizedCrop + flip) the training features differ every epoch and are recomputed per
batch.  ``encoder_images`` in the result counts every image the encoder saw.

The encoder is frozen (no gradients, always in eval mode) and its weights are checked to be
bit-identical (a SHA-256 over every tensor) before and after probing.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from .log import get_logger

log = get_logger()

KINDS = ("linear", "nonlinear")


@dataclass(frozen=True)
class ProbeRecipe:
    optimizer: str          # lars | adamw
    base_lr: float          # lr = base_lr × batch / 256
    weight_decay: float
    epochs: int
    warmup_epochs: float    # of ``epochs``; scaled with the epochs asked for
    batch_size: int


RECIPES = {
    # MAE's main_linprobe.py (its batch is 16384 over 32 GPUs; one process defaults to 256).
    "linear": ProbeRecipe("lars", 0.1, 0.0, 90, 10, 256),
    # Beyond Masking §5 states no recipe: see the module docstring for why these.
    "nonlinear": ProbeRecipe("adamw", 5e-4, 0.05, 90, 10, 256),
}


# --------------------------------------------------------------------------------------------
# the model


def pretrain_config(checkpoint: str | os.PathLike, config=None):
    """The pre-training RunConfig: ``config`` if given, else the copy the checkpoint keeps."""
    from .config.loader import config_from_text
    from .engine.init_encoder import stored_config_text

    if config is not None:
        return config
    text = stored_config_text(checkpoint)
    if text is None:
        raise ValueError(f"checkpoint {checkpoint} keeps no pre-training config; pass the YAML it "
                         f"was trained with (--config)")
    return config_from_text(text)


def build_probe(checkpoint: str | os.PathLike, kind: str, num_classes: int, *, num_blocks: int = 2,
                img_size: int | None = None, global_pool: str = "avg", config=None):
    """``(probe, encoder spec, InitReport, pre-training config)``: the encoder of ``checkpoint``
    loaded into a frozen probe.  The non-linear probe's encoder keeps its pre-trained final
    ``norm`` (the tokens it hands on are normalised, as the decoders saw them)."""
    from .config.validate import encoder_spec
    from .engine.init_encoder import init_classifier
    from .models.classifier import LinearProbe, NonLinearProbe
    from .models.encoder import build_vit

    if kind not in KINDS:
        raise ValueError(f"probe kind {kind!r} is not one of {', '.join(KINDS)}")
    if kind == "nonlinear" and num_blocks < 1:
        raise ValueError(f"a non-linear probe needs at least 1 block, got --blocks {num_blocks}")
    cfg = pretrain_config(checkpoint, config)
    spec = encoder_spec(cfg)
    if img_size is not None:
        spec = spec.with_overrides(img_size=int(img_size))
    pool = global_pool if kind == "linear" else "token"
    encoder = build_vit(spec, num_classes=0, global_pool=pool)
    report = init_classifier(encoder, checkpoint)
    if not report.loaded:
        raise ValueError(f"checkpoint {checkpoint} holds no encoder weights for this model "
                         f"(nothing matched by name); probe a pre-training checkpoint")
    fresh = [k for k in report.missing if not k.startswith("fc_norm.")]
    if fresh:
        log.warning("probe: %d encoder tensors are not in the checkpoint and stay at their "
                    "random initialisation: %s", len(fresh), ", ".join(fresh))
    probe = (LinearProbe(encoder, num_classes) if kind == "linear"
             else NonLinearProbe(encoder, num_classes, num_blocks))
    return probe, spec, report, cfg


def encoder_fingerprint(encoder: nn.Module) -> str:
    """SHA-256 over every tensor of the encoder (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for name, t in encoder.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def build_probe_optimizer(probe: nn.Module, optimizer: str, lr: float,
                          weight_decay: float) -> torch.optim.Optimizer:
    """``lars`` (the linear recipe) or ``adamw`` over the probe's trainable parameters."""
    if optimizer == "lars":
        from timm.optim import Lars
        # MAE's LARS adapts matrices only; timm adapts a group with always_adapt or weight decay.
        trainable = [p for p in probe.parameters() if p.requires_grad]
        groups = [{"params": [p for p in trainable if p.ndim > 1], "always_adapt": True,
                   "weight_decay": weight_decay},
                  {"params": [p for p in trainable if p.ndim <= 1], "always_adapt": False,
                   "weight_decay": 0.0}]
        return Lars(groups, lr=lr, momentum=0.9, trust_coeff=0.001)
    from timm.optim import param_groups_weight_decay
    return torch.optim.AdamW(param_groups_weight_decay(probe, weight_decay), lr=lr,
                             betas=(0.9, 0.999))


# --------------------------------------------------------------------------------------------
# data


def _check_classes(train, val) -> int:
    num_classes = train.num_classes
    if num_classes == 0:
        raise ValueError(f"manifest {train.url} has no class table; shard a labelled set")
    if val.classes and val.classes != train.classes:
        raise ValueError(f"manifests {train.url} and {val.url} list different classes; shard both "
                         f"splits with the same class list")
    return num_classes


def _full_pass_workers(total: int, wanted: int) -> int:
    """The loader splits samples evenly over workers and drops the rest; a worker count that
    divides the total loses none."""
    for w in range(wanted, 0, -1):
        if total % w == 0:
            return w
    return 0


def every_sample(manifest, decoder, *, batch_size: int, num_workers: int,
                 seed: int) -> tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], int]:
    """``(batches of (images, labels), sample count)`` covering every sample of ``manifest``
    once.  The streaming loader drops a last partial batch, so it is asked for 1-sample batches
    (nothing dropped) that are regrouped here."""
    from .data.stream import SampleDecoder, StreamingLoader

    workers = _full_pass_workers(manifest.total_samples, num_workers)
    loader = StreamingLoader(manifest, batch_size=1, num_workers=workers, seed=seed,
                             decode=SampleDecoder(decoder))

    def batches():
        images, labels = [], []
        for b in loader:
            images.append(b["images"])
            labels.append(b["labels"])
            if len(images) == batch_size:
                yield torch.cat(images), torch.cat(labels)
                images, labels = [], []
        if images:
            yield torch.cat(images), torch.cat(labels)
        if loader.skipped:
            log.warning("probe: %s skipped samples by reason: %s", manifest.url, loader.skipped)

    return batches(), loader.epoch_steps


class Encoder:
    """The frozen encoder's feature function, counting the images it is given."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device):
        self.fn, self.device = fn, device
        self.images = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.images += len(images)
        with torch.no_grad():
            return self.fn(images.to(self.device, non_blocking=True))


class FeatureCache:
    """Frozen features ``[N, ...]`` and labels of one split, computed once.  Held in memory, or
    in a ``.npy`` memory map when larger than ``max_memory`` bytes (token caches of a large set
    do not fit in RAM)."""

    def __init__(self, values, labels: torch.Tensor, path: Path | None, seconds: float):
        self.values, self.labels, self.path, self.seconds = values, labels, path, seconds

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes) if isinstance(self.values, np.ndarray) else \
            self.values.numel() * self.values.element_size()

    @classmethod
    def build(cls, batches, count: int, encode: Encoder, path: Path, max_memory: int,
              name: str) -> "FeatureCache":
        t0 = time.perf_counter()
        values, labels, at = None, torch.empty(count, dtype=torch.long), 0
        for images, y in batches:
            feats = encode(images).float().cpu()
            if values is None:      # the shape is known only now
                values = cls._allocate((count, *feats.shape[1:]), path, max_memory)
            cls._store(values, at, feats)
            labels[at:at + len(y)] = y
            at += len(y)
        if at != count:
            raise RuntimeError(f"{name}: the loader delivered {at} samples, expected {count}")
        if isinstance(values, np.ndarray):
            values.flush()
        cache = cls(values, labels, path if isinstance(values, np.ndarray) else None,
                    time.perf_counter() - t0)
        where = f"on disk at {path}" if cache.path else "in memory"
        log.info("probe: cached %s features %s of %d images in %.1f s (%.0f img/s), %s %s; "
                 "later epochs reuse them", name, list(values.shape), count, cache.seconds,
                 count / max(cache.seconds, 1e-9), _size(cache.nbytes), where)
        return cache

    @staticmethod
    def _allocate(shape: tuple, path: Path, max_memory: int):
        if 4 * math.prod(shape) <= max_memory:
            return torch.empty(shape, dtype=torch.float32)
        path.parent.mkdir(parents=True, exist_ok=True)
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)

    @staticmethod
    def _store(values, at: int, feats: torch.Tensor) -> None:
        if isinstance(values, np.ndarray):
            values[at:at + len(feats)] = feats.numpy()
        else:
            values[at:at + len(feats)] = feats

    def batch(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        index = np.sort(index)      # sequential reads from a memory map; order is irrelevant
        if isinstance(self.values, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(self.values[index])), self.labels[index]
        t = torch.from_numpy(index)
        return self.values[t], self.labels[t]

    def batches(self, batch_size: int, *, shuffle_seed: list[int] | None = None,
                drop_last: bool = False):
        order = (np.random.default_rng(shuffle_seed).permutation(len(self)) if shuffle_seed
                 else np.arange(len(self)))
        end = len(order) - len(order) % batch_size if drop_last else len(order)
        for i in range(0, end, batch_size):
            yield self.batch(order[i:i + batch_size])


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{nbytes} B"
        nbytes /= 1024
    return ""


# --------------------------------------------------------------------------------------------
# training and evaluation


@torch.no_grad()
def evaluate(probe: nn.Module, batches, device: torch.device, num_classes: int) -> dict:
    """Top-1 and top-5 accuracy (%) of the probe over ``batches`` of (features, labels)."""
    probe.eval()
    k = min(5, num_classes)
    hits1 = hits5 = total = 0
    for feats, labels in batches:
        logits = probe.classify(feats.to(device))
        top = logits.topk(k, dim=1).indices.cpu()
        hits1 += (top[:, 0] == labels).sum().item()
        hits5 += (top == labels[:, None]).any(dim=1).sum().item()
        total += len(labels)
    return {"top1": 100.0 * hits1 / total, "top5": 100.0 * hits5 / total, "images": total}


def train_epoch(probe: nn.Module, batches, optimizer, lr_of_step: Callable[[int], float],
                first_step: int, device: torch.device) -> tuple[float, int]:
    """One epoch over ``batches`` of (features, labels); returns (mean loss, steps taken)."""
    from .train.optim import set_lr

    probe.train()          # the probes keep their encoder in eval mode themselves
    losses, step = [], first_step
    for feats, labels in batches:
        set_lr(optimizer, lr_of_step(step))
        loss = nn.functional.cross_entropy(probe.classify(feats.to(device)), labels.to(device))
        if not torch.isfinite(loss):
            raise RuntimeError(f"the probe's loss is {loss.item()} at step {step}; lower the "
                               f"learning rate (--lr)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        step += 1
    return sum(losses) / max(1, len(losses)), step - first_step


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)       # a reader never sees half a file


@dataclass(frozen=True)
class ProbeSettings:
    """The recipe after the caller's overrides: what one run actually uses."""
    kind: str
    optimizer: str
    epochs: int
    warmup_epochs: float
    batch_size: int
    lr: float               # the peak lr
    weight_decay: float


def resolve_settings(kind: str, *, epochs: int | None = None, warmup_epochs: float | None = None,
                     batch_size: int | None = None, lr: float | None = None,
                     base_lr: float | None = None, weight_decay: float | None = None) -> ProbeSettings:
    """Unset values come from :data:`RECIPES`; ``lr`` overrides ``base_lr × batch / 256``; the
    warm-up keeps the recipe's share of the epochs."""
    if kind not in RECIPES:
        raise ValueError(f"probe kind {kind!r} is not one of {', '.join(KINDS)}")
    r = RECIPES[kind]
    epochs = r.epochs if epochs is None else int(epochs)
    batch_size = r.batch_size if batch_size is None else int(batch_size)
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"--epochs and --batch must be at least 1, got {epochs} and {batch_size}")
    warmup = r.warmup_epochs * epochs / r.epochs if warmup_epochs is None else float(warmup_epochs)
    if not 0 <= warmup <= epochs:
        raise ValueError(f"--warmup-epochs {warmup} must be between 0 and --epochs {epochs}")
    peak = lr if lr is not None else (r.base_lr if base_lr is None else base_lr) * batch_size / 256
    if not peak > 0:
        raise ValueError(f"the learning rate must be positive, got {peak}")
    wd = r.weight_decay if weight_decay is None else float(weight_decay)
    return ProbeSettings(kind, r.optimizer, epochs, warmup, batch_size, float(peak), wd)


class ProbeData:
    """Where the probe's (features, labels) batches come from: the caches, or the encoder fed
    by the streaming loader every batch (augmentation, or caching turned off)."""

    def __init__(self, train_m, val_m, encode: Encoder, *, spec, mean, std, batch_size: int,
                 augment: bool, cache: bool, cache_dir: Path, cache_max_memory: int,
                 num_workers: int, seed: int):
        from .data.finetune_transforms import eval_decoder, finetune_decoder
        from .data.stream import SampleDecoder, StreamingLoader

        if train_m.total_samples < batch_size:   # said before the (possibly long) caching pass
            raise ValueError(f"manifest {train_m.url} has {train_m.total_samples} samples, fewer "
                             f"than one batch of {batch_size}; lower --batch")
        self.val_m, self.encode, self.batch_size, self.seed = val_m, encode, batch_size, seed
        self.eval_dec = eval_decoder(spec.img_size, mean=mean, std=std)
        self.full = dict(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.train_cache = self.val_cache = self.train_loader = None
        if cache:   # validation always uses the evaluation transform: cacheable even with augment
            self.val_cache = FeatureCache.build(*every_sample(val_m, self.eval_dec, **self.full),
                                                encode, cache_dir / "val.npy", cache_max_memory, "val")
        if cache and not augment:
            self.train_cache = FeatureCache.build(*every_sample(train_m, self.eval_dec, **self.full),
                                                  encode, cache_dir / "train.npy", cache_max_memory,
                                                  "train")
            self.steps_per_epoch = len(self.train_cache) // batch_size   # last partial batch dropped
            return
        # MAE's linear-probe augmentation: RandomResizedCrop + flip (no RandAugment, no erasing).
        dec = finetune_decoder(spec.img_size, auto_augment=None, re_prob=0.0, mean=mean,
                               std=std) if augment else self.eval_dec
        self.train_loader = StreamingLoader(train_m, batch_size=batch_size, num_workers=num_workers,
                                            seed=seed, decode=SampleDecoder(dec))
        self.steps_per_epoch = self.train_loader.epoch_steps
        log.info("probe: training features are recomputed every batch (%s)",
                 "augmentation" if augment else "feature cache turned off")

    def train_batches(self, epoch: int):
        if self.train_cache is not None:
            return self.train_cache.batches(self.batch_size, shuffle_seed=[self.seed, epoch],
                                            drop_last=True)
        self.train_loader.set_epoch(epoch)
        return ((self.encode(b["images"]), b["labels"]) for b in self.train_loader)

    def val_batches(self):
        if self.val_cache is not None:
            return self.val_cache.batches(self.batch_size)
        batches, _ = every_sample(self.val_m, self.eval_dec, **self.full)
        return ((self.encode(x), y) for x, y in batches)

    def cache_record(self) -> dict:
        return {"train": _cache_record(self.train_cache), "val": _cache_record(self.val_cache)}


def _cache_record(cache: FeatureCache | None) -> dict | None:
    if cache is None:
        return None
    return {"images": len(cache), "shape": list(cache.values.shape), "bytes": cache.nbytes,
            "storage": "disk" if cache.path else "memory", "seconds": round(cache.seconds, 3)}


def fit(probe: nn.Module, data: ProbeData, settings: ProbeSettings, doc: dict, out: Path,
        device: torch.device, num_classes: int) -> None:
    """Train for ``settings.epochs``, evaluating after each; ``doc`` gathers the rows and is
    written to ``<out>/probe.json`` after every epoch (a stopped run keeps its progress)."""
    from .config.schema import OptimConfig
    from .train.schedule import lr_at

    s = settings
    total, warmup = s.epochs * data.steps_per_epoch, round(s.warmup_epochs * data.steps_per_epoch)
    cosine = OptimConfig(min_lr=0.0, schedule="cosine")
    lr_of = lambda step: lr_at(step, total, warmup, s.lr, cosine)  # noqa: E731
    optimizer = build_probe_optimizer(probe, s.optimizer, s.lr, s.weight_decay)
    step = 0
    for epoch in range(s.epochs):
        t0 = time.perf_counter()
        loss, n = train_epoch(probe, data.train_batches(epoch), optimizer, lr_of, step, device)
        step += n
        acc = evaluate(probe, data.val_batches(), device, num_classes)
        row = {"epoch": epoch + 1, "train_loss": loss, "lr": lr_of(step - 1),
               "val_top1": acc["top1"], "val_top5": acc["top5"],
               "seconds": round(time.perf_counter() - t0, 3)}
        doc["epochs"].append(row)
        if doc["best"] is None or acc["top1"] > doc["best"]["val_top1"]:
            doc["best"] = {"epoch": epoch + 1, "val_top1": acc["top1"], "val_top5": acc["top5"]}
        doc.update(val_images=acc["images"], encoder_images=data.encode.images)
        log.info("probe epoch %d/%d  loss %.4f  val top-1 %.2f%%  top-5 %.2f%%  (%.1f s)",
                 epoch + 1, s.epochs, loss, acc["top1"], acc["top5"], row["seconds"])
        _write_json(out / "probe.json", doc)


def run_probe(checkpoint: str | os.PathLike, train_manifest: str | os.PathLike,
              val_manifest: str | os.PathLike, kind: str = "linear", *, num_blocks: int = 2,
              epochs: int | None = None, warmup_epochs: float | None = None,
              batch_size: int | None = None, lr: float | None = None,
              base_lr: float | None = None, weight_decay: float | None = None, seed: int = 0,
              img_size: int | None = None, global_pool: str = "avg",
              out_dir: str | os.PathLike = "runs/probe", augment: bool = False,
              cache: bool = True, cache_max_memory: int = 4 << 30, num_workers: int = 0,
              device: str | None = None, config=None) -> dict:
    """Probe the frozen encoder of ``checkpoint`` on the train/val shard manifests (one
    process, one device: no DeepSpeed).

    Recipe arguments left unset follow :data:`RECIPES` (see :func:`resolve_settings`).  Writes
    ``<out_dir>/probe.json`` and ``<out_dir>/probe_head.pt`` (the trained part of the probe);
    returns the JSON's content plus ``"model"``, the probe module.  ``config`` (a RunConfig)
    stands in for a checkpoint that keeps no pre-training config.
    """
    from .data.manifest import load_manifest

    settings = resolve_settings(kind, epochs=epochs, warmup_epochs=warmup_epochs,
                                batch_size=batch_size, lr=lr, base_lr=base_lr,
                                weight_decay=weight_decay)
    train_m, val_m = load_manifest(train_manifest), load_manifest(val_manifest)
    num_classes = _check_classes(train_m, val_m)
    torch.manual_seed(seed)      # the heads' initialisation
    probe, spec, report, cfg = build_probe(checkpoint, kind, num_classes, num_blocks=num_blocks,
                                           img_size=img_size, global_pool=global_pool, config=config)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    probe.to(dev)
    before = encoder_fingerprint(probe.encoder)
    encode = Encoder(probe.features if kind == "linear" else probe.tokens, dev)
    doc = {"kind": kind, "checkpoint": str(checkpoint), "train": train_m.url, "val": val_m.url,
           "num_classes": num_classes, "init": report.summary(), "init_layout": report.layout,
           "settings": {**asdict(settings), "num_blocks": num_blocks if kind == "nonlinear" else 0,
                        "img_size": spec.img_size, "augment": augment, "seed": seed,
                        "global_pool": global_pool if kind == "linear" else "token"},
           "device": str(dev), "epochs": [], "best": None}
    cache_dir = out / "feature_cache"
    try:
        data = ProbeData(train_m, val_m, encode, spec=spec, mean=tuple(cfg.data.mean),
                         std=tuple(cfg.data.std), batch_size=settings.batch_size, augment=augment,
                         cache=cache, cache_dir=cache_dir, cache_max_memory=cache_max_memory,
                         num_workers=num_workers, seed=seed)
        doc["cache"] = data.cache_record()
        fit(probe, data, settings, doc, out, dev, num_classes)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)   # derived data, possibly very large
    after = encoder_fingerprint(probe.encoder)
    if after != before:
        raise RuntimeError("the encoder's weights changed during probing; this is a bug")
    last = doc["epochs"][-1]
    doc.update(encoder_sha256=after, encoder_unchanged=True, top1=last["val_top1"],
               top5=last["val_top5"])
    _write_json(out / "probe.json", doc)
    trained = {k: v.cpu() for k, v in probe.state_dict().items() if not k.startswith("encoder.")}
    torch.save({"kind": kind, "state_dict": trained, "settings": doc["settings"]},
               out / "probe_head.pt")
    print(f"{kind} probe: top-1 {doc['top1']:.2f}% top-5 {doc['top5']:.2f}% on "
          f"{doc['val_images']} val images after {settings.epochs} epochs (best top-1 "
          f"{doc['best']['val_top1']:.2f}% at epoch {doc['best']['epoch']}); wrote "
          f"{out / 'probe.json'}", flush=True)
    return {**doc, "model": probe}
