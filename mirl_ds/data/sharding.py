"""``mirl-ds shard SRC DEST``: write an image source as WebDataset tar shards + a JSON manifest.

The format is the contract in ``docs/shard-format.md``: ``<prefix>-000000.tar`` … holding
``<key>.jpg`` (the source file's original bytes) and ``<key>.cls`` (ASCII class index), and
``<prefix>.manifest.json`` written last.

How it works
------------
1. **Listing** (:mod:`mirl_ds.data.sources`): samples ``(key, path, class_index)`` in a fixed
   order (sorted class folders, sorted file names) and the class table.
2. **Plan**: the sample order is shuffled with ``numpy.random.default_rng(seed).permutation``
   and cut into consecutive shards bounded by ``max_count`` samples and ``max_bytes`` bytes of
   tar file.  Tar sizes are exact arithmetic on the file sizes from ``os.stat`` (512-byte header
   + padded data per member, 1024 bytes of end marker, padded to 10240-byte records), so the
   whole plan is known before any byte is written and every shard can be written on its own, in
   parallel.  A sample alone bigger than ``max_bytes`` gets a shard to itself.  The plan's
   fingerprint (``plan_sha256``) covers every (key, relative path, class, size), the seed, the
   bounds and the prefix.
3. **Writing**: ``--workers`` writer threads write whole shards (:mod:`mirl_ds.data.tar_members`:
   the bytes of WebDataset's ``TarWriter`` with member mtime 0, so the bytes depend only on the
   plan and the files: same plan -> identical tars, whatever the worker count).  A writer reads
   each file straight into its shard's staging buffer and hashes and writes that buffer about
   every MiB; with fewer writers than cores, hasher threads hash while the writers go on
   (:func:`_hash_threads`).  Every file is checked, in the buffer, before it is added; a file that
   is empty, unreadable, not a JPEG (shards hold original JPEG bytes, nothing is re-encoded) or not
   decodable is skipped, and listed with its reason in the manifest's ``skipped`` and in the
   report printed at the end.  A skipped file keeps its planned slot: the other samples stay in
   their planned shards, that shard just holds one sample fewer.  A local shard is written as
   ``<name>.partial``, preallocated to its planned size and cut to its tar's at the end
   (:func:`_preallocate`); a finisher thread fsyncs and renames it while its writer goes on with the
   next shard.  An ``s3://`` shard is written to a local temporary file and uploaded by the
   finisher through :mod:`mirl_ds.data.object_store`.  Each finished shard then gets a
   sidecar ``<name>.done.json`` (samples, bytes, sha256, first key, skipped, plan_sha256).
4. **Resume**: a re-run with the same plan keeps every shard whose sidecar carries the same
   plan fingerprint and whose tar has the recorded size, and writes only the others (stale
   ``.partial`` files are removed).  The sidecar is *trusted* rather than the tar re-hashed:
   it is written only after the tar was completely written, synced and renamed into place, so
   sidecar + matching size means a complete shard, and re-reading a 140 GB shard set to re-hash
   it would cost as much as writing it.  (On ``s3://`` the object's size is not checked: an
   upload only becomes visible once complete.)  ``--no-fsync`` drops the fsync: a killed or
   interrupted *process* loses nothing (its writes are in the page cache), only a machine crash
   could leave a shard of the right size with unwritten blocks.  A DEST holding a manifest or sidecars of a
   *different* plan is refused with an error.
5. **Manifest** last: ``<prefix>.manifest.json`` with per-shard sample counts, bytes, sha256 and
   first key, the classes, the source, the bounds, ``skipped`` and ``plan_sha256`` (an addition
   to the documented fields, used for resuming).

Checking images (``--verify``): ``header`` (default) walks the JPEG marker segments up to the
first scan (frame size; PIL only names the format of a file that is not a JPEG) and requires the
end-of-image marker ``FFD9`` near the end of the file, which catches empty, garbage, non-JPEG and
truncated files at ~5 µs an image; ``decode``
additionally decodes every image at 1/8 scale (PIL ``draft``), ~1 ms an image, ~20x slower than
copying the bytes.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .sources import SOURCE_KINDS, SourceListing, list_source
from .tar_members import BLOCK, RECORD, TarMembers, UnreadableSource

__all__ = [
    "FORMAT",
    "ShardPlan",
    "plan_shards",
    "plan_fingerprint",
    "tar_bytes",
    "check_jpeg",
    "shard_dataset",
    "format_report",
    "parse_size",
    "add_arguments",
    "run",
]

FORMAT = "mirl_ds-shards/1"
VERIFY_MODES = ("header", "decode")
_EOI_WINDOW = 4096           # the end-of-image marker must lie within the file's last 4 KiB
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


# ----------------------------------------------------------------------------- destination


def _is_remote(dest: str) -> bool:
    return dest.startswith("s3://")


def _join(dest: str, name: str) -> str:
    return dest.rstrip("/") + "/" + name if _is_remote(dest) else os.path.join(dest, name)


def _dest_exists(dest: str, name: str) -> bool:
    if _is_remote(dest):
        from .object_store import exists
        return exists(_join(dest, name))
    return os.path.exists(_join(dest, name))


def _dest_read(dest: str, name: str) -> bytes:
    if _is_remote(dest):
        from .object_store import read_bytes
        return read_bytes(_join(dest, name))
    with open(_join(dest, name), "rb") as f:
        return f.read()


def _dest_write(dest: str, name: str, data: bytes) -> None:
    """Write a small file whole: local via a temporary name + rename, s3 with one PUT."""
    if _is_remote(dest):
        from .object_store import write_bytes
        write_bytes(_join(dest, name), data)
        return
    path = _join(dest, name)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _upload(local: str, url: str) -> None:
    from .object_store import open_write
    with open(local, "rb") as src, open_write(url) as dst:
        while True:
            buf = src.read(8 << 20)
            if not buf:
                break
            dst.write(buf)


def _prepare_dest(dest: str) -> str:
    if _is_remote(dest):
        return dest.rstrip("/")
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", dest):
        raise ValueError(f"DEST {dest} is not writable by mirl-ds shard: use a local folder or s3://bucket/prefix")
    path = Path(dest).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ValueError(f"DEST {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".mirl_ds_write_probe"):
            pass
    except OSError as e:
        raise ValueError(f"DEST {path} is not writable ({e.strerror or e})") from None
    return str(path)


# ----------------------------------------------------------------------------- plan


def _pad(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _sample_tar_bytes(size: int, class_index: int) -> int:
    """Bytes one sample adds to a tar: a header + padded data for each of .cls and .jpg."""
    return 2 * BLOCK + _pad(size) + _pad(len(str(class_index)))


def tar_bytes(sample_bytes: int) -> int:
    """Size of a tar file whose members take ``sample_bytes``: + end marker, padded to records."""
    return -(-(sample_bytes + 2 * BLOCK) // RECORD) * RECORD


@dataclass
class ShardPlan:
    index: int
    name: str
    samples: list[tuple[str, str, int, str, int]]   # (key, path, class_index, rel, size)
    planned_bytes: int                               # tar size if no sample is skipped


def plan_shards(listing: SourceListing, sizes: list[int], seed: int, max_count: int, max_bytes: int,
                prefix: str) -> list[ShardPlan]:
    """Shuffle the listing with ``default_rng(seed)`` and cut it into bounded consecutive shards."""
    order = np.random.default_rng(seed).permutation(len(listing.samples))
    plans: list[ShardPlan] = []
    cur: list[tuple[str, str, int, str, int]] = []
    cur_bytes = 0

    def flush() -> None:
        i = len(plans)
        plans.append(ShardPlan(i, f"{prefix}-{i:06d}.tar", cur[:], tar_bytes(cur_bytes)))

    for i in order.tolist():
        s = listing.samples[i]
        b = _sample_tar_bytes(sizes[i], s.class_index)
        if cur and (len(cur) >= max_count or tar_bytes(cur_bytes + b) > max_bytes):
            flush()
            cur, cur_bytes = [], 0
        cur.append((s.key, s.path, s.class_index, s.rel, sizes[i]))
        cur_bytes += b
    if cur:
        flush()
    return plans


def plan_fingerprint(plans: list[ShardPlan], seed: int, max_count: int, max_bytes: int, prefix: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT, prefix, seed, max_count, max_bytes]).encode())
    for p in plans:
        # One JSON document per shard (not per sample: ImageNet has 1.28M of them).
        rows = [[key, rel, label, size] for key, _path, label, rel, size in p.samples]
        h.update(f"\n#{p.name}\n".encode())
        h.update(json.dumps(rows).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- writing one shard


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}   # start-of-frame, any coding
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}                 # RSTn, TEM: no length field


def _jpeg_header_problem(data: bytes) -> str | None:
    """Walk the JPEG marker segments from SOI to the first scan (SOS) and check their structure:
    every segment inside the file, a frame header (SOF) with a non-zero size before the scan.
    The same information PIL's header parser reads, at a fraction of its cost."""
    n = len(data)
    pos = 2
    size = None
    while True:
        while pos < n and data[pos] == 0xFF and pos + 1 < n and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes
        if pos + 2 > n:
            return "truncated JPEG: ends inside its header"
        if data[pos] != 0xFF:
            return f"not a decodable image: corrupt JPEG header (no marker at byte {pos})"
        m = data[pos + 1]
        pos += 2
        if m in _STANDALONE:
            continue
        if m == 0xD9 or m == 0xD8:
            return f"not a decodable image: corrupt JPEG header (marker FF{m:02X} before the first scan)"
        if pos + 2 > n:
            return "truncated JPEG: ends inside its header"
        length = (data[pos] << 8) | data[pos + 1]
        if length < 2 or pos + length > n:
            return "truncated JPEG: ends inside its header" if pos + length > n else \
                f"not a decodable image: corrupt JPEG header (segment length {length} at byte {pos})"
        if m in _SOF_MARKERS:
            if length < 8:
                return "not a decodable image: corrupt JPEG frame header"
            h = (data[pos + 3] << 8) | data[pos + 4]
            w = (data[pos + 5] << 8) | data[pos + 6]
            if w == 0 or h == 0:
                return f"not a decodable image: JPEG frame size {w}x{h}"
            size = (w, h)
        elif m == 0xDA:
            if size is None:
                return "not a decodable image: JPEG scan before any frame header"
            return None
        pos += length


def check_jpeg(data: bytes | memoryview, verify: str = "header") -> str | None:
    """Why ``data`` cannot go into a shard as a JPEG sample, or ``None`` if it can.

    ``header``: the marker structure up to the first scan (:func:`_jpeg_header_problem`) and an
    end-of-image marker near the end (in the entropy-coded data FF is always followed by 00 or a
    restart marker, so FFD9 there can only be the end-of-image marker: without it the file is
    truncated).  ``decode``: additionally PIL decodes the image at 1/8 scale (``draft``).
    """
    if not data:
        return "empty file"
    if data[:3] != b"\xff\xd8\xff":
        from PIL import Image

        try:
            fmt = Image.open(io.BytesIO(data)).format
        except Exception:
            fmt = None
        if fmt:
            return f"not a JPEG but {fmt} (shards hold original JPEG bytes; nothing is re-encoded)"
        return "not a decodable image: unknown format"
    problem = _jpeg_header_problem(data)
    if problem is not None:
        return problem
    # rfind: the marker is normally the last two bytes, found at once (``in`` scans from the start
    # of the window, stopping at every FF of the entropy-coded data).
    if bytes(data[-_EOI_WINDOW:]).rfind(b"\xff\xd9") < 0:
        return "truncated JPEG: no end-of-image marker"
    if verify == "decode":
        from PIL import Image

        try:
            im = Image.open(io.BytesIO(data), formats=("JPEG", "MPO"))
            im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
            im.load()
        except Exception as e:  # PIL raises many types for broken files
            return f"not a decodable image: {type(e).__name__}: {e}"
    return None


@functools.cache
def _fallocate():
    """libc's ``fallocate(2)`` (through ctypes: the standard library only has ``posix_fallocate``,
    which glibc emulates where the filesystem cannot preallocate by writing a zero into every
    block, thousands of writes per shard on NFS or FUSE), or ``None``."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fallocate = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):
        return None
    fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fallocate.restype = ctypes.c_int
    return fallocate


def _preallocate(fd: int, size: int) -> None:
    """Give a new shard file its planned size in one ``fallocate``: ext4 then maps each written
    page to a block already allocated instead of reserving a delayed allocation per block
    (writing 220 MB of shards: 0.055 -> 0.038 s of CPU, measured on ext4).  Best effort: where the
    filesystem cannot (or the disk is full) nothing happens and writing goes on as without it;
    :func:`_write_tar` cuts the file to the tar's size, which differs from the plan's when a
    sample is skipped or a file changed since it was listed."""
    fallocate = _fallocate()
    if fallocate is not None and size > 0:
        fallocate(fd, 0, 0, size)   # mode 0: the file's size becomes ``size`` (no emulation on failure)


class _Stopped(Exception):
    """Another shard failed (or the run was interrupted): stop writing this one."""


def _write_tar(job: dict, progress=None, stop=None, staging=None, hasher=None) -> tuple:
    """Check and write one planned shard's samples into ``<name>.partial`` (a local temporary file
    for ``s3://``), hashing them inline or, with ``hasher`` (an executor), on another thread.
    Returns ``(file, tmp_path, result, staging)`` with the file still open, for
    :func:`_finish_shard`, and the staging buffers for the writer's next shard."""
    dest, name = job["dest"], job["name"]
    if _is_remote(dest):
        fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".partial")
        os.close(fd)
    else:
        tmp = _join(dest, name + ".partial")
    verify = job["verify"]

    def check(data) -> str | None:
        return check_jpeg(data, verify)

    written = 0
    first_key = None
    skipped: list[dict] = []
    f = open(tmp, "wb", buffering=0)   # TarMembers stages the bytes itself: no Python file buffer
    try:
        _preallocate(f.fileno(), job["planned_bytes"])
        tar = TarMembers(f, staging=staging, hasher=hasher)
        for key, path, label, rel, size in job["samples"]:
            if stop is not None and stop.is_set():
                raise _Stopped
            try:
                # The JPEG is read straight into the tar's staging buffer, checked there, and added
                # only if the check passes.
                reason = tar.add_file_sample(key, {"cls": str(label).encode("ascii")}, "jpg", path, size, check)
            except UnreadableSource as e:
                reason = f"unreadable: {e.error.strerror or e.error}"
            if reason is None:
                written += 1
                if first_key is None:
                    first_key = key
            else:
                skipped.append({"path": rel, "reason": reason})
            if progress is not None:
                progress(1)
        tar.close()
        if tar.size != job["planned_bytes"]:
            os.ftruncate(f.fileno(), tar.size)     # a skipped sample or a file that changed since planning
    except BaseException:
        f.close()
        os.unlink(tmp)
        raise
    result = {"name": name, "samples": written, "bytes": tar.size, "sha256": tar.sha.hexdigest(),
              "first_key": first_key, "skipped": skipped}
    return f, tmp, result, tar.staging


def _finish_shard(job: dict, f, tmp: str, result: dict) -> dict:
    """Make a written shard durable and visible, then write its sidecar (module docstring, step 3):
    local: fsync, rename ``.partial`` into place; ``s3://``: upload.  The sidecar comes last, so
    a sidecar always describes a complete shard."""
    dest, name = job["dest"], job["name"]
    remote = _is_remote(dest)
    try:
        if not remote and job.get("fsync", True):
            os.fsync(f.fileno())
        f.close()
        if remote:
            _upload(tmp, _join(dest, name))
        else:
            os.replace(tmp, _join(dest, name))
    finally:
        f.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
    sidecar = {**result, "plan_sha256": job["plan_sha256"]}
    _dest_write(dest, name + ".done.json", (json.dumps(sidecar, indent=1) + "\n").encode())
    return result


# ----------------------------------------------------------------------------- the whole job


def _read_json(dest: str, name: str) -> dict | None:
    try:
        obj = json.loads(_dest_read(dest, name))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _mismatch(dest: str, prefix: str, what: str) -> ValueError:
    return ValueError(
        f"{dest} already holds a '{prefix}' shard set ({what}) made from a different plan (other source "
        f"listing, --seed, --max-count, --max-bytes or --prefix): write to a new DEST, or delete that "
        f"shard set first")


def _find_kept(dest: str, plans: list[ShardPlan], fp: str, prefix: str) -> dict[str, dict]:
    """Shards of this plan already complete at ``dest`` (see the module docstring, step 4)."""
    remote = _is_remote(dest)
    if _dest_exists(dest, f"{prefix}.manifest.json"):
        man = _read_json(dest, f"{prefix}.manifest.json")
        if man is None or man.get("plan_sha256") != fp:
            raise _mismatch(dest, prefix, f"{prefix}.manifest.json")
    if not remote:
        # Sidecars of shards outside this plan (e.g. a longer earlier plan) would also mismatch.
        pat = re.compile(rf"^{re.escape(prefix)}-\d{{6,}}\.tar(\.done\.json|\.partial|\.done\.json\.tmp)$")
        planned = {p.name for p in plans}
        for entry in os.listdir(dest):
            m = pat.match(entry)
            if not m:
                continue
            if m.group(1) != ".done.json":
                os.unlink(_join(dest, entry))      # an interrupted write: never complete
            elif entry[: -len(".done.json")] not in planned:
                side = _read_json(dest, entry)
                if side is not None and side.get("plan_sha256") != fp:
                    raise _mismatch(dest, prefix, entry)
    kept: dict[str, dict] = {}
    for p in plans:
        side_name = p.name + ".done.json"
        if not _dest_exists(dest, side_name):
            continue
        side = _read_json(dest, side_name)
        if side is None:
            continue  # torn sidecar: rewrite the shard
        if side.get("plan_sha256") != fp:
            raise _mismatch(dest, prefix, side_name)
        if not remote:
            try:
                if os.path.getsize(_join(dest, p.name)) != side.get("bytes"):
                    continue
            except OSError:
                continue
        elif not _dest_exists(dest, p.name):
            continue
        kept[p.name] = {k: side[k] for k in ("name", "samples", "bytes", "sha256", "first_key", "skipped")}
    return kept


def shard_dataset(src: str | os.PathLike, dest: str | os.PathLike, *, source_kind: str = "auto",
                  label_file: str | os.PathLike | None = None, split: str = "train", prefix: str | None = None,
                  max_count: int = 1000, max_bytes: int = 1_000_000_000, seed: int = 0,
                  workers: int | None = None, classes_file: str | os.PathLike | None = None,
                  verify: str = "header", fsync: bool = True, progress: bool = True) -> dict:
    """Shard ``src`` into ``dest``; return ``{"manifest", "written", "kept", "seconds", "dest",
    "notes", "written_samples", "written_bytes"}`` (see the module docstring)."""
    max_count, max_bytes, seed = int(max_count), int(max_bytes), int(seed)
    if max_count < 1:
        raise ValueError(f"--max-count must be at least 1, got {max_count}")
    if max_bytes < RECORD:
        raise ValueError(f"--max-bytes must be at least {RECORD} (one tar record), got {max_bytes}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    if verify not in VERIFY_MODES:
        raise ValueError(f"--verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
    workers = int(workers) if workers is not None else (os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")

    t0 = time.perf_counter()
    listing = list_source(src, source_kind, split, label_file, classes_file)
    if prefix is None:
        prefix = "val" if listing.kind == "imagenet_val" and split == "train" else split
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"--prefix {prefix!r} may hold only letters, digits, '_', '-' and '.'")
    dest = _prepare_dest(str(dest))

    sizes = []
    for s in listing.samples:
        try:
            sizes.append(os.stat(s.path).st_size)
        except OSError:
            sizes.append(0)  # gone since the listing: reported as unreadable when its shard is written
    plans = plan_shards(listing, sizes, seed, max_count, max_bytes, prefix)
    fp = plan_fingerprint(plans, seed, max_count, max_bytes, prefix)
    kept = _find_kept(dest, plans, fp, prefix)
    jobs = [{"dest": dest, "name": p.name, "samples": p.samples, "verify": verify, "plan_sha256": fp,
             "fsync": fsync, "planned_bytes": p.planned_bytes}
            for p in plans if p.name not in kept]

    results: dict[str, dict] = dict(kept)
    total = sum(len(p.samples) for p in plans)
    bar = _progress_bar(total, sum(len(p.samples) for p in plans if p.name in kept), prefix, progress)
    try:
        results.update(_write_all(jobs, workers, bar))
    finally:
        if bar is not None:
            bar.close()

    shards = [results[p.name] for p in plans]
    skipped = sorted(listing.skipped + [s for r in shards for s in r["skipped"]], key=lambda d: d["path"])
    manifest = {
        "format": FORMAT,
        "prefix": prefix,
        "total_samples": sum(r["samples"] for r in shards),
        "shards": [{k: r[k] for k in ("name", "samples", "bytes", "sha256", "first_key")} for r in shards],
        "classes": listing.classes,
        "source": {"kind": listing.kind, "path": listing.path, "label_file": listing.label_file,
                   "split": listing.split},
        "seed": seed,
        "max_count": max_count,
        "max_bytes": max_bytes,
        "skipped": skipped,
        "plan_sha256": fp,
    }
    _dest_write(dest, f"{prefix}.manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    written = [j["name"] for j in jobs]
    return {
        "manifest": manifest,
        "dest": dest,
        "written": written,
        "kept": sorted(kept),
        "written_samples": sum(results[n]["samples"] + len(results[n]["skipped"]) for n in written),
        "written_bytes": sum(results[n]["bytes"] for n in written),
        "seconds": time.perf_counter() - t0,
        "notes": listing.notes,
    }


def _hash_threads(writers: int) -> int:
    """Hasher threads beside ``writers`` writer threads: none when the writers have a core each
    (each hashes its own shard, in ~1 MiB updates that release the GIL; measured on 2 cores, 2
    writers beat 1 writer + 1 hasher and 2 writers + 1 hasher), else one per spare core, up to one
    per writer, so that ``--workers 1`` on 2 cores hashes on the second core."""
    return min(writers, max(0, (os.cpu_count() or 1) - writers))


def _write_all(jobs: list[dict], workers: int, bar) -> dict[str, dict]:
    """Write ``jobs`` with ``workers`` writer threads; each written shard is handed to a finisher
    thread (fsync/upload + sidecar) so that a writer goes on with its next shard while the disk
    or the network catches up.  Threads, not processes: reading, hashing, writing and JPEG
    decoding all release the GIL, the Python left per image is a few microseconds, and threads
    start instantly and share one S3 client.  The first error stops every writer after its
    current image (its ``.partial`` is removed); finished shards keep their sidecars."""
    stop = threading.Event()
    lock = threading.Lock()

    def tick(n: int) -> None:
        with lock:
            bar.update(n)

    progress = tick if bar is not None else None
    results: dict[str, dict] = {}
    staging = threading.local()       # one writer thread's staging buffers, reused shard after shard
    n_writers = max(1, min(workers, len(jobs)))
    n_hashers = _hash_threads(n_writers)
    # Finishers and hashers outlive writers (the inner ``with`` is left first): a writer that
    # completes its shard while the run is stopping still gets it finished.
    with ExitStack() as pools:
        finishers = pools.enter_context(ThreadPoolExecutor(n_writers, thread_name_prefix="shard-finish"))
        hashers = pools.enter_context(ThreadPoolExecutor(n_hashers, thread_name_prefix="shard-hash")) \
            if n_hashers else None
        with ThreadPoolExecutor(n_writers, thread_name_prefix="shard-write") as writers:
            def write_then_hand_over(job):
                # Buffers go back for reuse only with a complete shard: after an error, a hash of
                # the failed shard may still be reading them.
                buffers, staging.buffers = getattr(staging, "buffers", None), None
                f, tmp, result, staging.buffers = _write_tar(job, progress, stop, buffers, hashers)
                return finishers.submit(_finish_shard, job, f, tmp, result)

            writing = {writers.submit(write_then_hand_over, job) for job in jobs}
            pending = set(writing)
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for fut in done:
                        r = fut.result()
                        if isinstance(r, Future):       # a written shard, now being finished
                            pending.add(r)
                        else:
                            results[r["name"]] = r
            except BaseException:
                stop.set()
                for fut in pending & writing:   # shards not started; a written one is still finished
                    fut.cancel()
                raise
    return results


def _progress_bar(total: int, initial: int, prefix: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="img", desc=f"shard {prefix}",
                file=sys.stderr, mininterval=0.5, smoothing=0.1, dynamic_ncols=True)


def format_report(result: dict, max_listed: int = 50) -> str:
    man = result["manifest"]
    secs = max(result["seconds"], 1e-9)
    lines = [
        f"wrote {man['total_samples']} samples in {len(man['shards'])} shards to {result['dest']} "
        f"({len(result['written'])} shards written, {len(result['kept'])} kept from an earlier run) "
        f"in {secs:.1f} s: {result['written_samples'] / secs:.0f} images/s, "
        f"{result['written_bytes'] / secs / 1e6:.1f} MB/s",
        f"manifest: {_join(result['dest'], man['prefix'] + '.manifest.json')}",
    ]
    lines += result.get("notes", [])
    skipped = man["skipped"]
    if skipped:
        lines.append(f"skipped {len(skipped)} files (all listed in the manifest's 'skipped'):")
        lines += [f"  {s['path']}: {s['reason']}" for s in skipped[:max_listed]]
        if len(skipped) > max_listed:
            lines.append(f"  … and {len(skipped) - max_listed} more")
    else:
        lines.append("skipped 0 files")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def parse_size(text: str) -> int:
    """``1e9``, ``1000000000``, ``500M``, ``1G``, ``64KiB`` -> bytes."""
    m = re.match(r"^\s*([0-9.eE+]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*$", str(text))
    try:
        if not m:
            raise ValueError
        base = 1024 if m.group(3) else 1000
        mult = base ** " KMGT".index(m.group(2).upper() or " ")
        return int(float(m.group(1)) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1e9, 500M, 1G)") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC",
                        help="ImageFolder tree (the split folder, or the root with --split), ImageNet's flat "
                             "val folder (with --label-file), or the synthetic set's root")
    parser.add_argument("dest", metavar="DEST", help="output folder: a local path or s3://bucket/prefix")
    parser.add_argument("--source-kind", choices=SOURCE_KINDS, default="auto",
                        help="auto (default): imagenet_val with --label-file, synthetic for a synthetic root, "
                             "else imagefolder; synthetic generates the demo set at SRC if missing")
    parser.add_argument("--label-file", metavar="F",
                        help="val labels: LOC_val_solution.csv, '<filename> <wnid|class_index>' lines, or "
                             "ILSVRC2012_validation_ground_truth.txt (needs --classes-file map_clsloc.txt)")
    parser.add_argument("--classes-file", metavar="F",
                        help="class names (LOC_synset_mapping.txt '<wnid> <name>' or map_clsloc.txt "
                             "'<wnid> <id> <name>'); for val, its sorted wnids give the class indices")
    parser.add_argument("--split", default="train", help="split folder under SRC (default train)")
    parser.add_argument("--prefix", metavar="NAME",
                        help="shard name prefix (default: the split; 'val' for imagenet_val)")
    parser.add_argument("--max-count", type=int, default=1000, help="samples per shard at most (default 1000)")
    parser.add_argument("--max-bytes", type=parse_size, default=1_000_000_000,
                        help="bytes per shard tar at most (default 1e9; a single larger image gets its own shard)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample shuffle (default 0)")
    parser.add_argument("--workers", type=int, default=None,
                        help="parallel shard writers (default: the number of CPU cores)")
    parser.add_argument("--verify", choices=VERIFY_MODES, default="header",
                        help="image check: header (markers + end-of-image marker, default) or decode "
                             "(also decode at 1/8 scale, ~20x slower)")
    parser.add_argument("--no-fsync", action="store_true",
                        help="do not fsync each shard before its .done.json: faster where the disk is slower "
                             "than the page cache; an interrupted process still resumes exactly, but after a "
                             "power loss a shard of the right size could hold unwritten blocks")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    result = shard_dataset(args.src, args.dest, source_kind=args.source_kind, label_file=args.label_file,
                           split=args.split, prefix=args.prefix, max_count=args.max_count,
                           max_bytes=args.max_bytes, seed=args.seed, workers=args.workers,
                           classes_file=args.classes_file, verify=args.verify, fsync=not args.no_fsync,
                           progress=not args.no_progress)
    print(format_report(result))
    return 0
