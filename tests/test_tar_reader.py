"""mirl_ds.data.tar_reader reads what tarfile/webdataset read, from any tar dialect."""
from __future__ import annotations

import io
import tarfile

import pytest
import webdataset as wds

from mirl_ds.data.tar_reader import iter_members, iter_samples


def write_tar(path, members, fmt=tarfile.PAX_FORMAT, extra=None):
    with tarfile.open(path, "w", format=fmt) as tf:
        if extra is not None:
            extra(tf)
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def members_of(n, long=False):
    out = []
    for i in range(n):
        key = f"dir/sample{i:03d}" + ("_" + "x" * 150 if long and i % 2 else "")
        out += [(f"{key}.cls", str(i).encode()), (f"{key}.jpg", bytes([i % 256]) * (i * 37 + 1))]
    return out


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_match_tarfile_for_every_tar_dialect(tmp_path, fmt):
    members = members_of(9, long=fmt != tarfile.USTAR_FORMAT)   # long names need GNU or PAX headers
    path = tmp_path / "a.tar"

    def extras(tf):
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        if fmt == tarfile.PAX_FORMAT:
            tf.pax_headers = {"comment": "global header"}

    write_tar(path, members, fmt, extras)
    with open(path, "rb") as f:
        assert list(iter_members(f)) == members


def test_samples_match_webdatasets_grouping_and_skip_reads_nothing_skipped(tmp_path):
    path = tmp_path / "s.tar"
    with wds.TarWriter(str(path)) as tw:      # webdataset's own writer: float mtimes -> PAX headers
        for i in range(6):
            tw.write({"__key__": f"k{i}", "jpg": b"J" * (100 + i), "cls": str(i).encode()})
    expected = [(s["__key__"], {"jpg": s["jpg"], "cls": s["cls"]})
                for s in wds.WebDataset(str(path), shardshuffle=False, empty_check=False)]
    with open(path, "rb") as f:
        assert list(iter_samples(f)) == expected

    reads = []

    class Counting(io.FileIO):
        def read(self, n=-1):
            reads.append(n)
            return super().read(n)

    with Counting(path) as f:
        assert list(iter_samples(f, skip=4)) == expected[4:]
    # The jpg data of samples 0-3 (100-103 bytes) was never read, only that of 4 and 5.
    assert [n for n in reads if 100 <= n <= 105] == [104, 105]


def test_a_truncated_tar_raises_read_error_after_the_complete_samples(tmp_path):
    path = tmp_path / "t.tar"
    write_tar(path, members_of(5))
    data = path.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    got = []
    with open(cut, "rb") as f, pytest.raises(tarfile.ReadError):
        for key, sample in iter_samples(f):
            got.append(key)
    assert 0 < len(got) < 5


def test_non_seekable_streams_are_read_through(tmp_path):
    path = tmp_path / "p.tar"
    write_tar(path, members_of(4))

    class Pipe(io.RawIOBase):
        def __init__(self, data):
            self.buf = io.BytesIO(data)

        def readable(self):
            return True

        def read(self, n=-1):
            return self.buf.read(min(n, 700) if n and n > 0 else n)   # short reads, like a socket

    with open(path, "rb") as f:
        expected = list(iter_samples(f))
    assert list(iter_samples(Pipe(path.read_bytes()), skip=1)) == expected[1:]
