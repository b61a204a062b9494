"""The ``deepspeed`` command line for a run, checked before any rank starts.

Modelled on gpt-neox's ``deepy.py``: our arguments become ``deepspeed`` launcher flags plus the
training module's arguments. Unlike a bare ``deepspeed`` call, the run config, the hostfile and
the DeepSpeed JSON are loaded and reconciled here first, for the world size the launcher will
start, so a contradiction is one sentence on the launching terminal instead of N tracebacks.
"""
import glob
import os
import shutil
import socket
import sys
from pathlib import Path

from ..config.loader import ConfigError, load_config
from .ds_config import resolve_ds_config
from .hostfile import HostfileError, filter_hosts, parse_hostfile, total_slots

# DeepSpeed reads this hostfile when --hostfile is not given (deepspeed.launcher.constants).
DEFAULT_HOSTFILE = "/job/hostfile"


def free_port() -> int:
    """A TCP port free on loopback now, for a launch's --master_port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_executable() -> str:
    """The ``deepspeed`` launcher of this Python's environment (its bin/ may not be on PATH when
    run as ``.venv/bin/python -m mirl_ds``), else the one on PATH."""
    sibling = Path(sys.executable).with_name("deepspeed")
    exe = str(sibling) if os.access(sibling, os.X_OK) else shutil.which("deepspeed")
    if exe is None:
        raise ValueError("the deepspeed launcher is not on PATH; activate the environment where "
                         "deepspeed is installed")
    return exe


def remove_shm_buffers(port: int) -> None:
    """Call after a CPU launch on ``port`` has ended.  DeepSpeed's CPU all-reduce (shm.cpp)
    shm_open()s one buffer per rank, named after the master port, and never unlinks it: 66 MB of
    RAM per rank and run until reboot."""
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
        try:
            os.unlink(path)
        except OSError:
            pass


def _local_device_count() -> int:
    # Imported only when needed (seconds to import); the launcher counts local devices the same way.
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().device_count()


def launch_world_size(hostfile: str | None = None, include: str | None = None,
                      exclude: str | None = None, num_gpus: int | None = None,
                      num_nodes: int | None = None) -> int:
    """The number of ranks ``deepspeed`` will start, following its runner's rules."""
    if (include or exclude) and (num_gpus is not None or num_nodes is not None):
        raise HostfileError("--num_gpus/--num_nodes cannot be combined with --include/--exclude "
                            "(DeepSpeed refuses it); use one way of choosing slots")
    for flag, value in (("--num_gpus", num_gpus), ("--num_nodes", num_nodes)):
        if value is not None and value < 1:
            raise HostfileError(f"{flag} {value} must be at least 1")
    if hostfile is None and os.path.isfile(DEFAULT_HOSTFILE):
        hostfile = DEFAULT_HOSTFILE
    if hostfile is None:
        # Without a hostfile DeepSpeed runs on this machine only.
        if num_nodes is not None and num_nodes > 1:
            raise HostfileError(f"--num_nodes {num_nodes} needs a --hostfile listing the nodes")
        if num_gpus is not None:
            return num_gpus
        hosts = {"localhost": _local_device_count()}
        return total_slots(filter_hosts(hosts, include, exclude, "this machine"))
    hosts = filter_hosts(parse_hostfile(hostfile), include, exclude, hostfile)
    if num_nodes is not None:
        if num_nodes > len(hosts):
            raise HostfileError(f"--num_nodes {num_nodes} exceeds the {len(hosts)} hosts in "
                                f"{hostfile}; lower it or add hosts")
        hosts = dict(list(hosts.items())[:num_nodes])   # DeepSpeed takes the first N hosts
    if num_gpus is not None:
        small = {h: n for h, n in hosts.items() if n < num_gpus}
        if small:
            host, n = next(iter(small.items()))
            raise HostfileError(f"--num_gpus {num_gpus} exceeds the {n} slots of {host} in "
                                f"{hostfile}; lower it or raise that host's slots")
        hosts = {h: num_gpus for h in hosts}
    return total_slots(hosts)


def check_entry_config(module: str, cfg) -> None:
    """The entry point's own config checks (its ranks run them again), here so that a bad run is
    refused (ConfigError) before any rank starts."""
    if module == "mirl_ds.pretrain":
        from .loop import pretraining_problems as check
    elif module == "mirl_ds.finetune":
        from .finetune_loop import finetuning_problems as check
    else:
        return
    problems = check(cfg)
    if problems:
        raise ConfigError(problems)


def build_launch_command(config_paths, overrides, ds_config, hostfile=None, include=None,
                         exclude=None, num_gpus=None, num_nodes=None, master_addr=None,
                         master_port=None, no_ssh=False, node_rank=None,
                         module="mirl_ds.pretrain") -> list[str]:
    """``deepspeed … --module <module> --config … --deepspeed_config … overrides…`` as argv.

    Raises (ConfigError, DsConfigError, HostfileError: all ValueErrors) if the run config, the
    hostfile or the DeepSpeed JSON is bad or they contradict each other."""
    if isinstance(config_paths, (str, Path)):
        config_paths = [config_paths]
    config_paths, overrides = [str(p) for p in config_paths], list(overrides or [])
    if no_ssh and (node_rank is None or not master_addr):
        # Without ssh every node is started by hand; each must know its rank and the master.
        raise HostfileError("--no_ssh needs --node_rank (this node's index in the hostfile) and "
                            "--master_addr (the address of node 0)")
    if node_rank is not None and not no_ssh:
        raise HostfileError("--node_rank is only used with --no_ssh; add --no_ssh or drop it")

    cfg = load_config(config_paths, overrides)
    check_entry_config(module, cfg)
    world = launch_world_size(hostfile, include, exclude, num_gpus, num_nodes)
    if no_ssh and hostfile is not None:
        nodes = len(filter_hosts(parse_hostfile(hostfile), include, exclude, hostfile))
        if num_nodes is not None:
            nodes = min(nodes, num_nodes)
        if not 0 <= node_rank < nodes:
            raise HostfileError(f"--node_rank {node_rank} must be between 0 and {nodes - 1} "
                                f"(the nodes in {hostfile})")
    resolve_ds_config(cfg, str(ds_config), world, str(ds_config))

    cmd = ["deepspeed"]
    for flag, value in (("--hostfile", hostfile), ("--include", include),
                        ("--exclude", exclude), ("--num_nodes", num_nodes),
                        ("--num_gpus", num_gpus), ("--master_addr", master_addr),
                        ("--master_port", master_port)):
        if value is not None and value != "":
            cmd += [flag, str(value)]
    if no_ssh:
        cmd += ["--no_ssh", "--node_rank", str(node_rank)]
    cmd += ["--module", module]
    for path in config_paths:
        cmd += ["--config", path]
    cmd += ["--deepspeed_config", str(ds_config), *overrides]
    return cmd
