"""`mirl-ds bench pipeline`: the ranks' memory figures add up, and the bubble measure is sound.

The end-to-end test launches real 2-rank DeepSpeed runs of a tiny G=6 preset (pp=2 and
pp=1 x dp=2, ZeRO-0); it checks what the ranks report, not how fast they were."""
from __future__ import annotations

import glob
import json
import re
from pathlib import Path

import pytest
import torch

from mirl_ds.bench.pipeline_bench import bubble, theoretical_bubble
from mirl_ds.bench.rank_probe import memory_breakdown
from mirl_ds.cli import main as cli_main

M = 2                   # micro-batches per pipeline step
STEP_COUNTERS = 16 * 1024   # AdamW's per-tensor step counters: in the optimizer state, not predicted


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline_bench")
    out = tmp / "bench.json"
    rc = cli_main(["bench", "pipeline", "--preset", "vit_tiny_deep", "--img-size", "32", "--micro-batch", "2",
                   "--grad-accum", str(M), "--zero", "0", "--warmup", "1", "--steps", "1",
                   "--workdir", str(tmp / "work"), "--json", str(out)])
    assert rc == 0
    return json.loads(out.read_text()), tmp / "work"


def test_pipeline_stages_hold_half_the_parameters_and_optimizer_state(bench):
    data, _ = bench
    pipe, plain = data["runs"]
    assert (pipe["name"], plain["name"]) == ("pp=2 x dp=1", "pp=1 x dp=2")
    assert pipe["status"] == plain["status"] == "ok"
    assert pipe["global_batch"] == plain["global_batch"] == 2 * M          # the same batch per step
    assert plain["param_and_optimizer_bytes"][0] == plain["param_and_optimizer_bytes"][1]   # replicas
    assert max(pipe["param_and_optimizer_bytes"]) < max(plain["param_and_optimizer_bytes"])
    # The stages' trainable parameters are the model's, plus the second stage's tied mask token.
    token_bytes = 4 * data["mask_token_numel"]
    assert sum(pipe["trainable_param_bytes"]) - plain["trainable_param_bytes"][0] == token_bytes
    for run in (pipe, plain):
        # ZeRO-0 in fp32: AdamW updates the module's own tensors (no master copy) and keeps two
        # moments per trainable parameter (plus its 8-byte step counters).
        assert run["master_bytes"] == [0, 0]
        for state, trainable in zip(run["optimizer_state_bytes"], run["trainable_param_bytes"]):
            assert 0 <= state - 2 * trainable < STEP_COUNTERS
        # The prediction from the meta-device parameter counts is the measurement, step counters aside.
        for measured, predicted in zip(run["param_and_optimizer_bytes"], run["predicted_bytes"]):
            assert 0 <= measured - predicted < STEP_COUNTERS
        assert all(b > 0 for b in run["peak_rss_bytes"]) and run["images_per_s"] > 0
        assert run["others_cpu_share"] >= 0
    (comp,) = data["comparisons"]
    assert comp["param_and_optimizer_per_rank"] <= data["target_param_and_optimizer_ratio"]


def test_every_stage_times_m_forward_and_backward_passes_per_step(bench):
    data, work = bench
    pipe = data["runs"][0]
    assert 0 < pipe["bubble"] < 1 and 0 <= pipe["bubble_from_stage_times"] < 1
    reports = [json.loads(p.read_text()) for p in sorted(work.glob("run0_*/reports/rank*.json"))]
    assert sorted(r["stage"] for r in reports) == [0, 1]
    for r in reports:
        assert len(r["step_ends"]) == len(r["instructions"]) == len(r["cpu"]) == 2
        for step in r["instructions"]:
            kinds = [kind for kind, _, _ in step]
            assert kinds.count("ForwardPass") == kinds.count("BackwardPass") == M
            assert kinds.count("OptimizerStep") == 1
            assert all(t0 <= t1 for _, t0, t1 in step)


def test_the_bench_removes_deepspeeds_shared_memory_buffers_of_its_runs(bench):
    _, work = bench
    ports = {int(p) for log in work.glob("run*/log.txt") for p in re.findall(r"master_port=(\d+)", log.read_text())}
    assert len(ports) == 2
    for port in ports:
        assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")


def _instr(kind, t0, t1):
    return [kind, float(t0), float(t1)]


def test_an_ideal_1f1b_timeline_has_the_theoretical_bubble():
    # p=2, m=2, forward 1 s and backward 2 s on both stages, free communication (1F1B):
    # stage 0: F1 0-1, F2 1-2, B1 4-6, B2 7-9;  stage 1: F1 1-2, B1 2-4, F2 4-5, B2 5-7.
    stage0 = [_instr("ForwardPass", 0, 1), _instr("ForwardPass", 1, 2), _instr("RecvGrad", 2, 4),
              _instr("BackwardPass", 4, 6), _instr("RecvGrad", 6, 7), _instr("BackwardPass", 7, 9),
              _instr("OptimizerStep", 9, 10)]
    stage1 = [_instr("RecvActivation", 0, 1), _instr("ForwardPass", 1, 2), _instr("BackwardPass", 2, 4),
              _instr("ForwardPass", 4, 5), _instr("BackwardPass", 5, 7), _instr("ReduceTiedGrads", 7, 9),
              _instr("OptimizerStep", 9, 10)]
    reports = [{"stage": 1, "instructions": [stage1]}, {"stage": 0, "instructions": [stage0]}]
    measured, from_stage_times, seconds = bubble(reports, range(1), m=2)
    assert measured == pytest.approx(theoretical_bubble(2, 2)) == pytest.approx(1 / 3)
    assert from_stage_times == pytest.approx(1 / 3)
    assert [s["span"] for s in seconds] == [9.0, 9.0]
    assert seconds[0]["BackwardPass"] == 4.0 and seconds[1]["ForwardPass"] == 2.0


class _Wrapper:
    """Stands for a DeepSpeed optimizer wrapper: the torch optimizer is its ``.optimizer``."""

    def __init__(self, optimizer):
        self.optimizer = optimizer


def test_memory_breakdown_counts_master_copies_and_adam_moments_once():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    n = sum(p.numel() for p in model.parameters())
    plain = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 8)).sum().backward()
    plain.step()
    mem = memory_breakdown(model, plain)
    assert mem["param_bytes"] == mem["trainable_param_bytes"] == 4 * n
    assert mem["master_bytes"] == 0
    assert 0 <= mem["optimizer_state_bytes"] - 8 * n <= 8 * 4            # + one step counter per tensor
    # A master copy in one flat tensor (as ZeRO keeps it) is counted, and counted once.
    flat = torch.nn.Parameter(torch.cat([p.detach().flatten() for p in model.parameters()]))
    flat.grad = torch.zeros_like(flat)
    master = torch.optim.AdamW([flat])
    master.step()
    mem = memory_breakdown(model, _Wrapper(master))
    assert mem["master_bytes"] == 4 * n
    assert mem["param_and_optimizer_bytes"] == 4 * n + 4 * n + mem["optimizer_state_bytes"]
