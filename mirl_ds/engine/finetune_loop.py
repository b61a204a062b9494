"""Fine-tuning on every rank: the classification ViT under DeepSpeed, MAE's recipe, exact resume.

The model is timm's ``VisionTransformer`` (``finetune.global_pool``, drop path), initialised
from a pre-training checkpoint of any layout (:mod:`mirl_ds.engine.init_encoder`) or at random.
Recipe pieces are timm's: layer-decay parameter groups, ``create_transform`` with RandAugment
and random erasing, ``Mixup``/CutMix with label smoothing and ``SoftTargetCrossEntropy``,
``ModelEmaV3``.  Evaluation of the raw and the EMA weights on ``finetune.val_shards`` once per
epoch (or every ``finetune.eval_every`` steps) and at the end; the best of each is kept as
``<run_dir>/best_raw.pt`` / ``best_ema.pt`` and ``<run_dir>/metrics.jsonl`` has every result.

Data-parallel only (pipelines are for pre-training's deep decoders; a classifier is one
segment): ZeRO 0–2 with the EMA, ZeRO-3 without it (its parameters live in shards).

Exactness, as for pre-training: a sample's augmentation is a function of its stream position
(the decoder is reseeded per sample), and everything random in a step (mixup/cutmix, drop
path) is seeded from (seed, step, micro-batch, dp rank); the EMA and the best scores ride in
the checkpoint.  A resumed run repeats the uninterrupted losses (fp32 on CPU).
"""
from __future__ import annotations

import json
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist

from ..config.loader import dump_config
from ..log import get_logger
from . import checkpoints
from .loop import TrainingError, _StopFlag, load_run, micro_seed, step_plan, write_run_folder

log = get_logger()


def finetuning_problems(cfg) -> list[str]:
    problems = []
    if cfg.data.source != "shards" or not cfg.data.shards:
        problems.append("fine-tuning streams shards: set data.source=shards and data.shards=<train manifest> "
                        "(make them with `mirl-ds shard`)")
    if cfg.parallel.pipeline_stages != 1:
        problems.append(f"parallel.pipeline_stages={cfg.parallel.pipeline_stages}: fine-tuning is data-parallel "
                        f"only; set parallel.pipeline_stages=1 (ZeRO shards the optimizer instead)")
    if (cfg.finetune.mixup > 0 or cfg.finetune.cutmix > 0) and cfg.data.micro_batch_size % 2:
        problems.append(f"data.micro_batch_size={cfg.data.micro_batch_size} must be even for mixup/cutmix "
                        f"(timm mixes a batch with its flip); use an even size or finetune.mixup=0 cutmix=0")
    if cfg.finetune.auto_augment is not None and not _known_policy(cfg.finetune.auto_augment):
        problems.append(f"finetune.auto_augment={cfg.finetune.auto_augment!r} is not a timm augmentation policy; "
                        f"give one such as rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, trivialaugment or original, "
                        f"or null to turn it off")
    return problems


def _known_policy(name: str) -> bool:
    """Whether timm's ``create_transform`` accepts the policy string (timm asserts on unknown ones)."""
    from ..data.finetune_transforms import build_finetune_transform

    try:
        build_finetune_transform(32, auto_augment=name)
    except (AssertionError, ValueError, KeyError, IndexError):
        return False
    return True


def _load(config_paths, overrides, ds_path):
    from ..data.manifest import load_manifest

    cfg, ds = load_run(config_paths, overrides, ds_path, finetuning_problems)
    if cfg.finetune.ema_decay > 0 and ds.get("zero_optimization", {}).get("stage", 0) == 3:
        raise TrainingError("finetune.ema_decay with ZeRO-3: the EMA needs whole parameters on each rank; "
                            "use ZeRO stage 1 or 2 (ds_configs/zero2_bf16.json) or set finetune.ema_decay=0")
    try:
        manifest = load_manifest(cfg.data.shards)
    except (ValueError, FileNotFoundError) as e:
        raise TrainingError(f"data.shards={cfg.data.shards}: {e}") from None
    return cfg, ds, manifest


def build_model(cfg, num_classes: int):
    """The classifier, initialised as ``finetune.init`` says; returns (model, init report or None)."""
    from ..config.validate import encoder_spec
    from ..models.classifier import build_classifier
    from .init_encoder import init_classifier

    ft = cfg.finetune
    torch.manual_seed(cfg.seed)            # the same fresh weights on every rank and every run
    model = build_classifier(encoder_spec(cfg), num_classes, global_pool=ft.global_pool,
                             drop_path_rate=ft.drop_path)
    model.pos_embed.requires_grad_(True)   # fixed in pre-training, fine-tuned (as MAE's models_vit)
    torch.nn.init.trunc_normal_(model.head.weight, std=2e-5)   # MAE's head initialisation
    report = None
    if ft.init:
        try:
            report = init_classifier(model, ft.init, reinit_last=ft.reinit_last,
                                     pretrained_blocks=ft.pretrained_blocks)
        except (ValueError, FileNotFoundError) as e:
            raise TrainingError(f"finetune.init={ft.init}: {e}") from None
    return model, report


def make_ema(model, decay: float):
    """timm's ModelEmaV3, kept in fp32 whatever the training precision."""
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay, dtype=torch.float32) if decay > 0 else None


def _whole_state(module, zero3: bool) -> dict:
    """The module's state dict with whole tensors (ZeRO-3 keeps each rank's shard only: gathered
    on every rank, a collective)."""
    if not zero3:
        return module.state_dict()
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _seed_step(seed: int, step: int, micro: int, dp_rank: int) -> None:
    value = micro_seed(seed, step, micro, dp_rank)
    random.seed(value)
    np.random.seed(value)          # timm's Mixup draws lambda and the mode from numpy
    torch.manual_seed(value)       # drop path


def run_finetuning(config_paths: list[str], overrides: list[str], ds_path: str) -> int:
    import deepspeed

    from ..build import pretrain_input_size
    from ..data.finetune_transforms import build_finetune_criterion, build_mixup, finetune_decoder
    from ..data.stream import SampleDecoder, StreamingLoader
    from ..train.optim import build_finetune_optimizer, set_lr
    from ..train.schedule import lr_at
    from .evaluate import eval_stream, evaluate

    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg, ds, manifest = _load(config_paths, overrides, ds_path)
    ft = cfg.finetune
    num_classes = ft.num_classes or manifest.num_classes
    stop = _StopFlag()
    model, report = build_model(cfg, num_classes)
    optimizer = build_finetune_optimizer(model, cfg.optim, ft.layer_decay, lr=0.0)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    ema = make_ema(engine.module, ft.ema_decay)
    dtype = torch.bfloat16 if ds.get("bf16", {}).get("enabled") else torch.float32
    zero3 = ds.get("zero_optimization", {}).get("stage", 0) == 3
    run_dir = cfg.logging.run_dir
    if rank == 0:
        write_run_folder(cfg, ds)
        if report is not None:
            log.info("init: %s", report.summary())
            with open(os.path.join(run_dir, "init_report.json"), "w") as f:
                json.dump(vars(report), f, indent=1)

    size = pretrain_input_size(cfg)
    decoder = finetune_decoder(size, auto_augment=ft.auto_augment, re_prob=ft.re_prob, mean=cfg.data.mean,
                               std=cfg.data.std, scale=ft.crop_scale)
    loader = StreamingLoader(manifest, batch_size=cfg.data.micro_batch_size, dp_rank=rank, dp_size=world,
                             num_workers=cfg.data.num_workers, seed=cfg.seed, decode=SampleDecoder(decoder))
    mixup = build_mixup(ft.mixup, ft.cutmix, ft.label_smoothing, num_classes=num_classes)
    criterion = build_finetune_criterion(mixup, ft.label_smoothing)
    ga = engine.gradient_accumulation_steps()
    global_batch, steps_per_epoch, total, warmup, peak = step_plan(cfg, loader.epoch_steps, ga, world)
    eval_every = ft.eval_every or steps_per_epoch

    step, best = 0, {"raw": None, "ema": None}
    state = checkpoints.load(engine, cfg.checkpoint.dir, cfg.checkpoint.resume)
    if state is not None:
        step, best = int(state["step"]), state.get("best", best)
        loaders = state.get("loaders", [])
        if len(loaders) == world:
            loader.load_state_dict(loaders[rank])
        else:
            loader.set_epoch(int(state.get("epoch", 0)) + 1)
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
        if rank == 0:
            log.info("resumed from step %d", step)

    def evaluate_all(step_: int) -> None:
        if not ft.val_shards:
            return
        results = {"step": step_, "raw": evaluate(engine.module, eval_stream(cfg, ft.val_shards, rank, world), dtype)}
        if ema is not None:
            results["ema"] = evaluate(ema.module, eval_stream(cfg, ft.val_shards, rank, world))
        for kind in ("raw", "ema"):
            if kind in results and (best[kind] is None or results[kind]["top1"] > best[kind]["top1"]):
                best[kind] = {**results[kind], "step": step_}
                weights = _whole_state(engine.module, zero3) if kind == "raw" else ema.module.state_dict()
                if rank == 0:
                    torch.save({"model": {k: v.float() for k, v in weights.items()}, "config": dump_config(cfg),
                                "step": step_, "metrics": results[kind]},
                               os.path.join(run_dir, f"best_{kind}.pt"))
        if rank == 0:
            with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(results) + "\n")
            log.info("eval step %d: raw top-1 %.2f top-5 %.2f%s (%d images, %d skipped)", step_,
                     results["raw"]["top1"], results["raw"]["top5"],
                     f"; EMA top-1 {results['ema']['top1']:.2f}" if "ema" in results else "",
                     results["raw"]["samples"], results["raw"]["skipped"])

    def save(step_: int) -> None:
        positions = [None] * world
        dist.all_gather_object(positions, loader.state_dict())
        state_ = {"step": step_, "epoch": loader.epoch, "loaders": positions, "config": dump_config(cfg),
                  "seed": cfg.seed, "dp_size": world, "best": best, "num_classes": num_classes,
                  "ema": ema.module.state_dict() if ema is not None else None}
        tag = checkpoints.save(engine, cfg.checkpoint.dir, step_, state_, cfg.checkpoint.keep_last)
        if rank == 0:
            log.info("saved checkpoint %s/%s", cfg.checkpoint.dir, tag)

    batches = loader.forever()
    losses_path = os.path.join(run_dir, "losses.jsonl")
    t_last, imgs_since = time.perf_counter(), 0
    engine.train()
    while step < total:
        lr = lr_at(step, total, warmup, peak, cfg.optim)
        set_lr(optimizer, lr)
        loss_sum = 0.0
        for m in range(ga):
            b = next(batches)
            _seed_step(cfg.seed, step, m, rank)
            imgs, targets = b["images"], b["labels"]
            if mixup is not None:
                imgs, targets = mixup(imgs, targets)
            logits = engine(imgs.to(dtype))
            loss = criterion(logits.float(), targets)
            engine.backward(loss)
            engine.step()
            loss_sum += float(loss.detach())
        step += 1
        if ema is not None:
            ema.update(engine.module, step=step)     # timm's convention: updates so far (the 1st copies)
        imgs_since += global_batch
        loss_t = torch.tensor(loss_sum / ga)
        dist.all_reduce(loss_t)
        loss_value = float(loss_t) / world
        if not np.isfinite(loss_value):
            raise TrainingError(f"the loss is {loss_value} at step {step}: lower optim.lr / base_lr or set "
                                f"optim.grad_clip")
        if rank == 0:
            with open(losses_path, "a") as f:
                f.write(json.dumps({"step": step, "loss": loss_value, "lr": lr}) + "\n")
            if step % cfg.logging.log_every == 0 or step == total:
                dt = time.perf_counter() - t_last
                log.info("step %d/%d loss %.4f lr %.3g %.1f img/s skipped %d", step, total, loss_value, lr,
                         imgs_since / max(dt, 1e-9), sum(loader.skipped.values()))
                if engine.monitor is not None and engine.monitor.enabled:
                    engine.monitor.write_events([("Train/loss", loss_value, step), ("Train/lr", lr, step)])
                t_last, imgs_since = time.perf_counter(), 0
        if step % eval_every == 0 or step == total:
            evaluate_all(step)
        if stop.agreed():
            save(step)
            if rank == 0:
                log.info("stopped by a signal at step %d; resume with checkpoint.resume=auto", step)
            return 0
        if step % cfg.checkpoint.save_every == 0 or step == total:
            save(step)
    if rank == 0:
        with open(os.path.join(run_dir, "best.json"), "w") as f:
            json.dump(best, f, indent=1)
        for kind, res in best.items():
            if res is not None:
                log.info("best %s: top-1 %.2f top-5 %.2f at step %d", kind, res["top1"], res["top5"], res["step"])
    return 0
