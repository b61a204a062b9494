"""Real multi-node DeepSpeed launches on one machine: two "hosts" (127.0.0.1, 127.0.0.2).

* through pdsh + ssh (``ssh_cluster`` fixture: a private sshd on both addresses);
* per node without ssh (``--no_ssh --node_rank 0|1``, two launchers started together).

The pdsh launch first runs a probe script, one rank per host: gloo process group, an
all_reduce of the rank, and a JSON record per rank (rank, world size, node rank, local rank, the
address ssh reached).  Then the product itself: ``mirl-ds launch`` pre-trains with the two hosts
as the two pipeline stages, through pdsh and per node without ssh.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mirl_ds.engine.launch import remove_shm_buffers
from ssh_cluster import HOSTS, free_port

LAUNCH_TIMEOUT_S = 300.0   # generous: a busy 2-core machine; only a hang should hit it
# On a fresh machine DeepSpeed JIT-compiles its CPU shm comm op at the first init_distributed
# (~2 min, cached in ~/.cache/torch_extensions): give that first launch room.
FIRST_BUILD_TIMEOUT_S = 400.0

RANK_SCRIPT = textwrap.dedent("""\
    import json, os, socket, sys
    import torch
    import deepspeed
    import deepspeed.comm as dist

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    ssh = os.environ.get("SSH_CONNECTION", "").split()
    rec = {
        "rank": rank, "world_size": world, "all_reduce": t.item(),
        "cross_rank": os.environ.get("CROSS_RANK"), "local_rank": os.environ.get("LOCAL_RANK"),
        "ssh_server_addr": ssh[2] if len(ssh) == 4 else None,
        "hostname": socket.gethostname(), "pid": os.getpid(),
        "omp": os.environ.get("OMP_NUM_THREADS"), "prefix": os.path.realpath(sys.prefix),
    }
    out = os.path.join(sys.argv[-1], f"rank{rank}.json")  # the launcher prepends --local_rank=N
    with open(out + ".tmp", "w") as f:
        json.dump(rec, f)
    os.replace(out + ".tmp", out)
    dist.barrier()
    print(f"RANK_DONE {rank}/{world}", flush=True)
""")


def _deepspeed() -> str:
    exe = Path(sys.executable).parent / "deepspeed"
    assert exe.exists(), f"{exe} missing"
    return str(exe)


def _timeout() -> float:
    cache = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser("~/.cache/torch_extensions")
    built = glob.glob(os.path.join(cache, "**", "deepspeed_shm_comm*.so"), recursive=True)
    return LAUNCH_TIMEOUT_S if built else FIRST_BUILD_TIMEOUT_S


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's own process group. Not SIGTERM: DeepSpeed's pdsh runner answers
    SIGTERM with `pdsh … pkill -f "python -u -m deepspeed.launcher.launch"`, which would hit
    every DeepSpeed launch on this machine."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _spawn(cmd: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout: float, on_timeout=None) -> None:
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            _kill_group(p)
        if on_timeout is not None:
            on_timeout()
        pytest.fail(f"launch did not finish in {timeout:.0f} s:\n" + _logs(logs))
    for p, log in zip(procs, logs):
        assert p.returncode == 0, f"launcher exited {p.returncode}:\n" + _logs(logs)


def _logs(logs: list[Path]) -> str:
    return "\n".join(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-60:])
                     for log in logs)


def _records(out_dir: Path) -> dict[int, dict]:
    recs = {}
    for f in sorted(out_dir.glob("rank*.json")):
        rec = json.loads(f.read_text())
        recs[rec["rank"]] = rec
    return recs


def _check_two_ranks(recs: dict[int, dict], logs: str) -> None:
    assert sorted(recs) == [0, 1], logs
    for r, rec in recs.items():
        assert rec["world_size"] == 2
        assert rec["all_reduce"] == 1.0  # 0 + 1
        assert rec["cross_rank"] == str(r)  # one rank per node: node rank == global rank
        assert rec["local_rank"] == "0"
        assert rec["omp"] == "1"
    assert recs[0]["pid"] != recs[1]["pid"]


def _setup(tmp_path: Path) -> tuple[Path, Path]:
    script = tmp_path / "rank_script.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    return script, out


def test_two_host_launch_through_pdsh_ssh(ssh_cluster, tmp_path):
    script, out = _setup(tmp_path)
    hostfile = ssh_cluster.write_hostfile(tmp_path / "hostfile", slots=1)
    ssh_cluster.write_deepspeed_env(tmp_path)  # found as ./.deepspeed_env (launcher cwd)
    port = free_port(["127.0.0.1"])
    log = tmp_path / "launcher.log"
    cmd = [_deepspeed(), "--hostfile", str(hostfile), "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(script), str(out)]
    proc = _spawn(cmd, tmp_path, ssh_cluster.env(), log)
    try:
        _wait_all([proc], [log], _timeout(), on_timeout=ssh_cluster.kill_strays)
    finally:
        remove_shm_buffers(port)   # the probe script's ranks leave DeepSpeed's CPU all-reduce buffers

    text = log.read_text(errors="replace")
    recs = _records(out)
    _check_two_ranks(recs, text)
    # went through pdsh + ssh, one session per host address
    assert f"cmd = pdsh -S -f 1024 -w {','.join(HOSTS)}" in text, text
    assert f"{HOSTS[0]}: RANK_DONE" in text and f"{HOSTS[1]}: RANK_DONE" in text, text
    assert {recs[0]["ssh_server_addr"], recs[1]["ssh_server_addr"]} == set(HOSTS), recs
    assert recs[0]["ssh_server_addr"] == HOSTS[0]  # pdsh's %n node rank follows the hostfile
    venv = os.path.realpath(sys.prefix)
    assert recs[0]["prefix"] == venv == recs[1]["prefix"]  # the ranks ran in our venv


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    from mirl_ds.data.sharding import shard_dataset

    root = tmp_path_factory.mktemp("two_host_data")
    shard_dataset(root / "synthetic", root / "shards", source_kind="synthetic", max_count=32, progress=False)
    return str(root / "shards" / "train.manifest.json")


def _mirl_ds_launch(tmp_path: Path, manifest: str, *launch_args: str) -> list[str]:
    """`mirl-ds launch` of a 2-step pre-training, the two hosts as the two pipeline stages."""
    root = Path(__file__).resolve().parents[1]
    return [str(Path(sys.executable).parent / "mirl-ds"), "launch", "--config", "demo",
            "--deepspeed_config", str(root / "ds_configs" / "cpu_test.json"), *launch_args,
            "parallel.pipeline_stages=2", "data.source=shards", f"data.shards={manifest}",
            "data.micro_batch_size=4", "optim.max_steps=2", f"checkpoint.dir={tmp_path / 'ckpt'}",
            f"logging.run_dir={tmp_path / 'run'}", "logging.log_every=1"]


def _check_pretraining(tmp_path: Path, text: str) -> None:
    lines = (tmp_path / "run" / "losses.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2], text
    assert (tmp_path / "ckpt" / "global_step2" / "layer_07-model_states.pt").exists(), text


def test_pretraining_over_two_hosts_through_pdsh_as_two_pipeline_stages(ssh_cluster, manifest, tmp_path):
    hostfile = ssh_cluster.write_hostfile(tmp_path / "hostfile", slots=1)
    ssh_cluster.write_deepspeed_env(tmp_path)
    log = tmp_path / "launcher.log"
    cmd = _mirl_ds_launch(tmp_path, manifest, "--hostfile", str(hostfile), "--master_addr", "127.0.0.1",
                          "--master_port", str(free_port(["127.0.0.1"])))
    proc = _spawn(cmd, tmp_path, ssh_cluster.env(), log)
    _wait_all([proc], [log], 2 * _timeout(), on_timeout=ssh_cluster.kill_strays)
    text = log.read_text(errors="replace")
    assert "pdsh" in text and f"{HOSTS[0]}: [rank 0] step 2/2" in text, text   # rank 0 on the first host
    _check_pretraining(tmp_path, text)


def test_pretraining_per_node_without_ssh(manifest, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{h} slots=1\n" for h in HOSTS))
    port = free_port(["127.0.0.1"])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    procs, logs = [], []
    for node in (0, 1):   # what a scheduler does: the same command on every node, its own node rank
        log = tmp_path / f"launcher{node}.log"
        cmd = _mirl_ds_launch(tmp_path, manifest, "--no_ssh", "--node_rank", str(node), "--hostfile",
                              str(hostfile), "--master_addr", "127.0.0.1", "--master_port", str(port))
        procs.append(_spawn(cmd, tmp_path, env, log))
        logs.append(log)
    _wait_all(procs, logs, 2 * _timeout())
    text = _logs(logs)
    assert "pdsh" not in text and "[rank 0] step 2/2" in text, text
    _check_pretraining(tmp_path, text)
