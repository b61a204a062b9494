"""``mirl-ds bench infer``: classifier inference throughput per preset, as ratios to ViT-B.

The shape of the MIRL supplementary's Table 4 (one V100, batch 256, images/s: ViT-S 751,
ViT-S-54 257, ViT-B 488, ViT-B-24 285, ViT-B-48 160) measured on this machine.  Absolute
images/s of a 2-core CPU and a V100 have nothing to say to each other; the ratios to ViT-B
measured in the same run do — how much a deeper or narrower encoder costs at inference.

Method:

* the model is the fine-tuning classifier :func:`mirl_ds.models.classifier.build_classifier`
  makes (timm ``VisionTransformer``, 1000 classes, average pooling + ``fc_norm``), at the
  preset's image size (224 px for every paper preset), fp32, ``eval()``, under
  ``torch.inference_mode``, on random images at ``--batch`` (default 8: the V100's 256 would
  take minutes per forward on a few cores, and a CPU is compute-bound long before that);
* **interleaved rounds**: each round builds every preset in turn (untimed; one model in memory
  at a time — ViT-B-48 alone is 1.4 GB of fp32 weights), runs ``--warmup`` untimed forwards,
  then ``--iters`` timed ones, and frees it.  Taking turns spreads a disturbance of the machine
  (another process, clock changes) over all presets instead of landing on one; the order is
  reversed every other round so that a slow drift does not favour the first preset;
* **best of N, undisturbed only**: every timed forward records the CPU time this process got
  over it / (wall × threads); below 95 % another process took cores (on a shared machine
  OpenMP threads that lose their core stall every parallel region) and the forward does not
  count.  Per preset the fastest undisturbed forward is kept (noise only ever slows a forward
  down); a preset none of whose forwards was undisturbed gets up to ``--extra-rounds`` more
  rounds, and if it still has none its fastest forward is reported and flagged.  images/s =
  batch / that time; ratio = images/s over the reference preset's (``--reference``, default
  ViT-B) from the same run;
* on a machine shared with other work, ``--threads 1`` keeps every forward undisturbed while
  another process holds the other core(s); the ratios hold per core (the forward is
  compute-bound), only the absolute images/s shrink;
* FLOPs per image are counted once per preset (``FlopCounterMode``, batch 1, the CPU attention
  kernel included as in ``bench model``): they say how far the ratios follow compute alone.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from .model_bench import _EXTRA_FLOP_FORMULAS, BUSY_SHARE, CpuShare

# Supplementary Table 4: one V100, batch 256, images/s.
PAPER_V100 = {"vit_small": 751, "vit_s54": 257, "vit_base": 488, "vit_b24": 285, "vit_b48": 160}
PAPER_NAMES = {"vit_small": "ViT-S", "vit_s54": "ViT-S-54", "vit_base": "ViT-B",
               "vit_b24": "ViT-B-24", "vit_b48": "ViT-B-48"}
DEFAULT_PRESETS = ",".join(PAPER_V100)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", default=DEFAULT_PRESETS,
                        help=f"comma-separated encoder presets (default {DEFAULT_PRESETS})")
    parser.add_argument("--reference", default="vit_base",
                        help="preset the ratios are taken to; must be in --presets (default vit_base)")
    parser.add_argument("--batch", type=int, default=8, help="images per forward (default 8)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds; each builds every preset afresh (default 3)")
    parser.add_argument("--iters", type=int, default=1, help="timed forwards per preset per round (default 1)")
    parser.add_argument("--extra-rounds", type=int, default=3,
                        help="further rounds, only for presets none of whose forwards ran undisturbed "
                             "(cpu >= 95%%), until each has one (default at most 3)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed forwards per preset per round, after building it (default 1)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier classes (default 1000)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: os.cpu_count())")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")


@dataclass
class PresetResult:
    preset: str
    name: str                       # the paper's name, or the preset's
    depth: int
    embed_dim: int
    num_heads: int
    img_size: int
    params_m: float
    gflop_per_image: float = 0.0
    times_s: list[float] = field(default_factory=list)   # every timed forward, in order
    shares: list[float] = field(default_factory=list)    # the cpu share of each of them

    @property
    def clean(self) -> bool:
        """Whether some forward ran with the cores to itself."""
        return any(c >= BUSY_SHARE for c in self.shares)

    @property
    def best_index(self) -> int:
        """The fastest forward among the undisturbed ones (all of them if none was)."""
        ok = [i for i, c in enumerate(self.shares) if c >= BUSY_SHARE] or range(len(self.times_s))
        return min(ok, key=lambda i: self.times_s[i])

    @property
    def best_s(self) -> float:
        return self.times_s[self.best_index]

    @property
    def cpu_share(self) -> float:
        return self.shares[self.best_index]


def parse_presets(text: str, reference: str) -> list[str]:
    from mirl_ds.models.presets import get_preset

    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        get_preset(n)                       # ValueError naming the choices
    if not names or len(set(names)) != len(names):
        raise ValueError(f"--presets {text!r} must name each preset once")
    if reference not in names:
        raise ValueError(f"--reference {reference} is not among --presets {','.join(names)}")
    return names


def count_gflop(model: torch.nn.Module, img_size: int) -> float:
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    with torch.inference_mode(), counter:
        model(torch.randn(1, 3, img_size, img_size))
    return counter.get_total_flops() / 1e9


def time_preset(row: PresetResult, args, first_round: bool) -> None:
    """Build the preset's classifier, warm it up, time ``--iters`` forwards into ``row``."""
    from mirl_ds.models.classifier import build_classifier
    from mirl_ds.models.presets import get_preset

    torch.manual_seed(args.seed)
    model = build_classifier(get_preset(row.preset), args.num_classes).eval()
    imgs = torch.randn(args.batch, 3, row.img_size, row.img_size)
    try:
        with torch.inference_mode():
            for _ in range(args.warmup):
                model(imgs)
            for _ in range(args.iters):
                with CpuShare() as share:
                    t0 = time.perf_counter()
                    model(imgs)
                    row.times_s.append(time.perf_counter() - t0)
                row.shares.append(share.share)
        if first_round:
            row.gflop_per_image = count_gflop(model, row.img_size)
            row.params_m = sum(t.numel() for t in model.parameters()) / 1e6
    finally:
        del model, imgs
        gc.collect()                        # the next preset must not share memory with this one


def new_row(preset: str) -> PresetResult:
    from mirl_ds.models.presets import get_preset

    p = get_preset(preset)
    return PresetResult(preset, PAPER_NAMES.get(preset, preset), p.depth, p.embed_dim, p.num_heads,
                        p.img_size, params_m=0.0)


def measure(names: list[str], args) -> list[PresetResult]:
    rows = {n: new_row(n) for n in names}
    for r in range(args.rounds + args.extra_rounds):
        todo = names if r < args.rounds else [n for n in names if not rows[n].clean]
        if not todo:
            break
        # Extra rounds only for presets every forward of which another process disturbed: a
        # busy stretch of a shared machine must not decide a ratio.
        for n in todo if r % 2 == 0 else todo[::-1]:
            time_preset(rows[n], args, first_round=r == 0)
            print(f"  round {r + 1}{'' if r < args.rounds else ' (extra)'} {rows[n].name}: "
                  f"{args.batch / rows[n].times_s[-1]:.2f} img/s, cpu {rows[n].shares[-1]:.0%}", flush=True)
    return [rows[n] for n in names]


def table(rows: list[PresetResult], ref: PresetResult, batch: int, markdown: bool = False) -> str:
    ref_ips, paper_ref = batch / ref.best_s, PAPER_V100.get(ref.preset)
    head = ["model", "depth", "width", "heads", "params", "GFLOP/img", "img/s", "GFLOP/s",
            f"ratio to {ref.name}", "V100 img/s (paper)", "V100 ratio (paper)", "cpu"]
    body = []
    for r in rows:
        ips = batch / r.best_s
        paper = PAPER_V100.get(r.preset)
        paper_ratio = f"{paper / paper_ref:.2f}" if paper and paper_ref else "-"
        body.append([r.name, str(r.depth), str(r.embed_dim), str(r.num_heads), f"{r.params_m:.0f}M",
                     f"{r.gflop_per_image:.1f}", f"{ips:.2f}", f"{r.gflop_per_image * ips:.0f}",
                     f"{ips / ref_ips:.2f}", str(paper or "-"), paper_ratio, f"{r.cpu_share:.0%}"])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), "-" * len(fmt(head))] + [fmt(b) for b in body])


def run(args: argparse.Namespace) -> int:
    if args.batch < 1 or args.rounds < 1 or args.iters < 1 or args.warmup < 0 or args.extra_rounds < 0:
        print("bench infer: --batch, --rounds and --iters must be at least 1, --warmup and "
              "--extra-rounds at least 0")
        return 2
    names = parse_presets(args.presets, args.reference)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    print(f"bench infer: {', '.join(names)}; batch {args.batch}, {args.rounds} interleaved round(s) of "
          f"{args.warmup} warm-up + {args.iters} timed forward(s), best kept; {threads} thread(s), "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}", flush=True)
    rows = measure(names, args)
    ref = rows[names.index(args.reference)]

    print()
    print(table(rows, ref, args.batch))
    if args.markdown:
        print()
        print(table(rows, ref, args.batch, markdown=True))
    print()
    print(f"img/s = batch {args.batch} / fastest undisturbed forward (cpu >= {BUSY_SHARE:.0%}); ratios to "
          f"{ref.name} from this run; V100 = supplementary Table 4 (batch 256). cpu = CPU time this "
          f"process got / (wall x threads) during that forward; load average now "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} core(s).")
    busy = [r.name for r in rows if r.cpu_share < BUSY_SHARE]
    if busy:
        print(f"WARNING: the machine was busy while timing {', '.join(busy)} (cpu < {BUSY_SHARE:.0%}); "
              f"re-run on an idle machine, or with fewer --threads than cores (the ratios hold per "
              f"core), for trustworthy ratios.")

    if args.json is not None:
        ref_ips = args.batch / ref.best_s
        payload = {
            "batch": args.batch, "rounds": args.rounds, "iters": args.iters, "warmup": args.warmup,
            "threads": threads, "torch": torch.__version__, "machine": platform.machine(),
            "reference": ref.preset, "num_classes": args.num_classes,
            "rows": [dict(asdict(r), best_s=r.best_s, median_s=statistics.median(r.times_s),
                          images_per_s=args.batch / r.best_s,
                          ratio=(args.batch / r.best_s) / ref_ips, cpu_share=r.cpu_share,
                          paper_v100_images_per_s=PAPER_V100.get(r.preset),
                          paper_v100_ratio=(PAPER_V100[r.preset] / PAPER_V100[ref.preset]
                                            if r.preset in PAPER_V100 and ref.preset in PAPER_V100
                                            else None))
                     for r in rows],
            "machine_busy": bool(busy),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mirl-ds bench infer", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
