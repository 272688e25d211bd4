"""Local shards read sample by sample, so that the training order is the seed's (data/order.py) on
shards too: each rank and loader worker reads its own micro-batches, by seeking to their samples.

An index holds where each sample's members lie in its tar file: the tar headers are read once (the
data is seeked over, not read: 13 us a sample here, about 16 s for ImageNet's 1.28 M) and
kept in the cache folder, by file path, size and modification time. The epoch's order is
shard-aware: the shards are shuffled, then the samples within each window of consecutive shards of
at least `data.shuffle_buffer` samples, as a shuffle buffer of that size mixes a stream (but the
same on any number of ranks and workers). Shards that cannot be seeked in (URLs, pipes, compressed
tars) are streamed instead (data/shards.py), where each rank and worker shuffles its own.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from webdataset.tariterators import base_plus_ext, group_by_keys

from mixer_cli.core.console import counting_progress, err_console
from mixer_cli.core.errors import UserError
from mixer_cli.data.demo import cache_dir
from mixer_cli.data.order import derived_seed
from mixer_cli.data.shard_samples import OneAtATime, SkipCorrupt
from mixer_cli.data.subsets import Selection
from mixer_cli.data.tar_stream import COMPRESSED, META, member_spans, walk

log = logging.getLogger(__name__)
INDEX_VERSION = 1
OPEN_FILES = 64  # per process


def seekable(url: str) -> bool:
    """A local, uncompressed tar file: one whose samples can be read one by one."""
    if "://" in url or url.startswith("pipe:") or not Path(url).is_file():
        return False
    with open(url, "rb") as f:
        head = f.read(6)
    return not any(head.startswith(magic) for magic in COMPRESSED)


def sample_spans(path: str) -> tuple[list[str], np.ndarray]:
    """The keys of a tar file's samples, in order, and each one's (start, end) bytes: from its first
    member's header to its last member's data, as webdataset groups members into samples."""
    keys, spans = [], []
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        try:
            for name, start, end in member_spans(f):
                key, _ = base_plus_ext(name)
                if key is None or META.match(Path(name).name) or end > size:  # past the end: a truncated file
                    continue
                if keys and keys[-1] == key:
                    spans[-1][1] = end
                else:
                    keys.append(key)
                    spans.append([start, end])
        except tarfile.ReadError as e:  # as the stream does: the samples before the damage, not those after
            log.warning("data: %s is damaged after its first %d samples, which alone are read: %s", path, len(keys), e)
    return keys, np.array(spans, dtype=np.int64).reshape(-1, 2)


def cached_index(path: str) -> Path:
    """Where the index of this version of the file is kept."""
    stat = os.stat(path)
    name = hashlib.blake2b(f"{INDEX_VERSION}:{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode(),
                           digest_size=12).hexdigest()
    return cache_dir() / "shard-index" / f"{name}.npz"


def indexed_spans(urls: list[str]) -> list[tuple[list[str], np.ndarray]]:
    """cached_spans of each shard, with a progress bar while shards not indexed before are read."""
    indexes = [cached_index(url) for url in urls]
    new = sum(not index.is_file() for index in indexes)
    if not new:
        return [cached_spans(url, index) for url, index in zip(urls, indexes)]
    spans = []
    with counting_progress(err_console) as bar:
        task = bar.add_task(f"indexing {new} shard(s), once", total=len(urls))
        for url, index in zip(urls, indexes):
            spans.append(cached_spans(url, index))
            bar.advance(task)
    return spans


def cached_spans(path: str, cached: Path) -> tuple[list[str], np.ndarray]:
    """sample_spans, read once per version of the file and kept at `cached` (cached_index)."""
    if cached.is_file():
        with np.load(cached) as saved:
            return saved["keys"].tolist(), saved["spans"]
    keys, spans = sample_spans(path)
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(f".{os.getpid()}.npz")  # written whole, then renamed: ranks may race
    np.savez(partial, keys=np.array(keys, dtype=str), spans=spans)
    partial.replace(cached)
    return keys, spans


def shard_aware_order(counts: list[int], window: int, seed: int, epoch: int) -> torch.Tensor:
    """An epoch's order of samples numbered shard after shard: the shards shuffled, then the samples
    within each window of consecutive shards holding at least `window` samples."""
    g = torch.Generator().manual_seed(derived_seed(seed, "shards", epoch))
    starts = np.concatenate([[0], np.cumsum(counts)])
    order, pending, pending_samples = [], [], 0
    for shard in torch.randperm(len(counts), generator=g).tolist():
        pending.append(torch.arange(starts[shard], starts[shard + 1]))
        pending_samples += counts[shard]
        if pending_samples >= window:
            order.append(shuffled(torch.cat(pending), g))
            pending, pending_samples = [], 0
    if pending:
        order.append(shuffled(torch.cat(pending), g))
    return torch.cat(order) if order else torch.zeros(0, dtype=torch.long)


def shuffled(samples: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return samples[torch.randperm(len(samples), generator=g)]


class IndexedShards(OneAtATime, Dataset):
    """The training samples of local shards that `selection` keeps, by number: (image, label) as the
    stream makes them (data/shard_samples.py), `transform` applied to the image."""

    def __init__(self, urls: list[str], transform, channels: int, window: int, selection: Selection | None = None,
                 num_classes: int | None = None, decoded: bool = True):
        self.urls, self.channels, self.window = urls, channels, window
        self.num_classes, self.decoded, self.corrupt = num_classes, decoded, SkipCorrupt()
        self.transform = transform
        every = selection is None or selection.everything
        spans, self.counts = [], []
        for keys, found in indexed_spans(urls):
            kept = [i for i, key in enumerate(keys) if every or selection.keeps(key)]
            spans.append(found[kept])
            self.counts.append(len(kept))
        self.spans = np.concatenate(spans) if spans else np.zeros((0, 2), dtype=np.int64)
        self.shard = np.repeat(np.arange(len(urls)), self.counts)  # of each sample
        if not len(self.spans):
            raise UserError(f"no training sample in the {len(urls)} shard(s) from {urls[0]}")
        self._files: OrderedDict[int, int] = OrderedDict()  # shard number -> descriptor, the latest used last

    def __len__(self) -> int:
        return len(self.spans)

    def order(self, seed: int, epoch: int) -> torch.Tensor:
        return shard_aware_order(self.counts, self.window, seed, epoch)

    def __getitem__(self, index: int):
        """The sample; a corrupt one (SkipCorrupt counts it) gives way to the next readable one."""
        for tried in range(len(self)):
            sample = self.read((index + tried) % len(self))
            if sample is not None:
                return sample
        raise UserError(f"no readable sample in the {len(self.urls)} shard(s) from {self.urls[0]}: all corrupt")

    def read(self, index: int):
        shard = int(self.shard[index])
        start, end = self.spans[index]
        raw = os.pread(self.descriptor(shard), int(end - start), int(start))
        url = self.urls[shard]
        files = [{"fname": name, "data": data, "__url__": url} for name, data in self.members_of(raw, url)]
        return self.staged(group_by_keys(iter([*files, {}])))

    def members_of(self, raw: bytes, url: str) -> list[tuple[str, bytes]]:
        """The members of one sample's bytes; a damaged sample gives none, and the corrupt-sample
        handler counts it (the decode stages, its other caller, never see it)."""
        try:
            return [(name, data) for name, _, _, data in walk(io.BytesIO(raw))]
        except tarfile.ReadError as e:
            e.args = (*e.args, url)
            self.corrupt(e)
            return []

    def descriptor(self, shard: int) -> int:
        """The shard's file, open; at most OPEN_FILES at once (ImageNet-21k has thousands of shards)."""
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard]
        if len(self._files) >= OPEN_FILES:
            os.close(self._files.popitem(last=False)[1])
        self._files[shard] = os.open(self.urls[shard], os.O_RDONLY)
        return self._files[shard]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": OrderedDict()}  # a loader worker started by pickling opens its own
