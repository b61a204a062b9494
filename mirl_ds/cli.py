"""``mirl-ds``: one console command, one subcommand per job."""
import argparse
import os
import shlex
import shutil
import sys

from .config import ConfigError, dump_config, load_config
from .config.loader import shipped_configs
from .config.schema import RunConfig


def _split_args(items: list[str]) -> tuple[list[str], list[str]]:
    """Positional words: ``key.path=value`` are overrides, everything else a YAML file/name."""
    return [i for i in items if "=" not in i], [i for i in items if "=" in i]


def cmd_check_config(args) -> int:
    if args.show_defaults:
        print(dump_config(RunConfig()), end="")
        return 0
    files, overrides = _split_args(args.items)
    cfg = load_config(files, overrides)
    text = dump_config(cfg)
    if args.write:
        with open(args.write, "w") as f:
            f.write(text)
        print(f"wrote the resolved config to {args.write}")
    else:
        print(text, end="")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo  # imports torch: keep `check-config` fast
    files, overrides = _split_args(args.items)
    if args.steps is not None:
        overrides.append(f"optim.max_steps={args.steps}")
    run_demo(load_config(files or ["demo"], overrides), ranks=args.ranks)
    return 0


def cmd_launch(args) -> int:
    from .engine.launch import build_launch_command
    cmd = build_launch_command(
        args.config, args.overrides, args.deepspeed_config, hostfile=args.hostfile,
        include=args.include, exclude=args.exclude, num_gpus=args.num_gpus,
        num_nodes=args.num_nodes, master_addr=args.master_addr, master_port=args.master_port,
        no_ssh=args.no_ssh, node_rank=args.node_rank)
    print(shlex.join(cmd), flush=True)  # flushed: exec replaces the process and its buffers
    if args.dry_run:
        return 0
    # The venv's bin/ may not be on PATH when run as `.venv/bin/python -m mirl_ds`.
    sibling = os.path.join(os.path.dirname(sys.executable), cmd[0])
    exe = shutil.which(cmd[0]) or (sibling if os.access(sibling, os.X_OK) else None)
    if exe is None:
        raise ValueError("the deepspeed launcher is not on PATH; activate the environment "
                         "where deepspeed is installed")
    # exec, not subprocess: deepspeed becomes this process, so Ctrl-C and SIGTERM reach it
    # (and it forwards them to every rank) with no wrapper in between.
    os.execvp(exe, cmd)
    return 0  # not reached


def add_launch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value", help="run config overrides")
    p.add_argument("--config", action="append", required=True, metavar="YAML",
                   help="run config (path or shipped name); repeat to merge several")
    p.add_argument("--deepspeed_config", required=True, metavar="JSON",
                   help="DeepSpeed config, e.g. ds_configs/cpu_test.json (see ds_configs/README.md)")
    p.add_argument("--hostfile", help="DeepSpeed hostfile, e.g. hostfiles/localhost")
    p.add_argument("--include", help="slots to use: host1:0,1@host2 (DeepSpeed syntax)")
    p.add_argument("--exclude", help="slots to leave out: host1:0@host2 (DeepSpeed syntax)")
    p.add_argument("--num_gpus", type=int, help="ranks per node")
    p.add_argument("--num_nodes", type=int, help="use the first N hosts of the hostfile")
    p.add_argument("--master_addr", help="address of node 0")
    p.add_argument("--master_port", type=int, help="port of node 0's rendezvous")
    p.add_argument("--no_ssh", action="store_true",
                   help="start this node only (run the same command on every node)")
    p.add_argument("--node_rank", type=int, help="this node's index (with --no_ssh)")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything and print the deepspeed command without running it")


def cmd_universal(args) -> int:
    from .engine.checkpoints import NoCheckpoint
    from .engine.universal import UniversalError, convert

    try:
        out = convert(args.checkpoint, args.out, quiet=not args.verbose)
    except (NoCheckpoint, UniversalError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote the universal checkpoint {out}\n"
          f"resume it on any pipeline/data-parallel layout (with a ZeRO DeepSpeed config): "
          f"checkpoint.resume={out}")
    return 0


def cmd_bench(args) -> int:
    return args.bench_run(args)


def cmd_shard(args) -> int:
    from .data import sharding
    return sharding.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirl-ds", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check-config", help="print the resolved config, or every problem in it",
                       description="Merge YAML files (paths or shipped names: "
                                   f"{', '.join(shipped_configs())}) and key.path=value overrides.")
    p.add_argument("items", nargs="*", metavar="YAML|key=value")
    p.add_argument("--write", metavar="PATH", help="write the resolved config here")
    p.add_argument("--show-defaults", action="store_true", help="print every key with its default")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("demo", help="CPU MIRL pre-training on synthetic shards, 2 ranks as 2 pipeline "
                                    "stages, + reconstruction picture")
    p.add_argument("items", nargs="*", metavar="YAML|key=value", help="default: the shipped demo config")
    p.add_argument("--steps", type=int, help="stop after this many steps")
    p.add_argument("--ranks", type=int, default=2, choices=(1, 2, 4),
                   help="CPU ranks = pipeline stages (default 2; G=4 segments split evenly)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("launch", aliases=["pretrain"],
                       help="check the run + DeepSpeed configs, then start `deepspeed` on them",
                       description="Reconcile the YAML run config, the hostfile and the DeepSpeed "
                                   "JSON for the world size to launch, print the deepspeed "
                                   "command and run it.")
    add_launch_arguments(p)
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("universal", help="convert a ZeRO checkpoint for another pipeline/data-parallel layout",
                       description="Run DeepSpeed's ds_to_universal on a checkpoint and add the parameter "
                                   "names of the other layout (pipeline <-> plain model), so that it resumes "
                                   "with any parallel.pipeline_stages and any number of ranks.")
    p.add_argument("checkpoint", help="a global_step<N> folder, or a checkpoint dir (its latest)")
    p.add_argument("--out", help="output folder (default: <checkpoint>_universal beside it)")
    p.add_argument("--verbose", action="store_true", help="show DeepSpeed's converter output")
    p.set_defaults(func=cmd_universal)

    from .data import sharding
    p = sub.add_parser("shard", help="write WebDataset tar shards + manifest (local or s3://)")
    sharding.add_arguments(p)
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("bench", help="benchmarks")
    bench = p.add_subparsers(dest="bench", required=True)
    from .bench import data_bench, model_bench, shard_bench
    for name, module, what in (("model", model_bench, "one pre-training step vs the matmul rate"),
                               ("data", data_bench, "input pipeline img/s per core vs torchvision"),
                               ("shard", shard_bench, "sharding throughput vs tar -cf")):
        module.add_arguments(bench.add_parser(name, help=what))
        bench.choices[name].set_defaults(bench_run=module.run)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        # Our own bad-input errors are single sentences; say them without a traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
