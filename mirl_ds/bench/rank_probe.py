"""What each rank reports to ``mirl-ds bench pipeline``: memory by kind, peak RSS, step timings.

Switched on by the environment variable ``MIRL_DS_BENCH_REPORT=<folder>`` (the training loop
calls :func:`attach` right after ``deepspeed.initialize`` when it is set; nothing changes when it
is not).  After every optimizer step the rank rewrites ``<folder>/rank<R>.json`` with:

* **memory**, counted exactly from the live tensors rather than estimated: the bytes of the
  rank's module parameters (all of them, and the trainable ones), of the optimizer's own
  parameter copies (DeepSpeed's fp32 master partitions under ZeRO or bf16; none when the
  optimizer updates the module's tensors directly) and of the optimizer state (AdamW's two
  moments and step counters).  Storages are counted once, whoever holds them: under ZeRO the
  module's parameters are views into one flat buffer.
* **RSS**: ``VmHWM`` (the peak) and ``VmRSS`` from ``/proc/self/status``.  ``getrusage``'s
  ``ru_maxrss`` is not used: Linux carries the launcher's peak across ``execve`` into it.
* **timings** on ``time.perf_counter`` (CLOCK_MONOTONIC: one clock for every process on the
  host, so the bench can lay the ranks' timelines side by side): when each optimizer step
  ended and, on a pipeline engine, when each schedule instruction (load, forward, backward,
  send/receive, gradient reductions, optimizer step) started and ended;
* **CPU** at each step end: this process's CPU seconds and the whole machine's busy CPU
  seconds (``/proc/stat``), from which the bench tells how much other processes took.

The probe does not write checkpoints: it makes the engine's ``save_checkpoint`` a no-op, since
a ViT-B-48 checkpoint is gigabytes of disk writes per run that the bench does not measure.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

def attach(engine, report_dir: str) -> "RankProbe":
    """Instrument ``engine`` (a DeepSpeed engine or pipeline engine) for the bench."""
    return RankProbe(engine, report_dir)


def tensor_bytes(tensors, skip_storages: set[int] = frozenset()) -> tuple[int, set[int]]:
    """Bytes of the distinct storages behind ``tensors`` (not in ``skip_storages``), and those
    storages' addresses.  A storage is counted whole: views (ZeRO's flat buffers) count once."""
    seen: dict[int, int] = {}
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in skip_storages:
            seen[ptr] = storage.nbytes()
    return sum(seen.values()), set(seen)


def inner_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO, bf16), which hold it as ``.optimizer``."""
    while not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def memory_breakdown(module: torch.nn.Module, optimizer) -> dict[str, int]:
    params = list(module.parameters())
    trainable = [p for p in params if p.requires_grad]
    param_bytes, module_storages = tensor_bytes(params)
    inner = inner_optimizer(optimizer)
    # The optimizer's parameters are the module's own tensors (plain fp32) or DeepSpeed's master
    # copies (ZeRO partitions, bf16 master weights): count only storages the module does not own.
    master_bytes, _ = tensor_bytes((p for g in inner.param_groups for p in g["params"]), module_storages)
    state_bytes, _ = tensor_bytes(t for state in inner.state.values() for t in state.values())
    return {
        "param_bytes": param_bytes,
        "param_numel": sum(p.numel() for p in params),
        "trainable_param_bytes": sum(p.numel() * p.element_size() for p in trainable),
        "trainable_param_numel": sum(p.numel() for p in trainable),
        "master_bytes": master_bytes,
        "optimizer_state_bytes": state_bytes,
        "param_and_optimizer_bytes": param_bytes + master_bytes + state_bytes,
    }


def machine_busy_seconds() -> float:
    """CPU seconds every process on the host has used since boot, all cores (``/proc/stat``)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]   # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def rss_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])       # "kB", i.e. KiB
    return {"peak_rss_kib": out.get("VmHWM", 0), "rss_kib": out.get("VmRSS", 0)}


class RankProbe:
    def __init__(self, engine, report_dir: str):
        self.engine = engine
        self.rank = dist.get_rank()
        self.path = Path(report_dir) / f"rank{self.rank}.json"
        self.pipeline = hasattr(type(engine), "_INSTRUCTION_MAP")     # DeepSpeed's PipelineEngine
        self.step_ends: list[float] = []
        self.cpu: list[list[float]] = []          # per step end: [own CPU s, machine busy CPU s]
        self.instructions: list[list] = []        # per step: [kind, start, end] of each instruction
        self._current: list = []
        engine.save_checkpoint = lambda *args, **kwargs: True
        if self.pipeline:
            self._time_instructions()
            self._wrap("train_batch")
        else:
            self._wrap("step")

    def _time_instructions(self):
        # The pipeline engine looks each instruction's method up in self._INSTRUCTION_MAP and
        # binds it to itself; an instance-level copy of the map with timed methods covers them all.
        def timed(kind, method):
            def run(engine, **kwargs):
                t0 = time.perf_counter()
                try:
                    return method(engine, **kwargs)
                finally:
                    self._current.append([kind, t0, time.perf_counter()])
            return run
        self.engine._INSTRUCTION_MAP = {cls: timed(cls.__name__, method)
                                        for cls, method in type(self.engine)._INSTRUCTION_MAP.items()}

    def _wrap(self, name: str):
        # A step ends when the engine's global step count moves: every train_batch, and on a plain
        # engine the step() at the gradient-accumulation boundary.
        method = getattr(self.engine, name)

        def wrapped(*args, **kwargs):
            before = self.engine.global_steps
            out = method(*args, **kwargs)
            if self.engine.global_steps != before:
                self._step_ended()
            return out
        setattr(self.engine, name, wrapped)

    def _step_ended(self):
        self.step_ends.append(time.perf_counter())
        self.cpu.append([time.process_time(), machine_busy_seconds()])
        self.instructions.append(self._current)
        self._current = []
        self.write()

    def write(self):
        engine = self.engine
        report = {
            "rank": self.rank,
            "world_size": dist.get_world_size(),
            "pipeline_stages": engine.num_stages if self.pipeline else 1,
            "stage": engine.stage_id if self.pipeline else 0,
            "micro_batch": engine.train_micro_batch_size_per_gpu(),
            "grad_accum": engine.gradient_accumulation_steps(),
            "global_batch": engine.train_batch_size(),
            "zero_stage": engine.zero_optimization_stage(),
            "bf16": bool(engine.bfloat16_enabled()),
            "memory": memory_breakdown(engine.module, engine.optimizer),
            "rss": rss_kib(),
            "step_ends": self.step_ends,
            "cpu": self.cpu,
            "instructions": self.instructions,
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report))
        os.replace(tmp, self.path)          # the bench never reads a half-written report

