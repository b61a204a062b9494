"""DeepSpeed fine-tuning entry point, one process per rank.

    deepspeed [--hostfile hostfiles/…] --module mirl_ds.finetune --config <yaml> \\
        --deepspeed_config ds_configs/<json> [key=value …]

(``mirl-ds finetune`` builds and checks this command.)  Each rank builds the classification
ViT, initialised from ``finetune.init`` (a pre-training checkpoint of any layout), streams its
data-parallel share of the training shards, evaluates raw and EMA weights on
``finetune.val_shards``, checkpoints and resumes (:mod:`mirl_ds.engine.finetune_loop`).
"""
from __future__ import annotations

from .pretrain import run_entry


def main(argv: list[str] | None = None) -> int:
    from .engine.finetune_loop import run_finetuning

    return run_entry(run_finetuning, argv)


if __name__ == "__main__":
    raise SystemExit(main())
