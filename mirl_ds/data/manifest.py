"""Read a shard set's manifest (`<prefix>.manifest.json`, see docs/shard-format.md).

The manifest is the loader's only source of truth for which shards exist and how many samples
each holds: the streaming loader plans epochs, splits data by data-parallel rank and resumes
(skipping whole shards without opening them) from these counts alone.

Manifests may live on a local path (or ``file://`` URL), behind ``http(s)://`` or in
``s3://bucket/prefix/`` (read through :mod:`mirl_ds.data.object_store`, imported only when an
``s3://`` URL is used). Shard names are resolved relative to the manifest's folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

FORMAT = "mirl_ds-shards/1"
MANIFEST_SUFFIX = ".manifest.json"

__all__ = ["FORMAT", "Manifest", "ShardInfo", "load_manifest", "join_url", "is_remote"]


@dataclass(frozen=True)
class ShardInfo:
    name: str  # as written in the manifest, relative to the manifest's folder
    samples: int
    bytes: int | None
    sha256: str | None
    url: str  # resolved: absolute local path, or http(s)://…, s3://…
    first_key: str | None = None


@dataclass
class Manifest:
    prefix: str
    shards: list[ShardInfo]
    total_samples: int
    classes: list[dict[str, Any]]
    base_url: str  # the manifest's folder (absolute local path or URL ending in '/')
    url: str = ""  # where the manifest itself was read from
    source: dict[str, Any] | None = None
    skipped: list[dict[str, Any]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def fingerprint(self) -> str:
        """A short hash of (shard names, sample counts): equal manifests plan equal epochs."""
        h = hashlib.sha1()
        for s in self.shards:
            h.update(f"{s.name}\0{s.samples}\n".encode())
        return h.hexdigest()[:16]


def is_remote(url: str) -> bool:
    return urllib.parse.urlsplit(url).scheme.lower() in ("http", "https", "s3")


def _local_path(url: str) -> str:
    if url.startswith("file://"):
        return urllib.request.url2pathname(urllib.parse.urlsplit(url).path)
    return url


def join_url(base: str, name: str) -> str:
    """Resolve shard `name` against the manifest folder `base` (local path or URL)."""
    if is_remote(base):
        return base if not name else base.rstrip("/") + "/" + name.lstrip("/")
    return os.path.join(base, name)


def _read_http(url: str, attempts: int = 4) -> bytes:
    delay = 0.5
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=60) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            if e.code in (403, 404, 410):
                raise FileNotFoundError(f"manifest {url} not found (HTTP {e.code})") from None
            if e.code < 500 or attempt == attempts - 1:
                raise OSError(f"manifest {url} could not be read: HTTP {e.code}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            if attempt == attempts - 1:
                raise OSError(f"manifest {url} could not be read: {e}") from None
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


def _read_bytes(url: str) -> bytes:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return _read_http(url)
    if scheme == "s3":
        from mirl_ds.data import object_store  # lazy: registers the s3 handler, needs boto3

        try:
            return object_store.read_bytes(url)
        except FileNotFoundError:
            raise FileNotFoundError(f"manifest {url} not found") from None
    path = _local_path(url)
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"manifest {url} not found") from None
    except IsADirectoryError:
        raise FileNotFoundError(f"manifest {url} is a folder, not a *{MANIFEST_SUFFIX} file") from None


def _find_in_folder(path: str) -> str:
    found = sorted(n for n in os.listdir(path) if n.endswith(MANIFEST_SUFFIX))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(found)})"
        raise FileNotFoundError(
            f"folder {path} holds {what} *{MANIFEST_SUFFIX} files; pass the manifest file itself"
        )
    return os.path.join(path, found[0])


def _int_field(url: str, where: str, value: Any, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"manifest {url}: {where} must be a non-negative integer, got {value!r}")
    return value


def _parse(url: str, base_url: str, data: bytes) -> Manifest:
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"manifest {url} is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"manifest {url} must hold a JSON object, got {type(doc).__name__}")
    fmt = doc.get("format", FORMAT)
    if fmt != FORMAT:
        raise ValueError(f"manifest {url} has format {fmt!r}; this loader reads {FORMAT!r}")
    shards_doc = doc.get("shards")
    if not isinstance(shards_doc, list):
        raise ValueError(f"manifest {url} has no 'shards' list")
    shards: list[ShardInfo] = []
    seen: set[str] = set()
    for i, s in enumerate(shards_doc):
        if not isinstance(s, dict):
            raise ValueError(f"manifest {url}: shards[{i}] must be an object, got {s!r}")
        name = s.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"manifest {url}: shards[{i}] has no 'name'")
        if "://" in name or name.startswith("/") or ".." in name.split("/"):
            raise ValueError(
                f"manifest {url}: shards[{i}].name {name!r} must be relative to the manifest's folder"
            )
        if name in seen:
            raise ValueError(f"manifest {url}: shard {name!r} is listed twice")
        seen.add(name)
        if "samples" not in s:
            raise ValueError(f"manifest {url}: shards[{i}] ({name}) has no 'samples' count")
        samples = _int_field(url, f"shards[{i}].samples", s["samples"])
        nbytes = _int_field(url, f"shards[{i}].bytes", s.get("bytes"), allow_none=True)
        sha = s.get("sha256")
        if sha is not None and not isinstance(sha, str):
            raise ValueError(f"manifest {url}: shards[{i}].sha256 must be a string, got {sha!r}")
        shards.append(
            ShardInfo(name=name, samples=samples, bytes=nbytes, sha256=sha,
                      url=join_url(base_url, name), first_key=s.get("first_key"))
        )
    counted = sum(s.samples for s in shards)
    total = doc.get("total_samples", counted)
    _int_field(url, "total_samples", total)
    if total != counted:
        raise ValueError(
            f"manifest {url}: total_samples={total} but the shards' counts add up to {counted}"
        )
    classes = doc.get("classes", [])
    if not isinstance(classes, list):
        raise ValueError(f"manifest {url}: 'classes' must be a list")
    prefix = doc.get("prefix")
    if prefix is None:
        prefix = os.path.basename(url.rstrip("/"))
        prefix = prefix[: -len(MANIFEST_SUFFIX)] if prefix.endswith(MANIFEST_SUFFIX) else prefix
    return Manifest(
        prefix=str(prefix), shards=shards, total_samples=total, classes=classes,
        base_url=base_url, url=url, source=doc.get("source"),
        skipped=list(doc.get("skipped") or []), raw=doc,
    )


def load_manifest(url: str | os.PathLike) -> Manifest:
    """Read and validate a shard-set manifest.

    `url` is a local path (or ``file://`` URL), an ``http(s)://`` URL or an ``s3://`` URL of a
    ``*.manifest.json`` file; a local folder holding exactly one manifest is accepted too.
    Raises FileNotFoundError (missing) or ValueError (malformed), one sentence naming the URL.
    """
    url = os.fspath(url)
    if is_remote(url):
        data = _read_bytes(url)
        base = url.rsplit("/", 1)[0] + "/"
        return _parse(url, base, data)
    path = os.path.abspath(_local_path(url))
    if os.path.isdir(path):
        path = _find_in_folder(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"manifest {url} not found")
    return _parse(url, os.path.dirname(path), _read_bytes(path))
