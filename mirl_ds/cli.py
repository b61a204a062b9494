"""``mirl-ds``: one console command, one subcommand per job."""
import argparse
import importlib
import os
import shlex
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
    ft_overrides = list(args.finetune_set or [])
    if args.finetune_steps is not None:
        ft_overrides.append(f"optim.max_steps={args.finetune_steps}")
    run_demo(load_config(files or ["demo"], overrides), ranks=args.ranks, finetune=not args.no_finetune,
             finetune_overrides=ft_overrides)
    return 0


def cmd_launch(args) -> int:
    from .engine.launch import build_launch_command, deepspeed_executable
    cmd = build_launch_command(
        args.config, args.overrides, args.deepspeed_config, hostfile=args.hostfile,
        include=args.include, exclude=args.exclude, num_gpus=args.num_gpus,
        num_nodes=args.num_nodes, master_addr=args.master_addr, master_port=args.master_port,
        no_ssh=args.no_ssh, node_rank=args.node_rank, module=getattr(args, "module", "mirl_ds.pretrain"))
    print(shlex.join(cmd), flush=True)  # flushed: exec replaces the process and its buffers
    if args.dry_run:
        return 0
    # This environment's launcher (the one whose deepspeed the ranks import), else PATH's.
    exe = deepspeed_executable()
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


def cmd_eval(args) -> int:
    from .engine.evaluate import evaluate_checkpoint

    res = evaluate_checkpoint(args.checkpoint, args.val, args.batch, args.out)
    for kind in ("raw", "ema"):
        if kind in res:
            r = res[kind]
            print(f"{kind}: top-1 {r['top1']:.2f}  top-5 {r['top5']:.2f}  ({r['samples']} images, "
                  f"{r['skipped']} skipped)")
    print(f"wrote {res['written']}")
    return 0


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


def cmd_export(args) -> int:
    from .export import export  # imports torch: keep `check-config` fast
    print(export(args.checkpoint, args.out, what=args.what, num_heads=args.num_heads).summary())
    return 0


def cmd_probe(args) -> int:
    from .probe import run_probe  # imports torch: keep `check-config` fast
    run_probe(args.checkpoint, args.train, args.val, args.kind, num_blocks=args.blocks,
              epochs=args.epochs, warmup_epochs=args.warmup_epochs, batch_size=args.batch,
              lr=args.lr, base_lr=args.base_lr, weight_decay=args.weight_decay, seed=args.seed,
              img_size=args.img_size, global_pool=args.global_pool, out_dir=args.out,
              augment=args.augment, cache=not args.no_cache, num_workers=args.workers,
              config=load_config(args.config) if args.config else None)
    return 0


# name -> (module under mirl_ds.bench, what it measures). The modules import torch, so they
# are imported only when their benchmark runs: every other command starts without torch.
BENCHES = {
    "model": ("model_bench", "one pre-training step vs the matmul rate"),
    "infer": ("infer_bench", "classifier img/s per preset, ratios to ViT-B (supp. Table 4)"),
    "data": ("data_bench", "input pipeline img/s per core vs torchvision"),
    "shard": ("shard_bench", "sharding throughput vs tar -cf"),
    "pipeline": ("pipeline_bench", "pp=2 vs pp=1 x dp=2 on 2 ranks: memory, img/s, bubble"),
}


def cmd_bench(args) -> int:
    module_name, what = BENCHES[args.bench]
    module = importlib.import_module(f".bench.{module_name}", __package__)
    parser = argparse.ArgumentParser(prog=f"mirl-ds bench {args.bench}", description=what)
    module.add_arguments(parser)
    return module.run(parser.parse_args(args.bench_args))


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
                                    "stages, + reconstruction picture, then fine-tuning from it and "
                                    "from random initialisation, side by side")
    p.add_argument("items", nargs="*", metavar="YAML|key=value",
                   help="pre-training config and overrides (default: the shipped demo config)")
    p.add_argument("--steps", type=int, help="stop pre-training after this many steps")
    p.add_argument("--finetune-steps", type=int, help="fine-tuning steps of each of the two runs "
                                                      "(default: finetune_demo's epochs)")
    p.add_argument("--finetune-set", action="append", metavar="key=value",
                   help="override of the finetune_demo config (repeatable)")
    p.add_argument("--no-finetune", action="store_true", help="stop after pre-training and the picture")
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

    p = sub.add_parser("finetune", help="check the fine-tuning + DeepSpeed configs, then start `deepspeed` "
                                        "on mirl_ds.finetune",
                       description="Fine-tune the encoder of a pre-training checkpoint (finetune.init) for "
                                   "classification: the same launch options as `mirl-ds launch`.")
    add_launch_arguments(p)
    p.set_defaults(func=cmd_launch, module="mirl_ds.finetune")

    p = sub.add_parser("eval", help="top-1/top-5 of a fine-tuning checkpoint (raw and EMA weights)")
    p.add_argument("checkpoint", help="a fine-tuning checkpoint folder (or its run's checkpoints dir), "
                                      "or a best_raw.pt / best_ema.pt file")
    p.add_argument("--val", help="validation manifest (default: the run's finetune.val_shards)")
    p.add_argument("--batch", type=int, help="batch size (default: the run's data.micro_batch_size)")
    p.add_argument("--out", help="JSON to write (default: <run_dir>/eval.json)")
    p.set_defaults(func=cmd_eval)

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

    p = sub.add_parser("export", help="a checkpoint's encoder (or fine-tuned classifier) as timm weights",
                       description="Write the encoder, or the fine-tuned classifier, of a checkpoint of any "
                                   "layout as a plain state dict with timm VisionTransformer names "
                                   "(.safetensors or .pth) plus <out>.json saying which timm model it loads "
                                   "into with strict=True.")
    p.add_argument("checkpoint", help="a DeepSpeed checkpoint folder (any layout) or a .pt/.pth file")
    p.add_argument("out", help="output weights, *.safetensors or *.pth")
    p.add_argument("--what", choices=("auto", "encoder", "classifier"), default="auto",
                   help="auto (default): the classifier of a fine-tuned checkpoint, else the encoder")
    p.add_argument("--num-heads", type=int, help="attention heads, for a checkpoint that keeps no config "
                                                 "(default: its config's, else width / 64)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("probe", help="linear or non-linear probe of a frozen pre-trained encoder",
                       description="Train a linear (BatchNorm + Linear, MAE's recipe) or non-linear "
                                   "(k Transformer blocks + Linear, Beyond Masking) probe on the frozen "
                                   "encoder of a checkpoint, one process; features are computed once and "
                                   "cached unless --augment. Writes <out>/probe.json.")
    p.add_argument("checkpoint", help="a pre-training checkpoint: DeepSpeed folder (any layout) or .pt file")
    p.add_argument("--train", required=True, metavar="MANIFEST", help="training shards' manifest")
    p.add_argument("--val", required=True, metavar="MANIFEST", help="validation shards' manifest")
    p.add_argument("--kind", choices=("linear", "nonlinear"), default="linear")
    p.add_argument("--blocks", type=int, default=2, help="non-linear probe: Transformer blocks (default 2)")
    p.add_argument("--epochs", type=int, help="default 90 (MAE)")
    p.add_argument("--warmup-epochs", type=float, help="default: 10/90 of --epochs")
    p.add_argument("--batch", type=int, help="batch size (default 256)")
    p.add_argument("--lr", type=float, help="peak lr (default: base lr x batch / 256)")
    p.add_argument("--base-lr", type=float, help="default 0.1 (linear, LARS) or 5e-4 (non-linear, AdamW)")
    p.add_argument("--weight-decay", type=float, help="default 0 (linear) or 0.05 (non-linear)")
    p.add_argument("--img-size", type=int, help="default: the pre-training config's")
    p.add_argument("--global-pool", choices=("avg", "token"), default="avg",
                   help="linear probe feature: mean of patch tokens + fc_norm (MAE, default) or cls token")
    p.add_argument("--augment", action="store_true",
                   help="RandomResizedCrop + flip on the training images (features recomputed every batch)")
    p.add_argument("--no-cache", action="store_true", help="recompute features every epoch")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/probe", help="output folder (default runs/probe)")
    p.add_argument("--config", action="append", metavar="YAML",
                   help="pre-training config, for a checkpoint that keeps none")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("bench", help="benchmarks",
                       description="; ".join(f"{name}: {what}" for name, (_, what) in BENCHES.items()))
    p.add_argument("bench", choices=BENCHES, help="which benchmark (mirl-ds bench NAME --help for its options)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
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
