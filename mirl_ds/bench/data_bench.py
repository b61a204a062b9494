"""``mirl-ds bench data``: pre-training input pipeline, images/s per worker (one core).

One run, one process, ``torch.set_num_threads(1)``:

1. Generate ``--images`` ImageNet-like JPEGs (about 500 x 375 in a few orientations/aspect
   ratios, quality 90, smooth random colour fields with edges and fine texture; numpy + PIL)
   into a temporary ImageFolder tree of a few classes, and shard that tree with ``mirl-ds
   shard`` (the same bytes, docs/shard-format.md, with a manifest).
2. For each output size (``--size``, then ``--extra-sizes``, default 112 and 64), time full
   passes over the images, alternating the pipelines so they share the machine's state:

   * baseline: torchvision ``ImageFolder`` + ``RandomResizedCrop(size, scale=(0.2, 1),
     bicubic)`` + ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize`` through a
     ``DataLoader(batch_size=64, num_workers=0)``;
   * ours: the training input pipeline, :class:`~mirl_ds.data.stream.StreamingLoader` (batch 64,
     ``num_workers=0``) over the shards with :class:`~mirl_ds.data.decode.PretrainDecoder`
     (JPEG draft, crops seeded by stream position) -> uint8 batches.  That is what a data
     worker produces; the trainer normalises the batch on the accelerator;
   * ours + normalise: the same plus :func:`~mirl_ds.data.decode.normalize_batch` on this CPU
     (into a fresh float32 batch each time), the counterpart of the baseline's per-image
     ``ToTensor`` + ``Normalize`` for a CPU-only trainer;
   * ours without draft (``PretrainDecoder(draft=False)``), to show what the draft itself buys.

   Each pipeline's rate is taken from the best of ``--repeats`` passes (other processes on a
   shared machine only ever slow a pass down).  With one process the rate is images per
   CPU-second of the process (``time.process_time``; single-threaded here, so it is the
   per-core rate even while other processes take the core away part of the time); the
   wall-clock ratio is shown beside it.  ``cpu`` is the CPU time the process got over the wall
   time of the passes (below ~90 % the machine was busy and even CPU times get noisier).

``--workers N`` (N > 1) runs every pipeline with ``DataLoader(num_workers=N)`` instead and
reports the aggregate rate divided by N.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

TARGET_RATIO = 2.0  # the goal: at least 2x the torchvision baseline per core at 224


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=400,
                        help="JPEGs to generate and decode per pass (default 400)")
    parser.add_argument("--size", type=int, default=224, help="main output size (default 224)")
    parser.add_argument("--extra-sizes", type=int, nargs="*", default=[112, 64],
                        help="further output sizes measured in the same run (default 112 64)")
    parser.add_argument("--workers", type=int, default=1,
                        help="1 (default): one process, num_workers=0, i.e. per core; N > 1: "
                             "DataLoader(num_workers=N), rate reported per worker")
    parser.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed passes per pipeline and size; the best is kept (default 3)")
    parser.add_argument("--classes", type=int, default=4, help="ImageFolder classes (default 4)")
    parser.add_argument("--shard-size", type=int, default=100, help="images per tar shard")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="write the generated images/shards here and keep them "
                             "(default: a temporary directory, removed afterwards)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--min-ratio", type=float, default=None,
                        help="exit 1 if ours/baseline at --size is below this")


# -- synthetic ImageNet-like JPEGs -----------------------------------------------------------

_SHAPES = ((500, 375), (500, 375), (375, 500), (500, 333), (500, 400), (450, 500))


def make_jpeg(rng, quality: int = 90) -> bytes:
    """One ImageNet-like JPEG: a smooth random colour field, a few soft-edged shaded blobs
    (objects with edges), and fine texture whose strength varies over the image, at one of a
    few ~500 x 375 shapes.  About 0.5 bytes/pixel at quality 90 (ImageNet's training JPEGs
    average roughly 110 KB for ~400 x 350 pixels), so entropy decoding costs what it would."""
    import numpy as np
    from PIL import Image

    w, h = _SHAPES[int(rng.integers(len(_SHAPES)))]

    def field(cells: int, channels: int) -> np.ndarray:
        gh, gw = max(2, h // cells), max(2, w // cells)
        low = (rng.random((gh, gw, channels)) * 255).astype(np.uint8).squeeze(-1 if channels == 1 else None)
        img = Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC)
        return np.asarray(img, dtype=np.float32).reshape(h, w, channels)

    img = field(int(rng.integers(60, 160)), 3)                     # smooth background
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    for _ in range(int(rng.integers(2, 6))):                        # objects with edges
        cy, cx = rng.random() * h, rng.random() * w
        ry, rx = (0.1 + 0.3 * rng.random()) * h, (0.1 + 0.3 * rng.random()) * w
        d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        mask = np.clip((1.0 - d) * 8.0, 0.0, 1.0)[..., None]         # ~1-2 px soft edge
        colour = rng.random(3).astype(np.float32) * 255
        shade = field(int(rng.integers(20, 50)), 1) * np.float32(0.6 / 255) + np.float32(0.7)
        img += mask * (colour * shade - img)
    detail = field(int(rng.integers(4, 10)), 1) - np.float32(128)   # mid-frequency pattern
    strength = field(int(rng.integers(80, 200)), 1) * np.float32(1 / 255)  # where texture is
    noise = rng.standard_normal((h, w, 1), dtype=np.float32)
    img += strength * (np.float32(0.5) * detail + np.float32(40) * noise)
    arr = np.clip(img, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@dataclass
class Dataset:
    root: Path             # ImageFolder tree
    shards: list[str]      # tar files with the same bytes
    images: int
    mean_bytes: float
    mean_pixels: float
    manifest: str          # the shards' manifest (mirl-ds shard)


def write_dataset(out: Path, images: int, classes: int, shard_size: int, seed: int,
                  min_shards: int = 1) -> Dataset:
    """Generate the JPEGs once as an ImageFolder tree, then shard that tree with ``mirl-ds shard``
    (:func:`mirl_ds.data.sharding.shard_dataset`): the same bytes, in the product's shard format."""
    import numpy as np
    from PIL import Image

    from mirl_ds.data.sharding import shard_dataset

    root, shard_dir = out / "imagefolder", out / "shards"
    for c in range(classes):
        (root / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
    total_bytes, total_px = 0, 0
    for k in range(images):
        rng = np.random.default_rng([seed, k])
        data = make_jpeg(rng)
        (root / f"class_{k % classes:02d}" / f"img_{k:06d}.JPEG").write_bytes(data)
        total_bytes += len(data)
        with Image.open(io.BytesIO(data)) as im:
            total_px += im.size[0] * im.size[1]
    per_shard = max(1, min(shard_size, -(-images // max(1, min_shards))))
    result = shard_dataset(root, shard_dir, prefix="bench", max_count=per_shard, seed=seed, progress=False)
    manifest = result["manifest"]
    return Dataset(root, [str(shard_dir / sh["name"]) for sh in manifest["shards"]], images,
                   total_bytes / images, total_px / images, str(shard_dir / "bench.manifest.json"))


# -- pipelines -------------------------------------------------------------------------------

def _worker_init(worker_id: int) -> None:
    import torch
    torch.set_num_threads(1)


def baseline_loader(ds: Dataset, size: int, batch: int, workers: int):
    import torch
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torchvision import datasets
    from torchvision import transforms as T

    tf = T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])
    dataset = datasets.ImageFolder(str(ds.root), transform=tf)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False,
                                         num_workers=workers if workers > 1 else 0,
                                         worker_init_fn=_worker_init if workers > 1 else None)

    def run_pass() -> int:
        n = 0
        for x, _y in loader:
            n += x.shape[0]
        return n
    return run_pass


def ours_loader(ds: Dataset, size: int, batch: int, workers: int, draft: bool, seed: int,
                normalize: bool = False):
    """The training input pipeline: :class:`~mirl_ds.data.stream.StreamingLoader` over the
    shards (position-seeded crops, fixed uint8 batches), decoding with
    :class:`~mirl_ds.data.decode.PretrainDecoder`.  Its product is the uint8 batch a data worker
    hands to the trainer, which normalises it on the accelerator; ``normalize=True`` also runs
    :func:`~mirl_ds.data.decode.normalize_batch` here on the CPU (into a fresh float32 batch),
    to show what the per-image ``ToTensor`` + ``Normalize`` of the baseline would cost us."""
    from mirl_ds.data.decode import PretrainDecoder, normalize_batch
    from mirl_ds.data.stream import SampleDecoder, StreamingLoader

    decoder = PretrainDecoder(size, scale=(0.2, 1.0), seed=seed, draft=draft)
    loader = StreamingLoader(ds.manifest, batch_size=batch, num_workers=workers if workers > 1 else 0,
                             seed=seed, decode=SampleDecoder(decoder))

    def run_pass() -> int:
        n = 0
        for b in loader:                 # one epoch: every full batch of the shards
            x = b["images"]
            if normalize:
                x = normalize_batch(x)          # ImageNet mean/std, its defaults
            n += x.shape[0]
        return n
    run_pass.decoder = decoder
    run_pass.expected = loader.epoch_steps * batch
    return run_pass


# -- measurement -----------------------------------------------------------------------------

@dataclass
class Row:
    size: int
    baseline: float                  # images per second per core (see the module docstring)
    ours: float                      # uint8 batches: what a data worker delivers
    ours_norm: float                 # + normalize_batch on the CPU
    ours_no_draft: float
    ratio: float                     # ours / baseline
    ratio_norm: float
    ratio_no_draft: float
    wall_ratio: float                # the same ratio from wall-clock times
    draft_share: dict = field(default_factory=dict)   # draft factor -> fraction of samples
    passes: dict = field(default_factory=dict)        # pipeline -> [(wall s, cpu s), ...]
    cpu_share: float | None = None  # one process only


def measure_size(ds: Dataset, size: int, args) -> Row:
    pipes = {
        "baseline": baseline_loader(ds, size, args.batch, args.workers),
        "ours": ours_loader(ds, size, args.batch, args.workers, True, args.seed),
        "ours_norm": ours_loader(ds, size, args.batch, args.workers, True, args.seed, normalize=True),
        "ours_no_draft": ours_loader(ds, size, args.batch, args.workers, False, args.seed),
    }
    expected = {k: getattr(fn, "expected", ds.images) for k, fn in pipes.items()}
    for fn in pipes.values():  # warm-up: imports, page cache, allocator
        fn()
    if args.workers <= 1:
        pipes["ours"].decoder.draft_counts.clear()
    passes: dict[str, list[tuple[float, float]]] = {k: [] for k in pipes}
    for _ in range(args.repeats):
        for name, fn in pipes.items():
            c0, t0 = time.process_time(), time.perf_counter()
            n = fn()
            passes[name].append((time.perf_counter() - t0, time.process_time() - c0))
            if n != expected[name]:
                raise RuntimeError(f"pipeline {name} yielded {n} images, expected {expected[name]}")
    single = args.workers <= 1
    # one process: images per CPU-second of the process (per core, robust to other processes
    # taking the core away); N workers: wall-clock rate / N.  The streaming loader drops the
    # last partial batch, so each pipeline's rate uses its own image count.
    if single:
        rate = {k: expected[k] / min(c for _, c in v) for k, v in passes.items()}
    else:
        rate = {k: expected[k] / min(w for w, _ in v) / args.workers for k, v in passes.items()}
    wall_rate = {k: expected[k] / min(w for w, _ in v) for k, v in passes.items()}
    wall = sum(w for v in passes.values() for w, _ in v)
    cpu = sum(c for v in passes.values() for _, c in v)
    counts = pipes["ours"].decoder.draft_counts if single else {}
    total = sum(counts.values()) or 1
    return Row(size=size, baseline=rate["baseline"], ours=rate["ours"], ours_norm=rate["ours_norm"],
               ours_no_draft=rate["ours_no_draft"],
               ratio=rate["ours"] / rate["baseline"],
               ratio_norm=rate["ours_norm"] / rate["baseline"],
               ratio_no_draft=rate["ours_no_draft"] / rate["baseline"],
               wall_ratio=wall_rate["ours"] / wall_rate["baseline"],
               draft_share={int(s): counts[s] / total for s in sorted(counts)},
               passes=passes, cpu_share=cpu / wall if single and wall else None)


def measure_decode_only(ds: Dataset, repeats: int) -> float:
    """Images per CPU-second of nothing but ``Image.open(bytes).load()`` (full-size JPEG decode)
    over the same bytes: the floor every full-resolution path pays, whatever it does after."""
    import webdataset as wds
    from PIL import Image

    blobs = [jpg for jpg, in wds.WebDataset(ds.shards, shardshuffle=False,
                                             empty_check=False).to_tuple("jpg")]
    best = math.inf
    for _ in range(repeats + 1):  # the first pass is a warm-up
        c0 = time.process_time()
        for b in blobs:
            Image.open(io.BytesIO(b)).load()
        best = min(best, time.process_time() - c0)
    return len(blobs) / best


def _pct(fraction: float) -> str:
    """A share as a percentage that never rounds a few samples away (99.6 % is not 100 %)."""
    pct = 100 * fraction
    if pct in (0.0, 100.0) or 1 <= pct <= 99:
        return f"{pct:.0f}%"
    return f"{min(max(pct, 0.1), 99.9):.1f}%"


def format_table(rows: list[Row]) -> str:
    head = (f"{'size':>5} {'baseline img/s':>15} {'ours img/s':>11} {'ratio':>6} "
            f"{'(wall)':>6} {'+normalise':>11} {'ratio':>6} {'no-draft':>9} {'ratio':>6}  "
            f"{'draft 1/2/4/8 share':<20} {'cpu':>4}")
    lines = [head, "-" * len(head)]
    for r in rows:
        share = "/".join(_pct(r.draft_share.get(s, 0.0)) for s in (1, 2, 4, 8)) \
            if r.draft_share else "n/a"
        lines.append(f"{r.size:>5} {r.baseline:>15.1f} {r.ours:>11.1f} {r.ratio:>5.2f}x "
                     f"{r.wall_ratio:>5.2f}x {r.ours_norm:>11.1f} {r.ratio_norm:>5.2f}x "
                     f"{r.ours_no_draft:>9.1f} {r.ratio_no_draft:>5.2f}x  "
                     f"{share:<20} " + (f"{100 * r.cpu_share:>3.0f}%" if r.cpu_share is not None
                                        else " n/a"))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import PIL
    import torch
    import torchvision
    from PIL import features

    if args.images < 1 or args.repeats < 1 or args.batch < 1 or args.workers < 1:
        print("bench data: --images, --repeats, --batch and --workers must be at least 1")
        return 2
    torch.set_num_threads(1)
    sizes = list(dict.fromkeys([args.size, *args.extra_sizes]))
    print(f"bench data: {args.images} images, sizes {sizes}, batch {args.batch}, "
          f"{'1 process (num_workers=0)' if args.workers <= 1 else f'{args.workers} workers'}, "
          f"best of {args.repeats} passes; torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}, Pillow {PIL.__version__} (libjpeg-turbo "
          f"{features.version('jpg')}), {platform.processor() or platform.machine()}", flush=True)

    with tempfile.TemporaryDirectory(prefix="mirl_ds_bench_data_") as tmp:
        out = args.data_dir or Path(tmp)
        t0 = time.perf_counter()
        ds = write_dataset(out, args.images, args.classes, args.shard_size, args.seed,
                           min_shards=2 * args.workers if args.workers > 1 else 1)
        print(f"  generated {ds.images} JPEGs in {time.perf_counter() - t0:.1f} s: mean "
              f"{ds.mean_bytes / 1024:.0f} KiB, {ds.mean_pixels / 1e3:.0f} kpixel "
              f"({ds.mean_bytes / ds.mean_pixels:.2f} bytes/pixel), {len(ds.shards)} shard(s)",
              flush=True)
        rows = []
        for size in sizes:
            rows.append(measure_size(ds, size, args))
            r = rows[-1]
            print(f"  size {size}: baseline {r.baseline:.1f}, ours {r.ours:.1f} img/s "
                  f"({r.ratio:.2f}x)", flush=True)

        decode_rate = measure_decode_only(ds, args.repeats) if args.workers <= 1 else None

    print()
    print(format_table(rows))
    print()
    rate_note = ("img/s per core = images / CPU seconds of the process, best pass" if args.workers <= 1
                 else f"img/s per worker = wall-clock images/s / {args.workers}, best pass")
    print(f"{rate_note}; ratio = ours / baseline ((wall): the same from wall-clock time). "
          "baseline = torchvision ImageFolder + RandomResizedCrop(bicubic) + flip + ToTensor + Normalize; "
          "ours = StreamingLoader over `mirl-ds shard` shards -> PretrainDecoder (JPEG draft where the "
          "crop keeps >= size px per side) -> uint8 batch, what a data worker hands the trainer (which "
          "normalises on the accelerator); +normalise = ours + normalize_batch on this CPU; no-draft = "
          "ours with draft=False. draft share = fraction of samples decoded at 1/1, 1/2, 1/4, 1/8.")
    print(f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} core(s).")
    busy = [str(r.size) for r in rows if r.cpu_share is not None and r.cpu_share < 0.9]
    if busy:
        print(f"WARNING: the machine was busy while timing size(s) {', '.join(busy)} "
              f"(cpu < 90%): numbers are noisy; re-run on an idle machine.")
    main = rows[0]
    if decode_rate is not None:
        line = (f"JPEG decode alone (Image.open(bytes).load(), full size, nothing else): "
                f"{decode_rate:.1f} img/s per core = {1e3 / decode_rate:.2f} ms/img, i.e. "
                f"{decode_rate / main.baseline:.2f}x the baseline at size {main.size}")
        full = main.draft_share.get(1, 0.0)
        if full:
            line += (f"; {_pct(full)} of the samples there decode at full resolution (a 2x draft "
                     f"needs a crop of at least {2 * main.size} px per side)")
        print(line + ".")
    verdict = "reached" if main.ratio >= TARGET_RATIO else "NOT reached"
    print(f"target >= {TARGET_RATIO:.1f}x per core at size {main.size}: {verdict} "
          f"({main.ratio:.2f}x).")
    if args.json:
        args.json.write_text(json.dumps({
            "images": ds.images, "mean_bytes": ds.mean_bytes, "mean_pixels": ds.mean_pixels,
            "workers": args.workers, "batch": args.batch, "repeats": args.repeats,
            "decode_only_img_per_s": decode_rate,
            "rows": [asdict(r) for r in rows],
            "median_cpu_ratio": {r.size: statistics.median(c for _, c in r.passes["baseline"]) /
                                 statistics.median(c for _, c in r.passes["ours"]) for r in rows},
        }, indent=2))
        print(f"wrote {args.json}")
    if args.min_ratio is not None and main.ratio < args.min_ratio:
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mirl-ds bench data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
