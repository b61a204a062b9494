"""Exactly resumable WebDataset streaming, split by data-parallel rank then by worker.

The stream is a pure function of (manifest, seed, epoch, dp_rank, dp_size, num_workers,
batch_size, shuffle_block) and a position, so a checkpointed position restores the exact
continuation without decoding anything that was already delivered.

Plan of epoch ``e``
-------------------
* The shard list is permuted with ``np.random.default_rng([seed, e])``; concatenating the
  permuted shards' samples gives global positions ``0 .. T-1`` (T = manifest total).
* ``batches_per_worker = T // (dp_size * W * batch_size)`` (W = logical workers =
  ``max(1, num_workers)``; the remainder is dropped so every rank and worker has the same
  number of full batches); ``epoch_steps = batches_per_worker * W`` batches per rank.
* Logical worker ``w`` of data-parallel rank ``r`` owns the contiguous range of
  ``L = batches_per_worker * batch_size`` positions starting at ``(r * W + w) * L``. The split
  is by *data-parallel* rank: pipeline stages of one replica pass the same ``dp_rank``.
* A worker reads its range sequentially, opening only the shards the range overlaps; it
  shuffles within consecutive blocks of ``shuffle_block`` raw samples (boundaries fixed relative
  to the range start) using ``np.random.default_rng([seed, e, dp_rank, w, block])``, then
  decodes and emits. Its position ``raw`` counts range positions processed in that emission
  order (bad ones included). If the range runs out before the last batch is full (bad samples),
  the worker starts over at its range start (pass 1, 2, ...; positions ``raw >= L``) and the
  re-used samples are counted as ``refilled``.
* Batch ``k`` of the epoch comes from logical worker ``k % W`` (its batch ``k // W``).

Resume: the saved state is (epoch, k, raw per logical worker). A fresh DataLoader starts with
its worker 0, so DataLoader worker ``j`` runs logical worker ``(k % W + j) % W``; each logical
worker skips whole shards by manifest counts, skips raw tar members of the first shard without
decoding, loads only the partially consumed shuffle block and drops its already processed
entries by the block's permutation.

Random augmentation: if the ``decode`` callable has a ``reseed(seq)`` method (see
:class:`SampleDecoder`), it is called before each sample with ``[seed, epoch, dp_rank, worker,
raw]`` so crops/flips, too, are a function of the position and survive a resume.

Bad data is skipped and counted by reason (never silently): ``decode_error`` (decode raised),
``missing_field`` (no ``jpg`` or ``cls`` member), ``truncated_shard`` (the tar ended early or
could not be read: every sample the manifest promised but the tar did not deliver),
``missing_shard`` (the shard could not be opened, only with ``on_missing_shard="skip"``).
Shard-level problems are logged with the shard URL on ``logging.getLogger("mirl_ds")``.
"""
from __future__ import annotations

import http.client
import io
import logging
import os
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mirl_ds.data.manifest import Manifest, is_remote, load_manifest
from mirl_ds.data.tar_reader import iter_samples

log = logging.getLogger("mirl_ds")

__all__ = [
    "StreamingLoader",
    "ShardStream",
    "StreamPlan",
    "decode_jpeg_uint8",
    "SampleDecoder",
    "open_shard",
    "shard_order",
    "batches_per_worker",
    "SKIP_REASONS",
]

SKIP_REASONS = ("decode_error", "missing_field", "truncated_shard", "missing_shard")
REMOTE_READ_RETRIES = 3  # re-opens of an http(s)/s3 shard whose read fails mid-way
STATE_VERSION = 1


# --------------------------------------------------------------------------------------------
# decoding


def decode_jpeg_uint8(sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """Default decoder: JPEG bytes -> RGB uint8 tensor [3, H, W]; ``cls`` -> int."""
    from PIL import Image

    with Image.open(io.BytesIO(sample["jpg"])) as im:
        arr = np.array(im.convert("RGB"))  # a writable copy
    return torch.from_numpy(arr).permute(2, 0, 1), int(sample["cls"])


class SampleDecoder:
    """Adapts an image decoder ``f(jpg_bytes, key) -> image`` (e.g. ``mirl_ds.data.decode``'s
    PretrainDecoder / EvalDecoder) to the loader's ``decode(sample) -> (image, label)``,
    forwarding ``reseed`` so random crops/flips are a pure function of the stream position."""

    def __init__(self, image_decoder: Callable[..., Any]):
        self.image_decoder = image_decoder

    def __call__(self, sample: dict[str, Any]) -> tuple[Any, int]:
        return self.image_decoder(sample["jpg"], sample.get("__key__")), int(sample["cls"])

    def reseed(self, seed) -> None:
        reseed = getattr(self.image_decoder, "reseed", None)
        if reseed is not None:
            reseed(seed)


# --------------------------------------------------------------------------------------------
# pure planning functions


def shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of the manifest's shard list used in `epoch`."""
    return np.random.default_rng([seed, epoch]).permutation(num_shards)


def batches_per_worker(total: int, dp_size: int, num_workers: int, batch_size: int) -> int:
    return total // (dp_size * max(1, num_workers) * batch_size)


def _block_perm(seed: int, epoch: int, dp_rank: int, worker: int, block: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, dp_rank, worker, block]).permutation(n)


@dataclass(frozen=True)
class StreamPlan:
    """Everything that fixes the stream (what a worker needs; cheap to pickle)."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    seed: int
    dp_rank: int
    dp_size: int
    workers: int  # logical workers, >= 1
    batch_size: int
    shuffle_block: int
    on_missing_shard: str

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def batches_per_worker(self) -> int:
        return batches_per_worker(self.total, self.dp_size, self.workers, self.batch_size)

    @property
    def range_len(self) -> int:
        return self.batches_per_worker * self.batch_size

    @property
    def epoch_steps(self) -> int:
        return self.batches_per_worker * self.workers

    def range_start(self, worker: int) -> int:
        return (self.dp_rank * self.workers + worker) * self.range_len

    def pieces(self, epoch: int, worker: int, q0: int = 0) -> list[tuple[str, int, int]]:
        """(shard url, first sample in shard, sample count) covering range positions q0..L-1."""
        order = shard_order(len(self.urls), self.seed, epoch)
        counts = np.asarray(self.counts, dtype=np.int64)[order]
        cum = np.concatenate([[0], np.cumsum(counts)])
        pos, end = self.range_start(worker) + q0, self.range_start(worker) + self.range_len
        out = []
        i = int(np.searchsorted(cum, pos, side="right")) - 1
        while pos < end:
            avail = int(cum[i + 1]) - pos
            if avail > 0:
                n = min(avail, end - pos)
                out.append((self.urls[order[i]], pos - int(cum[i]), n))
                pos += n
            i += 1
        return out


# --------------------------------------------------------------------------------------------
# shard reading


def open_shard(url: str, attempts: int = 4):
    """Open a shard for sequential reading (local path, file://, http(s)://, s3://, or any
    scheme webdataset's gopen knows). A shard that does not exist raises FileNotFoundError."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        path = urllib.request.url2pathname(urllib.parse.urlsplit(url).path) if scheme == "file" else url
        return open(path, "rb")
    if scheme in ("http", "https"):
        delay = 0.5
        for attempt in range(attempts):
            try:
                return urllib.request.urlopen(url, timeout=60)
            except urllib.error.HTTPError as e:
                if e.code in (403, 404, 410):
                    raise FileNotFoundError(f"HTTP {e.code}") from None
                if e.code < 500 or attempt == attempts - 1:
                    raise OSError(f"HTTP {e.code}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError):
                if attempt == attempts - 1:
                    raise
            time.sleep(delay)
            delay *= 2
    if scheme == "s3":
        from mirl_ds.data import object_store  # noqa: F401  (registers the s3 gopen handler)
    import webdataset as wds

    return wds.gopen(url, "rb")


class _Bad:
    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


_TRUNCATED, _MISSING = _Bad("truncated_shard"), _Bad("missing_shard")


class _WorkerStream:
    """One logical worker of one epoch: yields its batches from a given position."""

    def __init__(self, plan: StreamPlan, decode: Callable, epoch: int, worker: int):
        self.plan, self.decode, self.epoch, self.worker = plan, decode, epoch, worker
        self._reseed = getattr(decode, "reseed", None)
        self._warned: set[tuple[str, str]] = set()

    def _warn(self, url: str, kind: str, msg: str) -> None:
        if (url, kind) not in self._warned:
            self._warned.add((url, kind))
            log.warning(msg)

    def _read_piece(self, url: str, offset: int, n: int):
        try:
            f = open_shard(url)
        except Exception as e:  # noqa: BLE001 - every failure to open is reported with the URL
            what = "does not exist" if isinstance(e, FileNotFoundError) else "could not be opened"
            msg = f"shard {url} {what} ({type(e).__name__}: {e})"
            if self.plan.on_missing_shard == "raise":
                cls = FileNotFoundError if isinstance(e, FileNotFoundError) else OSError
                raise cls(msg + "; pass on_missing_shard='skip' to skip it (counted)") from e
            self._warn(url, "missing", f"{msg}; skipping its {n} samples of this range")
            for _ in range(n):
                yield _MISSING
            return
        got, error, delay = 0, None, 0.5
        retries = REMOTE_READ_RETRIES if is_remote(url) else 0
        while True:
            error = None
            try:
                if got < n:
                    for key, sample in iter_samples(f, skip=offset + got):
                        yield key, sample, url
                        got += 1
                        if got == n:
                            break
            except (tarfile.TarError, OSError, EOFError, ValueError, http.client.HTTPException) as e:
                error = e
            finally:
                try:
                    f.close()
                except Exception:  # noqa: BLE001
                    pass
            if got == n or error is None or retries == 0:
                break
            # a transient failure of a remote read: reopen and skip to where it broke off
            retries -= 1
            log.warning("shard %s: read failed at sample #%d (%s: %s); retrying in %.1fs",
                        url, offset + got, type(error).__name__, error, delay)
            time.sleep(delay)
            delay *= 2
            try:
                f = open_shard(url)
            except Exception as e:  # noqa: BLE001
                error = e
                break
        if got < n:
            why = f"unreadable ({type(error).__name__}: {error})" if error else "ended early"
            self._warn(url, "truncated",
                       f"shard {url} is {why}: {n - got} of the samples the manifest lists "
                       f"(from #{offset + got}) are skipped")
            for _ in range(n - got):
                yield _TRUNCATED

    def _records(self, q0: int):
        for url, offset, n in self.plan.pieces(self.epoch, self.worker, q0):
            yield from self._read_piece(url, offset, n)

    def batches(self, raw: int, batch_index: int) -> Iterator[dict[str, Any]]:
        p = self.plan
        L, S, B, bpw = p.range_len, p.shuffle_block, p.batch_size, p.batches_per_worker
        reader, reader_at = None, None  # reader_at = (pass, next range position)
        delta: Counter = Counter()
        images, labels, keys = [], [], []
        since_good, last_error = 0, "none"
        while batch_index < bpw:
            npass, q = divmod(raw, L)
            block = q // S
            bs, be = block * S, min(block * S + S, L)
            if reader is None or reader_at != (npass, bs):
                if reader is not None:
                    reader.close()
                reader = self._records(bs)
            recs = [next(reader) for _ in range(be - bs)]
            reader_at = (npass, be) if be < L else None
            perm = _block_perm(p.seed, self.epoch, p.dp_rank, self.worker, block, be - bs)
            for j in range(q - bs, be - bs):
                rec = recs[perm[j]]
                raw = npass * L + bs + j + 1
                since_good += 1
                ok = False
                if isinstance(rec, _Bad):
                    if npass == 0:
                        delta[rec.reason] += 1
                else:
                    key, sample, url = rec
                    if "jpg" not in sample or "cls" not in sample:
                        if npass == 0:
                            delta["missing_field"] += 1
                            log.warning("sample %s in %s lacks %s; skipped", key, url,
                                        " and ".join(x for x in ("jpg", "cls") if x not in sample))
                    else:
                        sample = dict(sample, __key__=key, __url__=url)
                        try:
                            if self._reseed is not None:  # augmentation = f(position): resumable
                                self._reseed([p.seed, self.epoch, p.dp_rank, self.worker, raw])
                            image, label = self.decode(sample)
                            label = int(label)
                            ok = True
                        except Exception as e:  # noqa: BLE001 - counted and reported
                            last_error = f"{key}: {type(e).__name__}: {e}"
                            if npass == 0:
                                delta["decode_error"] += 1
                                log.warning("sample %s in %s could not be decoded (%s: %s); skipped",
                                            key, url, type(e).__name__, e)
                if not ok:
                    if since_good >= L:
                        raise RuntimeError(
                            f"dp rank {p.dp_rank}, worker {self.worker}, epoch {self.epoch}: none of "
                            f"the {L} samples of its range could be decoded "
                            f"(shards {sorted({u for u, _, _ in p.pieces(self.epoch, self.worker)})}; "
                            f"last decode error {last_error})")
                    continue
                since_good = 0
                if npass > 0:
                    delta["refilled"] += 1
                images.append(image)
                labels.append(label)
                keys.append(key)
                if len(keys) == B:
                    yield {
                        "images": _stack(images),
                        "labels": torch.tensor(labels, dtype=torch.long),
                        "keys": keys,
                        "meta": {"worker": self.worker, "epoch": self.epoch, "raw": raw,
                                 "batch_index": batch_index, "skipped": dict(delta)},
                    }
                    batch_index += 1
                    images, labels, keys, delta = [], [], [], Counter()
                    if batch_index == bpw:
                        break
        if reader is not None:
            reader.close()


def _stack(images: list):
    first = images[0]
    try:
        if isinstance(first, torch.Tensor):
            return torch.stack(images)
        if isinstance(first, np.ndarray):
            return torch.from_numpy(np.stack(images))
    except (RuntimeError, ValueError) as e:
        shapes = sorted({tuple(x.shape) for x in images})
        raise RuntimeError(
            f"cannot stack decoded images of shapes {shapes} into a batch; the decode callable "
            f"must return equally shaped images (add a resizing/cropping transform)") from e
    return images


class ShardStream(IterableDataset):
    """The rest of one epoch for one data-parallel rank, as seen by DataLoader workers.

    DataLoader worker ``j`` (or the main process when num_workers=0) runs logical worker
    ``(start_k % W + j) % W`` from its saved raw position."""

    def __init__(self, plan: StreamPlan, decode: Callable, epoch: int, start_k: int,
                 start_raw: list[int]):
        self.plan, self.decode, self.epoch = plan, decode, epoch
        self.start_k, self.start_raw = start_k, list(start_raw)

    def __iter__(self):
        W = self.plan.workers
        info = get_worker_info()
        if info is None:
            if W != 1:
                raise RuntimeError(f"this stream is planned for {W} DataLoader workers")
            j = 0
        else:
            if info.num_workers != W:
                raise RuntimeError(f"stream planned for {W} workers runs in {info.num_workers}")
            j = info.id
        r = self.start_k % W
        w = (r + j) % W
        first_batch = self.start_k // W + (1 if w < r else 0)
        stream = _WorkerStream(self.plan, self.decode, self.epoch, w)
        return stream.batches(self.start_raw[w], first_batch)


# --------------------------------------------------------------------------------------------
# the loader the trainer uses


class StreamingLoader:
    """Batches for one data-parallel rank, resumable exactly through state_dict().

    Each batch is a dict: ``images`` (stacked decode output, e.g. uint8 [B,3,H,W]),
    ``labels`` (LongTensor [B]), ``keys`` (list[str]) and ``meta`` (logical worker, epoch, raw
    position after the batch, batch index within the worker, skip-counter delta).

    ``iter(loader)`` yields the rest of the current epoch (a new ``iter`` after the epoch's
    last batch starts the next epoch); ``loader.forever()`` runs across epochs without end.
    Only the newest iterator may be used.
    """

    def __init__(
        self,
        manifest: Manifest | str | os.PathLike,
        *,
        batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        epoch: int = 0,
        shuffle_block: int = 512,
        decode: Callable[[dict[str, Any]], tuple[Any, int]] | None = None,
        on_missing_shard: str = "raise",
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        multiprocessing_context=None,
        timeout: float = 0,
    ):
        if not isinstance(manifest, Manifest):
            manifest = load_manifest(manifest)
        problems = []
        for name, value, lo in (("batch_size", batch_size, 1), ("dp_size", dp_size, 1),
                                ("num_workers", num_workers, 0), ("seed", seed, 0),
                                ("epoch", epoch, 0), ("shuffle_block", shuffle_block, 1),
                                ("dp_rank", dp_rank, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
                problems.append(f"{name} must be an integer >= {lo}, got {value!r}")
        if not problems and dp_rank >= dp_size:
            problems.append(f"dp_rank={dp_rank} must be below dp_size={dp_size}")
        if on_missing_shard not in ("raise", "skip"):
            problems.append(f"on_missing_shard must be 'raise' or 'skip', got {on_missing_shard!r}")
        if problems:
            raise ValueError("; ".join(problems))
        self.manifest = manifest
        self.num_workers = int(num_workers)
        self.plan = StreamPlan(
            urls=tuple(s.url for s in manifest.shards),
            counts=tuple(s.samples for s in manifest.shards),
            seed=int(seed), dp_rank=int(dp_rank), dp_size=int(dp_size),
            workers=max(1, int(num_workers)), batch_size=int(batch_size),
            shuffle_block=int(shuffle_block), on_missing_shard=on_missing_shard,
        )
        if self.plan.epoch_steps == 0:
            need = dp_size * self.plan.workers * batch_size
            raise ValueError(
                f"manifest {manifest.url or manifest.base_url} has {manifest.total_samples} samples, "
                f"fewer than the {need} needed for one batch per worker "
                f"(dp_size={dp_size} x workers={self.plan.workers} x batch_size={batch_size})")
        self.decode = decode or decode_jpeg_uint8
        self._dl_kwargs = {"pin_memory": pin_memory, "timeout": timeout}
        if prefetch_factor is not None:
            self._dl_kwargs["prefetch_factor"] = prefetch_factor
        if multiprocessing_context is not None:
            self._dl_kwargs["multiprocessing_context"] = multiprocessing_context
        self._skipped: Counter = Counter()
        self._generation = 0
        self.out_of_order = 0  # diagnostic: batches the DataLoader delivered ahead of their turn
        self._start_epoch(int(epoch))

    # ---- position ----------------------------------------------------------------------

    @property
    def epoch_steps(self) -> int:
        """Batches per rank per epoch, from the manifest counts alone."""
        return self.plan.epoch_steps

    def __len__(self) -> int:
        return self.epoch_steps

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def step_in_epoch(self) -> int:
        """Batches delivered in the current epoch."""
        return self._k

    @property
    def skipped(self) -> dict[str, int]:
        """Counts by reason (see SKIP_REASONS) plus ``refilled``, for delivered batches."""
        return dict(sorted(self._skipped.items()))

    def _start_epoch(self, epoch: int) -> None:
        self._epoch, self._k = epoch, 0
        self._raw = [0] * self.plan.workers

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of `epoch`; a no-op when already in `epoch` (so that a trainer
        calling set_epoch at each epoch start does not undo a mid-epoch resume)."""
        if epoch != self._epoch:
            self._generation += 1  # invalidates running iterators
            self._start_epoch(int(epoch))

    def _plan_record(self) -> dict[str, Any]:
        p = self.plan
        return {"seed": p.seed, "dp_rank": p.dp_rank, "dp_size": p.dp_size,
                "workers": p.workers, "batch_size": p.batch_size,
                "shuffle_block": p.shuffle_block, "total_samples": p.total,
                "manifest": self.manifest.fingerprint()}

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "epoch": self._epoch, "step_in_epoch": self._k,
                "worker_raw": list(self._raw), "skipped": self.skipped,
                "plan": self._plan_record()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a StreamingLoader state (version {STATE_VERSION}): {state!r:.200}")
        mine, saved = self._plan_record(), state.get("plan", {})
        diff = [f"{k}={saved.get(k)!r} (saved) vs {v!r} (now)" for k, v in mine.items()
                if saved.get(k) != v]
        if diff:
            raise ValueError("the loader state was saved for a different stream, resuming it "
                             "would not continue the same samples: " + ", ".join(diff))
        k, raw = state["step_in_epoch"], state["worker_raw"]
        if not (0 <= k <= self.epoch_steps) or len(raw) != self.plan.workers or any(
                not isinstance(x, int) or x < 0 for x in raw):
            raise ValueError(f"inconsistent loader state: step_in_epoch={k}, worker_raw={raw}")
        self._generation += 1
        self._epoch, self._k, self._raw = int(state["epoch"]), int(k), [int(x) for x in raw]
        self._skipped = Counter({str(r): int(n) for r, n in state.get("skipped", {}).items()})

    # ---- iteration -----------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._generation += 1
        return self._run(self._generation, infinite=False)

    def forever(self) -> Iterator[dict[str, Any]]:
        self._generation += 1
        return self._run(self._generation, infinite=True)

    def _run(self, gen: int, infinite: bool):
        while True:
            if self._k >= self.epoch_steps:
                self._start_epoch(self._epoch + 1)
            yield from self._epoch_batches(gen)
            if not infinite:
                return

    def _epoch_batches(self, gen: int):
        W = self.plan.workers
        ds = ShardStream(self.plan, self.decode, self._epoch, self._k, self._raw)
        if self.num_workers == 0:
            it = iter(ds)
        else:
            it = iter(DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                 persistent_workers=False, in_order=True, **self._dl_kwargs))
        pending: dict[tuple[int, int], dict] = {}
        try:
            for batch in it:
                meta = batch["meta"]
                if (meta["worker"], meta["batch_index"]) != (self._k % W, self._k // W):
                    self.out_of_order += 1  # held back; 0 when the worker rotation is right
                pending[(meta["worker"], meta["batch_index"])] = batch
                while (self._k % W, self._k // W) in pending:
                    if gen != self._generation:
                        raise RuntimeError("this loader iterator is stale: a newer iterator was "
                                           "started, or the position was changed")
                    b = pending.pop((self._k % W, self._k // W))
                    self._k += 1
                    self._raw[b["meta"]["worker"]] = b["meta"]["raw"]
                    self._skipped.update(b["meta"]["skipped"])
                    yield b
            if self._k != self.epoch_steps or pending:
                raise RuntimeError(f"epoch {self._epoch} ended after {self._k} of "
                                   f"{self.epoch_steps} batches (pending: {sorted(pending)})")
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            elif hasattr(it, "close"):
                it.close()
