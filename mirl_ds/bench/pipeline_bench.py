"""``mirl-ds bench pipeline``: two pipeline stages against two data-parallel replicas, 2 CPU ranks.

One run launches, one after the other, real ``deepspeed --module mirl_ds.pretrain`` trainings of
the same model (default: ViT-B-48 MIRL, G = 6, the shipped ``pretrain_vit_b48_mirl`` config) on
2 ranks with ``OMP_NUM_THREADS=1`` each:

* **pp=2 × dp=1**: ``parallel.pipeline_stages=2``, three whole segments per stage, ``m``
  micro-batches per step (``--grad-accum``, default 4 and 8);
* **pp=1 × dp=2**: the plain model on both ranks, ``m/2`` micro-batches each, so that both
  topologies train on the same global batch (micro-batch × m) per optimizer step;

for each ZeRO stage in ``--zero`` (default 0 and 1), with the same micro-batch, image size and
seed, in fp32 (this CPU has no bf16 matrix units).  Data: the synthetic demo set, sharded into
the work folder first (the engine streams shards only).  The image size is small by default
(96 px, patch 16: 9 visible patches + cls) so that a step takes seconds; parameter and optimizer
memory do not depend on it.

What each rank measures (:mod:`mirl_ds.bench.rank_probe`, switched on by the environment
variable ``MIRL_DS_BENCH_REPORT``):

* **parameter + optimizer bytes**, counted from the live tensors after the last step: module
  parameters + the optimizer's own master copies (ZeRO's fp32 partitions; none for ZeRO-0 in
  fp32, where AdamW updates the module's tensors) + optimizer state (AdamW's moments).
  Gradients and buffers are not in it; the peak RSS holds them.  ZeRO-1 shards master copy and
  moments across *data-parallel* ranks, so pp=1 × dp=2 halves them while pp=2 × dp=1 has nobody
  to shard them with: the ZeRO-0 pair isolates what cutting the model saves, the ZeRO-1 pair
  sets it against what sharding across replicas saves.  The bench also predicts these bytes
  from the exact parameter count of each rank's layers (meta-device model, the pipeline's own
  :func:`~mirl_ds.models.pipeline_layers.segment_layers`): 4 bytes per parameter, + 4 per
  trainable one for a master copy (ZeRO-1), + 8 for AdamW's moments, master and moments divided
  by dp under ZeRO-1.  Measured and predicted are printed side by side; a run that does not
  fit in memory gets the prediction only.
* **peak RSS** (``VmHWM``), which also holds gradients, activations, AdamW's temporaries,
  DeepSpeed's buffers, and what is left of the whole model every rank builds before keeping
  its stage.
* **images/s**: global batch × timed steps / wall time from the end of the last ``--warmup``
  step to the end of the last step, on the slowest rank (data loading, the loop's logging and
  every collective included).  ``others`` is the share of the machine's cores that other
  processes used meanwhile (machine busy CPU time from ``/proc/stat`` less the ranks' own);
  above 10 % the timings of that run are flagged as disturbed.
* **pipeline bubble**: every schedule instruction of the pipeline engine is timed on each
  stage.  Per step, the pipelined phase spans from the first instruction any stage starts to
  the end of the last backward pass on any stage; a stage is busy during its forward and
  backward passes; measured bubble = 1 − busy / span, summed over the timed steps and averaged
  over the stages.  Gradient all-reduce, tied-weight reduction and optimizer step come after the
  span; data loading, sends and waits for receives fall inside it.  Beside it: the 1F1B
  schedule's (p − 1)/(m + p − 1) for equal stages and free communication (0.20 for p = 2,
  m = 4; 0.11 for m = 8), and the bubble expected from the measured per-micro-batch compute
  time ``t_s`` of each stage with free communication: span = Σ t_s + (m − 1)·max t_s (the
  slowest stage sets the pace), bubble_s = 1 − m·t_s / span.  ``perf_counter`` is
  CLOCK_MONOTONIC, one clock for every process on the host, so the stages' timelines line up.

The ranks write no checkpoints (see :mod:`~mirl_ds.bench.rank_probe`).  Before each launch the
run's peak memory is estimated and compared with ``MemAvailable`` less 1 GiB for the machine's
other users; the bench waits up to ``--wait-memory`` seconds for it, then skips the run and says
so (``--no-memory-check`` launches anyway).  DeepSpeed's CPU all-reduce leaves a 66 MB
``/dev/shm/deepspeed_allreduce_buffer_*`` file per rank and run (it never unlinks them); the
bench removes those of its own ports.  On a shared machine run it alone:
``flock /tmp/mirl_bench.lock mirl-ds bench pipeline`` (both cores are busy during a run).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..engine.launch import deepspeed_executable, free_port, remove_shm_buffers

ISSUE_TARGET_RATIO = 0.55   # per-rank parameter + optimizer memory, pp=2 over pp=1 (the issue)
RANKS = 2
GIB = 1024 ** 3
MIB = 1024 ** 2
# Peak RSS model, fitted on ViT-S-54 (all four runs) and ViT-B-48 (pp=2): see estimate_rank_bytes.
RUNTIME_BYTES = int(0.75 * GIB)   # python, torch, deepspeed, gloo, data pipeline: a tiny model's rank
SLACK = 1.2                       # allocator fragmentation over the tensors' own bytes
HEADROOM = 1 * GIB                # left to the machine's other users when deciding whether a run fits
COMPUTE = ("ForwardPass", "BackwardPass")
BUSY_SHARE = 0.10                 # others' share of the cores above which timings are flagged
REPORT_ENV = "MIRL_DS_BENCH_REPORT"   # mirl_ds.engine.loop attaches mirl_ds.bench.rank_probe when set


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="pretrain_vit_b48_mirl",
                        help="run config (shipped name or YAML path; default pretrain_vit_b48_mirl)")
    parser.add_argument("--preset", default="vit_b48", help="encoder preset (default vit_b48)")
    parser.add_argument("--img-size", type=int, default=96,
                        help="image size; parameter memory does not depend on it (default 96)")
    parser.add_argument("--micro-batch", type=int, default=4, help="micro-batch per rank (default 4)")
    parser.add_argument("--grad-accum", type=int, nargs="+", default=[4, 8], metavar="M",
                        help="micro-batches per step of the pipeline, even (the dp=2 replicas take M/2 "
                             "each); one pair of runs per value (default 4 8)")
    parser.add_argument("--zero", type=int, nargs="+", choices=(0, 1), default=[0, 1],
                        help="ZeRO stages to compare at (default 0 1)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per run (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1, at least 1)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per run (default 900)")
    parser.add_argument("--wait-memory", type=float, default=120,
                        help="seconds to wait for enough free memory before skipping a run (default 120)")
    parser.add_argument("--no-memory-check", action="store_true",
                        help="launch runs even when their estimated peak exceeds MemAvailable")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep shards, configs, logs and rank reports here (default: a temporary "
                             "folder, removed at the end)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra run-config override for every run (repeatable)")


# -- planning -------------------------------------------------------------------------------

@dataclass
class RunSpec:
    pp: int
    zero: int
    grad_accum: int        # micro-batches per rank and step

    @property
    def dp(self) -> int:
        return RANKS // self.pp

    @property
    def name(self) -> str:
        return f"pp={self.pp} x dp={self.dp}"


@dataclass
class RunResult:
    spec: RunSpec
    status: str = "ok"                 # ok | skipped: <why> | failed: <why>
    predicted_bytes: list[int] = field(default_factory=list)   # param + optimizer, per rank
    estimated_peak_bytes: int = 0                              # per rank, for the memory check
    global_batch: int = 0
    param_and_optimizer_bytes: list[int] = field(default_factory=list)   # measured, per rank
    param_bytes: list[int] = field(default_factory=list)
    trainable_param_bytes: list[int] = field(default_factory=list)
    master_bytes: list[int] = field(default_factory=list)
    optimizer_state_bytes: list[int] = field(default_factory=list)
    peak_rss_bytes: list[int] = field(default_factory=list)
    step_s: float = 0.0                # mean timed step, slowest rank
    images_per_s: float = 0.0
    others_cpu_share: float = 0.0      # of the machine's cores, used by other processes while timing
    bubble: float | None = None        # pipeline runs: measured bubble fraction
    bubble_from_stage_times: float | None = None
    stage_seconds: list[dict] = field(default_factory=list)   # pipeline: per stage, per kind, per step


def plan(args) -> list[RunSpec]:
    """Per ZeRO stage and m: the pipeline (m micro-batches) and the replicas (m/2 each)."""
    return [RunSpec(pp, z, m // (RANKS // pp)) for z in args.zero for m in args.grad_accum for pp in (2, 1)]


def param_counts(cfg, stages=(1, 2)) -> tuple[dict[int, list[tuple[int, int]]], int]:
    """For each pipeline degree, the (all, trainable) parameters of each rank's module, and the
    mask token's size; from a model on the meta device (no memory).  pp=1: the plain model; pp>1:
    the stage's segment layers and its copy of the tied mask token, split as
    :mod:`mirl_ds.engine.pipeline` splits them."""
    import torch

    from mirl_ds.build import build_pretrain_model
    from mirl_ds.models.pipeline_layers import SegmentLayer, segment_layers

    def count(params) -> tuple[int, int]:
        params = list(params)
        return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)

    with torch.device("meta"):
        model = build_pretrain_model(cfg)
        segments = [layer for layer in segment_layers(model) if isinstance(layer, SegmentLayer)]
    token = model.mask_token.numel()
    out = {}
    for pp in stages:
        if pp == 1:
            out[pp] = [count(model.parameters())]
            continue
        per = len(segments) // pp
        out[pp] = []
        for s in range(pp):
            n_all, n_train = map(sum, zip(*(count(layer.parameters()) for layer in segments[s * per:(s + 1) * per])))
            out[pp].append((n_all + token, n_train + token))
    return out, token


def predicted_bytes(counts: tuple[int, int], spec: RunSpec) -> int:
    """Parameter + optimizer bytes of one rank in fp32 (see the module docstring)."""
    n_all, n_train = counts
    shard = spec.dp if spec.zero >= 1 else 1
    master = 4 * n_train // shard if spec.zero >= 1 else 0
    return 4 * n_all + master + 8 * n_train // shard


def estimate_rank_bytes(counts: tuple[int, int], numel: int, spec: RunSpec) -> int:
    """A generous peak RSS of one rank, for deciding whether a run fits."""
    n_local = counts[0]
    # Per local parameter: weight, gradient, AdamW's moments and the temporaries of its foreach
    # step (about one more fp32 copy); ZeRO-1 adds a master copy, an fp32 gradient partition and
    # flat buffers, sharded with the moments across dp.
    per = 4 + 4 + 8 + 4 if spec.zero == 0 else 4 + 4 + (4 + 8 + 4 + 4 + 4) / spec.dp
    # Every rank builds the whole model first; of the stages it drops, the allocator keeps about half.
    dropped = (numel - n_local) * 2
    return int(SLACK * n_local * per + dropped + RUNTIME_BYTES)


def meminfo(key: str) -> int:
    """A ``/proc/meminfo`` figure in bytes (``MemAvailable``, ``MemTotal``)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def wait_for_memory(need: int, seconds: float) -> int:
    """MemAvailable once it exceeds ``need`` + headroom, or what it is after ``seconds`` (at once
    if the machine could not hold ``need`` even idle)."""
    deadline = time.monotonic() + seconds
    while True:
        have = meminfo("MemAvailable")
        if need + HEADROOM <= have or time.monotonic() >= deadline or need + HEADROOM > meminfo("MemTotal"):
            return have
        time.sleep(5)


# -- one run --------------------------------------------------------------------------------

def ds_config(spec: RunSpec) -> dict:
    zero = {"stage": spec.zero}
    if spec.zero:
        # Small buckets: communication buffers are not what is compared, and the default 5e8
        # elements would add up to 2 GB of them per rank.
        zero.update(reduce_bucket_size=50_000_000, allgather_bucket_size=50_000_000)
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": spec.grad_accum,
            "train_batch_size": "auto", "zero_optimization": zero, "bf16": {"enabled": False},
            "fp16": {"enabled": False}, "wall_clock_breakdown": False}


def run_overrides(args, spec: RunSpec, manifest: str, folder: Path) -> list[str]:
    return [f"model.preset={args.preset}", f"model.img_size={args.img_size}", "data.source=shards",
            f"data.shards={manifest}", f"data.micro_batch_size={args.micro_batch}", "data.num_workers=0",
            f"optim.max_steps={args.warmup + args.steps}", f"checkpoint.dir={folder / 'ckpt'}",
            "checkpoint.resume=none", f"checkpoint.save_every={10 ** 9}", f"logging.run_dir={folder / 'run'}",
            f"logging.log_every={10 ** 9}", f"parallel.pipeline_stages={spec.pp}", *args.overrides]


def launch(spec: RunSpec, args, manifest: str, folder: Path) -> list[dict]:
    """Train ``spec`` on 2 ranks; the ranks' reports in rank order.  RuntimeError on failure."""
    reports = folder / "reports"
    reports.mkdir(parents=True)
    ds_path = folder / "ds_config.json"
    ds_path.write_text(json.dumps(ds_config(spec), indent=2))
    port = free_port()
    cmd = [deepspeed_executable(), "--num_gpus", str(RANKS), "--master_port", str(port),
           "--module", "mirl_ds.pretrain", "--config", args.config, "--deepspeed_config", str(ds_path),
           *run_overrides(args, spec, manifest, folder)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **{REPORT_ENV: str(reports)})
    log_path = folder / "log.txt"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.timeout)
        except BaseException:
            # SIGKILL to the whole group, never SIGTERM: DeepSpeed's launcher answers SIGTERM by
            # pkill -f'ing every launcher of this python, other people's runs included.
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            remove_shm_buffers(port)
    if rc != 0:
        tail = log_path.read_text()[-2000:]
        raise RuntimeError(f"exit status {rc} (log: {log_path}):\n{tail}")
    found = sorted(reports.glob("rank*.json"), key=lambda p: int(p.stem[len("rank"):]))
    if len(found) != RANKS:
        raise RuntimeError(f"{len(found)} rank reports in {reports}, expected {RANKS}")
    return [json.loads(p.read_text()) for p in found]


def one_run(i: int, spec: RunSpec, args, manifest: str, work: Path, counts: list, numel: int) -> RunResult:
    label = f"{spec.name}, ZeRO-{spec.zero}, {spec.grad_accum} micro-batch(es) per rank"
    res = RunResult(spec, predicted_bytes=[predicted_bytes(c, spec) for c in counts * (RANKS // len(counts))],
                    estimated_peak_bytes=max(estimate_rank_bytes(c, numel, spec) for c in counts))
    need = res.estimated_peak_bytes * RANKS
    if not args.no_memory_check:
        have = wait_for_memory(need, args.wait_memory)
        if need + HEADROOM > have:
            res.status = (f"skipped: needs ~{need / GIB:.1f} GiB + {HEADROOM / GIB:.0f} GiB headroom, "
                          f"{have / GIB:.1f} GiB available")
            print(f"  {label}: {res.status}", flush=True)
            return res
    print(f"  {label}: running (peak estimated at {res.estimated_peak_bytes / GIB:.2f} GiB per rank)", flush=True)
    t0 = time.perf_counter()
    try:
        reports = launch(spec, args, manifest, work / f"run{i}_pp{spec.pp}_zero{spec.zero}_m{spec.grad_accum}")
    except RuntimeError as e:
        print(f"  {label}: FAILED: {e}", flush=True)
        res.status = f"failed: {str(e).splitlines()[0]}"
        return res
    summarize(res, reports, args.warmup, args.steps)
    print(f"  {label}: {res.images_per_s:.2f} img/s, {time.perf_counter() - t0:.0f} s", flush=True)
    return res


# -- analysis -------------------------------------------------------------------------------

def summarize(res: RunResult, reports: list[dict], warmup: int, steps: int) -> None:
    res.global_batch = reports[0]["global_batch"]
    for r in reports:
        for key in ("param_and_optimizer_bytes", "param_bytes", "trainable_param_bytes", "master_bytes",
                    "optimizer_state_bytes"):
            getattr(res, key).append(r["memory"][key])
        res.peak_rss_bytes.append(r["rss"]["peak_rss_kib"] * 1024)
    first, last = warmup - 1, warmup + steps - 1
    timed = max(r["step_ends"][last] - r["step_ends"][first] for r in reports)
    res.step_s = timed / steps
    res.images_per_s = res.global_batch * steps / timed
    own = sum(r["cpu"][last][0] - r["cpu"][first][0] for r in reports)
    machine = reports[0]["cpu"][last][1] - reports[0]["cpu"][first][1]
    res.others_cpu_share = max(0.0, machine - own) / (timed * (os.cpu_count() or 1))
    if res.spec.pp > 1:
        res.bubble, res.bubble_from_stage_times, res.stage_seconds = bubble(
            reports, range(warmup, warmup + steps), res.spec.grad_accum)


def bubble(reports: list[dict], steps: range, m: int) -> tuple[float, float, list[dict]]:
    """Measured bubble, the bubble the stages' compute times alone would give, and each stage's
    mean seconds per instruction kind and step (see the module docstring)."""
    by_stage = sorted(reports, key=lambda r: r["stage"])
    seconds = [dict() for _ in by_stage]
    span = 0.0
    for step in steps:
        timelines = [r["instructions"][step] for r in by_stage]
        start = min(t0 for tl in timelines for _, t0, _ in tl)
        span += max(t1 for tl in timelines for kind, _, t1 in tl if kind == "BackwardPass") - start
        for secs, tl in zip(seconds, timelines):
            for kind, t0, t1 in tl:
                secs[kind] = secs.get(kind, 0.0) + (t1 - t0) / len(steps)
    span /= len(steps)
    busy = [sum(secs.get(k, 0.0) for k in COMPUTE) for secs in seconds]
    for secs, b in zip(seconds, busy):
        secs.update(span=span, bubble=1 - b / span)
    per_micro = [b / m for b in busy]
    ideal_span = sum(per_micro) + (m - 1) * max(per_micro)
    expected = [1 - m * t / ideal_span for t in per_micro]
    return (sum(s["bubble"] for s in seconds) / len(seconds), sum(expected) / len(expected), seconds)


def theoretical_bubble(p: int, m: int) -> float:
    return (p - 1) / (m + p - 1)


def comparisons(results: list[RunResult]) -> list[dict]:
    """pp=2 over pp=1 for each ZeRO stage and global batch measured (or predicted) both ways."""
    out = []
    for pipe in results:
        plain = next((r for r in results if r.spec.pp == 1 and r.spec.zero == pipe.spec.zero
                      and r.spec.grad_accum * 2 == pipe.spec.grad_accum), None)
        if pipe.spec.pp != 2 or plain is None:
            continue
        both = pipe.status == plain.status == "ok"
        ratio = lambda a, b: max(a) / max(b) if both else None  # noqa: E731 - the larger rank of each
        out.append({
            "zero": pipe.spec.zero, "m": pipe.spec.grad_accum, "measured": both,
            "global_batch": pipe.global_batch or plain.global_batch or None,
            "param_and_optimizer_per_rank": ratio(pipe.param_and_optimizer_bytes, plain.param_and_optimizer_bytes),
            "param_and_optimizer_per_rank_predicted": max(pipe.predicted_bytes) / max(plain.predicted_bytes),
            "peak_rss_per_rank": ratio(pipe.peak_rss_bytes, plain.peak_rss_bytes),
            "images_per_s": pipe.images_per_s / plain.images_per_s if both else None,
            "bubble_measured": pipe.bubble, "bubble_from_stage_times": pipe.bubble_from_stage_times,
            "bubble_theoretical": theoretical_bubble(2, pipe.spec.grad_accum),
            "stage_trainable_bytes_minus_plain": (sum(pipe.trainable_param_bytes) - max(plain.trainable_param_bytes)
                                                  if both else None),
        })
    return out


# -- report ---------------------------------------------------------------------------------

def format_table(results: list[RunResult]) -> str:
    largest = max((b for r in results for b in r.peak_rss_bytes + r.predicted_bytes), default=0)
    unit, scale = ("GiB", GIB) if largest >= GIB else ("MiB", MIB)     # MiB for the tiny test presets
    pair = lambda xs: "/".join(f"{x / scale:.2f}" for x in xs)  # noqa: E731 - rank 0 / rank 1
    head = (f"{'run':<11} {'zero':>4} {'m/rank':>6} {'batch':>5} {'param+optim':>12} {'predicted':>11} "
            f"{'params':>6} {'master':>6} {'optim':>6} {'peak RSS':>11} {'img/s':>6} {'step s':>6} {'bubble':>6} "
            f"{'others':>6}")
    lines = [head, "-" * len(head)]
    for r in results:
        s = r.spec
        left = f"{s.name:<11} {s.zero:>4} {s.grad_accum:>6}"
        if r.status != "ok":
            lines.append(f"{left} {'':>5} {'':>12} {pair(r.predicted_bytes):>11}  {r.status}")
            continue
        big = lambda xs: f"{max(xs) / scale:>6.2f}"  # noqa: E731 - the larger rank's
        lines.append(
            f"{left} {r.global_batch:>5} {pair(r.param_and_optimizer_bytes):>12} {pair(r.predicted_bytes):>11} "
            f"{big(r.param_bytes)} {big(r.master_bytes)} {big(r.optimizer_state_bytes)} "
            f"{pair(r.peak_rss_bytes):>11} {r.images_per_s:>6.2f} {r.step_s:>6.2f} "
            f"{'' if r.bubble is None else f'{r.bubble:.3f}':>6} {r.others_cpu_share:>6.0%}")
    lines.append(f"memory in {unit}, per rank: 'a/b' = rank 0/rank 1 (the pipeline's stage 0/stage 1), one value = "
                 f"the larger rank's; param+optim = params + master + optim, measured; m/rank = micro-batches per "
                 f"rank and step; batch = global batch; others = the cores' share other processes took "
                 f"while timing.")
    return "\n".join(lines)


def format_stages(results: list[RunResult]) -> str:
    kinds = ("LoadMicroBatch", "ForwardPass", "BackwardPass", "SendActivation", "RecvActivation", "SendGrad",
             "RecvGrad", "ReduceTiedGrads", "ReduceGrads", "OptimizerStep")
    short = ("load", "fwd", "bwd", "send act", "recv act", "send grad", "recv grad", "tied red", "grad red",
             "optim")
    head = f"{'pipeline, s per step':<22} {'span':>6} " + " ".join(f"{k:>9}" for k in short) + f" {'bubble':>7}"
    lines = [head, "-" * len(head)]
    for r in results:
        for stage, secs in enumerate(r.stage_seconds):
            name = f"ZeRO-{r.spec.zero} m={r.spec.grad_accum} stage {stage}"
            lines.append(f"{name:<22} {secs['span']:>6.2f} " + " ".join(f"{secs.get(k, 0.0):>9.3f}" for k in kinds)
                         + f" {secs['bubble']:>7.3f}")
    return "\n".join(lines) if len(lines) > 2 else ""


def format_comparisons(comps: list[dict], token_bytes: int) -> str:
    lines = []
    for c in comps:
        measured, predicted = c["param_and_optimizer_per_rank"], c["param_and_optimizer_per_rank_predicted"]
        ratio = measured if measured is not None else predicted
        verdict = "met" if ratio <= ISSUE_TARGET_RATIO else "NOT met"
        line = (f"ZeRO-{c['zero']}, pipeline m={c['m']}: pp=2 / pp=1 per rank: param+optim "
                + (f"{measured:.3f} measured" if measured is not None else "not measured")
                + f", {predicted:.3f} predicted (target <= {ISSUE_TARGET_RATIO}: {verdict})")
        if c["measured"]:
            line += f"; peak RSS {c['peak_rss_per_rank']:.3f}; img/s {c['images_per_s']:.3f}"
        if c["bubble_measured"] is not None:
            line += (f"; bubble {c['bubble_measured']:.3f} measured, {c['bubble_from_stage_times']:.3f} from the "
                     f"stages' compute times, {c['bubble_theoretical']:.3f} = (p-1)/(m+p-1)")
        lines.append(line)
    extra = sorted({c["stage_trainable_bytes_minus_plain"] for c in comps if c["measured"]})
    if extra:
        lines.append(f"check: trainable parameter bytes of the two stages minus the plain model's: "
                     f"{', '.join(map(str, extra))} (one more copy of the tied mask token: {token_bytes})")
    return "\n".join(lines)


def check_args(args) -> str | None:
    if args.warmup < 1 or args.steps < 1 or args.micro_batch < 1:
        return "--warmup, --steps and --micro-batch must be at least 1"
    odd = [m for m in args.grad_accum if m < 2 or m % 2]
    if odd:
        return (f"--grad-accum {odd}: use even values of at least 2 (the dp=2 replicas take M/2 micro-batches "
                f"each for the same global batch)")
    return None


def make_shards(work: Path) -> str:
    from mirl_ds.data.sharding import shard_dataset

    data = work / "data"
    if not (data / "shards" / "train.manifest.json").exists():
        shard_dataset(data / "synthetic", data / "shards", source_kind="synthetic", max_count=128, progress=False)
    return str(data / "shards" / "train.manifest.json")


def run(args: argparse.Namespace) -> int:
    from mirl_ds.config.loader import ConfigError, load_config

    problem = check_args(args)
    if problem:
        print(f"bench pipeline: {problem}")
        return 2
    try:
        cfg = load_config([args.config], [f"model.preset={args.preset}", f"model.img_size={args.img_size}",
                                          "parallel.pipeline_stages=2", *args.overrides])
    except ConfigError as e:
        print("bench pipeline: " + "\n  ".join(e.problems))
        return 2
    counts, token = param_counts(cfg)
    numel = counts[1][0][0]
    print(f"bench pipeline: {args.preset} {cfg.objective.name} (G={cfg.objective.segments}), {numel / 1e6:.1f}M "
          f"parameters, {args.img_size} px, micro-batch {args.micro_batch}, fp32; {RANKS} CPU ranks x 1 "
          f"thread; {args.warmup} warm-up + {args.steps} timed steps per run", flush=True)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="mirl_bench_pipeline_"))
    results: list[RunResult] = []
    try:
        manifest = make_shards(work)
        for i, spec in enumerate(plan(args)):
            results.append(one_run(i, spec, args, manifest, work, counts[spec.pp], numel))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    comps = comparisons(results)
    for text in (format_table(results), format_stages(results), format_comparisons(comps, 4 * token)):
        if text:
            print()
            print(text)
    busy = [f"{r.spec.name} ZeRO-{r.spec.zero} m={r.spec.grad_accum}" for r in results
            if r.status == "ok" and r.others_cpu_share > BUSY_SHARE]
    if busy:
        print(f"WARNING: other processes took more than {BUSY_SHARE:.0%} of the cores while timing "
              f"{', '.join(busy)}: img/s and bubbles of those runs are not trustworthy (memory is).")
    print(f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} core(s); compare timings within one "
          f"run on an otherwise idle machine only.")
    if args.json is not None:
        payload = {
            "preset": args.preset, "config": args.config, "objective": cfg.objective.name,
            "segments": cfg.objective.segments, "img_size": args.img_size, "micro_batch": args.micro_batch,
            "precision": "fp32", "ranks": RANKS, "warmup": args.warmup, "steps": args.steps,
            "param_numel": numel, "mask_token_numel": token,
            "rank_param_counts": {f"pp{pp}": c for pp, c in counts.items()},
            "runs": [dict(asdict(r), name=r.spec.name) for r in results],
            "comparisons": comps, "target_param_and_optimizer_ratio": ISSUE_TARGET_RATIO,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if any(r.status.startswith("failed") for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mirl-ds bench pipeline", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
