"""The LightningDataModule over two built datasets.

Map-style sources (demo, image folder, local shards): our GlobalBatchSampler (data/order.py) gives
each rank its micro-batches of global batches that the seed alone fixes, and each sample's
augmentation is seeded by (seed, epoch, sample); evaluation uses an unpadded sampler so no sample is
counted twice. Streamed shards: the dataset batches itself and yields `micro_batches_per_epoch`
batches per rank and epoch, so every rank takes the same number of optimiser steps (no DDP hang).

The training loader is torchdata's StatefulDataLoader: Lightning keeps its position in each
checkpoint (the epoch and optimiser steps, which load into any layout; for the shard stream also
its `state_dict` and random generators in every worker, which load into the same), so a run stopped
mid-epoch continues with the very batch, augmented the very way, that the run left alone would have
had next; a stream on another layout restarts the rest of its epoch. Evaluation loaders draw their
worker seeds from a generator of their own: evaluating leaves the training's random stream as it was.
"""
from __future__ import annotations

import warnings

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from mixer_cli.core.errors import UserError
from mixer_cli.data.order import GlobalBatchSampler, SeededSamples, sample_order
from mixer_cli.data.shards import TrainShards
from mixer_cli.data.workers import worker_options
from mixer_cli.train.preemption import every_rank


def num_samples(dataset: Dataset) -> int:
    """Samples per epoch of a training set (a shard stream knows its epoch size)."""
    return dataset.num_samples if isinstance(dataset, TrainShards) else len(dataset)


class EveryRankLoader(StatefulDataLoader):
    """A StatefulDataLoader whose state holds every rank's position: Lightning writes rank 0's
    checkpoint only, and ranks read other shards, with other random generators in their workers.

    A state saved at the last batch of an epoch (`batches_per_epoch`) loads as an ended iteration, so
    the next one starts the next epoch: Lightning ends an epoch after its batches, before the
    iterator's own end, and a loaded iterator would have gone on with the ended epoch, leaving the
    next one without batches (a run stopped there lost an epoch of steps)."""

    def __init__(self, *args, batches_per_epoch: int | None = None, accumulate: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches_per_epoch, self.accumulate = batches_per_epoch, accumulate
        self.streams = isinstance(self.dataset, TrainShards)

    def state_dict(self) -> dict:
        state = super().state_dict()
        saved = {"ranks": every_rank(state), "accumulate": self.accumulate}  # every rank saves: Lightning dumps on all
        given = stream_given(state) if self.streams else sampler_given(state)
        if given is not None:
            saved["position"] = {"epoch": given["epoch"], "steps": given["given"] // self.accumulate}
        return saved

    def load_state_dict(self, state_dict: dict) -> None:
        """The position is (epoch, optimiser steps), which loads into any number of ranks, accumulation
        steps and workers: a map-style set's global batches are the seed's whatever the layout, so it
        continues exactly; a stream restarts the rest of its epoch (TrainShards.continue_epoch). On the
        layout that saved it, a stream continues exactly from each rank's and worker's own place."""
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_available() and dist.is_initialized() \
            else (1, 0)
        position = state_dict.get("position")
        if position is not None:
            epoch, given = position["epoch"], position["steps"] * self.accumulate
            if not self.streams:
                self.batch_sampler.load_state_dict({"epoch": epoch, "given": given})
                return
            if not same_layout(state_dict, world, self.num_workers, self.accumulate):
                self.dataset.continue_epoch(epoch, given)
                return
        check_same_layout(state_dict, world, self.num_workers)
        state = state_dict["ranks"][rank]
        if state and self.batches_per_epoch and self.given_in_epoch(state) >= self.batches_per_epoch:
            state = ended(state)
        super().load_state_dict(state)

    def given_in_epoch(self, state: dict) -> int:
        """The micro-batches a rank's saved iteration had given in its epoch."""
        given = stream_given(state) if self.streams else None
        return given["given"] if given else batches_given(state)


def saved_layout(state: dict, workers: int) -> tuple[int, int]:
    """(ranks, loader workers) of the run that saved `state`; a state saved before any batch says nothing
    of its workers."""
    ranks = state["ranks"]
    return len(ranks), len(ranks[0].get("_snapshot", {}).get("_worker_snapshots", {})) if ranks[0] else workers


def same_layout(state: dict, world: int, workers: int, accumulate: int) -> bool:
    """Whether `state` was saved by as many ranks and workers, each giving micro-batches as large: a
    stream's places count its micro-batches (checkpoints from before they said their accumulation
    steps are taken at their word)."""
    return saved_layout(state, workers) == (world, workers) and state.get("accumulate", accumulate) == accumulate


def check_same_layout(state: dict, world: int, workers: int) -> None:
    saved_ranks, saved_workers = saved_layout(state, workers)
    if (saved_ranks, saved_workers) != (world, workers):
        raise UserError(f"this run's checkpoint holds the place in its training data of each of {saved_ranks} "
                        f"process(es) and {saved_workers} loader worker(s) (it is from before places were saved "
                        f"as steps): resume it on {saved_ranks} (trainer.devices x trainer.num_nodes) with "
                        f"data.num_workers={saved_workers}; now {world} with {workers}")


# torchdata's StatefulDataLoader state comes in two layouts: with loader workers, the main process's
# part under _snapshot/_main_snapshot; without, at the top.

def batches_given(state: dict) -> int:
    """The batches a saved StatefulDataLoader iteration had given."""
    if "_snapshot" in state:
        return state["_snapshot"]["_snapshot_step"] + state["_steps_since_snapshot"]
    return state["_num_yielded"]


def sampler_given(state: dict) -> dict | None:
    """GlobalBatchSampler's (epoch, micro-batches given) as the saved iteration had consumed them: the
    sampler itself runs ahead by the batches its workers prefetch; None before any iteration."""
    main = state["_snapshot"]["_main_snapshot"] if "_snapshot" in state else state
    sampler = main.get("_index_sampler_state")
    if sampler is None:
        return None
    return {"epoch": sampler["epoch"], "given": sampler["given"] + state.get("_steps_since_snapshot", 0)}


def stream_given(state: dict) -> dict | None:
    """A shard stream's (epoch, micro-batches given in it) by one rank, from its workers' consumed states:
    unlike the loader's own count, it includes the batches given before a restart on another layout."""
    if "_snapshot" in state:
        places = [w["dataset_state"] for w in state["_snapshot"]["_worker_snapshots"].values()]
    else:
        places = [state.get("dataset_state")]
    places = [p for p in places if p is not None and p["epoch"] >= 0]
    if not places:
        return None
    epoch = max(p["epoch"] for p in places)
    return {"epoch": epoch, "given": sum(p["batches"] for p in places if p["epoch"] == epoch)}


def ended(state: dict) -> dict:
    """The state as torchdata saves an iteration that has reached its end: the next one starts an epoch.
    The sampler's, the dataset's and the workers' states are kept: GlobalBatchSampler, whose state is
    its position in the ended epoch, starts the next one (Lightning sets a batch sampler's epoch only
    after the loader's workers have taken their first batches); a shard stream knows its epoch."""
    return {**state, "_iterator_finished": True}


class ImageDataModule(L.LightningDataModule):
    """The evaluation split (validation loop during training, then the test loop), the dev split held
    out of training (the test loop's second loader), and the training set; `mixer eval` has no training set."""

    def __init__(self, eval_set: Dataset, device_batch: int, num_workers: int, *, train_set: Dataset | None = None,
                 dev_set: Dataset | None = None, micro_batches_per_epoch: int | None = None, accumulate: int = 1,
                 seed: int = 0):
        super().__init__()
        self.train_set, self.eval_set, self.dev_set = train_set, eval_set, dev_set
        self.device_batch, self.accumulate, self.seed = device_batch, accumulate, seed
        self.num_workers = num_workers
        self.micro_batches_per_epoch = micro_batches_per_epoch

    def _world(self) -> tuple[int, int]:
        return (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)

    def _pin(self) -> bool:
        return self.trainer is not None and self.trainer.accelerator.__class__.__name__ == "CUDAAccelerator"

    def _loader(self, dataset, loader=DataLoader, **kw) -> DataLoader:
        workers = self.num_workers
        return loader(dataset, persistent_workers=workers > 0, pin_memory=self._pin(),
                      **worker_options(workers, rank=self._world()[1]), **kw)

    def train_dataloader(self) -> EveryRankLoader:
        warnings.filterwarnings("ignore", ".*'set_vital' is deprecated.*")  # torchdata calls it, not us
        if isinstance(self.train_set, TrainShards):
            world, rank = self._world()
            self.train_set.placed = (rank, world)
            self.train_set.set_epoch_length(self.device_batch, self.micro_batches_per_epoch)
            # The length is exact however many workers share it (TrainShards.__iter__); torch's advice does not apply.
            warnings.filterwarnings("ignore", ".*IterableDataset.*has.*__len__.*")
            return self._loader(self.train_set, EveryRankLoader, batch_size=None,
                                batches_per_epoch=self.micro_batches_per_epoch, accumulate=self.accumulate)
        world, rank = self._world()
        n = len(self.train_set)
        sampler = GlobalBatchSampler(sample_order(self.train_set, self.seed), n, self.device_batch, self.accumulate,
                                     world, rank)
        return self._loader(SeededSamples(self.train_set, self.seed), EveryRankLoader, batch_sampler=sampler,
                            batches_per_epoch=self.micro_batches_per_epoch, accumulate=self.accumulate)

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader(self.eval_set)

    def test_dataloader(self) -> list[DataLoader]:
        return [self.eval_loader(d) for d in (self.eval_set, self.dev_set) if d is not None]

    def eval_loader(self, dataset: Dataset) -> DataLoader:
        """One exact, unpadded pass over `dataset`, split over the ranks."""
        world, rank = self._world()
        own_seeds = torch.Generator()
        if isinstance(dataset, IterableDataset):
            dataset.placed = (rank, world)
            dataset.batch_size = self.device_batch
            return self._loader(dataset, batch_size=None, generator=own_seeds)
        sampler = UnrepeatedDistributedSampler(dataset, world, rank, shuffle=False) if world > 1 else None
        return self._loader(dataset, batch_size=self.device_batch, sampler=sampler, generator=own_seeds)
