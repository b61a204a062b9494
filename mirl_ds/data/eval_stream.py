"""Every sample of a validation shard set exactly once, split across data-parallel ranks.

The training loader (:mod:`mirl_ds.data.stream`) drops what does not fill a batch on every
rank, which is right for training and wrong for accuracy.  Here shard ``i`` belongs to rank
``i % dp_size``, is read in order, and the last batch may be short; the ranks' counts are
summed by the caller.  Undecodable samples and unreadable shards are counted by reason, never
silently dropped.
"""
from __future__ import annotations

import tarfile
from collections import Counter
from typing import Any, Callable, Iterator

import torch

from .manifest import Manifest, load_manifest
from .stream import open_shard
from .tar_reader import iter_samples

__all__ = ["EvalStream"]


class EvalStream:
    """``iter()`` yields ``{"images", "labels", "keys"}`` batches of this rank's shards."""

    def __init__(self, manifest: Manifest | str, *, batch_size: int, decode: Callable[[bytes, str], Any],
                 dp_rank: int = 0, dp_size: int = 1):
        self.manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
        self.batch_size, self.decode = batch_size, decode
        self.shards = [s for i, s in enumerate(self.manifest.shards) if i % dp_size == dp_rank]
        self.skipped: Counter = Counter()

    def _samples(self) -> Iterator[tuple[str, dict[str, bytes]]]:
        for shard in self.shards:
            got = 0
            try:
                with open_shard(shard.url) as f:
                    for key, sample in iter_samples(f):
                        got += 1
                        yield key, sample
            except (OSError, tarfile.TarError, EOFError) as e:
                from ..log import get_logger

                get_logger().warning("validation shard %s unreadable after %d samples (%s: %s); "
                                     "its other samples are counted as skipped", shard.url, got,
                                     type(e).__name__, e)
            if got < shard.samples:
                self.skipped["truncated_shard"] += shard.samples - got

    def __iter__(self) -> Iterator[dict[str, Any]]:
        images, labels, keys = [], [], []
        for key, sample in self._samples():
            if "jpg" not in sample or "cls" not in sample:
                self.skipped["missing_field"] += 1
                continue
            try:
                images.append(self.decode(sample["jpg"], key))
            except ValueError:              # CorruptImage and friends
                self.skipped["decode_error"] += 1
                continue
            labels.append(int(sample["cls"]))
            keys.append(key)
            if len(images) == self.batch_size:
                yield {"images": torch.stack(images), "labels": torch.tensor(labels), "keys": keys}
                images, labels, keys = [], [], []
        if images:
            yield {"images": torch.stack(images), "labels": torch.tensor(labels), "keys": keys}
