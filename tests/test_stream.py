"""Streaming loader: dp split, deterministic shuffle, exact resume, bad data (mirl_ds.data.stream).

Shards and manifests are written here with webdataset's TarWriter (16x16 JPEGs), following
docs/shard-format.md, so these tests do not depend on the shard writer.
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import logging
import tarfile
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mirl_ds.data.manifest import load_manifest
from mirl_ds.data.stream import SampleDecoder, StreamingLoader, shard_order

# ------------------------------------------------------------------------------------------
# helpers


@functools.lru_cache(maxsize=None)
def _jpeg(i: int) -> bytes:
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def key_of(shard: int, i: int) -> str:
    return f"s{shard:02d}_{i:02d}"


def label_of(shard: int, i: int) -> int:
    return (shard * 7 + i) % 5


def write_shards(root: Path, counts, *, bad=None, prefix="train") -> Path:
    """Write one shard per entry of `counts` and the manifest; return the manifest path.

    `bad` maps a key to "corrupt" (jpg bytes not an image) or "nocls" (no cls member)."""
    bad = bad or {}
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for si, n in enumerate(counts):
        name = f"{prefix}-{si:06d}.tar"
        with wds.TarWriter(str(root / name)) as w:
            for i in range(n):
                key = key_of(si, i)
                sample = {"__key__": key, "jpg": _jpeg(si * 1000 + i), "cls": label_of(si, i)}
                if bad.get(key) == "corrupt":
                    sample["jpg"] = b"\xff\xd8 this is not a jpeg"
                elif bad.get(key) == "nocls":
                    del sample["cls"]
                w.write(sample)
        data = (root / name).read_bytes()
        shards.append({"name": name, "samples": n, "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest(),
                       "first_key": key_of(si, 0) if n else None})
    manifest = {
        "format": "mirl_ds-shards/1", "prefix": prefix, "total_samples": sum(counts),
        "shards": shards,
        "classes": [{"index": c, "wnid": f"n{c:08d}", "name": f"class{c}"} for c in range(5)],
        "source": {"kind": "synthetic", "path": "tests", "label_file": None},
        "seed": 0, "max_count": max(counts), "max_bytes": 10**9, "skipped": [],
    }
    path = root / f"{prefix}.manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def key_decode(sample):
    """Trivial decoder (no JPEG decoding): a 1-element image and the cls label."""
    return torch.zeros(1, dtype=torch.uint8), int(sample["cls"])


def take(it, n):
    out = []
    for _ in range(n):
        out.append(next(it))
    return out


def keys(batches):
    return [k for b in batches for k in b["keys"]]


def one_epoch(loader):
    return list(iter(loader))


# ------------------------------------------------------------------------------------------
# manifest


def test_manifest_resolves_shard_urls_relative_to_its_folder(tmp_path):
    path = write_shards(tmp_path / "set", [3, 2])
    m = load_manifest(str(path))
    assert m.prefix == "train" and m.total_samples == 5 and len(m.classes) == 5
    assert [s.samples for s in m.shards] == [3, 2]
    assert m.shards[1].url == str((tmp_path / "set" / "train-000001.tar").resolve())
    assert load_manifest(tmp_path / "set").shards == m.shards  # a folder with one manifest


def test_manifest_errors_name_the_url(tmp_path):
    missing = tmp_path / "nope.manifest.json"
    with pytest.raises(FileNotFoundError, match="nope.manifest.json"):
        load_manifest(str(missing))
    broken = tmp_path / "broken.manifest.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.manifest.json"):
        load_manifest(str(broken))
    path = write_shards(tmp_path / "set", [3, 2])
    doc = json.loads(path.read_text())
    doc["total_samples"] = 6
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="total_samples=6"):
        load_manifest(str(path))
    doc["total_samples"] = 5
    del doc["shards"][0]["samples"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="samples"):
        load_manifest(str(path))


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()

    flaky = set()  # paths whose next GET sends only half of the body

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            if self.path in flaky:
                flaky.discard(self.path)
                data = (root / self.path.lstrip("/")).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.close_connection = True
                return
            super().do_GET()

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}", flaky
    server.shutdown()
    server.server_close()


def test_manifest_and_shards_stream_over_http(http_root):
    root, base, _ = http_root
    write_shards(root / "set", [4, 4, 4])
    m = load_manifest(f"{base}/set/train.manifest.json")
    assert m.shards[2].url == f"{base}/set/train-000002.tar"
    loader = StreamingLoader(m, batch_size=4, decode=key_decode, seed=3)
    got = keys(one_epoch(loader))
    assert sorted(got) == sorted(key_of(s, i) for s in range(3) for i in range(4))
    with pytest.raises(FileNotFoundError, match="nope.manifest.json"):
        load_manifest(f"{base}/set/nope.manifest.json")
    (root / "set" / "train-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=f"{base}/set/train-000001.tar"):
        one_epoch(StreamingLoader(m, batch_size=4, decode=key_decode, seed=3))


def test_interrupted_http_shard_read_is_retried_not_skipped(http_root, mirl_warnings):
    root, base, flaky = http_root
    write_shards(root / "set", [6, 6])
    flaky.add("/set/train-000001.tar")
    loader = StreamingLoader(f"{base}/set/train.manifest.json", batch_size=4,
                             decode=key_decode, shuffle_block=4)
    got = keys(one_epoch(loader))
    assert sorted(got) == sorted(key_of(s, i) for s in range(2) for i in range(6))
    assert loader.skipped == {} and not flaky
    assert any("train-000001.tar: read failed" in m and "retrying" in m for m in mirl_warnings)


# ------------------------------------------------------------------------------------------
# split by data-parallel rank


@pytest.mark.parametrize("dp_size,num_workers,batch_size", [(2, 2, 4), (3, 0, 5)])
def test_dp_ranks_get_disjoint_samples_covering_the_epoch(tmp_path, dp_size, num_workers, batch_size):
    counts = [4] * 12  # 48 samples: (2, 2, 4) uses all of them, (3, 0, 5) drops 3
    path = write_shards(tmp_path, counts)
    everything = {key_of(s, i) for s, n in enumerate(counts) for i in range(n)}
    per_rank = []
    for r in range(dp_size):
        loader = StreamingLoader(path, batch_size=batch_size, dp_rank=r, dp_size=dp_size,
                                 num_workers=num_workers, decode=key_decode, shuffle_block=3)
        per_rank.append(keys(one_epoch(loader)))
        assert len(per_rank[-1]) == loader.epoch_steps * batch_size
    flat = [k for ks in per_rank for k in ks]
    assert len(flat) == len(set(flat)), "a sample was delivered twice"
    usable = (48 // (dp_size * max(1, num_workers) * batch_size)) * dp_size * max(1, num_workers) * batch_size
    assert len(flat) == usable and set(flat) <= everything
    if usable == 48:
        assert set(flat) == everything


def test_same_dp_rank_on_different_global_ranks_gets_identical_batches(tmp_path, monkeypatch):
    """Pipeline stages of one replica (different global ranks, same dp_rank) see the same data."""
    path = write_shards(tmp_path, [5] * 8)
    runs = []
    for global_rank in (1, 3):  # e.g. first and last stage of dp replica 1 with pp=2
        monkeypatch.setenv("RANK", str(global_rank))
        monkeypatch.setenv("LOCAL_RANK", str(global_rank))
        loader = StreamingLoader(path, batch_size=4, dp_rank=1, dp_size=2, num_workers=2,
                                 seed=7, shuffle_block=4)
        runs.append(one_epoch(loader))
    assert keys(runs[0]) == keys(runs[1]) and len(keys(runs[0])) == 16
    for a, b in zip(*runs):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    other = keys(one_epoch(StreamingLoader(path, batch_size=4, dp_rank=0, dp_size=2,
                                           num_workers=2, seed=7, shuffle_block=4,
                                           decode=key_decode)))
    assert not set(other) & set(keys(runs[0]))


# ------------------------------------------------------------------------------------------
# deterministic shuffle


def test_shuffle_is_deterministic_from_seed_and_epoch(tmp_path):
    path = write_shards(tmp_path, [6] * 8)

    def order(seed, epoch):
        loader = StreamingLoader(path, batch_size=4, decode=key_decode, seed=seed, epoch=epoch,
                                 shuffle_block=8)
        return keys(one_epoch(loader))

    e0 = order(5, 0)
    assert e0 == order(5, 0), "same seed and epoch must give the same order"
    assert sorted(e0) == sorted(key_of(s, i) for s in range(8) for i in range(6))
    assert e0 != sorted(e0), "order must differ from shard order"
    e1 = order(5, 1)
    assert e1 != e0 and sorted(e1) == sorted(e0), "epoch 1 must be a different order"
    assert order(6, 0) != e0, "another seed must give another order"
    # the shards themselves are permuted, not only samples within blocks
    first_shards = [k.split("_")[0] for k in e0[::6]]
    assert first_shards != [f"s{s:02d}" for s in range(8)]
    assert list(shard_order(8, 5, 0)) != list(range(8))


def test_default_decoder_gives_uint8_batches_with_labels(tmp_path):
    path = write_shards(tmp_path, [4, 4])
    loader = StreamingLoader(path, batch_size=4, shuffle_block=4)
    batches = one_epoch(loader)
    assert len(batches) == 2 == loader.epoch_steps
    for b in batches:
        assert b["images"].dtype == torch.uint8 and b["images"].shape == (4, 3, 16, 16)
        assert b["labels"].dtype == torch.long
        expected = [label_of(int(k[1:3]), int(k[4:6])) for k in b["keys"]]
        assert b["labels"].tolist() == expected


# ------------------------------------------------------------------------------------------
# exact resume


def _resume_check(path, k, total, **kw):
    reference = keys(take(StreamingLoader(path, **kw).forever(), total))
    first = StreamingLoader(path, **kw)
    it = first.forever()
    head = take(it, k)
    state = json.loads(json.dumps(first.state_dict()))  # must be JSON-able
    it.close()
    second = StreamingLoader(path, **kw)
    second.load_state_dict(state)
    tail = take(second.forever(), total - k)
    assert keys(head) + keys(tail) == reference, f"resume after {k} batches diverged"
    # the fresh DataLoader's worker 0 must run the logical worker whose batch is due next
    assert second.out_of_order == 0, "resumed workers were not rotated"
    return first, second


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("num_workers", [0, 2, 3])
def test_resume_continues_with_exactly_the_uninterrupted_batches(tmp_path, num_workers):
    # 50 samples in uneven shards; e.g. W=2, B=3 -> 8 batches per worker; blocks of 5 cut shards
    path = write_shards(tmp_path, [7, 4, 9, 5, 6, 8, 3, 8])
    kw = dict(batch_size=3, num_workers=num_workers, seed=11, shuffle_block=5, decode=key_decode)
    steps = StreamingLoader(path, **kw).epoch_steps
    total = 2 * steps + 3  # across an epoch boundary
    ks = {0: range(0, total), 2: [1, 3, steps - 1, steps, steps + 5], 3: [4, steps + 2]}[num_workers]
    for k in ks:
        _resume_check(path, k, total, **kw)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_with_bad_samples_restores_positions_and_skip_counts(tmp_path, num_workers):
    bad = {key_of(0, 1): "corrupt", key_of(2, 3): "nocls", key_of(5, 0): "corrupt"}
    path = write_shards(tmp_path, [6] * 8, bad=bad)
    kw = dict(batch_size=4, num_workers=num_workers, seed=2, shuffle_block=5)
    steps = StreamingLoader(path, **kw).epoch_steps
    total = steps + 2
    ks = range(1, total) if num_workers == 0 else [1, steps - 1]
    for k in ks:
        first, second = _resume_check(path, k, total, **kw)
    ref = StreamingLoader(path, **kw)
    take(ref.forever(), total)
    assert second.skipped == ref.skipped
    assert ref.skipped["decode_error"] >= 2 and ref.skipped["missing_field"] >= 1
    epoch = StreamingLoader(path, **kw)
    one_epoch(epoch)
    assert epoch.skipped == {"decode_error": 2, "missing_field": 1, "refilled": 3}


class RandomDecoder:
    """Stands in for a random-crop decoder: each image is a draw from the decoder's own RNG."""

    def __init__(self):
        self.rng = np.random.default_rng(0)

    def reseed(self, seed):
        self.rng = np.random.default_rng(seed)

    def __call__(self, jpg, key):
        return torch.from_numpy(self.rng.integers(0, 2**31, size=2))


def test_random_augmentation_is_restored_on_resume(tmp_path):
    path = write_shards(tmp_path, [5] * 8)
    kw = dict(batch_size=4, num_workers=2, seed=3, shuffle_block=3)
    ref = take(StreamingLoader(path, decode=SampleDecoder(RandomDecoder()), **kw).forever(), 7)
    first = StreamingLoader(path, decode=SampleDecoder(RandomDecoder()), **kw)
    it = first.forever()
    take(it, 3)
    it.close()
    second = StreamingLoader(path, decode=SampleDecoder(RandomDecoder()), **kw)
    second.load_state_dict(first.state_dict())
    tail = take(second.forever(), 4)
    assert keys(tail) == keys(ref[3:])
    for a, b in zip(tail, ref[3:]):
        assert torch.equal(a["images"], b["images"]), "augmentation differs after resume"
    assert not torch.equal(ref[0]["images"][0], ref[0]["images"][1])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_never_opens_shards_already_consumed(tmp_path, num_workers):
    """Delete every shard whose samples were all delivered before the checkpoint: the resumed
    loader must not touch them (missing shards raise by default), and must decode nothing it
    only skips."""
    path = write_shards(tmp_path, [4] * 12)
    decoded = []

    def recording_decode(sample):
        decoded.append(sample["__key__"])
        return key_decode(sample)

    kw = dict(batch_size=4, num_workers=num_workers, seed=4, shuffle_block=4)
    reference = keys(one_epoch(StreamingLoader(path, decode=key_decode, **kw)))
    first = StreamingLoader(path, decode=key_decode, **kw)
    it = iter(first)
    k = 5 if num_workers == 2 else 7
    head = keys(take(it, k))
    it.close()
    state = first.state_dict()
    consumed = set(head)
    deleted = 0
    for s in range(12):
        if all(key_of(s, i) in consumed for i in range(4)):
            (tmp_path / f"train-{s:06d}.tar").unlink()
            deleted += 1
    assert deleted >= 3
    second = StreamingLoader(path, decode=recording_decode, **kw)
    second.load_state_dict(state)
    tail = keys(one_epoch(second))
    assert head + tail == reference
    if num_workers == 0:
        assert decoded == tail, "resume decoded samples it should only have skipped"


def test_resume_skips_within_a_shard_and_block_without_decoding(tmp_path):
    path = write_shards(tmp_path, [10] * 4)
    decoded = []

    def recording_decode(sample):
        decoded.append(sample["__key__"])
        return key_decode(sample)

    kw = dict(batch_size=3, seed=9, shuffle_block=7)
    reference = keys(one_epoch(StreamingLoader(path, decode=key_decode, **kw)))
    first = StreamingLoader(path, decode=key_decode, **kw)
    it = iter(first)
    head = keys(take(it, 5))  # 15 samples: mid-shard, mid-block
    state = first.state_dict()
    assert state["worker_raw"] == [15]
    second = StreamingLoader(path, decode=recording_decode, **kw)
    second.load_state_dict(state)
    tail = keys(one_epoch(second))
    assert head + tail == reference and decoded == tail


def test_state_of_another_stream_is_refused(tmp_path):
    path = write_shards(tmp_path, [4] * 6)
    a = StreamingLoader(path, batch_size=4, dp_rank=0, dp_size=2, decode=key_decode)
    b = StreamingLoader(path, batch_size=4, dp_rank=1, dp_size=2, decode=key_decode)
    with pytest.raises(ValueError, match="dp_rank"):
        b.load_state_dict(a.state_dict())
    c = StreamingLoader(path, batch_size=2, dp_rank=0, dp_size=2, decode=key_decode)
    with pytest.raises(ValueError, match="batch_size"):
        c.load_state_dict(a.state_dict())


def test_set_epoch_keeps_a_resumed_position_and_moves_to_other_epochs(tmp_path):
    path = write_shards(tmp_path, [4] * 6)
    kw = dict(batch_size=4, decode=key_decode, seed=1, shuffle_block=4)
    reference = keys(one_epoch(StreamingLoader(path, **kw)))
    a = StreamingLoader(path, **kw)
    head = keys(take(iter(a), 2))
    b = StreamingLoader(path, **kw)
    b.load_state_dict(a.state_dict())
    b.set_epoch(0)  # the trainer's per-epoch call must not undo the resume
    assert head + keys(one_epoch(b)) == reference
    b.set_epoch(3)
    assert keys(one_epoch(b)) == keys(one_epoch(StreamingLoader(path, epoch=3, **kw)))


# ------------------------------------------------------------------------------------------
# bad data


def _check_full(batches, loader, batch_size):
    assert len(batches) == loader.epoch_steps
    assert all(len(b["keys"]) == batch_size and b["labels"].shape == (batch_size,) for b in batches)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_jpeg_and_missing_cls_are_skipped_counted_and_refilled(tmp_path, num_workers):
    bad = {key_of(1, 2): "corrupt", key_of(6, 0): "nocls"}
    path = write_shards(tmp_path, [5] * 8, bad=bad)
    loader = StreamingLoader(path, batch_size=4, num_workers=num_workers, shuffle_block=3, seed=1)
    batches = one_epoch(loader)
    _check_full(batches, loader, 4)
    assert loader.skipped == {"decode_error": 1, "missing_field": 1, "refilled": 2}
    got = keys(batches)
    assert not set(bad) & set(got)
    good = {key_of(s, i) for s in range(8) for i in range(5)} - set(bad)
    assert set(got) == good and len(got) == len(good) + 2  # 2 re-used from the own range
    assert all(b["images"].shape == (4, 3, 16, 16) for b in batches)


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def mirl_warnings():
    handler = _Capture()
    logger = logging.getLogger("mirl_ds")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def test_truncated_shard_skips_its_rest_counted_and_reported(tmp_path, mirl_warnings):
    path = write_shards(tmp_path, [5] * 8)
    shard = tmp_path / "train-000003.tar"
    with tarfile.open(shard) as tf:
        member = next(m for m in tf.getmembers() if m.name == f"{key_of(3, 2)}.jpg")
    data = shard.read_bytes()
    shard.write_bytes(data[: member.offset_data + 10])  # cut inside sample #2's JPEG
    loader = StreamingLoader(path, batch_size=4, decode=key_decode, shuffle_block=4, seed=5)
    batches = one_epoch(loader)
    _check_full(batches, loader, 4)
    assert loader.skipped == {"truncated_shard": 3, "refilled": 3}
    got = set(keys(batches))
    assert {key_of(3, 0), key_of(3, 1)} <= got and not {key_of(3, i) for i in (2, 3, 4)} & got
    assert any(str(shard) in m and "3 of the samples" in m for m in mirl_warnings)


def test_empty_shard_file_counts_every_listed_sample(tmp_path, mirl_warnings):
    path = write_shards(tmp_path, [5] * 8)
    shard = tmp_path / "train-000006.tar"
    shard.write_bytes(b"")
    loader = StreamingLoader(path, batch_size=4, num_workers=2, decode=key_decode, seed=5)
    batches = one_epoch(loader)
    _check_full(batches, loader, 4)
    assert loader.skipped == {"truncated_shard": 5, "refilled": 5}
    assert not any(k.startswith("s06_") for k in keys(batches))


def test_shard_with_zero_samples_in_manifest_is_never_opened(tmp_path):
    path = write_shards(tmp_path, [4, 0, 4, 4])
    (tmp_path / "train-000001.tar").unlink()
    loader = StreamingLoader(path, batch_size=4, decode=key_decode)
    assert len(keys(one_epoch(loader))) == 12 and loader.skipped == {}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_missing_shard_raises_with_its_url(tmp_path, num_workers):
    path = write_shards(tmp_path, [5] * 8)
    gone = tmp_path / "train-000004.tar"
    gone.unlink()
    loader = StreamingLoader(path, batch_size=4, num_workers=num_workers, decode=key_decode)
    with pytest.raises(FileNotFoundError, match=str(gone)):
        one_epoch(loader)


def test_missing_shard_in_skip_mode_is_counted(tmp_path, mirl_warnings):
    path = write_shards(tmp_path, [5] * 8)
    gone = tmp_path / "train-000004.tar"
    gone.unlink()
    loader = StreamingLoader(path, batch_size=4, decode=key_decode, on_missing_shard="skip")
    batches = one_epoch(loader)
    _check_full(batches, loader, 4)
    assert loader.skipped == {"missing_shard": 5, "refilled": 5}
    assert any(str(gone) in m for m in mirl_warnings)


def test_a_range_without_any_good_sample_raises_instead_of_looping(tmp_path):
    path = write_shards(tmp_path, [4, 4], bad={key_of(s, i): "corrupt" for s in (0, 1) for i in range(4)})
    with pytest.raises(RuntimeError, match="none of the 8 samples"):
        one_epoch(StreamingLoader(path, batch_size=4))


# ------------------------------------------------------------------------------------------
# epoch length


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("dp_size,num_workers,batch_size", [(1, 0, 4), (2, 2, 3), (3, 2, 2), (1, 3, 5)])
def test_epoch_steps_from_manifest_equals_batches_delivered(tmp_path, dp_size, num_workers, batch_size):
    path = write_shards(tmp_path, [7, 3, 9, 6, 5], bad={key_of(2, 4): "corrupt"})
    for r in range(dp_size):
        loader = StreamingLoader(path, batch_size=batch_size, dp_rank=r, dp_size=dp_size,
                                 num_workers=num_workers, shuffle_block=4)
        expected = 30 // (dp_size * max(1, num_workers) * batch_size) * max(1, num_workers)
        assert loader.epoch_steps == len(loader) == expected
        batches = one_epoch(loader)
        assert len(batches) == expected and loader.step_in_epoch == expected
        assert Counter(len(b["keys"]) for b in batches) == Counter({batch_size: expected})
        assert [b["meta"]["worker"] for b in batches] == [i % max(1, num_workers) for i in range(expected)]


def test_too_small_a_set_is_refused_up_front(tmp_path):
    path = write_shards(tmp_path, [3])
    with pytest.raises(ValueError, match="fewer than the 8"):
        StreamingLoader(path, batch_size=4, dp_size=2)
