"""Image sources for ``mirl-ds shard``: list samples ``(key, path, class_index)`` and the class table.

Three kinds of source (``--source-kind``):

``imagefolder``
    A torchvision ``ImageFolder`` tree ``<folder>/<wnid>/**/<file>``.  Class indices are the
    positions of the class folders in sorted order, as torchvision assigns them (hidden folders,
    names starting with ``.``, are not classes).  ``SRC`` is the split folder itself, or the
    dataset root when ``SRC/<split>`` exists.  Class names come from ``--classes-file``
    (``n01440764 tench, Tinca tinca`` lines, as ``LOC_synset_mapping.txt``; the devkit's
    ``n02119789 1 kit_fox`` lines, as ``map_clsloc.txt``, work too) or from a ``classes.json``
    (``{"0": name}``) beside or above the split folder.
``imagenet_val``
    ImageNet's flat validation folder plus a ground-truth label file (``--label-file``), one of

    * ``LOC_val_solution.csv``: header ``ImageId,PredictionString``, the first token of the
      prediction string is the image's wnid;
    * plain text, one ``<filename> <wnid>`` or ``<filename> <class_index>`` per line (the
      file name with or without its extension);
    * the devkit's ``ILSVRC2012_validation_ground_truth.txt``: one ILSVRC2012 ID (1..1000) per
      line, line *i* labelling ``ILSVRC2012_val_<i:08d>``.  Those IDs are *not* the sorted-wnid
      order, so this format needs ``--classes-file`` in the devkit's ``wnid id name`` form
      (``map_clsloc.txt``) to map them to wnids.

    With wnids, class indices are the positions in the sorted wnid list of ``--classes-file``
    (pass the train classes so val indices match train), or, without it, of the wnids the label
    file uses.  Images without a label are reported as skipped.
``synthetic``
    The project's synthetic demo set (:mod:`mirl_ds.data.synthetic`): ``SRC`` is its root,
    generated with the default :class:`SyntheticSpec` when it is missing, and ``--split`` is
    listed as an ImageFolder tree.

Keys are the file stems made safe for WebDataset: characters other than ``A-Z a-z 0-9 _ -``
become ``_`` (so keys hold no dots), stems longer than 90 characters are shortened with a hash,
and colliding keys get the class folder as prefix, then a numeric suffix, in listing order.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "IMAGE_EXTENSIONS",
    "SOURCE_KINDS",
    "Sample",
    "SourceListing",
    "list_source",
    "list_imagefolder",
    "list_imagenet_val",
    "prepare_synthetic",
    "read_classes_file",
    "read_label_file",
    "make_keys",
]

# Every extension torchvision's ImageFolder accepts: non-JPEG images are listed so they can be
# reported as skipped (shards hold original JPEG bytes only) instead of vanishing unnoticed.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SOURCE_KINDS = ("auto", "imagefolder", "imagenet_val", "synthetic")
MAX_KEY_LEN = 90  # ustar member names are <= 100 bytes: key + ".jpg"/".cls" must fit

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_INT = re.compile(r"^\d+$")


class Sample(NamedTuple):
    key: str          # unique in the listing, no dots
    path: str         # where to read the file
    class_index: int
    rel: str          # path relative to the listing's source path (manifest, reports)


@dataclass
class SourceListing:
    kind: str                      # imagefolder | imagenet_val | synthetic
    path: str                      # the source folder relative paths are relative to
    split: str | None
    label_file: str | None
    samples: list[Sample]
    classes: list[dict]            # [{"index", "wnid", "name"}], by index
    skipped: list[dict] = field(default_factory=list)   # found but not listable: {"path", "reason"}
    notes: list[str] = field(default_factory=list)      # one-line remarks for the final report


# ----------------------------------------------------------------------------- keys


def _safe_key(stem: str) -> str:
    key = _UNSAFE.sub("_", stem) or "sample"
    if len(key) > MAX_KEY_LEN:
        key = key[: MAX_KEY_LEN - 9] + "_" + hashlib.sha1(stem.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return key


def make_keys(stems: list[str], groups: list[str] | None = None) -> list[str]:
    """Unique, dot-free keys for ``stems`` (in order); a collision is resolved with the item's
    ``group`` (e.g. its class folder) as prefix, then with ``_2``, ``_3``, … suffixes."""
    base = [_safe_key(s) for s in stems]
    counts: dict[str, int] = {}
    for k in base:
        counts[k] = counts.get(k, 0) + 1
    used: set[str] = set()
    out: list[str] = []
    for i, k in enumerate(base):
        if counts[k] > 1 and groups is not None:
            k = _safe_key(f"{groups[i]}_{k}")
        cand, n = k, 1
        while cand in used:
            n += 1
            cand = _safe_key(f"{k}_{n}")
        used.add(cand)
        out.append(cand)
    return out


# ----------------------------------------------------------------------------- class / label files


def _read_text_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text ({e})") from None


def read_classes_file(path: str | os.PathLike) -> dict[str, dict]:
    """``wnid -> {"name", "id"}`` from ``wnid name…`` lines (LOC_synset_mapping.txt) or the devkit's
    ``wnid id name`` lines (map_clsloc.txt; ``id`` is the ILSVRC2012 ID, else None)."""
    path = Path(path)
    rows: list[tuple[int, str, str]] = []
    for n, raw in enumerate(_read_text_lines(path, "classes file"), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        if "," in parts[0] or "." in parts[0] or "/" in parts[0]:
            raise ValueError(f"{path}, line {n}: expected '<wnid> <name>', got {raw!r}")
        rows.append((n, parts[0], parts[1].strip() if len(parts) > 1 else ""))
    if not rows:
        raise ValueError(f"classes file {path} lists no classes")
    # The devkit form: every line is exactly "<wnid> <integer id> <name>".
    devkit = all(len(r[2].split()) == 2 and _INT.match(r[2].split()[0]) for r in rows)
    out: dict[str, dict] = {}
    for n, wnid, rest in rows:
        if wnid in out:
            raise ValueError(f"{path}, line {n}: class {wnid!r} is listed twice")
        if devkit:
            cid, name = rest.split()
            out[wnid] = {"name": name, "id": int(cid)}
        else:
            out[wnid] = {"name": rest or None, "id": None}
    return out


def read_label_file(path: str | os.PathLike) -> tuple[str, list[tuple[int, str, str]]]:
    """Parse a validation label file; return ``(format, [(line, image_stem, label)])``.

    ``format`` is ``"csv"`` (LOC_val_solution.csv; label = wnid), ``"pairs"`` (``filename
    label`` lines; label = wnid or class index, as written) or ``"ilsvrc_ids"`` (one ILSVRC2012
    ID per line; stem = ``ILSVRC2012_val_<line:08d>``, label = the ID as written).
    """
    path = Path(path)
    lines = _read_text_lines(path, "label file")
    numbered = [(n, raw) for n, raw in enumerate(lines, 1) if raw.strip()]
    if not numbered:
        raise ValueError(f"label file {path} holds no labels")
    first = numbered[0][1].strip()
    rows: list[tuple[int, str, str]] = []
    if first.replace(" ", "").lower().startswith("imageid,predictionstring"):
        reader = csv.reader(lines)
        for n, rec in enumerate(reader, 1):
            if n <= numbered[0][0] or not rec or not "".join(rec).strip():
                continue
            if len(rec) < 2 or not rec[0].strip() or not rec[1].split():
                raise ValueError(f"{path}, line {n}: expected 'ImageId,PredictionString' with the wnid "
                                 f"first, got {','.join(rec)!r}")
            rows.append((n, _stem(rec[0].strip()), rec[1].split()[0]))
        return "csv", rows
    if _INT.match(first):  # a lone integer: the devkit ground truth (pairs always have two tokens)
        # The devkit's ground truth: line i of the file (1-based, blank lines are errors here,
        # since they would shift every following label) labels ILSVRC2012_val_<i:08d>.
        last = numbered[-1][0]  # trailing blank lines are fine
        for n, raw in enumerate(lines[:last], 1):
            tok = raw.strip()
            if not _INT.match(tok):
                raise ValueError(f"{path}, line {n}: expected one ILSVRC2012 class ID (an integer), got {raw!r}")
            rows.append((n, f"ILSVRC2012_val_{n:08d}", tok))
        return "ilsvrc_ids", rows
    for n, raw in numbered:
        if raw.lstrip().startswith("#"):
            continue
        parts = raw.split()
        if len(parts) != 2:
            raise ValueError(f"{path}, line {n}: expected '<filename> <wnid>' or '<filename> <class_index>', "
                             f"got {raw!r}")
        rows.append((n, _stem(parts[0]), parts[1]))
    return "pairs", rows


def _stem(name: str) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    root, ext = os.path.splitext(base)
    return root if ext.lower() in IMAGE_EXTENSIONS else base


# ----------------------------------------------------------------------------- listing helpers


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _class_dirs(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _images_in(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_file() and _is_image(e.name))


def _rel(path: Path, base: Path) -> str:
    return path.relative_to(base).as_posix()


def _names_from_classes_json(folder: Path, n: int) -> list[str] | None:
    for cand in (folder / "classes.json", folder.parent / "classes.json"):
        if cand.is_file():
            try:
                table = json.loads(cand.read_text())
                names = [str(table[str(i)]) for i in range(n)]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{cand} is not a {{\"<index>\": \"<name>\"}} table for the {n} class "
                                 f"folders ({type(e).__name__}: {e})") from None
            return names
    return None


def _resolve_folder(src: Path, split: str | None) -> Path:
    if split and (src / split).is_dir():
        return src / split
    return src


# ----------------------------------------------------------------------------- the three kinds


def list_imagefolder(folder: str | os.PathLike, classes_file: str | os.PathLike | None = None,
                     base: str | os.PathLike | None = None, kind: str = "imagefolder",
                     split: str | None = None) -> SourceListing:
    """List an ImageFolder tree; relative paths are relative to ``base`` (default ``folder``)."""
    folder = Path(folder)
    base = Path(base) if base is not None else folder
    if not folder.is_dir():
        raise FileNotFoundError(f"source folder {folder} does not exist")
    wnids = _class_dirs(folder)
    if not wnids:
        raise ValueError(f"{folder} has no class folders (expected an ImageFolder tree <class>/<image>)")
    names: list[str | None]
    if classes_file is not None:
        table = read_classes_file(classes_file)
        names = [table[w]["name"] if w in table else None for w in wnids]
    else:
        names = _names_from_classes_json(folder, len(wnids)) or list(wnids)
    # Plain strings, one relative-path computation per folder: ImageNet's 1.28M files would take
    # a minute through pathlib objects.
    paths: list[str] = []
    rels: list[str] = []
    stems: list[str] = []
    labels: list[int] = []
    for ci, wnid in enumerate(wnids):
        for dirpath, dirnames, filenames in os.walk(folder / wnid, followlinks=True):
            dirnames.sort()
            rel_dir = _rel(Path(dirpath), base)
            for fn in sorted(filenames):
                if _is_image(fn):
                    paths.append(os.path.join(dirpath, fn))
                    rels.append(f"{rel_dir}/{fn}")
                    stems.append(os.path.splitext(fn)[0])
                    labels.append(ci)
    if not paths:
        raise ValueError(f"no images found under {folder} (looked for {', '.join(IMAGE_EXTENSIONS)} files "
                         "in its class folders)")
    keys = make_keys(stems, [wnids[c] for c in labels])
    samples = [Sample(k, p, c, r) for k, p, c, r in zip(keys, paths, labels, rels)]
    classes = [{"index": i, "wnid": w, "name": n} for i, (w, n) in enumerate(zip(wnids, names))]
    return SourceListing(kind, str(base), split, None, samples, classes)


def list_imagenet_val(folder: str | os.PathLike, label_file: str | os.PathLike,
                      classes_file: str | os.PathLike | None = None,
                      base: str | os.PathLike | None = None, split: str | None = None) -> SourceListing:
    """List ImageNet's flat val folder, labelled by ``label_file`` (see the module docstring)."""
    folder = Path(folder)
    base = Path(base) if base is not None else folder
    label_file = Path(label_file)
    if not folder.is_dir():
        raise FileNotFoundError(f"source folder {folder} does not exist")
    fmt, rows = read_label_file(label_file)
    table = read_classes_file(classes_file) if classes_file is not None else None

    if fmt == "ilsvrc_ids":
        if table is None or any(v["id"] is None for v in table.values()):
            raise ValueError(
                f"{label_file} holds ILSVRC2012 class IDs (one integer per line), which are not the sorted-wnid "
                "class order: pass --classes-file with the devkit's '<wnid> <id> <name>' lines (map_clsloc.txt), "
                "or use LOC_val_solution.csv or '<filename> <wnid>' lines instead")
        by_id = {v["id"]: w for w, v in table.items()}
        conv = []
        for n, stem, tok in rows:
            if int(tok) not in by_id:
                raise ValueError(f"{label_file}, line {n}: ILSVRC2012 ID {tok} is not in {classes_file}")
            conv.append((n, stem, by_id[int(tok)]))
        rows, fmt = conv, "wnids"
    elif fmt == "pairs":
        kinds = {bool(_INT.match(lab)) for _, _, lab in rows}
        if len(kinds) > 1:
            n = next(n for n, _, lab in rows if bool(_INT.match(lab)) != bool(_INT.match(rows[0][2])))
            raise ValueError(f"{label_file}, line {n}: mixes class indices and wnids; use one or the other")
        fmt = "indices" if kinds == {True} else "wnids"
    else:
        fmt = "wnids"

    labels: dict[str, int] = {}
    seen: dict[str, int] = {}
    if fmt == "wnids":
        for n, stem, wnid in rows:
            if not re.match(r"^[A-Za-z0-9_-]+$", wnid):
                raise ValueError(f"{label_file}, line {n}: {wnid!r} is not a class id (wnid)")
        wnids = sorted(table) if table is not None else sorted({w for _, _, w in rows})
        index = {w: i for i, w in enumerate(wnids)}
        for n, stem, wnid in rows:
            if wnid not in index:
                raise ValueError(f"{label_file}, line {n}: class {wnid!r} is not in the classes file {classes_file}")
            if stem in seen:
                raise ValueError(f"{label_file}, line {n}: {stem} is labelled twice (first on line {seen[stem]})")
            seen[stem] = n
            labels[stem] = index[wnid]
        classes = [{"index": i, "wnid": w, "name": (table[w]["name"] if table is not None else None)}
                   for i, w in enumerate(wnids)]
    else:  # class indices as written
        ordered = sorted(table) if table is not None else None
        for n, stem, tok in rows:
            ci = int(tok)
            if ordered is not None and ci >= len(ordered):
                raise ValueError(f"{label_file}, line {n}: class index {ci} is out of range for the "
                                 f"{len(ordered)} classes of {classes_file}")
            if stem in seen:
                raise ValueError(f"{label_file}, line {n}: {stem} is labelled twice (first on line {seen[stem]})")
            seen[stem] = n
            labels[stem] = ci
        if ordered is not None:
            classes = [{"index": i, "wnid": w, "name": table[w]["name"]} for i, w in enumerate(ordered)]
        else:
            classes = [{"index": i, "wnid": None, "name": None} for i in range(max(labels.values()) + 1)]

    files = _images_in(folder)
    if not files:
        raise ValueError(f"no images found in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)} files)")
    paths: list[Path] = []
    lab: list[int] = []
    skipped: list[dict] = []
    matched: set[str] = set()
    for fn in files:
        stem = os.path.splitext(fn)[0]
        p = folder / fn
        if stem in labels:
            paths.append(p)
            lab.append(labels[stem])
            matched.add(stem)
        else:
            skipped.append({"path": _rel(p, base), "reason": f"no label for it in {label_file}"})
    if not paths:
        raise ValueError(f"none of the {len(files)} images in {folder} has a label in {label_file} "
                         "(labels are matched by file name without extension)")
    notes = []
    if len(matched) < len(labels):
        notes.append(f"{len(labels) - len(matched)} images labelled in {label_file} are not in {folder}")
    keys = make_keys([p.stem for p in paths])
    samples = [Sample(k, str(p), c, _rel(p, base)) for k, p, c in zip(keys, paths, lab)]
    return SourceListing("imagenet_val", str(base), split, str(label_file), samples, classes, skipped, notes)


def prepare_synthetic(root: str | os.PathLike, spec=None) -> dict:
    """Generate the synthetic set under ``root`` unless a complete one is there; return its summary."""
    from .synthetic import SyntheticSpec, generate_synthetic_imagefolder

    root = Path(root)
    spec_path = root / "spec.json"
    if spec_path.is_file() and spec is None:
        return {"root": str(root), "generated": False}
    return generate_synthetic_imagefolder(root, spec if spec is not None else SyntheticSpec())


def _looks_synthetic(src: Path) -> bool:
    return (src / "spec.json").is_file() and (src / "classes.json").is_file() and (src / "README.txt").is_file()


def list_source(src: str | os.PathLike, kind: str = "auto", split: str = "train",
                label_file: str | os.PathLike | None = None,
                classes_file: str | os.PathLike | None = None) -> SourceListing:
    """List ``src`` as ``kind`` (``auto`` picks one: a label file means ``imagenet_val``, a complete
    synthetic root means ``synthetic``, otherwise ``imagefolder``)."""
    if kind not in SOURCE_KINDS:
        raise ValueError(f"unknown source kind {kind!r}; choose one of {', '.join(SOURCE_KINDS)}")
    src = Path(src).expanduser().resolve()
    if kind == "synthetic":
        if label_file is not None:
            raise ValueError("--label-file is for --source-kind imagenet_val, not synthetic")
        summary = prepare_synthetic(src)
        folder = src / split
        if not folder.is_dir():
            raise ValueError(f"the synthetic set at {src} has no split {split!r} (it has train and val)")
        listing = list_imagefolder(folder, classes_file, base=src, kind="synthetic", split=split)
        if summary.get("generated"):
            listing.notes.append(f"generated the synthetic set at {src}")
        return listing
    if not src.exists():
        raise FileNotFoundError(f"source {src} does not exist")
    if not src.is_dir():
        raise ValueError(f"source {src} is not a folder")
    if kind == "auto":
        if label_file is not None:
            kind = "imagenet_val"
        elif _looks_synthetic(src):
            kind = "synthetic"
            listing = list_imagefolder(_resolve_folder(src, split), classes_file, base=src, kind="synthetic",
                                       split=split)
            return listing
        else:
            folder = _resolve_folder(src, split)
            if not _class_dirs(folder) and _images_in(folder):
                raise ValueError(f"{folder} holds images directly, not class folders: for ImageNet's flat val "
                                 "folder pass --label-file (and --source-kind imagenet_val)")
            kind = "imagefolder"
    if kind == "imagenet_val":
        if label_file is None:
            raise ValueError("--source-kind imagenet_val needs --label-file (LOC_val_solution.csv, "
                             "'<filename> <wnid>' lines, or the devkit's ground truth with --classes-file)")
        # The flat folder is SRC itself when it holds images, else SRC/<split>.
        folder = src if _images_in(src) or not (src / split).is_dir() else src / split
        return list_imagenet_val(folder, label_file, classes_file, base=src,
                                 split=split if folder != src else None)
    if label_file is not None:
        raise ValueError("--label-file is for --source-kind imagenet_val; an ImageFolder tree is labelled "
                         "by its class folders")
    folder = _resolve_folder(src, split)
    return list_imagefolder(folder, classes_file, base=src, split=split if folder != src else None)
