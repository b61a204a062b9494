"""DeepSpeed pre-training entry point, one process per rank.

    deepspeed [--hostfile hostfiles/…] --module mirl_ds.pretrain --config <yaml> \\
        --deepspeed_config ds_configs/<json> [key=value …]

(``mirl-ds launch`` builds and checks this command.)  Each rank loads the same YAML and JSON,
reconciles them (:mod:`mirl_ds.engine.ds_config`), builds the model — cut into pipeline stages at
MIRL segment boundaries when ``parallel.pipeline_stages > 1`` — streams its data-parallel share
of the shards, trains, checkpoints and resumes (:mod:`mirl_ds.engine.loop`).
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mirl_ds.pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True,
                        help="run config YAML (a file or a shipped name); repeat to merge")
    parser.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON (ds_configs/…)")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the YAML")
    return parser.parse_args(argv)


def run_entry(run, argv: list[str] | None = None) -> int:
    """Parse a rank's arguments and call ``run(configs, overrides, ds_json)``; a bad input is one
    ``error:`` line and exit status 2, never a traceback."""
    args = parse_args(argv)
    from .engine.checkpoints import NoCheckpoint
    from .engine.loop import TrainingError

    try:
        status = run(args.config, args.overrides, args.deepspeed_config)
    except (TrainingError, NoCheckpoint) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    from .engine.shm import release_shm_buffers

    release_shm_buffers()       # every rank got here: DeepSpeed's CPU all-reduce buffers can go
    return status


def main(argv: list[str] | None = None) -> int:
    from .engine.loop import run_pretraining

    return run_entry(run_pretraining, argv)


if __name__ == "__main__":
    raise SystemExit(main())
