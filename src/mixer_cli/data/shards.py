"""Webdataset shards as training and evaluation sources.

Training on local shards reads them sample by sample, in the order the seed fixes (`IndexedShards`,
data/indexed_shards.py). Training on shards that cannot be seeked in (URLs, pipes, compressed tars)
streams them (`TrainShards`): the shard list is split by node and by worker into disjoint subsets,
so different ranks see different data; each (rank, worker) streams its subset, reshuffled every
pass, through a shuffle buffer, with a seed of its own for every epoch. The epoch length is set on
the loader: a rank yields exactly `batches_per_epoch` batches per epoch however many workers share
them, so step counts match `samples per epoch / global batch` under DDP, and no rank ever runs dry
(no DDP hang). The stream is resumable (`state_dict`): a continued run rebuilds the epoch's stream
from its seed and skips, before decoding, the samples the stopped run had taken, so it yields
exactly the batches the stopped run would have yielded next.
Evaluation (`EvalShards`): every shard is read exactly once, split by node and by worker, last
batch partial: no sample is dropped or duplicated across ranks. With `with_keys` its batches carry
the samples' keys as a third element (the ReaL labels read ImageNet's validation image numbers from them).
A corrupt sample (bad image, truncated tar) is skipped, counted and logged; the run goes on.
"""
from __future__ import annotations

import glob
import itertools
import random
import re
import tarfile
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from omegaconf import DictConfig
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from mixer_cli.core.errors import UserError
from mixer_cli.data.indexed_shards import IndexedShards, seekable
from mixer_cli.data.shard_samples import SkipCorrupt, decoded_samples
from mixer_cli.data.subsets import Selection
from mixer_cli.data.tar_stream import samples_of_tars
from mixer_cli.data.transforms import hands_over_uint8
from mixer_cli.data.writer import INDEX, read_index


def rank_and_world(placed: tuple[int, int] | None = None) -> tuple[int, int]:
    """This process's (rank, world size): as the DataModule placed the dataset (known in the main
    process, and pickled into loader workers however they start), else from torch.distributed."""
    import torch.distributed as dist

    if placed is not None:
        return placed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def worker_and_workers() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def my_part(batches: int) -> int:
    """This worker's part of a rank's `batches`, split as evenly as it goes (the loader takes them in turn)."""
    worker, workers = worker_and_workers()
    return batches // workers + (worker < batches % workers)


def rng_states() -> dict:
    """This process's random generators (torch, CUDA, numpy, Python), in types that torch.load(weights_only=True)
    reads back: checkpoints that hold them stay loadable by `load_mixer`.

    CUDA's only where this process has started CUDA: a loader worker forked from a process that has
    cannot start it again (torch refuses), and draws nothing from it."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
            "python": random.getstate()}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_initialized():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


def resolve_shards(path: str, size: int | None, key: str) -> tuple[list[str], int | None]:
    """Shard files and sample count of a split: a folder written by `mixer data write` (its index.json
    knows both), or a brace pattern like /data/in1k/train-{000000..001023}.tar (size from config)."""
    folder = Path(path)
    if folder.is_dir():
        if not (folder / INDEX).is_file():
            raise UserError(
                f"data.{key}={path} has no {INDEX}; write it with `mixer data write --to {path}` or give shard names"
            )
        index = read_index(folder)
        shards = [folder / s["file"] for s in index["shards"]]
        missing = [p for p in shards if not p.is_file()]
        if missing:
            raise UserError(f"{missing[0]} is listed in {folder / INDEX} but missing ({len(missing)} of "
                            f"{len(shards)} shards missing)")
        return [str(p) for p in shards], size or index["num_samples"]
    urls = wds.shardlists.expand_urls(path)
    missing = [u for u in urls if "://" not in u and not glob.has_magic(u) and not Path(u).is_file()]
    if not urls or len(missing) == len(urls):
        raise UserError(f"no shards at data.{key}={path}; set data.{key}=... (or the MIXER_DATA root)")
    if missing:
        raise UserError(f"{len(missing)} of {len(urls)} shards of data.{key} are missing, e.g. {missing[0]}")
    return urls, size


class TrainShards(IterableDataset):
    """Shuffled (image, label) batches from this rank's and worker's share of the shards, `batches_per_epoch`
    per epoch over all workers. Each (rank, worker) holds its own copy and position: `epoch` (the epoch it
    is in), `batches` (yielded in that epoch) and `taken` (samples taken off the shuffle buffer for them,
    corrupt ones included); `restarted_at`, where a resume on another layout restarted the epoch's
    streams (`continue_epoch`). `read` makes samples of the shards: tar files by default."""

    units = "training shard(s)"
    smaller_units = "write smaller shards (mixer data write --shard-size)"

    def __init__(self, urls: list[str], num_samples: int, transform, channels: int, shuffle_buffer: int, seed: int,
                 selection: Selection | None = None, num_classes: int | None = None, decoded: bool = True,
                 read=samples_of_tars):
        self.urls, self.selection, self.read = urls, selection, read
        self.num_classes, self.decoded = num_classes, decoded
        self.num_samples = round(num_samples * selection.expected_fraction) if selection else num_samples
        self.transform, self.channels = transform, channels
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.batch_size, self.batches_per_epoch = 1, num_samples
        self.corrupt = SkipCorrupt()
        self.placed: tuple[int, int] | None = None  # (rank, world size), set by the DataModule
        self.epoch, self.batches, self.taken = -1, 0, 0
        self.restarted_at: int | None = None
        self._continuing = False  # a loaded state: the next __iter__ continues its epoch instead of starting one

    def set_epoch_length(self, batch_size: int, batches_per_epoch: int) -> None:
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch

    def check_split(self, world_size: int, num_workers: int) -> None:
        """Every (rank, worker) needs a shard of its own; otherwise say so now rather than hang later."""
        slots = world_size * max(num_workers, 1)
        if len(self.urls) < slots:
            raise UserError(
                f"{len(self.urls)} {self.units} cannot feed {world_size} rank(s) x {max(num_workers, 1)} loader "
                f"worker(s) = {slots}; {self.smaller_units} or lower data.num_workers"
            )

    def my_shards(self) -> tuple[list[str], int]:
        """This (rank, worker)'s disjoint slice of the shard list, and its slot (which no other one has)."""
        rank, world = rank_and_world(self.placed)
        worker, workers = worker_and_workers()
        slot, slots = rank * workers + worker, world * workers
        self.check_split(world, workers)
        return self.urls[slot::slots], slot

    def my_share(self) -> int:
        """Batches this worker yields per epoch: the rank's epoch split as evenly as it goes."""
        return my_part(self.batches_per_epoch)

    def _epoch_stream(self, skip: int):
        """This slot's batches of the current epoch, after the first `skip` samples off the shuffle buffer."""
        shards, slot = self.my_shards()
        # The same stream whenever the epoch is rebuilt; one restarted on another layout is a new one.
        restarted = "" if self.restarted_at is None else f"/restarted at {self.restarted_at}"
        rng = random.Random(f"{self.seed}/{slot}/{self.epoch}{restarted}")
        read = [0]  # samples that came out of the tar files, to notice shards that hold none

        def shard_passes():
            while True:
                before = read[0]
                yield from (dict(url=u) for u in rng.sample(shards, len(shards)))
                if read[0] == before:  # a whole pass without one sample: resampling would spin forever
                    raise UserError(f"no readable sample in the {len(shards)} shard(s) from {shards[0]}: all corrupt")

        def count_read(samples):
            for sample in samples:
                read[0] += 1
                yield sample

        def count_taken(samples):  # still encoded: skipping what the stopped run took costs no decoding
            for sample in itertools.islice(samples, skip, None):
                self.taken += 1
                yield sample

        def batches(samples):  # unlike wds.batched, reads no sample ahead: `taken` is exactly what was yielded
            while len(batch := list(itertools.islice(samples, self.batch_size))) == self.batch_size:
                yield default_collate(batch)

        # No larger than the epoch: the buffer is filled afresh every epoch.
        buffer = min(self.shuffle_buffer, self.my_share() * self.batch_size)
        tar_stage, *decode_stages = decoded_samples(self.transform, self.channels, self.corrupt, self.selection,
                                                    self.num_classes, self.decoded, read=self.read)
        return wds.DataPipeline(
            shard_passes,
            tar_stage,
            count_read,
            wds.shuffle(buffer, initial=buffer, rng=rng),
            count_taken,
            *decode_stages,  # after the shuffle: the buffer holds encoded bytes, not decoded images
            batches,
        )

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self):
        # The position moves on to the new epoch here, when the loader asks for the iterator, not at its
        # first batch: torchdata records each worker's state as an epoch starts, and a worker that had
        # served its share of the last epoch before a stop must resume into the new one, not that one.
        if self._continuing:
            self._continuing = False
            if self.batches is None:  # restarted by continue_epoch: this worker's part of the batches given
                self.batches = my_part(self.restarted_at)
        else:
            self.epoch, self.batches, self.taken, self.restarted_at = self.epoch + 1, 0, 0, None
        return self._batches()

    def _batches(self):
        stream = self._epoch_stream(skip=self.taken)
        for batch in itertools.islice(stream, self.my_share() - self.batches):
            self.batches += 1
            yield batch

    def state_dict(self) -> dict:
        """The position of this (rank, worker), which torchdata's StatefulDataLoader asks for after every
        batch; in a loader worker also its random generators, which the augmentation draws from."""
        state = {"epoch": self.epoch, "batches": self.batches, "taken": self.taken}
        if self.restarted_at is not None:
            state["restarted_at"] = self.restarted_at
        return {**state, "rng": rng_states()} if get_worker_info() else state

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches, self.taken = state["epoch"], state["batches"], state["taken"]
        self.restarted_at = state.get("restarted_at")
        self._continuing = True
        if "rng" in state:
            set_rng_states(state["rng"])

    def continue_epoch(self, epoch: int, batches: int) -> None:
        """Go on with `epoch` after the rank's first `batches` on another layout (other ranks, accumulation
        or workers) than the one that gave them: the place of each (rank, worker) in its shards does not
        carry over, so each restarts its stream of the epoch, seeded anew, for its part of the batches
        left. The epoch keeps its length; samples given before the stop may come again in it."""
        self.epoch, self.taken = epoch, 0
        if batches >= self.batches_per_epoch:  # it had ended: the next iteration starts the next epoch
            self.batches, self.restarted_at = self.batches_per_epoch, None
            return
        self.batches, self.restarted_at, self._continuing = None, batches, True


class EvalShards(IterableDataset):
    """Every sample of the split exactly once over all ranks and workers, in batches: (images, labels),
    and with `with_keys` the list of the samples' keys after them."""

    def __init__(self, urls: list[str], num_samples: int | None, transform, channels: int,
                 selection: Selection | None = None, num_classes: int | None = None, decoded: bool = True,
                 read=samples_of_tars):
        self.num_classes, self.decoded, self.read = num_classes, decoded, read
        selected = selection is not None and not selection.everything
        self.urls, self.selection = urls, selection
        self.num_samples = None if selected else num_samples  # a selection's size is known only once read
        self.transform, self.channels = transform, channels
        self.batch_size = 1
        self.with_keys = False
        self.corrupt = SkipCorrupt()
        self.placed: tuple[int, int] | None = None  # (rank, world size), set by the DataModule

    def shard_list(self):
        return (dict(url=url) for url in self.urls)

    def my_rank_shards(self, shards):
        rank, world = rank_and_world(self.placed)
        return itertools.islice(shards, rank, None, world)

    def __iter__(self):
        return iter(
            wds.DataPipeline(
                self.shard_list,
                self.my_rank_shards,
                wds.split_by_worker,
                *decoded_samples(self.transform, self.channels, self.corrupt, self.selection, self.num_classes,
                                 self.decoded, self.with_keys, self.read),
                wds.batched(self.batch_size, partial=True),
            )
        )

    def keys(self) -> list[str] | None:
        """The keys of the samples the pass will read, before any image is read; None where only a pass can tell."""
        keys = self.all_keys()
        if keys is not None and self.selection is not None and not self.selection.everything:
            keys = [k for k in keys if self.selection.keeps(k)]
        return keys

    def all_keys(self) -> list[str] | None:
        """Every sample's key, from the tar headers alone; None when a shard is not a local file (a URL or a pipe)."""
        if any("://" in url or url.startswith("pipe:") for url in self.urls):
            return None
        return [key for url in self.urls for key in tar_keys(url)]


def tar_keys(path: str) -> list[str]:
    """The sample keys of one tar file in order, as webdataset groups its members: a member's key is
    its name up to the first dot of its base name. A truncated file gives the keys before the damage."""
    names = []
    try:
        with tarfile.open(path) as tar:
            for member in tar:  # one header at a time: what precedes a damaged one is kept
                if member.isfile():
                    names.append(member.name)
    except tarfile.TarError:
        pass  # the pass skips the rest of a truncated shard too (SkipCorrupt)
    return list(dict.fromkeys(re.sub(r"\.[^/]*$", "", n) for n in names if "." in n.rsplit("/", 1)[-1]))


def train_shards(data: DictConfig, transform, seed: int, selection: Selection | None = None):
    """Local shards as IndexedShards, read in the order the seed fixes (data/indexed_shards.py); others
    (URLs, pipes, compressed tars) as a stream that each rank and worker shuffles (TrainShards)."""
    urls, size = resolve_shards(data.train_path, data.get("train_size"), "train_path")
    shuffle_buffer = data.get("shuffle_buffer", 10_000)
    if all(seekable(url) for url in urls):
        return IndexedShards(urls, transform, data.channels, shuffle_buffer, selection, data.num_classes,
                             not hands_over_uint8(data))
    if not size:
        raise UserError("set data.train_size (samples per epoch) for a shard pattern, e.g. data.train_size=50000")
    return TrainShards(urls, size, transform, data.channels, shuffle_buffer, seed, selection,
                       data.num_classes, not hands_over_uint8(data))


def eval_shards(data: DictConfig, transform, key: str = "eval_path", selection: Selection | None = None) -> EvalShards:
    """One exact pass over the shards of `key` (eval_path, or train_path for frozen-feature probes and
    the dev split), of the samples `selection` keeps."""
    urls, size = resolve_shards(data[key], data.get(key.replace("_path", "_size")), key)
    return EvalShards(urls, size, transform, data.channels, selection, data.num_classes,
                      not hands_over_uint8(data))
