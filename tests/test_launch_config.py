"""Launch-time reconciliation of the YAML run config, the DeepSpeed JSON and the hostfile:
every contradiction is one sentence before any rank starts, and the deepspeed command is exact."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mirl_ds.cli import main
from mirl_ds.config import load_config
from mirl_ds.config.loader import ConfigError
from mirl_ds.engine.ds_config import DsConfigError, load_ds_json, resolve_ds_config
from mirl_ds.engine.hostfile import HostfileError, filter_hosts, parse_hostfile, total_slots
from mirl_ds.engine.launch import build_launch_command, launch_world_size

ROOT = Path(__file__).resolve().parent.parent
DS_DIR = ROOT / "ds_configs"


def demo(*overrides):
    return load_config(["demo"], list(overrides))     # G = 4, micro batch 32


def refusal(cfg, ds, world=1, path="ds_configs/x.json", accelerator="cuda") -> str:
    with pytest.raises(DsConfigError) as info:
        resolve_ds_config(cfg, ds, world, path, accelerator=accelerator)
    (problem,) = info.value.problems
    return problem


# --- DeepSpeed JSON vs the run config -------------------------------------------------------

def test_every_shipped_ds_config_resolves_to_what_deepspeed_accepts():
    from deepspeed.runtime.config import DeepSpeedConfig     # world size 1 outside dist
    for path in sorted(DS_DIR.glob("*.json")):
        ds = resolve_ds_config(demo("optim.grad_clip=1.0"), path, 1, accelerator="cuda")
        parsed = DeepSpeedConfig(ds)
        assert parsed.train_batch_size == 32 and parsed.gradient_clipping == 1.0, path.name


def test_zero3_with_pipeline_stages_is_refused_naming_the_pipeline_config():
    problem = refusal(demo("parallel.pipeline_stages=2"), {"zero_optimization": {"stage": 3}}, 2)
    assert problem == ("ds_configs/x.json sets zero_optimization.stage=3, but DeepSpeed pipelines "
                       "support ZeRO stage 0 or 1 only: use ds_configs/pipeline_zero1_bf16.json "
                       "or parallel.pipeline_stages: 1")


def test_pipeline_with_zero1_json_resolves_data_parallel_batch():
    ds = resolve_ds_config(demo("parallel.pipeline_stages=2"), DS_DIR / "pipeline_zero1_bf16.json",
                           8, accelerator="cuda")
    assert ds["train_batch_size"] == 32 * 1 * 4     # 8 ranks / 2 stages = 4 replicas


def test_pipeline_stages_that_do_not_divide_the_segments_are_refused():
    problem = refusal(demo("parallel.pipeline_stages=3"), {}, 3)
    assert problem == ("parallel.pipeline_stages=3 must divide the 4 MIRL segments "
                       "(objective.segments): use 1, 2 or 4")


def test_world_size_not_a_multiple_of_pipeline_stages_is_refused():
    problem = refusal(demo("parallel.pipeline_stages=2"), {}, 3)
    assert problem.startswith("world size 3 is not a multiple of parallel.pipeline_stages=2")


def test_yaml_micro_batch_fills_the_json():
    ds = resolve_ds_config(demo("data.micro_batch_size=8"), {}, 2, "x.json", accelerator="cuda")
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
            ds["train_batch_size"]) == (8, 1, 16)


def test_gradient_accumulation_computes_train_batch_and_back():
    cfg = demo("data.micro_batch_size=8")
    ds = resolve_ds_config(cfg, {"gradient_accumulation_steps": 4}, 2, "x.json", accelerator="cuda")
    assert ds["train_batch_size"] == 8 * 4 * 2
    ds = resolve_ds_config(cfg, {"train_batch_size": 64, "gradient_accumulation_steps": "auto"},
                           2, "x.json", accelerator="cuda")
    assert ds["gradient_accumulation_steps"] == 4


def test_batch_sizes_that_do_not_multiply_out_are_refused_with_the_arithmetic():
    ds = {"train_batch_size": 100, "gradient_accumulation_steps": 2,
          "train_micro_batch_size_per_gpu": 32}
    problem = refusal(demo(), ds, 2)
    assert ("train_batch_size=100" in problem and "32 × gradient_accumulation_steps 2 × 2 "
            "data-parallel ranks = 128" in problem)
    problem = refusal(demo(), {"train_batch_size": 100}, 2)
    assert "not a multiple of data.micro_batch_size 32 × 2 data-parallel ranks = 64" in problem


def test_json_micro_batch_that_disagrees_with_the_yaml_is_refused_naming_both():
    problem = refusal(demo(), {"train_micro_batch_size_per_gpu": 16})
    assert "train_micro_batch_size_per_gpu=16" in problem and "data.micro_batch_size=32" in problem


def test_fp16_on_the_cpu_accelerator_is_refused():
    problem = refusal(demo(), {"fp16": {"enabled": True}}, accelerator="cpu")
    assert problem.endswith("fp16 is not supported by DeepSpeed's CPU accelerator: use bf16")
    resolve_ds_config(demo(), {"fp16": {"enabled": True}}, 1, "x.json", accelerator="cuda")


def test_bf16_and_fp16_together_are_refused():
    assert "both bf16.enabled and fp16.enabled" in refusal(
        demo(), {"bf16": {"enabled": True}, "fp16": {"enabled": True}})


@pytest.mark.parametrize("section", ["optimizer", "scheduler"])
def test_optimizer_or_scheduler_section_is_refused(section):
    problem = refusal(demo(), {section: {"type": "AdamW"}})
    assert f"'{section}' section" in problem
    assert problem.endswith("remove it: mirl_ds builds AdamW and the schedule from optim.* in the YAML")


def test_gradient_clipping_comes_from_the_yaml_and_a_different_json_value_is_refused():
    ds = resolve_ds_config(demo("optim.grad_clip=1.0"), {}, 1, "x.json", accelerator="cuda")
    assert ds["gradient_clipping"] == 1.0
    assert "gradient_clipping=0.5" in refusal(demo("optim.grad_clip=1.0"), {"gradient_clipping": 0.5})


def test_deepspeed_monitor_comes_from_the_yaml_logging_keys():
    ds = resolve_ds_config(demo("logging.run_dir=runs/x", "logging.csv=true"), {}, 1, "x.json", accelerator="cuda")
    assert ds["csv_monitor"] == {"enabled": True, "output_path": "runs/x/monitor", "job_name": "pretrain"}
    assert ds["tensorboard"]["enabled"] is False
    assert "'csv_monitor' section" in refusal(demo(), {"csv_monitor": {"enabled": True}})


def test_tensorboard_without_its_package_is_refused_or_enabled_with_it():
    import importlib.util

    cfg = demo("logging.tensorboard=true")
    if importlib.util.find_spec("tensorboard") is None:
        assert "pip install tensorboard" in refusal(cfg, {})
    else:
        assert resolve_ds_config(cfg, {}, 1, "x.json", accelerator="cuda")["tensorboard"]["enabled"]


def test_steps_per_print_is_quietened_and_unknown_keys_pass_through():
    src = {"wall_clock_breakdown": True, "some_future_key": {"a": 1}}
    ds = resolve_ds_config(demo(), src, 1, "x.json", accelerator="cuda")
    assert ds["steps_per_print"] >= 10**6 and ds["some_future_key"] == {"a": 1}
    assert "train_batch_size" not in src                 # the caller's dict is not modified
    ds = resolve_ds_config(demo(), {"steps_per_print": 5}, 1, "x.json", accelerator="cuda")
    assert ds["steps_per_print"] == 5


def test_every_contradiction_is_reported_together():
    with pytest.raises(DsConfigError) as info:
        resolve_ds_config(demo(), {"optimizer": {}, "zero_optimization": {"stage": 7}}, 1,
                          "x.json", accelerator="cuda")
    assert len(info.value.problems) == 2


def test_invalid_json_is_one_sentence_with_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "bf16": {"enabled": true},\n  "zero_optimization": {"stage": 1,}\n}\n')
    with pytest.raises(DsConfigError, match=r"bad.json: not valid JSON at line 3 column"):
        load_ds_json(path)
    with pytest.raises(DsConfigError, match="does not exist"):
        load_ds_json(tmp_path / "missing.json")


# --- hostfiles ------------------------------------------------------------------------------

def test_shipped_hostfiles_parse():
    assert parse_hostfile(ROOT / "hostfiles" / "localhost") == {"localhost": 2}
    hosts = parse_hostfile(ROOT / "hostfiles" / "multinode.example")
    assert list(hosts) == ["node-0", "node-1"] and total_slots(hosts) == 16


def test_malformed_hostfile_line_is_refused_with_file_and_line(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("# two nodes\nnode-0 slots=8\n\nnode-1 8\n")
    with pytest.raises(HostfileError, match=f"^{path}:4: 'node-1 8' is not of the form"):
        parse_hostfile(path)


def test_non_positive_slots_are_refused(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("node-0 slots=0\n")
    with pytest.raises(HostfileError, match=f"{path}:1: .*slots must be a positive integer"):
        parse_hostfile(path)


def test_duplicate_host_is_refused(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("node-0 slots=8\nnode-0 slots=4\n")
    with pytest.raises(HostfileError, match=f"{path}:2: .*lists host node-0 a second time"):
        parse_hostfile(path)


def test_empty_hostfile_is_refused(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("# nothing yet\n\n")
    with pytest.raises(HostfileError, match="lists no hosts"):
        parse_hostfile(path)


def test_include_and_exclude_choose_slots_like_deepspeed():
    hosts = {"a": 4, "b": 4, "c": 2}
    assert filter_hosts(hosts, include="a:0,1@c") == {"a": 2, "c": 2}
    assert filter_hosts(hosts, exclude="b@a:3") == {"a": 3, "c": 2}
    with pytest.raises(HostfileError, match="slot 5 on a"):
        filter_hosts(hosts, include="a:5")
    with pytest.raises(HostfileError, match="host z"):
        filter_hosts(hosts, exclude="z")


def test_world_size_follows_num_nodes_and_num_gpus(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("a slots=8\nb slots=8\nc slots=8\n")
    assert launch_world_size(str(path)) == 24
    assert launch_world_size(str(path), num_nodes=2, num_gpus=4) == 8
    assert launch_world_size(None, num_gpus=3) == 3
    with pytest.raises(HostfileError, match="cannot be combined"):
        launch_world_size(str(path), include="a", num_gpus=2)


# --- the launch command ---------------------------------------------------------------------

SHARDS = ["data.source=shards", "data.shards=shards/synthetic/train.manifest.json"]   # the engine streams shards


def test_launch_command_is_built_after_validation():
    cmd = build_launch_command(["demo"], ["optim.max_steps=5", *SHARDS], "ds_configs/cpu_test.json",
                               hostfile="hostfiles/localhost", master_port=29600)
    assert cmd == ["deepspeed", "--hostfile", "hostfiles/localhost", "--master_port", "29600",
                   "--module", "mirl_ds.pretrain", "--config", "demo",
                   "--deepspeed_config", "ds_configs/cpu_test.json", "optim.max_steps=5", *SHARDS]


def test_launch_refuses_what_the_entry_point_would_refuse_before_any_rank_starts():
    with pytest.raises(ConfigError, match="data.source='synthetic': the DeepSpeed engine streams shards"):
        build_launch_command(["demo"], [], "ds_configs/cpu_test.json", num_gpus=1)
    with pytest.raises(ConfigError, match="parallel.pipeline_stages=2: fine-tuning is data-parallel only"):
        build_launch_command(["finetune_demo"], ["parallel.pipeline_stages=2"], "ds_configs/cpu_test.json",
                             num_gpus=2, module="mirl_ds.finetune")
    with pytest.raises(ConfigError, match="finetune.auto_augment='none' is not a timm augmentation policy"):
        build_launch_command(["finetune_demo"], ["finetune.auto_augment=none"], "ds_configs/cpu_test.json",
                             num_gpus=1, module="mirl_ds.finetune")


def test_no_ssh_needs_node_rank_and_master_addr():
    with pytest.raises(HostfileError, match="--no_ssh needs --node_rank"):
        build_launch_command(["demo"], SHARDS, "ds_configs/cpu_test.json", num_gpus=1, no_ssh=True)
    cmd = build_launch_command(["demo"], SHARDS, "ds_configs/cpu_test.json",
                               hostfile="hostfiles/multinode.example", no_ssh=True, node_rank=1,
                               master_addr="10.0.0.1")
    assert cmd[:8] == ["deepspeed", "--hostfile", "hostfiles/multinode.example",
                       "--master_addr", "10.0.0.1", "--no_ssh", "--node_rank", "1"]


def test_cli_launch_dry_run_prints_the_exact_deepspeed_command(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    rc = main(["launch", "--config", "demo", "--deepspeed_config", "ds_configs/cpu_test.json",
               "--hostfile", "hostfiles/localhost", "--dry-run", "parallel.pipeline_stages=2",
               "data.micro_batch_size=4", *SHARDS])
    assert rc == 0
    assert capsys.readouterr().out == (
        "deepspeed --hostfile hostfiles/localhost --module mirl_ds.pretrain --config demo "
        "--deepspeed_config ds_configs/cpu_test.json parallel.pipeline_stages=2 "
        "data.micro_batch_size=4 " + " ".join(SHARDS) + "\n")


def test_cli_pretrain_is_an_alias_of_launch(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["pretrain", "--config", "demo", "--deepspeed_config",
                 "ds_configs/cpu_test.json", "--num_gpus", "2", "--dry-run", *SHARDS]) == 0
    assert capsys.readouterr().out.startswith("deepspeed --num_gpus 2 --module mirl_ds.pretrain")


def test_cli_launch_with_a_contradiction_exits_2_with_one_line(tmp_path):
    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    run = subprocess.run([sys.executable, "-m", "mirl_ds", "launch", "--config", "demo",
                          "--deepspeed_config", str(ds), "--hostfile", "hostfiles/localhost",
                          "parallel.pipeline_stages=2", *SHARDS],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.splitlines() == [
        f"error: {ds} sets zero_optimization.stage=3, but DeepSpeed pipelines support ZeRO stage "
        f"0 or 1 only: use ds_configs/pipeline_zero1_bf16.json or parallel.pipeline_stages: 1"]
