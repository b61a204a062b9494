"""``mirl-ds``: one console command, one subcommand per job."""
import argparse
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
    run_demo(load_config(files or ["demo"], overrides))
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

    p = sub.add_parser("demo", help="short CPU MIRL pre-training on synthetic images + picture")
    p.add_argument("items", nargs="*", metavar="YAML|key=value", help="default: the shipped demo config")
    p.add_argument("--steps", type=int, help="stop after this many steps")
    p.set_defaults(func=cmd_demo)

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
