"""Writing WebDataset tar shards with one ``write`` per member, hashing as it goes.

The bytes are exactly those of webdataset's ``TarWriter(fileobj, encoder=False, mtime=0)``
(headers from the standard library's ``tarfile.TarInfo.tobuf`` with the same fields: PAX format,
mode 0444, owner ``bigdata``, mtime 0; data padded to 512 bytes; two zero blocks and padding to a
10240-byte record at the end), so a shard does not depend on which writer made it.

Why not ``TarWriter`` itself: it goes through ``tarfile``'s stream mode, which copies every member
through 16 KiB reads into 10 KiB records — at ImageNet's ~110 KB per image that copying costs as
much as reading the files.  Here a sample is its header blocks, then the JPEG bytes handed to the
OS as they are: the per-image cost is the unavoidable read, hash and write.
"""
from __future__ import annotations

import hashlib
import os
import tarfile

__all__ = ["BLOCK", "RECORD", "TarMembers"]

BLOCK = tarfile.BLOCKSIZE          # 512
RECORD = tarfile.RECORDSIZE        # 10240: tar archives end on a whole record
_ZEROS = bytes(2 * BLOCK + RECORD)   # the longest run of zeros ever written at once


_NAME, _SIZE, _CHKSUM = slice(0, 100), slice(124, 136), slice(148, 156)   # ustar header fields


class TarMembers:
    """Append members to an open unbuffered binary file (``open(path, "wb", buffering=0)``); ``sha256``/``size`` cover every byte written."""

    def __init__(self, f, *, user: str = "bigdata", group: str = "bigdata", mode: int = 0o444, mtime: int = 0):
        self.f = f
        self.fd = f.fileno()
        self.sha = hashlib.sha256()
        self.size = 0
        self._fields = (user, group, mode, mtime)
        # tarfile builds a header in ~40 us of Python (held GIL: writer threads would queue on it).
        # Every member here shares all fields but name, size and checksum, so tarfile makes one
        # template and a header is the template with those three patched in (the same bytes:
        # tests/test_sharding.py checks them against tobuf).
        template = bytearray(self._tobuf("", 0))
        template[_CHKSUM] = b" " * 8            # the checksum is computed with its field as blanks
        self._template = bytes(template)

    def _tobuf(self, name: str, size: int) -> bytes:
        user, group, mode, mtime = self._fields
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = size, mtime, mode, user, group
        return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")

    def header(self, name: str, size: int) -> bytes:
        """The 512-byte header ``tarfile`` would write for this member (longer for names that need
        a PAX extended header: those go through tarfile itself)."""
        raw = name.encode("utf-8", "surrogateescape")
        if len(raw) >= 100 or not name.isascii() or size >= 8 ** 11:
            return self._tobuf(name, size)
        h = bytearray(self._template)
        h[: len(raw)] = raw
        h[_SIZE] = b"%011o\0" % size
        h[148:155] = b"%06o\0" % sum(h)       # tarfile: six octal digits, NUL, then the blank stays
        return bytes(h)

    def _emit(self, parts: list) -> None:
        for b in parts:
            self.sha.update(b)   # hashlib releases the GIL on large buffers: threads hash in parallel
        n = sum(len(b) for b in parts)
        done = os.writev(self.fd, parts)           # one system call per sample
        if done < n:                               # a short write (a signal, a full disk): finish it
            rest = b"".join(bytes(b) for b in parts)[done:]
            while rest:
                rest = rest[os.write(self.fd, rest):]
        self.size += n

    def _member(self, name: str, data: bytes) -> list:
        parts = [self.header(name, len(data)), data]
        pad = -len(data) % BLOCK
        if pad:
            parts.append(_ZEROS[:pad])
        return parts

    def add(self, name: str, data: bytes) -> None:
        self._emit(self._member(name, data))

    def add_sample(self, key: str, fields: dict[str, bytes]) -> None:
        """One WebDataset sample: members ``<key>.<ext>`` in sorted extension order (as TarWriter)."""
        parts: list = []
        for ext in sorted(fields):
            parts += self._member(f"{key}.{ext}", fields[ext])
        self._emit(parts)

    def close(self) -> None:
        """The end-of-archive marker (two zero blocks) and the padding to a whole record."""
        end = self.size + 2 * BLOCK
        self._emit([_ZEROS[: 2 * BLOCK + (-end % RECORD)]])
