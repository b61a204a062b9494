"""The pre-training loop on every rank: engine, data, steps, logging, checkpoints, pre-emption.

Exactness: everything random in a step is a function of (seed, step, micro-batch, dp rank) —
the loader's crops/flips come from the stream position, the masks from a seed handed to the
model with each micro-batch — and the learning rate is a pure function of the step.  A resumed
run therefore repeats the uninterrupted run's losses step for step (fp32 on CPU).
"""
from __future__ import annotations

import json
import os
import signal
import time
import numpy as np
import torch
import torch.distributed as dist

from ..config.loader import ConfigError, dump_config, load_config
from ..config.validate import validate_config
from ..log import get_logger
from . import checkpoints

log = get_logger()
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingError(RuntimeError):
    """A problem with the run's inputs, reported as one sentence."""


def micro_seed(seed: int, step: int, micro: int, dp_rank: int) -> int:
    """The mask/degradation seed of one micro-batch."""
    return int(np.random.SeedSequence([seed, step, micro, dp_rank]).generate_state(1)[0] & 0x7FFFFFFF)


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop saves and exits at the end of the step, all ranks
    together (the flag is all-reduced, so a signal reaching one rank stops every rank)."""

    def __init__(self):
        self.raised = False
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._set)

    def _set(self, signum, frame):
        self.raised = True

    def agreed(self) -> bool:
        return checkpoints.any_rank(self.raised)


def load_run(config_paths, overrides, ds_path, check=None):
    """The run config and the DeepSpeed dict resolved for this world size; every problem — the
    config's own, then ``check(cfg)``'s (the entry point's) — as one TrainingError."""
    from .ds_config import resolve_ds_config

    try:
        cfg = load_config(config_paths, overrides)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        raise TrainingError(str(e)) from None
    problems = validate_config(cfg) + (check(cfg) if check else [])
    if problems:
        raise TrainingError("; ".join(problems))
    try:
        ds = resolve_ds_config(cfg, ds_path, dist.get_world_size())
    except ValueError as e:
        raise TrainingError(str(e)) from None
    return cfg, ds


def pretraining_problems(cfg) -> list[str]:
    problems = []
    if cfg.data.source != "shards":
        problems.append(f"data.source={cfg.data.source!r}: the DeepSpeed engine streams shards; set "
                        f"data.source=shards and data.shards=<manifest> (make them with `mirl-ds shard`)")
    if cfg.parallel.pipeline_stages > 1 and (cfg.objective.feature_loss.enabled or cfg.objective.perceptual_loss.enabled):
        problems.append("objective.feature_loss / perceptual_loss need the whole model on one stage: "
                        "use parallel.pipeline_stages=1 with them")
    return problems


def _load_everything(config_paths, overrides, ds_path):
    return load_run(config_paths, overrides, ds_path, pretraining_problems)


def step_plan(cfg, epoch_batches: int, ga: int, dp_size: int) -> tuple[int, int, int, int, float]:
    """(global batch, steps per epoch, total steps, warm-up steps, peak lr) of a run whose loader
    gives ``epoch_batches`` micro-batches per rank and epoch."""
    from ..train.schedule import peak_lr

    global_batch = cfg.data.micro_batch_size * ga * dp_size
    steps_per_epoch = max(1, epoch_batches // ga)
    total = cfg.optim.max_steps or int(cfg.optim.epochs * steps_per_epoch)
    warmup = int(cfg.optim.warmup_epochs * steps_per_epoch)
    return global_batch, steps_per_epoch, total, warmup, peak_lr(cfg.optim, global_batch)


def write_run_folder(cfg, ds: dict) -> None:
    """Rank 0: the resolved YAML and DeepSpeed JSON in ``logging.run_dir``."""
    os.makedirs(cfg.logging.run_dir, exist_ok=True)
    with open(os.path.join(cfg.logging.run_dir, "config.yaml"), "w") as f:
        f.write(dump_config(cfg))
    with open(os.path.join(cfg.logging.run_dir, "deepspeed_config.json"), "w") as f:
        json.dump(ds, f, indent=2)


def _build_engine(cfg, ds):
    import deepspeed

    from ..build import build_pretrain_model
    from ..train.optim import build_optimizer
    from .pipeline import build_pipeline

    torch.manual_seed(cfg.seed)            # identical initial weights on every rank and topology
    model = build_pretrain_model(cfg)
    pp = cfg.parallel.pipeline_stages
    if pp > 1:
        module = build_pipeline(model, pp, checkpoint_blocks=cfg.parallel.activation_checkpointing)
        del model
    else:
        module = model
        module.checkpoint_blocks = cfg.parallel.activation_checkpointing
    if pp == 1 and ds.get("zero_optimization", {}).get("stage", 0) == 3:
        # ZeRO-3 gathers a module's parameters around that module's forward; the cls token and the
        # position embedding are read by the model's own code, not by the timm encoder's forward.
        for p in (module.encoder.cls_token, module.encoder.pos_embed):
            deepspeed.zero.register_external_parameter(module, p)
    # Marks the checkpoints as convertible by DeepSpeed's ds_to_universal (mirl_ds.engine.universal);
    # an empty info = no tensor-parallel slicing to describe.
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)
    setattr(module, UNIVERSAL_CHECKPOINT_INFO, {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})
    optimizer = build_optimizer(module, cfg.optim, lr=0.0)
    engine, optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds)
    return engine, optimizer


def _data_parallel(engine, pp: int) -> tuple[int, int]:
    if pp > 1:
        return engine.grid.get_data_parallel_rank(), engine.grid.get_data_parallel_world_size()
    return dist.get_rank(), dist.get_world_size()


def _make_loader(cfg, dp_rank: int, dp_size: int):
    from ..data.decode import PretrainDecoder
    from ..data.stream import SampleDecoder, StreamingLoader
    from ..build import pretrain_input_size

    size = pretrain_input_size(cfg)
    decoder = PretrainDecoder(size, scale=tuple(cfg.data.crop_scale), hflip=cfg.data.hflip)
    try:
        return StreamingLoader(cfg.data.shards, batch_size=cfg.data.micro_batch_size, dp_rank=dp_rank,
                               dp_size=dp_size, num_workers=cfg.data.num_workers, seed=cfg.seed,
                               decode=SampleDecoder(decoder))
    except (ValueError, FileNotFoundError) as e:
        raise TrainingError(f"data.shards={cfg.data.shards}: {e}") from None


def run_pretraining(config_paths: list[str], overrides: list[str], ds_path: str) -> int:
    import deepspeed

    from ..data.decode import normalize_batch
    from ..train.optim import set_lr
    from ..train.schedule import lr_at

    deepspeed.init_distributed()
    rank = dist.get_rank()
    cfg, ds = _load_everything(config_paths, overrides, ds_path)
    stop = _StopFlag()
    engine, optimizer = _build_engine(cfg, ds)
    if os.environ.get("MIRL_DS_BENCH_REPORT"):   # `mirl-ds bench pipeline`: per-rank memory and timings
        from ..bench.rank_probe import attach
        attach(engine, os.environ["MIRL_DS_BENCH_REPORT"])
    pp = cfg.parallel.pipeline_stages
    dp_rank, dp_size = _data_parallel(engine, pp)
    loader = _make_loader(cfg, dp_rank, dp_size)
    ga = engine.gradient_accumulation_steps()
    global_batch, steps_per_epoch, total, warmup, peak = step_plan(cfg, loader.epoch_steps, ga, dp_size)
    dtype = torch.bfloat16 if ds.get("bf16", {}).get("enabled") else torch.float32
    run_dir = cfg.logging.run_dir
    if rank == 0:
        write_run_folder(cfg, ds)

    step = 0
    state = checkpoints.load(engine, cfg.checkpoint.dir, cfg.checkpoint.resume)
    if state is not None:
        step = int(state["step"])
        loaders = state.get("loaders", [])
        if len(loaders) == dp_size:
            loader.load_state_dict(loaders[dp_rank])
        else:
            loader.set_epoch(int(state.get("epoch", 0)) + 1)
            if rank == 0:
                log.warning("resuming on %d data-parallel ranks instead of %d: the data stream restarts "
                            "at epoch %d", dp_size, len(loaders), loader.epoch)
        if rank == 0:
            log.info("resumed from step %d (%s)", step,
                     cfg.checkpoint.dir if cfg.checkpoint.resume == "auto" else cfg.checkpoint.resume)
    elif cfg.checkpoint.init_from:
        source = checkpoints.load_weights(engine, cfg.checkpoint.init_from)
        if rank == 0:
            log.info("initialised the weights from %s (step %s of that run); optimizer, schedule and data "
                     "start at step 0", cfg.checkpoint.init_from, source.get("step"))

    batches = loader.forever()
    # Which ranks read data: every rank of a plain engine; the first and last stage of a pipeline.
    stage = engine.stage_id if pp > 1 else 0
    reads_data = pp == 1 or stage in (0, pp - 1)
    losses_path = os.path.join(run_dir, "losses.jsonl")

    keys_file = None
    if cfg.logging.sample_keys and reads_data:
        os.makedirs(os.path.join(run_dir, "sample_keys"), exist_ok=True)
        keys_file = os.path.join(run_dir, "sample_keys", f"rank{rank}.jsonl")

    def micro_batches(step_: int):
        for m in range(ga):
            b = next(batches)
            if keys_file is not None:
                with open(keys_file, "a") as f:
                    f.write(json.dumps({"step": step_ + 1, "micro": m, "stage": stage, "dp_rank": dp_rank,
                                        "keys": list(b["keys"])}) + "\n")
            imgs = normalize_batch(b["images"], cfg.data.mean, cfg.data.std).to(dtype)
            seed = torch.tensor([micro_seed(cfg.seed, step_, m, dp_rank)], dtype=torch.long)
            yield imgs, seed

    def save(step_: int):
        positions = [None] * dist.get_world_size()
        dist.all_gather_object(positions, (dp_rank, stage, loader.state_dict()))
        by_dp = {d: s for d, st, s in positions if st == 0}
        state_ = {"step": step_, "epoch": loader.epoch, "loaders": [by_dp[d] for d in range(dp_size)],
                  "config": dump_config(cfg), "seed": cfg.seed, "pipeline_stages": pp, "dp_size": dp_size}
        tag = checkpoints.save(engine, cfg.checkpoint.dir, step_, state_, cfg.checkpoint.keep_last)
        if rank == 0:
            log.info("saved checkpoint %s/%s", cfg.checkpoint.dir, tag)

    t_last, imgs_since = time.perf_counter(), 0
    while step < total:
        lr = lr_at(step, total, warmup, peak, cfg.optim)
        set_lr(optimizer, lr)
        if pp > 1:
            it = ((inp, inp[0]) for inp in micro_batches(step)) if reads_data else None
            loss = engine.train_batch(data_iter=it)
            terms = engine.module.loss_fn.last_terms if stage == pp - 1 else None
        else:
            loss_sum, terms = 0.0, {}
            for imgs, seed in micro_batches(step):
                gen = torch.Generator().manual_seed(int(seed[0]))
                out = engine(imgs, gen)
                engine.backward(out.loss)
                engine.step()
                loss_sum += float(out.loss.detach())
                for k, v in out.terms.items():
                    terms[k] = terms.get(k, 0.0) + float(v.detach()) / ga
            loss = torch.tensor(loss_sum / ga)
            loss = _mean_over_ranks(loss)
        step += 1
        imgs_since += global_batch
        loss_value = float(loss)
        if not np.isfinite(loss_value):
            raise TrainingError(f"the loss is {loss_value} at step {step}: lower optim.lr / base_lr, "
                                f"set optim.grad_clip, or check the data")
        if pp > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, terms)
            terms = next((t for t in gathered if t), {})
        if rank == 0:
            with open(losses_path, "a") as f:
                f.write(json.dumps({"step": step, "loss": loss_value, "lr": lr, **terms}) + "\n")
            if step % cfg.logging.log_every == 0 or step == total:
                dt = time.perf_counter() - t_last
                skipped = sum(loader.skipped.values())
                pairs = " ".join(f"{k} {v:.4f}" for k, v in terms.items())
                log.info("step %d/%d loss %.4f %s lr %.3g %.1f img/s skipped %d", step, total, loss_value,
                         pairs, lr, imgs_since / max(dt, 1e-9), skipped)
                if engine.monitor is not None and engine.monitor.enabled:
                    engine.monitor.write_events([("Train/loss", loss_value, step), ("Train/lr", lr, step)] +
                                                [(f"Train/{k}", v, step) for k, v in terms.items()])
                t_last, imgs_since = time.perf_counter(), 0
        if stop.agreed():
            save(step)
            if rank == 0:
                log.info("stopped by a signal at step %d; resume with checkpoint.resume=auto", step)
            return 0
        if step % cfg.checkpoint.save_every == 0 or step == total:
            save(step)
    # Resumed from another folder with nothing left to do: the final state still lands in this
    # run's own checkpoint folder.
    if checkpoints.any_rank(not os.path.isdir(os.path.join(cfg.checkpoint.dir, checkpoints.tag_for(step)))):
        save(step)
    return 0


def _mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()
