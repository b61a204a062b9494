"""Embedded default dataset: a clearly labelled *synthetic* labelled image set.

This is what the CPU demo and the tests use until real ImageNet shards are wired in.
It is NOT ImageNet and NOT natural images.  :func:`generate_synthetic_imagefolder`
writes a torchvision ``ImageFolder`` tree::

    <root>/README.txt                      says the data is synthetic and how it was made
    <root>/classes.json                    {"0": "<name>", ...}  (sorted = ImageFolder order)
    <root>/{train,val}/<class>/<key>.JPEG  RGB, JPEG quality 90
    <root>/spec.json                       written last; marks the tree complete

with ``key = <split>_<class name>_<index:05d>``.

What the classes mean
---------------------
A class is a (shape, texture) pair, e.g. ``disc_stripes``: shapes are
disc / square / triangle / cross, textures are solid / stripes / checker / dots.
Class ``c`` of the canonical order is ``SHAPES[c % 4]`` with ``TEXTURES[c // 4]``, so
the default 8 classes are the 4 shapes x {solid, stripes}; up to 16 classes are
supported.  Class *indices* are the positions of the names in sorted order, which is
the order torchvision's ``ImageFolder`` assigns.

Everything else varies freely *within* every class and is drawn from the same
distribution for all classes: the background (bilinear blend of four random corner
colours plus mild noise), the shape's colour (random, but contrasting with the
background under it), the texture's second colour, position, scale, rotation,
texture orientation / phase / period, and 0-2 soft distractor blobs (Gaussian
ellipses, never a class shape).  Shapes are scaled to equal area and textures to ~50%
fill, so neither mean colour nor position identifies the class: only shape and texture
do, which gives masked image modelling structure to reconstruct and a classifier
something to learn.

The ``mirror`` layout
---------------------
``SyntheticSpec(layout="mirror")`` is a second set, made to show in minutes on a CPU whether
pre-training transfers.  Its class is the image's mirror symmetry: ``mirror_none``,
``mirror_leftright`` (right half = left half mirrored), ``mirror_topbottom`` or
``mirror_point`` (lower half = upper half turned by 180 degrees); the content is an image
of the default layout with a random class.  To fill a masked patch whose mirror image is
visible, masked image modelling must work out which symmetry the image has: the label is
something pre-training learns without labels, while a tiny ViT learning it from labels
alone has to discover the comparison of mirrored patches (``tests/test_transfer.py``).
Horizontal flips keep every label; crops and geometric augmentations that move the
centre do not.

Rendering is vectorised numpy on a coordinate grid, supersampled 2x and box-filtered
down for antialiasing; PIL only encodes the JPEG.  Each image's random stream is
``np.random.SeedSequence([seed, split, class_index, index])``, so output is
byte-identical for the same spec whatever the worker count or order.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "SHAPES",
    "TEXTURES",
    "MAX_CLASSES",
    "GENERATOR_VERSION",
    "LAYOUTS",
    "MIRRORS",
    "SyntheticSpec",
    "class_names",
    "render_image",
    "generate_synthetic_imagefolder",
]

SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "cross")
TEXTURES: tuple[str, ...] = ("solid", "stripes", "checker", "dots")
MAX_CLASSES = len(SHAPES) * len(TEXTURES)
LAYOUTS: tuple[str, ...] = ("objects", "mirror")
MIRRORS: tuple[str, ...] = ("none", "leftright", "topbottom", "point")
SPLITS: tuple[str, ...] = ("train", "val")
JPEG_QUALITY = 90
# Bump whenever rendering changes output bytes: a tree written by another version is
# then reported as a different spec instead of being silently reused.
GENERATOR_VERSION = 1

_SUPERSAMPLE = 2
_SPLIT_ID = {"train": 0, "val": 1}
_KEY_RE = re.compile(r"^(train|val)_[a-z]+_[a-z]+_\d{5}\.JPEG$")
_TOP_LEVEL = {"train", "val", "README.txt", "classes.json", "spec.json", "spec.json.tmp"}

# Equal-area shape geometry: each shape has area pi * r^2 for the drawn size r.
_SQUARE_HALF = math.sqrt(math.pi) / 2.0  # side 2a, area 4a^2 = pi
_TRI_CIRCUM = math.sqrt(math.pi / (3.0 * math.sqrt(3.0) / 4.0))  # circumradius R
_CROSS_LEN = math.sqrt(math.pi * 9.0 / 20.0)  # arm half-length L, half-width L/3
_CROSS_HALF_W = _CROSS_LEN / 3.0


@dataclass
class SyntheticSpec:
    """What to generate.  Same spec (and generator version) -> byte-identical tree."""

    num_classes: int = 8
    train_per_class: int = 64
    val_per_class: int = 16
    image_size: int = 64
    seed: int = 0
    layout: str = "objects"  # objects (shape x texture classes) | mirror (symmetry classes)

    def validate(self) -> None:
        for k, v in asdict(self).items():
            if k != "layout" and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
                raise ValueError(f"SyntheticSpec.{k} must be an int, got {v!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        limit = max_classes(self.layout)
        if not 1 <= int(self.num_classes) <= limit:
            raise ValueError(f"num_classes must be in [1, {limit}] for layout {self.layout}, got {self.num_classes}")
        if int(self.train_per_class) < 1 or int(self.val_per_class) < 1:
            raise ValueError(
                "train_per_class and val_per_class must be >= 1 "
                f"(got {self.train_per_class}, {self.val_per_class})"
            )
        if int(self.image_size) < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if int(self.seed) < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    def per_class(self, split: str) -> int:
        return int(self.train_per_class if split == "train" else self.val_per_class)


def max_classes(layout: str = "objects") -> int:
    return len(MIRRORS) if layout == "mirror" else MAX_CLASSES


def _canonical_names(num_classes: int, layout: str = "objects") -> list[str]:
    if layout == "mirror":
        return [f"mirror_{m}" for m in MIRRORS[:num_classes]]
    return [f"{SHAPES[c % len(SHAPES)]}_{TEXTURES[c // len(SHAPES)]}" for c in range(num_classes)]


def class_names(num_classes: int = 8, layout: str = "objects") -> list[str]:
    """Class names of a ``num_classes`` set; list position = class index (sorted order)."""
    limit = max_classes(layout)
    if not 1 <= num_classes <= limit:
        raise ValueError(f"num_classes must be in [1, {limit}] for layout {layout}, got {num_classes}")
    return sorted(_canonical_names(num_classes, layout))


# ----------------------------------------------------------------------------- rendering


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _contrasting_colour(rng: np.random.Generator, ref: np.ndarray, min_luma: float) -> np.ndarray:
    """Uniform random RGB colour whose luma differs from ``ref``'s by >= ``min_luma``."""
    ref_l = float(_luma(ref))
    for _ in range(32):
        c = rng.uniform(0.0, 255.0, size=3)
        if abs(float(_luma(c)) - ref_l) >= min_luma:
            return c
    # Practically unreachable (each try succeeds with probability >= ~0.3).
    return np.where(ref > 127.5, 0.0, 255.0)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of a unit-area-scaled shape in its local (rotated, scaled) frame."""
    if shape == "disc":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= _SQUARE_HALF) & (np.abs(v) <= _SQUARE_HALF)
    if shape == "triangle":
        # Equilateral triangle with circumradius R centred at the origin: inside iff
        # the projection on each of the three outward edge normals is <= R/2.
        lim = _TRI_CIRCUM / 2.0
        m = np.ones(u.shape, dtype=bool)
        for k in range(3):
            a = math.pi / 2.0 + k * 2.0 * math.pi / 3.0 + math.pi
            m &= (u * math.cos(a) + v * math.sin(a)) <= lim
        return m
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= _CROSS_LEN) & (av <= _CROSS_HALF_W)) | ((au <= _CROSS_HALF_W) & (av <= _CROSS_LEN))
    raise ValueError(f"unknown shape {shape!r}")


def _fmod(a: np.ndarray, p: float) -> np.ndarray:
    """``a mod p`` in [0, p); np.mod on float32 is ~4x slower than this."""
    return a - p * np.floor(a * (1.0 / p))


def _texture_mask(texture: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask (True = first colour) of a ~50%-fill texture in image coordinates."""
    period = 0.25 * rng.uniform(0.85, 1.15)  # ~8 px at 64 px (coords span 2.0)
    ang = rng.uniform(0.0, math.pi)
    ph_s, ph_t = rng.uniform(0.0, period, size=2)  # drawn for every texture alike
    if texture == "solid":
        return np.ones(np.broadcast_shapes(x.shape, y.shape), dtype=bool)
    s = x * math.cos(ang) + y * math.sin(ang) + ph_s
    t = -x * math.sin(ang) + y * math.cos(ang) + ph_t
    if texture == "stripes":
        return _fmod(s, period) < period / 2.0
    if texture == "checker":
        return ((np.floor(s / (period / 2.0)) + np.floor(t / (period / 2.0))) % 2) == 0
    if texture == "dots":
        ds = _fmod(s, period) - period / 2.0
        dt = _fmod(t, period) - period / 2.0
        r = period * math.sqrt(0.5 / math.pi)  # pi r^2 = 0.5 period^2
        return ds * ds + dt * dt <= r * r
    raise ValueError(f"unknown texture {texture!r}")


def _mirrored(img: np.ndarray, mirror: str) -> np.ndarray:
    """``img`` with one half replaced by the mirror image of the other (``mirror`` in MIRRORS)."""
    out = img.copy()
    s, h = img.shape[0], img.shape[0] // 2  # an odd size keeps its middle column / row
    if mirror == "leftright":
        out[:, s - h:] = img[:, :h][:, ::-1]
    elif mirror == "topbottom":
        out[s - h:] = img[:h][::-1]
    elif mirror == "point":
        out[s - h:] = img[:h][::-1, ::-1]
        if s % 2:
            out[h, s - h:] = img[h, :h][::-1]
    elif mirror != "none":
        raise ValueError(f"unknown mirror {mirror!r}")
    return out


def render_image(class_index: int, rng: np.random.Generator, image_size: int, num_classes: int,
                 layout: str = "objects") -> np.ndarray:
    """Render one image of class ``class_index`` (index into :func:`class_names`).

    Returns ``uint8 [image_size, image_size, 3]``.  All randomness comes from ``rng``.
    """
    names = class_names(num_classes, layout)
    if not 0 <= class_index < num_classes:
        raise ValueError(f"class_index {class_index} out of range for {num_classes} classes")
    if layout == "mirror":
        content = render_image(int(rng.integers(0, MAX_CLASSES)), rng, image_size, MAX_CLASSES)
        return _mirrored(content, names[class_index][len("mirror_"):])
    shape, texture = names[class_index].split("_")

    s = int(image_size)
    n = s * _SUPERSAMPLE
    # Pixel-centre coordinates in [-1, 1] (y grows downwards like image rows): the
    # smooth parts are computed at output resolution, the hard-edged shape/texture
    # masks at _SUPERSAMPLE x and box-filtered down to coverage fractions (antialiasing).
    ax = (((np.arange(s, dtype=np.float32) + 0.5) / s) * 2.0 - 1.0)[:, None]
    x, y = ax.T, ax
    ax2 = (((np.arange(n, dtype=np.float32) + 0.5) / n) * 2.0 - 1.0)[:, None]
    x2, y2 = ax2.T, ax2

    # Background: bilinear blend of four random corner colours (smooth gradient).
    corners = rng.uniform(0.0, 255.0, size=(4, 3)).astype(np.float32)
    wx = ((x + 1.0) / 2.0)[..., None]
    wy = ((y + 1.0) / 2.0)[..., None]
    img = (corners[0] * (1 - wx) + corners[1] * wx) * (1 - wy) + (corners[2] * (1 - wx) + corners[3] * wx) * wy

    # Distractor blobs: soft Gaussian ellipses (no hard edge, unlike every class shape).
    for _ in range(int(rng.integers(0, 3))):
        bx, by = rng.uniform(-0.9, 0.9, size=2)
        sa, sb = rng.uniform(0.06, 0.16, size=2)
        ba = rng.uniform(0.0, math.pi)
        du, dv = x - bx, y - by
        pu = (du * math.cos(ba) + dv * math.sin(ba)) / sa
        pv = (-du * math.sin(ba) + dv * math.cos(ba)) / sb
        alpha = rng.uniform(0.35, 0.7) * np.exp(-0.5 * (pu * pu + pv * pv))
        col = rng.uniform(0.0, 255.0, size=3).astype(np.float32)
        img = img + alpha[..., None] * (col - img)

    # The class object: equal-area shape, free position / scale / rotation.
    r = rng.uniform(0.28, 0.45)
    lim = 1.0 - 1.2 * r
    cx, cy = rng.uniform(-lim, lim, size=2)
    rot = rng.uniform(0.0, 2.0 * math.pi)
    dx, dy = x2 - cx, y2 - cy
    u = (dx * math.cos(rot) + dy * math.sin(rot)) / r
    v = (-dx * math.sin(rot) + dy * math.cos(rot)) / r
    mask = _shape_mask(shape, u, v)
    tex = _texture_mask(texture, x2, y2, rng) & mask

    def coverage(m: np.ndarray) -> np.ndarray:
        c = np.zeros((s, s), dtype=np.float32)
        for i in range(_SUPERSAMPLE):
            for j in range(_SUPERSAMPLE):
                c += m[i::_SUPERSAMPLE, j::_SUPERSAMPLE]
        return (c * (1.0 / (_SUPERSAMPLE * _SUPERSAMPLE)))[..., None]

    a_shape = coverage(mask)  # fraction of each output pixel covered by the shape
    a_tex = coverage(tex)  # ... by the shape's first texture colour
    area = float(a_shape.sum())
    bg_under = (img * a_shape).sum(axis=(0, 1)) / area if area > 0 else img.mean(axis=(0, 1))
    fg = _contrasting_colour(rng, bg_under, 70.0)
    fg2 = _contrasting_colour(rng, fg, 70.0)
    img = img * (1.0 - a_shape) + a_tex * fg.astype(np.float32) + (a_shape - a_tex) * fg2.astype(np.float32)

    # Mild sensor noise: uniform, std 3 (uniform float32 draws are several x faster
    # than Gaussian ones here, and the shape of the noise does not matter).
    img = img + (rng.random(size=img.shape, dtype=np.float32) - 0.5) * np.float32(3.0 * math.sqrt(12.0))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _image_rng(seed: int, split: str, class_index: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_ID[split], int(class_index), int(index)]))


def _encode_jpeg(arr: np.ndarray) -> bytes:
    buf = BytesIO()
    # Fixed encoder settings (no optimize / progressive) so bytes depend only on pixels;
    # 4:4:4 chroma keeps the few-pixel texture colours intact at 64 px.
    Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8)).save(
        buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0
    )
    return buf.getvalue()


def _write_class(job: tuple[str, str, int, str, int, int, int, int, str]) -> int:
    """Render and write every image of one (split, class)."""
    root, split, class_index, name, count, image_size, num_classes, seed, layout = job
    d = Path(root) / split / name
    d.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        arr = render_image(class_index, _image_rng(seed, split, class_index, i), image_size, num_classes, layout)
        (d / f"{split}_{name}_{i:05d}.JPEG").write_bytes(_encode_jpeg(arr))
    return count


# ----------------------------------------------------------------------------- tree on disk


def _spec_record(spec: SyntheticSpec) -> dict:
    rec = {k: int(v) for k, v in asdict(spec).items() if k != "layout"}
    if spec.layout != "objects":  # trees written before layouts existed stay valid
        rec["layout"] = spec.layout
    rec["generator_version"] = GENERATOR_VERSION
    return rec


def _readme(spec: SyntheticSpec, names: list[str]) -> str:
    n_train = spec.train_per_class * spec.num_classes
    n_val = spec.val_per_class * spec.num_classes
    lines = [
        "SYNTHETIC DATASET -- generated by a program, NOT ImageNet and NOT natural images.",
        "",
        "Generator: mirl_ds.data.synthetic.generate_synthetic_imagefolder "
        f"(generator version {GENERATOR_VERSION}).",
        "Purpose: embedded default data for the mirl_ds CPU demo and tests.",
        "",
        f"seed: {spec.seed}",
        f"layout: {spec.layout}",
        f"image size: {spec.image_size}x{spec.image_size} RGB, JPEG quality {JPEG_QUALITY} (4:4:4 chroma)",
        f"classes: {spec.num_classes}",
        f"train: {spec.train_per_class} per class, {n_train} images",
        f"val: {spec.val_per_class} per class, {n_val} images",
        "",
        "Layout (torchvision ImageFolder): <split>/<class>/<split>_<class>_<index:05d>.JPEG",
        "classes.json maps class index -> name (sorted order, as ImageFolder assigns).",
        "spec.json is written last and marks the tree complete.",
        "",
        "How images are made: each class is a (shape, texture) pair; shapes are "
        + ", ".join(SHAPES)
        + "; textures are "
        + ", ".join(TEXTURES)
        + ".",
        "Within every class the background (bilinear gradient of 4 random colours + mild",
        "uniform noise), shape colour (random, contrasting with the background), texture",
        "colour / orientation / phase, position, scale, rotation and 0-2 soft distractor",
        "blobs vary freely, drawn from the same distribution for all classes; shapes have",
        "equal area and textures ~50% fill.  Only shape and texture identify the class.",
    ]
    if spec.layout == "mirror":
        lines += [
            "",
            "Layout mirror: the images above with a random (shape, texture) pair are NOT the",
            "classes here.  The class is the image's mirror symmetry: mirror_none, mirror_leftright",
            "(right half = left half mirrored), mirror_topbottom, mirror_point (lower half = upper",
            "half turned by 180 degrees).",
        ]
    lines += [
        "Rendered with numpy at 2x and box-filtered down (antialiasing).  Each image's",
        "randomness is np.random.SeedSequence([seed, split(train=0,val=1), class_index, index]),",
        "so the same spec reproduces byte-identical files.",
        "",
        "Classes (index: name):",
    ]
    lines += [f"  {i}: {n}" for i, n in enumerate(names)]
    return "\n".join(lines) + "\n"


def _check_partial_tree(root: Path) -> None:
    """Refuse to write into a non-empty directory that is not (a partial) synthetic tree."""
    vocabulary = set(_canonical_names(MAX_CLASSES)) | set(_canonical_names(len(MIRRORS), "mirror"))
    foreign: list[str] = []
    for entry in root.iterdir():
        if entry.name not in _TOP_LEVEL:
            foreign.append(entry.name)
        elif entry.name in SPLITS:
            if not entry.is_dir():
                foreign.append(entry.name)
                continue
            for cdir in entry.iterdir():
                if cdir.name not in vocabulary or not cdir.is_dir():
                    foreign.append(f"{entry.name}/{cdir.name}")
                    continue
                for f in cdir.iterdir():
                    if not _KEY_RE.match(f.name) or not f.is_file():
                        foreign.append(f"{entry.name}/{cdir.name}/{f.name}")
        if len(foreign) >= 3:
            break
    if foreign:
        raise ValueError(
            f"{root} exists and is not a synthetic dataset tree (found {', '.join(foreign[:3])}); "
            "delete it or choose another root"
        )


def _remove_stale(root: Path, spec: SyntheticSpec, names: list[str]) -> None:
    """In a partial synthetic tree, delete images / class dirs this spec would not write."""
    for split in SPLITS:
        sdir = root / split
        if not sdir.is_dir():
            continue
        for cdir in sdir.iterdir():
            keep = cdir.name in names
            count = spec.per_class(split)
            for f in cdir.iterdir():
                m = re.match(rf"^{split}_{re.escape(cdir.name)}_(\d{{5}})\.JPEG$", f.name)
                if not keep or m is None or int(m.group(1)) >= count:
                    f.unlink()
            if not keep:
                cdir.rmdir()


def generate_synthetic_imagefolder(root: str | os.PathLike, spec: SyntheticSpec | None = None, workers: int = 1) -> dict:
    """Write the synthetic ImageFolder tree for ``spec`` under ``root``; return a summary.

    * ``root`` holding a complete tree of the same spec: nothing is written (no-op).
    * ``root`` holding a complete tree of another spec (or generator version), or
      unrelated files: ``ValueError`` naming ``root``.
    * ``root`` holding an interrupted synthetic tree (no ``spec.json``): completed.

    ``workers > 1`` renders (split, class) jobs in worker threads; the output bytes
    do not depend on ``workers``.  Not safe for several processes generating into the
    same ``root`` at once: in a multi-rank job generate on one rank, then barrier.
    """
    spec = SyntheticSpec() if spec is None else spec
    spec.validate()
    root = Path(root)
    names = class_names(spec.num_classes, spec.layout)
    record = _spec_record(spec)
    summary = {
        "root": str(root),
        "classes": names,
        "counts": {s: spec.per_class(s) * spec.num_classes for s in SPLITS},
        "per_class": {s: spec.per_class(s) for s in SPLITS},
        "spec": record,
    }

    spec_path = root / "spec.json"
    if spec_path.is_file():
        try:
            existing = json.loads(spec_path.read_text())
        except (OSError, ValueError):
            existing = None
        if existing == record:
            return {**summary, "generated": False, "seconds": 0.0}
        raise ValueError(
            f"{root} already holds a synthetic dataset with a different spec "
            f"(found {existing}, wanted {record}); delete it or choose another root"
        )
    if root.exists():
        if not root.is_dir():
            raise ValueError(f"{root} exists and is not a directory; delete it or choose another root")
        _check_partial_tree(root)
        _remove_stale(root, spec, names)

    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    jobs = [
        (str(root), split, ci, name, spec.per_class(split), int(spec.image_size), int(spec.num_classes), int(spec.seed),
         spec.layout)
        for split in SPLITS
        for ci, name in enumerate(names)
    ]
    if workers > 1 and len(jobs) > 1:
        # Threads, not processes: numpy's array loops and PIL's encoder release the GIL,
        # and threads need no picklable entry point / __main__ guard in the caller.
        with ThreadPoolExecutor(max_workers=min(int(workers), len(jobs))) as ex:
            list(ex.map(_write_class, jobs))
    else:
        for job in jobs:
            _write_class(job)

    (root / "README.txt").write_text(_readme(spec, names))
    (root / "classes.json").write_text(json.dumps({str(i): n for i, n in enumerate(names)}, indent=2) + "\n")
    tmp = root / "spec.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, spec_path)  # last: marks the tree complete
    return {**summary, "generated": True, "seconds": time.perf_counter() - t0}
