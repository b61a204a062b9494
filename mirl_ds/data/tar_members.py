"""Writing WebDataset tar shards through a staging buffer: one hash update and one write per MiB.

The bytes are exactly those of webdataset's ``TarWriter(fileobj, encoder=False, mtime=0)``
(headers from the standard library's ``tarfile.TarInfo.tobuf`` with the same fields: PAX format,
mode 0444, owner ``bigdata``, mtime 0; data padded to 512 bytes; two zero blocks and padding to a
10240-byte record at the end), so a shard does not depend on which writer made it.

Why not ``TarWriter`` itself: it goes through ``tarfile``'s stream mode, which copies every member
through 16 KiB reads into 10 KiB records — at ImageNet's ~110 KB per image that copying costs as
much as reading the files.

How the bytes travel: members are laid out in a page-aligned staging buffer (an anonymous
``mmap``), and :meth:`TarMembers.add_file_sample` reads a source file straight into its place
there, after its header, so the file's bytes are copied once into user space and once into the
tar's page cache, as with ``tar -cf``.  About every MiB (:data:`FLUSH_BYTES`) the staged bytes get
one ``sha256`` update and one ``write``: both release the GIL for the whole MiB, so parallel writer
threads hash and write on every core, and the per-image Python (the image check, two headers)
stays small.  With a ``hasher`` (an executor), two buffers take turns: one is hashed on the
hasher's thread while the writer writes it out and fills the other.  Two details keep the
kernel's copies fast:

* a staged byte sits at the same offset within a page as it will in the tar file (the buffer
  restarts at ``written % PAGE`` after each flush), and a file's bytes start at a multiple of 512
  in the tar: the copies page cache -> buffer (read) and buffer -> page cache (write) have source
  and destination aligned alike or 512-byte multiples apart.  ``rep movsb``, the kernel's copy, is
  slow on some CPUs when the destination lies a few bytes past the source modulo the page size:
  on the AMD EPYC test machine a buffer 16 bytes off made the whole run ~20% more CPU;
* the buffers are reused from shard to shard (``staging``), so their pages are faulted in once.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import tarfile

__all__ = ["BLOCK", "RECORD", "FLUSH_BYTES", "TarMembers", "UnreadableSource"]

BLOCK = tarfile.BLOCKSIZE          # 512
RECORD = tarfile.RECORDSIZE        # 10240: tar archives end on a whole record
FLUSH_BYTES = 1 << 20              # hash + write the staged bytes once this much is staged
_PAGE = mmap.PAGESIZE
_GROW = 1 << 20                    # the staging buffer grows in whole MiB
_ZEROS = bytes(2 * BLOCK + RECORD)   # the longest run of zeros ever staged at once


_NAME, _SIZE, _CHKSUM = slice(0, 100), slice(124, 136), slice(148, 156)   # ustar header fields


class UnreadableSource(Exception):
    """Opening or reading a sample's source file failed (not writing the tar); ``error`` is the
    ``OSError``.  A separate type so that a caller can skip the sample on this and still fail on an
    ``OSError`` from writing (a full disk)."""

    def __init__(self, error: OSError):
        super().__init__(str(error))
        self.error = error


def _pad(n: int) -> int:
    return -n % BLOCK


def _read_into(fd: int, view: memoryview) -> int:
    """Read ``fd`` into ``view`` until end of file or ``view`` is full; return the bytes read."""
    got, want = 0, len(view)
    while got < want:
        n = os.readv(fd, [view[got:]])
        if n == 0:
            break
        got += n
    return got


def _read_rest(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _write_out(fd: int, view: memoryview) -> None:
    while view:                       # a short write (a signal, a full disk): finish it
        view = view[os.write(fd, view):]


class TarMembers:
    """Append members to an open binary file (unbuffered: ``open(path, "wb", buffering=0)``; the
    staging buffer is the only buffer).  After :meth:`close`, ``sha`` and ``size`` cover every byte
    of the file.  ``staging``: the buffers of an earlier, closed ``TarMembers`` (its ``staging``
    attribute), to reuse.  ``hasher``: an executor (``concurrent.futures``) to hash on; ``None``
    hashes on the calling thread.  Its errors surface from the next flush or :meth:`close`."""

    def __init__(self, f, *, user: str = "bigdata", group: str = "bigdata", mode: int = 0o444, mtime: int = 0,
                 staging: list | None = None, hasher=None, flush_bytes: int = FLUSH_BYTES):
        self.f = f
        self.fd = f.fileno()
        self.sha = hashlib.sha256()
        self.size = 0                      # bytes added so far: written + staged
        self._fields = (user, group, mode, mtime)
        self._flush_bytes = flush_bytes
        self._layouts: dict[tuple, tuple] = {}
        # tarfile builds a header in ~40 us of Python (held GIL: writer threads would queue on it).
        # Every member here shares all fields but name, size and checksum, so tarfile makes one
        # template and a header is the template with those three patched in (the same bytes:
        # tests/test_sharding.py checks them against TarWriter's).  The checksum is the byte sum
        # of the header with its own field as blanks: the template's sum, corrected for the name
        # and size fields.
        template = bytearray(self._tobuf("", 0))
        template[_CHKSUM] = b" " * 8
        self._template = bytes(template)
        self._template_sum = sum(template) - sum(template[_SIZE])   # name field: all NUL
        # With a hasher, two buffers take turns: one is hashed while the other fills.
        n_bufs = 2 if hasher is not None else 1
        staging = [b for b in (staging or []) if len(b) >= 2 * flush_bytes][:n_bufs]
        while len(staging) < n_bufs:
            staging.append(mmap.mmap(-1, 2 * flush_bytes))
        self.staging = staging
        self._hasher = hasher
        self._hashing = None               # the Future of the last hash update handed to the hasher
        self._cur = 0
        self._mv = memoryview(staging[0])
        self._start = self._pos = 0        # staged bytes: _mv[_start:_pos]; _start = written % _PAGE

    # ------------------------------------------------------------------------- headers

    def _tobuf(self, name: str, size: int) -> bytes:
        user, group, mode, mtime = self._fields
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = size, mtime, mode, user, group
        return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")

    @staticmethod
    def _plain(raw: bytes) -> bool:
        """Whether tarfile writes a name as one plain 512-byte header (else PAX extended headers)."""
        return len(raw) < 100 and raw.isascii()

    def _fill_header(self, buf, pos: int, raw: bytes, size: int) -> None:
        """Write the 512-byte header of a plain name (:meth:`_plain`) and ``size`` into ``buf`` at
        ``pos``."""
        size_field = b"%011o\0" % size
        buf[pos:pos + BLOCK] = self._template
        buf[pos:pos + len(raw)] = raw
        buf[pos + 124:pos + 136] = size_field
        # Six octal digits and a NUL, then the last blank stays (as tarfile writes it).
        buf[pos + 148:pos + 155] = b"%06o\0" % (self._template_sum + sum(raw) + sum(size_field))

    def header(self, name: str, size: int) -> bytes:
        """The header ``tarfile`` would write for this member: 512 bytes, more for names that need
        a PAX extended header (those go through tarfile itself)."""
        raw = name.encode("utf-8", "surrogateescape")
        if not self._plain(raw) or size >= 8 ** 11:
            return self._tobuf(name, size)
        h = bytearray(BLOCK)
        self._fill_header(h, 0, raw, size)
        return bytes(h)

    # ------------------------------------------------------------------------- the staging buffer

    def _make_room(self, n: int) -> None:
        """Room for ``n`` more staged bytes: flush (a write) if the buffer is full, grow it if one item
        is larger than the buffer."""
        if self._pos + n > len(self._mv):
            self.flush()
            if self._pos + n > len(self._mv):
                self._grow(self._pos + n, self._pos)

    def _grow(self, n: int, used: int) -> None:
        """A buffer of at least ``n`` bytes holding the same bytes ``[_start:used]`` at the same
        indices (so at the same offsets within a page).  For an item larger than the buffer; never
        writes."""
        bigger = mmap.mmap(-1, -(-n // _GROW) * _GROW)
        mv = memoryview(bigger)
        mv[self._start:used] = self._mv[self._start:used]
        self.staging[self._cur], self._mv = bigger, mv

    def _put(self, data) -> None:
        n = len(data)
        self._make_room(n)
        self._mv[self._pos:self._pos + n] = data
        self._pos += n
        self.size += n

    def _flush_if_full(self) -> None:
        if self._pos - self._start >= self._flush_bytes:
            self.flush()

    def flush(self) -> None:
        """Hash and write what is staged.  Both release the GIL for the whole buffer.  With a hasher,
        the hash runs there while this thread writes and fills the other buffer."""
        if self._pos == self._start:
            return
        view = self._mv[self._start:self._pos]
        if self._hasher is None:
            self.sha.update(view)
        else:
            # The other buffer's hash must be done: the sha sees the bytes in order, and that
            # buffer is filled next.
            self.wait_hashed()
            self._hashing = self._hasher.submit(self.sha.update, view)
            self._cur ^= 1
            self._mv = memoryview(self.staging[self._cur])
        _write_out(self.fd, view)
        self._start = self._pos = self.size % _PAGE

    def wait_hashed(self) -> None:
        """Wait for the hasher's last update (re-raising its error)."""
        if self._hashing is not None:
            hashing, self._hashing = self._hashing, None
            hashing.result()

    # ------------------------------------------------------------------------- members

    def add(self, name: str, data) -> None:
        self._put(self.header(name, len(data)))
        self._put(data)
        self._put(_ZEROS[:_pad(len(data))])
        self._flush_if_full()

    def add_sample(self, key: str, fields: dict) -> None:
        """One WebDataset sample: members ``<key>.<ext>`` in sorted extension order (as TarWriter)."""
        for ext in sorted(fields):
            self.add(f"{key}.{ext}", fields[ext])

    def add_file_sample(self, key: str, fields: dict, ext: str, path, size_hint: int = 0,
                        check=None) -> str | None:
        """One sample of the in-memory ``fields`` plus member ``<key>.<ext>`` holding the bytes of the
        file at ``path``, read straight into the staging buffer (``size_hint``: its expected size; a
        file of another size costs a copy, not an error).  ``check(data)`` sees those bytes (a
        memoryview) before anything is added and returns ``None`` to add the sample, or a reason not
        to, which is returned and adds nothing.  Opening or reading the file fails with
        :class:`UnreadableSource`; other errors (writing the tar) propagate as they are."""
        kb = key.encode("utf-8", "surrogateescape")
        layout = self._layout(ext, fields)
        if layout is None or len(kb) + layout[0] >= 100 or not kb.isascii():
            return self._add_read_sample(key, fields, ext, path, check)     # PAX headers: the copying path
        members = layout[1]
        lead, tail = 0, BLOCK               # tail: room after the file's bytes, its padding and later members
        for e, _suffix, is_file, before in members:
            if not is_file:
                size = len(fields[e])
                if before:
                    lead += BLOCK + size + (-size % BLOCK)
                else:
                    tail += BLOCK + size + (-size % BLOCK)
        want = max(0, size_hint) + 1        # one byte more: a full read means the file grew
        self._make_room(lead + BLOCK + want + tail)     # the only write this call may do: before reading
        at = self._pos + lead + BLOCK       # where the file's bytes go: after the earlier members and its header
        n = self._read_file(path, at, want, tail)
        if n >= 8 ** 11:
            return self._add_read_sample(key, fields, ext, path, check)     # a size field needs PAX: rare
        if check is not None:
            reason = check(self._mv[at:at + n])
            if reason is not None:
                return reason
        # The sample is accepted: its headers and in-memory members go around the file's bytes.
        mv, pos = self._mv, self._pos
        for e, suffix, is_file, _before in members:
            size = n if is_file else len(fields[e])
            self._fill_header(mv, pos, kb + suffix, size)
            pos += BLOCK
            if not is_file:
                mv[pos:pos + size] = fields[e]
            pos += size
            pad = -size % BLOCK
            mv[pos:pos + pad] = _ZEROS[:pad]
            pos += pad
        self.size += pos - self._pos
        self._pos = pos
        self._flush_if_full()
        return None

    def _layout(self, ext: str, fields: dict) -> tuple | None:
        """The members of a sample with in-memory ``fields`` and the file member ``ext``, in tar order:
        ``(longest suffix, [(ext, b".ext", is the file, before the file)])``, or None where an
        extension is not ASCII.  Cached: every sample of a shard has the same layout."""
        names = (ext, *fields)
        layout = self._layouts.get(names)
        if layout is None:
            if ext in fields:
                raise ValueError(f"member .{ext} is both the file and an in-memory field")
            if not all(e.isascii() for e in names):
                return None
            members = [(e, f".{e}".encode("ascii"), e == ext, e < ext) for e in sorted(names)]
            layout = self._layouts[names] = (max(len(m[1]) for m in members), members)
        return layout

    def _read_file(self, path, at: int, want: int, tail: int) -> int:
        """Read the file at ``path`` into the staging buffer at ``at``, where there is room for ``want``
        bytes and then ``tail`` more (the buffer grows, without writing, if the file is longer);
        return its length."""
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                n = _read_into(fd, self._mv[at:at + want])
                if n < want:
                    return n
                rest = _read_rest(fd)       # longer than expected
            finally:
                os.close(fd)
        except OSError as e:
            raise UnreadableSource(e) from e
        if at + n + len(rest) + tail > len(self._mv):
            self._grow(at + n + len(rest) + tail, at + n)
        self._mv[at + n:at + n + len(rest)] = rest
        return n + len(rest)

    def _add_read_sample(self, key: str, fields: dict, ext: str, path, check) -> str | None:
        """:meth:`add_file_sample` for names that need PAX headers: read into ``bytes``, then copy."""
        try:
            with open(path, "rb", buffering=0) as src:
                data = src.read()
        except OSError as e:
            raise UnreadableSource(e) from e
        reason = check(data) if check is not None else None
        if reason is None:
            self.add_sample(key, {**fields, ext: data})
        return reason

    def close(self) -> None:
        """The end-of-archive marker (two zero blocks) and the padding to a whole record; everything
        staged is hashed and written."""
        end = self.size + 2 * BLOCK
        self._put(_ZEROS[: 2 * BLOCK + (-end % RECORD)])
        self.flush()
        self.wait_hashed()
