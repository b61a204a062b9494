"""Tests for ``mirl-ds shard`` (mirl_ds.data.sources, mirl_ds.data.sharding) and the shard contract
of docs/shard-format.md."""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mirl_ds.data import sharding
from mirl_ds.data.sharding import FORMAT, shard_dataset, tar_bytes
from mirl_ds.data.sources import list_source, make_keys

WNIDS = ["n01440764", "n01443537", "n01484850"]


def jpeg_bytes(rng: np.random.Generator, w: int = 16, h: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_tree(root: Path, per_class: tuple[int, ...] = (9, 7, 8), seed: int = 0, vary: bool = True) -> dict:
    """ImageFolder tree root/train/<wnid>/<wnid>_<i>.JPEG; returns {relative path: (bytes, class)}."""
    rng = np.random.default_rng(seed)
    out = {}
    for ci, (wnid, n) in enumerate(zip(WNIDS, per_class)):
        d = root / "train" / wnid
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            w = int(rng.integers(8, 40)) if vary else 16
            data = jpeg_bytes(rng, w, w * 3 // 4 + 1)
            (d / f"{wnid}_{i}.JPEG").write_bytes(data)
            out[f"train/{wnid}/{wnid}_{i}.JPEG"] = (data, ci)
    return out


def read_tar(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def samples_of(dest: Path, prefix: str = "train") -> list[tuple[str, bytes, int]]:
    """(key, jpg bytes, class) of every sample, in shard then member order."""
    man = json.loads((dest / f"{prefix}.manifest.json").read_text())
    out = []
    for sh in man["shards"]:
        members = read_tar(dest / sh["name"])
        assert len(members) == 2 * sh["samples"]
        for (n_cls, cls), (n_jpg, jpg) in zip(members[0::2], members[1::2]):
            key = n_cls[: -len(".cls")]
            assert n_cls == f"{key}.cls" and n_jpg == f"{key}.jpg"
            out.append((key, jpg, int(cls.decode("ascii"))))
    return out


def files_of(dest: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(dest.iterdir())}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("src")
    return root, make_tree(root)


def shard(src, dest, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return shard_dataset(src, dest, **kw)


# ----------------------------------------------------------------------------- round trip


def test_every_source_image_arrives_once_with_original_bytes_and_label(tree, tmp_path):
    root, files = tree
    dest = tmp_path / "out"
    res = shard(root, dest, split="train", max_count=7)
    man = res["manifest"]

    got = samples_of(dest)
    assert len(got) == len(files) == man["total_samples"]
    keys = [k for k, _, _ in got]
    assert len(set(keys)) == len(keys) and not any("." in k for k in keys)
    by_key = {Path(rel).stem: v for rel, v in files.items()}
    assert set(keys) == set(by_key)
    for key, jpg, cls in got:
        assert jpg == by_key[key][0], f"{key}: bytes differ from the source file"
        assert cls == by_key[key][1], f"{key}: wrong class"

    # The manifest matches the tars it describes.
    assert man["format"] == FORMAT and man["prefix"] == "train"
    assert man["classes"] == [{"index": i, "wnid": w, "name": w} for i, w in enumerate(WNIDS)]
    assert man["source"]["kind"] == "imagefolder" and man["source"]["split"] == "train"
    assert man["seed"] == 0 and man["max_count"] == 7 and man["skipped"] == []
    assert [s["name"] for s in man["shards"]] == [f"train-{i:06d}.tar" for i in range(len(man["shards"]))]
    for sh in man["shards"]:
        data = (dest / sh["name"]).read_bytes()
        assert sh["bytes"] == len(data)
        assert sh["sha256"] == hashlib.sha256(data).hexdigest()
        assert sh["first_key"] == read_tar(dest / sh["name"])[0][0].split(".")[0]
    assert sum(s["samples"] for s in man["shards"]) == man["total_samples"]

    # A standard tar tool reads them too.
    listed = []
    for sh in man["shards"]:
        listed += subprocess.run(["tar", "-tf", str(dest / sh["name"])], check=True, capture_output=True,
                                 text=True).stdout.split()
    assert sorted(listed) == sorted([f"{k}.cls" for k in keys] + [f"{k}.jpg" for k in keys])


def test_webdataset_reads_the_shards_back(tree, tmp_path):
    import webdataset as wds

    root, files = tree
    dest = tmp_path / "out"
    man = shard(root, dest, split="train", max_count=10)["manifest"]
    urls = [str(dest / s["name"]) for s in man["shards"]]
    by_key = {Path(rel).stem: v for rel, v in files.items()}
    seen = []
    for sample in wds.WebDataset(urls, shardshuffle=False):
        seen.append(sample["__key__"])
        assert sample["jpg"] == by_key[sample["__key__"]][0]
        assert int(sample["cls"]) == by_key[sample["__key__"]][1]
    assert sorted(seen) == sorted(by_key)


# ----------------------------------------------------------------------------- bounds


def test_shards_respect_max_count_and_max_bytes_except_a_lone_oversized_sample(tmp_path):
    root = tmp_path / "src"
    files = make_tree(root, per_class=(12, 10, 11), vary=True)
    rng = np.random.default_rng(5)
    big = jpeg_bytes(rng, 160, 120)  # alone bigger than max_bytes below
    (root / "train" / WNIDS[0] / "big.JPEG").write_bytes(big)
    max_bytes, max_count = 12 * 1024, 6
    assert tar_bytes(2 * 512 + len(big)) > max_bytes

    dest = tmp_path / "out"
    man = shard(root, dest, max_count=max_count, max_bytes=max_bytes)["manifest"]
    assert man["total_samples"] == len(files) + 1
    shards = man["shards"]
    sizes = [(dest / s["name"]).stat().st_size for s in shards]
    for s, size in zip(shards, sizes):
        assert s["samples"] <= max_count
        assert size <= max_bytes or s["samples"] == 1, f"{s['name']} is {size} bytes with {s['samples']} samples"
    big_shard = next(s for s in shards if any(n == "big.jpg" for n, _ in read_tar(dest / s["name"])))
    assert big_shard["samples"] == 1

    # The cuts are tight: each shard but the last is full (max_count samples, or the next sample
    # would have pushed it over max_bytes); planned sizes are exact tar sizes.
    def sample_bytes(members):
        return sum(512 + -(-len(data) // 512) * 512 for _, data in members)

    for i, s in enumerate(shards):
        members = read_tar(dest / s["name"])
        assert tar_bytes(sample_bytes(members)) == sizes[i]
        if i + 1 < len(shards):
            nxt = read_tar(dest / shards[i + 1]["name"])[:2]
            assert s["samples"] == max_count or tar_bytes(sample_bytes(members) + sample_bytes(nxt)) > max_bytes


# ----------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_shards_and_the_order_is_shuffled(tree, tmp_path):
    root, files = tree
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    shard(root, a, max_count=5, seed=3)
    shard(root, b, max_count=5, seed=3)
    assert files_of(a) == files_of(b)

    order = [k for k, _, _ in samples_of(a)]
    source_order = [s.key for s in list_source(root, split="train").samples]
    assert sorted(order) == sorted(source_order)
    assert order != source_order, "samples were written in source order, not shuffled"
    # Classes are mixed within shards, not one class per shard.
    labels = [c for _, _, c in samples_of(a)]
    assert any(len(set(labels[i:i + 5])) > 1 for i in range(0, len(labels), 5))

    shard(root, c, max_count=5, seed=4)
    assert [k for k, _, _ in samples_of(c)] != order, "a different seed gave the same order"


def test_parallel_writers_give_byte_identical_output(tree, tmp_path):
    root, _ = tree
    one, two = tmp_path / "w1", tmp_path / "w2"
    shard(root, one, max_count=4, workers=1)
    res = shard(root, two, max_count=4, workers=2)
    assert len(res["written"]) > 2
    assert files_of(one) == files_of(two)


def test_tar_members_writes_the_bytes_of_webdatasets_tarwriter(tmp_path):
    import webdataset as wds

    from mirl_ds.data.tar_members import TarMembers

    rng = np.random.default_rng(3)
    samples = [(f"k{i:03d}_" + "x" * int(rng.integers(0, 95)),
                {"jpg": rng.bytes(int(rng.choice([0, 1, 511, 512, 513, 4000]))), "cls": str(i).encode()})
               for i in range(40)]
    samples.append(("k_long_" + "y" * 120, {"jpg": b"\xff" * 70, "cls": b"7"}))   # needs a PAX header
    with open(tmp_path / "ours.tar", "wb", buffering=0) as f:
        tm = TarMembers(f)
        for key, fields in samples:
            tm.add_sample(key, fields)
        tm.close()
    with open(tmp_path / "wds.tar", "wb") as f:
        with wds.TarWriter(f, encoder=False, mtime=0) as tw:
            for key, fields in samples:
                tw.write({"__key__": key, **fields})
    ours = (tmp_path / "ours.tar").read_bytes()
    assert ours == (tmp_path / "wds.tar").read_bytes()
    assert tm.size == len(ours) and tm.sha.hexdigest() == hashlib.sha256(ours).hexdigest()


def tarwriter_bytes(path: Path, samples: list[tuple[str, dict]]) -> bytes:
    import webdataset as wds

    with open(path, "wb") as f:
        with wds.TarWriter(f, encoder=False, mtime=0) as tw:
            for key, fields in samples:
                tw.write({"__key__": key, **fields})
    return path.read_bytes()


@pytest.mark.parametrize("off_thread", [False, True], ids=["hash-inline", "hash-off-thread"])
def test_file_samples_read_into_the_staging_buffer_give_tarwriters_bytes_and_sha256(tmp_path, off_thread):
    """add_file_sample through every path: sizes around block boundaries, files larger than the
    buffer (it grows), wrong size hints (the file grew or shrank since it was listed), members
    sorted before and after the file's, names that need PAX headers, rejected and unreadable
    files; hashed inline or on a hasher thread."""
    from concurrent.futures import ThreadPoolExecutor

    from mirl_ds.data.tar_members import TarMembers, UnreadableSource

    rng = np.random.default_rng(4)
    src = tmp_path / "src"
    src.mkdir()
    expected, calls = [], []
    flush_bytes = 4096               # tiny: many flushes, buffer swaps and growths
    with ThreadPoolExecutor(1) as hasher, open(tmp_path / "ours.tar", "wb", buffering=0) as f:
        tm = TarMembers(f, flush_bytes=flush_bytes, hasher=hasher if off_thread else None)
        for i, size in enumerate([0, 1, 511, 512, 513, 3000, 9000, 70_000, 200, 4096, 12_345]):
            key = f"k{i:03d}" + ("_" + "p" * 110 if i == 5 else "")      # i == 5: PAX headers
            data = rng.bytes(size)
            path = src / f"{i}.bin"
            path.write_bytes(data)
            hint = [size, size // 2, size * 2 + 7, 0][i % 4]             # right, grew, shrank, unknown
            fields = {"cls": str(i).encode(), "txt": b"t" * (i * 100)}     # before and after "jpg"
            rejected = i in (3, 8)

            def check(view, rejected=rejected, data=data):
                calls.append(1)
                assert bytes(view) == data               # the check sees exactly the file's bytes
                return "rejected" if rejected else None

            reason = tm.add_file_sample(key, fields, "jpg", path, hint, check)
            assert reason == ("rejected" if rejected else None)
            if not rejected:
                expected.append((key, {**fields, "jpg": data}))
            if i == 6:
                with pytest.raises(UnreadableSource) as e:
                    tm.add_file_sample("gone", {"cls": b"0"}, "jpg", src / "missing.bin", 10, check)
                assert isinstance(e.value.error, FileNotFoundError)
        tm.close()
    ours = (tmp_path / "ours.tar").read_bytes()
    assert ours == tarwriter_bytes(tmp_path / "wds.tar", expected)
    assert tm.size == len(ours) and tm.sha.hexdigest() == hashlib.sha256(ours).hexdigest()
    assert len(calls) == 11
    assert max(len(b) for b in tm.staging) > 2 * flush_bytes      # grew for the 70 KB file


def test_a_failing_hash_surfaces_as_the_error_not_a_hang(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from mirl_ds.data.tar_members import TarMembers

    class BrokenHash:
        def update(self, data):
            raise RuntimeError("hash unit on fire")

    (tmp_path / "a.bin").write_bytes(bytes(5000))
    for hasher in (None, ThreadPoolExecutor(1)):
        with open(tmp_path / "out.tar", "wb", buffering=0) as f:
            tm = TarMembers(f, flush_bytes=4096, hasher=hasher)
            tm.sha = BrokenHash()
            with pytest.raises(RuntimeError, match="hash unit on fire"):
                for _ in range(4):             # the error shows at the next flush or at close
                    tm.add_file_sample("k", {"cls": b"1"}, "jpg", tmp_path / "a.bin", 5000)
                tm.close()
        if hasher is not None:
            hasher.shutdown()


@pytest.mark.parametrize("hash_threads", [0, 1], ids=["hash-inline", "hash-off-thread"])
def test_hashing_on_a_hasher_thread_writes_the_same_shards(tree, tmp_path, monkeypatch, hash_threads):
    root, _ = tree
    ref = tmp_path / "ref"
    shard(root, ref, max_count=4, workers=2)
    monkeypatch.setattr(sharding, "_hash_threads", lambda writers: hash_threads)
    dest = tmp_path / "dest"
    man = shard(root, dest, max_count=4, workers=1)["manifest"]
    assert files_of(dest) == files_of(ref)
    for sh in man["shards"]:
        assert sh["sha256"] == hashlib.sha256((dest / sh["name"]).read_bytes()).hexdigest()


@pytest.mark.parametrize("hash_threads", [0, 1], ids=["hash-inline", "hash-off-thread"])
def test_a_failing_hash_stops_the_run_with_its_error(tree, tmp_path, monkeypatch, hash_threads):
    import threading
    import types

    from mirl_ds.data import tar_members

    root, _ = tree
    real = tar_members.hashlib.sha256
    shards_hashed = []

    class FailsOnThirdShard:
        def __init__(self):
            shards_hashed.append(1)
            self.sha, self.broken = real(), len(shards_hashed) == 3

        def update(self, data):
            if self.broken:
                raise RuntimeError("hash unit on fire")
            self.sha.update(data)

        def hexdigest(self):
            return self.sha.hexdigest()

    monkeypatch.setattr(sharding, "_hash_threads", lambda writers: hash_threads)
    monkeypatch.setattr(tar_members, "hashlib", types.SimpleNamespace(sha256=FailsOnThirdShard))
    dest = tmp_path / "dest"
    outcome = []

    def run():
        try:
            shard(root, dest, max_count=3, workers=1)
        except BaseException as e:     # handed to the test thread
            outcome.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert not t.is_alive(), "the run hung after its hash failed"
    assert len(outcome) == 1 and isinstance(outcome[0], RuntimeError) and "hash unit on fire" in str(outcome[0])
    assert not list(dest.glob("*.partial")) and not (dest / "train.manifest.json").exists()
    assert not (dest / "train-000002.tar.done.json").exists()
    for side in dest.glob("*.done.json"):               # what finished is complete and resumable
        assert (dest / side.name[: -len(".done.json")]).stat().st_size == json.loads(side.read_text())["bytes"]
    monkeypatch.undo()
    shard(root, dest, max_count=3, workers=1)
    shard(root, tmp_path / "ref", max_count=3)
    assert files_of(dest) == files_of(tmp_path / "ref")


def test_a_failing_writer_stops_the_run_and_leaves_no_partial_shard(tree, tmp_path, monkeypatch):
    root, _ = tree
    dest = tmp_path / "dest"
    real = sharding.check_jpeg
    calls = []

    def failing(data, verify="header"):
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("disk on fire")
        return real(data, verify)

    monkeypatch.setattr(sharding, "check_jpeg", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        shard(root, dest, max_count=3, workers=2)
    assert not list(dest.glob("*.partial"))
    assert not (dest / "train.manifest.json").exists()
    for side in dest.glob("*.done.json"):               # what finished is complete and resumable
        assert (dest / side.name[: -len(".done.json")]).stat().st_size == json.loads(side.read_text())["bytes"]
    monkeypatch.setattr(sharding, "check_jpeg", real)
    ref = tmp_path / "ref"
    shard(root, ref, max_count=3)
    shard(root, dest, max_count=3, workers=2)
    assert files_of(dest) == files_of(ref)


def test_files_that_change_size_after_planning_are_written_as_they_are_now(tmp_path, monkeypatch):
    """Shards are preallocated to their planned size and cut to the tar's: a file that grew or
    shrank between the plan and the write still gives a shard whose size and sha256 are the
    manifest's, holding the file's current bytes; without preallocation the shards are the same."""
    root = tmp_path / "src"
    make_tree(root, per_class=(5, 5, 5))
    big = root / "train" / WNIDS[0] / "big.JPEG"
    big.write_bytes(jpeg_bytes(np.random.default_rng(8), 160, 120))
    real_plan = sharding.plan_shards
    seen = {}

    def plan_then_change_files(*args, **kw):
        plans = seen["plans"] = real_plan(*args, **kw)
        i_big = next(i for i, p in enumerate(plans) if any(s[1] == str(big) for s in p.samples))
        grown = Path(plans[(i_big + 1) % len(plans)].samples[0][1])      # in another shard
        seen["changed"] = [big, grown]
        seen["shards"] = (plans[i_big].name, plans[(i_big + 1) % len(plans)].name)
        big.write_bytes(jpeg_bytes(np.random.default_rng(9), 8, 6))      # > 10 KiB smaller: its tar shrinks
        grown.write_bytes(grown.read_bytes() + b"\0" * 12_000 + b"\xff\xd9")   # still ends with EOI
        return plans

    monkeypatch.setattr(sharding, "plan_shards", plan_then_change_files)
    dest = tmp_path / "out"
    man = shard(root, dest, max_count=4)["manifest"]
    assert man["total_samples"] == 16 and man["skipped"] == []
    planned = {p.name: p.planned_bytes for p in seen["plans"]}
    shrunk_shard, grown_shard = seen["shards"]
    by_name = {sh["name"]: sh for sh in man["shards"]}
    assert by_name[shrunk_shard]["bytes"] < planned[shrunk_shard]
    assert by_name[grown_shard]["bytes"] > planned[grown_shard]
    for sh in man["shards"]:
        data = (dest / sh["name"]).read_bytes()
        assert sh["bytes"] == len(data) and sh["sha256"] == hashlib.sha256(data).hexdigest()
    got = {key: jpg for key, jpg, _ in samples_of(dest)}
    for path in seen["changed"]:
        assert got[path.stem] == path.read_bytes()

    monkeypatch.setattr(sharding, "plan_shards", real_plan)
    monkeypatch.setattr(sharding, "_fallocate", lambda: None)
    shard(root, tmp_path / "plain", max_count=4)
    for sh in man["shards"]:
        assert (tmp_path / "plain" / sh["name"]).read_bytes() == (dest / sh["name"]).read_bytes()


def test_no_fsync_writes_the_same_shards(tree, tmp_path, monkeypatch):
    root, _ = tree
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(sharding.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    shard(root, tmp_path / "a", max_count=5)
    n_synced = len(synced)
    shard(root, tmp_path / "b", max_count=5, fsync=False)
    assert n_synced == len(json.loads((tmp_path / "a" / "train.manifest.json").read_text())["shards"])
    assert len(synced) == n_synced
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")


# ----------------------------------------------------------------------------- resume


def test_resume_writes_only_missing_shards_and_matches_an_uninterrupted_run(tree, tmp_path):
    root, _ = tree
    ref, dest = tmp_path / "ref", tmp_path / "dest"
    shard(root, ref, max_count=5)
    first = shard(root, dest, max_count=5)
    names = [s["name"] for s in first["manifest"]["shards"]]
    assert len(names) >= 4

    # Interrupted state: shard 1 never finished (tar + sidecar gone, a .partial left behind),
    # shard 2's tar is torn (its size no longer matches the sidecar); the manifest is gone.
    (dest / names[1]).unlink()
    (dest / (names[1] + ".done.json")).unlink()
    (dest / (names[1] + ".partial")).write_bytes(b"garbage from a killed writer")
    with open(dest / names[2], "r+b") as f:
        f.truncate(1000)
    (dest / "train.manifest.json").unlink()
    kept = [n for i, n in enumerate(names) if i not in (1, 2)]
    mtimes = {n: (dest / n).stat().st_mtime_ns for n in kept}

    again = shard(root, dest, max_count=5, workers=2)
    assert again["written"] == [names[1], names[2]]
    assert again["kept"] == sorted(kept)
    assert {n: (dest / n).stat().st_mtime_ns for n in kept} == mtimes
    assert not list(dest.glob("*.partial"))
    assert files_of(dest) == files_of(ref)

    # A complete set: a re-run writes nothing and changes nothing.
    third = shard(root, dest, max_count=5)
    assert third["written"] == [] and files_of(dest) == files_of(ref)


def test_resume_refuses_a_destination_made_from_another_plan(tree, tmp_path):
    root, _ = tree
    dest = tmp_path / "dest"
    shard(root, dest, max_count=5, seed=0)
    with pytest.raises(ValueError, match="different plan.*new DEST"):
        shard(root, dest, max_count=5, seed=1)
    (dest / "train.manifest.json").unlink()  # only sidecars left: still refused
    with pytest.raises(ValueError, match="different plan"):
        shard(root, dest, max_count=6, seed=0)


# ----------------------------------------------------------------------------- bad images


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sharding.add_arguments(parser)
    return sharding.run(parser.parse_args(argv))


def test_corrupt_empty_and_non_jpeg_files_are_skipped_counted_listed_and_reported(tmp_path, capsys):
    root = tmp_path / "src"
    files = make_tree(root, per_class=(6, 6, 6))
    d = root / "train" / WNIDS[1]
    good = (d / f"{WNIDS[1]}_0.JPEG").read_bytes()
    bad = {
        f"train/{WNIDS[1]}/empty.JPEG": b"",
        f"train/{WNIDS[1]}/truncated.JPEG": good[: len(good) * 2 // 3],
        f"train/{WNIDS[2]}/garbage.JPEG": b"\xff\xd8\xff\xe0" + bytes(300),
        f"train/{WNIDS[2]}/noise.jpg": bytes(range(256)) * 4,
    }
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    bad[f"train/{WNIDS[0]}/picture.png"] = png.getvalue()
    for rel, data in bad.items():
        (root / rel).write_bytes(data)

    dest = tmp_path / "out"
    assert run_cli([str(root), str(dest), "--max-count", "4", "--workers", "1", "--no-progress"]) == 0
    report = capsys.readouterr().out
    man = json.loads((dest / "train.manifest.json").read_text())

    assert man["total_samples"] == len(files)
    assert sum(s["samples"] for s in man["shards"]) == len(files)
    skipped = {s["path"]: s["reason"] for s in man["skipped"]}
    assert set(skipped) == set(bad)
    assert skipped[f"train/{WNIDS[1]}/empty.JPEG"] == "empty file"
    assert "truncated" in skipped[f"train/{WNIDS[1]}/truncated.JPEG"]
    assert "not a JPEG but PNG" in skipped[f"train/{WNIDS[0]}/picture.png"]
    assert f"skipped {len(bad)} files" in report
    for rel, reason in skipped.items():
        assert f"{rel}: {reason}" in report
    written = {k for k, _, _ in samples_of(dest)}
    assert not written & {"empty", "truncated", "garbage", "noise", "picture"}
    for sh in man["shards"]:     # shards that lost samples are cut to their tar: size and sha256 hold
        data = (dest / sh["name"]).read_bytes()
        assert sh["bytes"] == len(data) and sh["sha256"] == hashlib.sha256(data).hexdigest()
    # A skipped file keeps its planned slot: its shard just holds fewer samples.
    assert any(s["samples"] < 4 for s in man["shards"][:-1])


def test_an_unreadable_source_is_skipped_but_a_failing_tar_write_fails_the_run(tmp_path, monkeypatch):
    import errno

    from mirl_ds.data import tar_members

    root = tmp_path / "src"
    files = make_tree(root, per_class=(4, 4, 4))
    (root / "train" / WNIDS[0] / "gone.JPEG").symlink_to(root / "nowhere.JPEG")   # listed, not readable
    man = shard(root, tmp_path / "out", max_count=5)["manifest"]
    assert man["total_samples"] == len(files)
    assert man["skipped"] == [{"path": f"train/{WNIDS[0]}/gone.JPEG",
                               "reason": "unreadable: No such file or directory"}]

    def disk_full(fd, view):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tar_members, "_write_out", disk_full)
    with pytest.raises(OSError, match="No space left"):
        shard(root, tmp_path / "full", max_count=5)
    assert not list((tmp_path / "full").glob("*.partial"))


def with_undefined_quant_table(data: bytes) -> bytes:
    """The JPEG with its first component pointing at quantisation table 3, which is not defined:
    well-formed markers (the header check passes), but libjpeg refuses to decode it."""
    out = bytearray(data)
    sof = out.index(b"\xff\xc0")
    out[sof + 12] = 3  # FF C0, length(2), precision, height(2), width(2), Nf, [Ci, HiVi, Tqi]...
    return bytes(out)


def test_decode_verification_catches_what_the_header_check_cannot(tmp_path):
    root = tmp_path / "src"
    make_tree(root, per_class=(3, 3, 3))
    rel = f"train/{WNIDS[0]}/{WNIDS[0]}_0.JPEG"
    (root / rel).write_bytes(with_undefined_quant_table((root / rel).read_bytes()))
    assert shard(root, tmp_path / "a", verify="header")["manifest"]["skipped"] == []
    man = shard(root, tmp_path / "b", verify="decode")["manifest"]
    assert [s["path"] for s in man["skipped"]] == [rel]
    assert "not a decodable image" in man["skipped"][0]["reason"]


# ----------------------------------------------------------------------------- ImageNet val


VAL_LABELS = ["n01484850", "n01440764", "n01484850", "n01443537", "n01440764"]


@pytest.fixture()
def val_folder(tmp_path) -> tuple[Path, dict]:
    rng = np.random.default_rng(1)
    d = tmp_path / "val"
    d.mkdir()
    out = {}
    for i, _ in enumerate(VAL_LABELS, 1):
        data = jpeg_bytes(rng)
        (d / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(data)
        out[f"ILSVRC2012_val_{i:08d}"] = data
    return d, out


def expected_val(indices: list[int]) -> dict[str, int]:
    return {f"ILSVRC2012_val_{i:08d}": c for i, c in enumerate(indices, 1)}


def val_labels(dest: Path, files: dict) -> dict[str, int]:
    got = samples_of(dest, "val")
    for key, jpg, _ in got:
        assert jpg == files[key]
    return {k: c for k, _, c in got}


def test_imagenet_val_with_loc_val_solution_csv(val_folder, tmp_path):
    folder, files = val_folder
    lf = tmp_path / "LOC_val_solution.csv"
    rows = [f"ILSVRC2012_val_{i:08d},{w} 10 20 30 40 {w} 1 2 3 4" for i, w in enumerate(VAL_LABELS, 1)]
    lf.write_text("ImageId,PredictionString\n" + "\n".join(reversed(rows)) + "\n")
    dest = tmp_path / "out"
    man = shard(folder, dest, label_file=lf)["manifest"]
    # Indices follow the sorted wnids the label file uses.
    assert val_labels(dest, files) == expected_val([2, 0, 2, 1, 0])
    assert [c["wnid"] for c in man["classes"]] == sorted(set(VAL_LABELS))
    assert man["source"]["kind"] == "imagenet_val" and man["prefix"] == "val"
    assert man["source"]["label_file"] == str(lf)


def test_imagenet_val_with_filename_wnid_lines_and_a_classes_file(val_folder, tmp_path):
    folder, files = val_folder
    lf = tmp_path / "val_labels.txt"
    lf.write_text("".join(f"ILSVRC2012_val_{i:08d}.JPEG {w}\n" for i, w in enumerate(VAL_LABELS, 1)))
    cf = tmp_path / "LOC_synset_mapping.txt"
    cf.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n"
                  "n01000000 extra class\nn01484850 great white shark\n")
    dest = tmp_path / "out"
    man = shard(folder, dest, label_file=lf, classes_file=cf, source_kind="imagenet_val")["manifest"]
    # Indices follow the classes file's sorted wnids (n01000000 first), not the label file's.
    assert val_labels(dest, files) == expected_val([3, 1, 3, 2, 1])
    assert man["classes"][1] == {"index": 1, "wnid": "n01440764", "name": "tench, Tinca tinca"}


def test_imagenet_val_with_filename_class_index_lines(val_folder, tmp_path):
    folder, files = val_folder
    lf = tmp_path / "val.txt"
    idx = [7, 0, 7, 3, 0]
    lf.write_text("".join(f"ILSVRC2012_val_{i:08d}.JPEG {c}\n" for i, c in enumerate(idx, 1)))
    dest = tmp_path / "out"
    shard(folder, dest, label_file=lf)
    assert val_labels(dest, files) == expected_val(idx)


def test_imagenet_val_with_devkit_ground_truth_needs_and_uses_the_id_mapping(val_folder, tmp_path):
    folder, files = val_folder
    lf = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    ids = {"n01484850": 1, "n01440764": 2, "n01443537": 3}  # devkit IDs: not sorted-wnid order
    lf.write_text("".join(f"{ids[w]}\n" for w in VAL_LABELS))
    with pytest.raises(ValueError, match="ILSVRC2012 class IDs.*map_clsloc"):
        shard(folder, tmp_path / "x", label_file=lf)
    cf = tmp_path / "map_clsloc.txt"
    cf.write_text("n01484850 1 great_white_shark\nn01440764 2 tench\nn01443537 3 goldfish\n")
    dest = tmp_path / "out"
    man = shard(folder, dest, label_file=lf, classes_file=cf)["manifest"]
    assert val_labels(dest, files) == expected_val([2, 0, 2, 1, 0])
    assert man["classes"][0] == {"index": 0, "wnid": "n01440764", "name": "tench"}


def test_imagenet_val_reports_images_without_a_label(val_folder, tmp_path):
    folder, files = val_folder
    lf = tmp_path / "val.txt"
    lf.write_text("".join(f"ILSVRC2012_val_{i:08d} {w}\n" for i, w in enumerate(VAL_LABELS[:4], 1)))
    man = shard(folder, tmp_path / "out", label_file=lf)["manifest"]
    assert man["total_samples"] == 4
    assert [s["path"] for s in man["skipped"]] == ["ILSVRC2012_val_00000005.JPEG"]
    assert "no label" in man["skipped"][0]["reason"]


@pytest.mark.parametrize("name, text, line", [
    ("LOC_val_solution.csv", "ImageId,PredictionString\nILSVRC2012_val_00000001,n01484850 1 2 3 4\n"
                             "ILSVRC2012_val_00000002\n", 3),
    ("val.txt", "ILSVRC2012_val_00000001.JPEG n01484850\nILSVRC2012_val_00000002.JPEG n01440764 extra\n", 2),
    ("val.txt", "a.JPEG 1\nb.JPEG 2\nc.JPEG n01440764\n", 3),
    ("ILSVRC2012_validation_ground_truth.txt", "1\n2\n3\nx\n", 4),
])
def test_malformed_label_line_is_an_error_naming_file_and_line(val_folder, tmp_path, name, text, line):
    folder, _ = val_folder
    lf = tmp_path / name
    lf.write_text(text)
    cf = tmp_path / "map_clsloc.txt"
    cf.write_text("n01484850 1 a\nn01440764 2 b\nn01443537 3 c\n")
    with pytest.raises(ValueError) as e:
        shard(folder, tmp_path / "out", label_file=lf, classes_file=cf)
    assert str(lf) in str(e.value) and f"line {line}" in str(e.value)


# ----------------------------------------------------------------------------- sources, keys, errors


def test_synthetic_source_is_generated_if_missing_and_sharded_with_class_names(tmp_path, monkeypatch):
    from mirl_ds.data import synthetic

    tiny = synthetic.SyntheticSpec(num_classes=3, train_per_class=3, val_per_class=2, image_size=16, seed=0)
    monkeypatch.setattr(synthetic, "SyntheticSpec", lambda: tiny)
    root = tmp_path / "syn"
    res = shard(root, tmp_path / "out", source_kind="synthetic", split="val")
    man = res["manifest"]
    assert (root / "spec.json").is_file()
    assert man["source"]["kind"] == "synthetic" and man["prefix"] == "val" and man["total_samples"] == 6
    names = synthetic.class_names(3)
    assert [c["name"] for c in man["classes"]] == names
    for key, jpg, cls in samples_of(tmp_path / "out", "val"):
        assert key.startswith(f"val_{names[cls]}_")
        assert jpg == (root / "val" / names[cls] / f"{key}.JPEG").read_bytes()
    # auto detects the (now complete) synthetic root.
    assert shard(root, tmp_path / "out2", split="val")["manifest"]["source"]["kind"] == "synthetic"


def test_keys_are_unique_and_dot_free_when_stems_collide(tmp_path):
    rng = np.random.default_rng(2)
    for wnid in WNIDS[:2]:
        d = tmp_path / "src" / wnid
        d.mkdir(parents=True)
        for name in ("img.v2.jpg", "img_v2.JPEG", "photo 1.jpeg"):
            (d / name).write_bytes(jpeg_bytes(rng))
    dest = tmp_path / "out"
    man = shard(tmp_path / "src", dest)["manifest"]
    keys = [k for k, _, _ in samples_of(dest)]
    assert man["total_samples"] == len(keys) == 6
    assert len(set(keys)) == 6 and all("." not in k and " " not in k for k in keys)
    assert make_keys(["a.b", "a_b", "a_b"]) == ["a_b", "a_b_2", "a_b_3"]


def test_bad_inputs_are_one_sentence_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        shard(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty" / "n0").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found"):
        shard(tmp_path / "empty", tmp_path / "out")
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.JPEG").write_bytes(jpeg_bytes(np.random.default_rng(0)))
    with pytest.raises(ValueError, match="--label-file"):
        shard(flat, tmp_path / "out")
    src = tmp_path / "src"
    make_tree(src, per_class=(1, 1, 1))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        shard(src, tmp_path / "file")
    with pytest.raises(FileNotFoundError, match="label file"):
        shard(flat, tmp_path / "out", label_file=tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="--max-count"):
        shard(src, tmp_path / "out", max_count=0)


def test_unwritable_destination_is_an_error(tmp_path):
    src = tmp_path / "src"
    make_tree(src, per_class=(1, 1, 1))
    if os.geteuid() == 0:  # root writes anywhere a mode allows: use a filesystem nobody can write
        with pytest.raises(ValueError, match="not writable"):
            shard(src, "/sys/mirl_ds_test_out")
        return
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="not writable"):
            shard(src, ro / "out")
    finally:
        ro.chmod(0o755)


def test_cli_arguments_parse_sizes_and_defaults():
    parser = argparse.ArgumentParser()
    sharding.add_arguments(parser)
    a = parser.parse_args(["s", "d", "--max-bytes", "1e9"])
    assert (a.max_bytes, a.max_count, a.seed, a.split, a.source_kind) == (10**9, 1000, 0, "train", "auto")
    assert parser.parse_args(["s", "d", "--max-bytes", "500M"]).max_bytes == 500 * 10**6
    assert parser.parse_args(["s", "d", "--max-bytes", "64KiB"]).max_bytes == 64 * 1024
    with pytest.raises(SystemExit):
        parser.parse_args(["s", "d", "--max-bytes", "lots"])
