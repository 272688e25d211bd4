"""The same run on any number of devices, accumulation steps and loader workers: global batches and
augmentation fixed by the seed alone (data/order.py), the training step's draws by (seed, step,
micro-batch) (train/draws.py)."""
import gzip
import io
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from functools import partial

import pytest
import torch
from omegaconf import OmegaConf
from torchdata.stateful_dataloader import StatefulDataLoader
from webdataset.handlers import reraise_exception

from mixer_cli.data import build_dataset
from mixer_cli.data.demo import demo_arrays
from mixer_cli.data.indexed_shards import IndexedShards, sample_spans, seekable, shard_aware_order
from mixer_cli.data.order import GlobalBatchSampler, SeededSamples, epoch_order, seeded_draws
from mixer_cli.data.subsets import Selection
from mixer_cli.data.tar_stream import members, samples_of_tars
from mixer_cli.data.tensor import TensorImages
from mixer_cli.data.transforms import demo_transform
from mixer_cli.data.writer import demo_samples, write_shards

LAYOUTS = [(32, 1, 1), (16, 2, 1), (16, 1, 2), (8, 2, 2), (4, 2, 4)]  # (device batch, accumulate, ranks): 32 each


def steps(n: int, device_batch: int, accumulate: int, world: int, epoch: int = 0, seed: int = 7) -> list[list[int]]:
    """Each optimiser step's samples, as every (rank, slot) of the layout takes them, in micro-batch order j."""
    per_rank = []
    for rank in range(world):
        sampler = GlobalBatchSampler(partial(epoch_order, n, seed), n, device_batch, accumulate, world, rank)
        sampler.set_epoch(epoch)
        per_rank.append([[i for _, i in keys] for keys in sampler])
    return [[i for rank in range(world) for i in sum(per_rank[rank][s * accumulate:(s + 1) * accumulate], [])]
            for s in range(len(per_rank[0]) // accumulate)]


@pytest.mark.parametrize("device_batch,accumulate,world", LAYOUTS)
def test_every_layout_trains_on_the_global_batches_the_seed_fixes(device_batch, accumulate, world):
    order = epoch_order(100, seed=7, epoch=0).tolist()
    expected = [order[s * 32:(s + 1) * 32] for s in range(3)]  # 100 // 32 whole global batches; 4 left out
    assert steps(100, device_batch, accumulate, world) == expected


def test_the_order_is_the_seed_and_the_epochs_alone():
    one, again = epoch_order(1000, 7, 3), epoch_order(1000, 7, 3)
    assert torch.equal(one, again) and sorted(one.tolist()) == list(range(1000))
    assert not torch.equal(one, epoch_order(1000, 7, 4)) and not torch.equal(one, epoch_order(1000, 8, 3))
    # epoch 1 of seed 7 is not epoch 0 of seed 8 (no seed + epoch)
    assert not torch.equal(epoch_order(1000, 7, 1), epoch_order(1000, 8, 0))
    # Lightning's epoch reaches the sampler
    assert steps(100, 16, 1, 2, epoch=4)[0] == epoch_order(100, 7, 4)[:32].tolist()


def test_a_rank_takes_whole_micro_batches_and_every_sample_at_most_once_an_epoch():
    samplers = [GlobalBatchSampler(partial(epoch_order, 1003, 0), 1003, 10, 3, 4, rank) for rank in range(4)]
    taken = Counter(i for s in samplers for keys in s for _, i in keys)
    assert len(samplers[0]) == 1003 // 120 * 3 == 24 and all(len(list(s)) == 24 for s in samplers)
    assert len(taken) == 8 * 120 and set(taken.values()) == {1}


@pytest.mark.parametrize("stop_after", [0, 5, 11, 12])
def test_a_loaded_sampler_continues_with_the_next_micro_batch(stop_after):
    def sampler(epoch: int | None = None) -> GlobalBatchSampler:
        made = GlobalBatchSampler(partial(epoch_order, 200, 3), 200, 8, 2, 2, 1)  # 12 micro-batches an epoch
        if epoch is not None:
            made.set_epoch(epoch)
        return made

    expected = list(sampler(2)) + list(sampler(3))
    stopped = sampler(2)
    taken = [keys for _, keys in zip(range(stop_after), stopped)]
    state = stopped.state_dict()
    assert state == {"epoch": 2, "given": stop_after}
    continued = sampler()  # a new process: its epoch comes from the state
    continued.load_state_dict(state)
    if stop_after < 12:
        after = list(continued) + list(sampler(3))
    else:  # saved at the epoch's last micro-batch: it goes on with the next epoch (Lightning sets it later)
        after = list(continued)
    assert taken + after == expected
    assert [i for _, i in expected[12]] == epoch_order(200, 3, 3)[16:24].tolist()  # j = rank 1 x 2 + slot 0


def test_seeded_draws_repeat_and_leave_the_outer_generators_as_they_were():
    torch.manual_seed(1)
    random.seed(1)
    outer_torch, outer_python = torch.rand(3), random.random()
    torch.manual_seed(1)
    random.seed(1)
    with seeded_draws(42):
        inner = torch.rand(2), random.random()
    with seeded_draws(42):
        again = torch.rand(2), random.random()
    assert torch.equal(inner[0], again[0]) and inner[1] == again[1]
    assert torch.equal(torch.rand(3), outer_torch) and random.random() == outer_python


def demo_training_set(seed: int = 5) -> SeededSamples:
    data = OmegaConf.create({"img_size": 28, "mean": [0.1307], "std": [0.3081], "interpolation": "bilinear"})
    aug = OmegaConf.create({"pad_crop": 2, "hflip": True, "inception_crop": False, "randaug_magnitude": 0})
    x, y = demo_arrays("train")
    return SeededSamples(TensorImages(x[:64], y[:64], demo_transform(data, aug, train=True)), seed)


def test_a_sample_is_augmented_by_its_seed_epoch_and_index_alone():
    dataset = demo_training_set()
    first = dataset[(0, 3)][0]
    torch.rand(5)  # whatever was drawn before
    assert torch.equal(dataset[(0, 3)][0], first)
    assert not torch.equal(dataset[(1, 3)][0], first)  # another epoch, another crop and flip
    assert not torch.equal(demo_training_set(seed=6)[(0, 3)][0], first)


@pytest.mark.filterwarnings("ignore:.*set_vital")
@pytest.mark.parametrize("workers", [1, 2])
def test_loader_workers_give_the_batches_the_main_process_gives(workers):
    def batches(num_workers: int) -> list[torch.Tensor]:
        sampler = GlobalBatchSampler(partial(epoch_order, 64, 5), 64, 8, 2, 1, 0)
        loader = StatefulDataLoader(demo_training_set(), batch_sampler=sampler, num_workers=num_workers)
        return [x for epoch in range(2) if not sampler.set_epoch(epoch) for x, _ in loader]

    main, in_workers = batches(0), batches(workers)
    assert len(main) == 16 and all(torch.equal(a, b) for a, b in zip(main, in_workers, strict=True))


# --- whole runs: real processes ------------------------------------------------------------------------

ONE_EPOCH = ["trainer.epochs=1", "data.global_batch=128", "trainer.log_every_steps=1", "seed=3"]
MAX_ABS = 1e-3  # reduction order: 4.3e-4 (accumulation), 4.9e-4 (2 ranks) measured on the demo's network


def pretrain_in(run_root, *overrides: str) -> dict[str, torch.Tensor]:
    env = {k: v for k, v in os.environ.items() if k not in ("MIXER_RUN_DIR", "LOCAL_RANK", "RANK")}
    # a session of its own: a run that hangs is ended with every rank and loader worker it started
    proc = subprocess.Popen([sys.executable, "-m", "mixer_cli.cli", "pretrain", *overrides, f"run_root={run_root}"],
                            cwd=run_root.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the run hung: {proc.communicate()[1][-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    (run,) = (run_root / "pretrain").iterdir()
    return torch.load(run / "last.ckpt", weights_only=True)["state_dict"]


def max_abs_difference(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["demo", "shards", "hf"])
def test_one_demo_epoch_gives_the_same_weights_on_any_layout(tmp_path, tiny_run, source):
    data = []
    if source == "shards":  # the demo's digits in 16 shards of 250, windows of 1,000 samples
        for split in ("train", "test"):
            write_shards(*demo_samples(split), tmp_path / split, shard_size=250)
        data = ["data.source=shards", f"data.train_path={tmp_path / 'train'}", f"data.eval_path={tmp_path / 'test'}",
                "data.shuffle_buffer=1000"]
    if source == "hf":  # the demo's digits as save_to_disk folders, read row by row
        from hf_sets import hf_rows

        for split in ("train", "test"):
            classes, samples = demo_samples(split)
            rows = hf_rows([s.read() for s in samples], [s.label for s in samples], classes)
            rows.save_to_disk(str(tmp_path / split))
        data = ["data=hf", f"data.train_path={tmp_path / 'train'}", f"data.eval_path={tmp_path / 'test'}",
                "data.img_size=28", "data.channels=1", "data.mean=[0.5]", "data.std=[0.5]"]
    run = [*tiny_run, *ONE_EPOCH, *data]
    one = pretrain_in(tmp_path / "one", *run)
    layouts = {
        "accumulation": ["trainer.device_batch=64"],
        "2 ranks, 2 loader workers each": ["trainer=ddp", "trainer.devices=2", "data.num_workers=2"],
    }
    for name, overrides in layouts.items():
        other = pretrain_in(tmp_path / name.replace(" ", "_").replace(",", ""), *run, *overrides)
        assert max_abs_difference(other, one) < MAX_ABS, name
    assert max_abs_difference(one, pretrain_in(tmp_path / "workers", *run, "data.num_workers=2")) == 0


# --- shards: read sample by sample, in the seed's order --------------------------------------------


def test_the_index_reads_each_sample_the_stream_reads(tmp_path, index_shards):
    index_shards(tmp_path / "s", n=7, shard_size=7)  # webdataset's writer: a PAX header before every member
    shard = str(tmp_path / "s" / "shard-000000.tar")
    streamed = list(samples_of_tars(iter([{"url": shard}]), handler=reraise_exception))
    keys, spans = sample_spans(shard)
    assert keys == [s["__key__"] for s in streamed] and len(spans) == 7
    with open(shard, "rb") as f:
        for (start, end), sample in zip(spans, streamed):
            f.seek(start)
            assert dict(members(io.BytesIO(f.read(end - start)))) == {
                f"{sample['__key__']}.{ext}": sample[ext] for ext in ("png", "cls")}


def test_the_shard_aware_order_shuffles_shards_then_within_windows():
    counts = [5, 3, 4, 6]  # samples 0-4 in shard 0, 5-7 in shard 1, ...
    shard_of = torch.tensor(sum(([s] * c for s, c in enumerate(counts)), []))
    by_shard = shard_aware_order(counts, window=1, seed=2, epoch=0)
    assert sorted(by_shard.tolist()) == list(range(18))
    shards = shard_of[by_shard].tolist()
    runs = [shard for k, shard in enumerate(shards) if k == 0 or shard != shards[k - 1]]
    assert sorted(runs) == [0, 1, 2, 3]  # each shard's samples together
    windows = shard_aware_order(counts, window=8, seed=2, epoch=0)  # 2 windows of 2 shards each here
    first = set(shard_of[windows[:8]].tolist())
    size = sum(counts[s] for s in first)  # the first window: its shards' samples, then the others'
    assert len(first) == 2 and size >= 8 and set(shard_of[windows[size:]].tolist()).isdisjoint(first)
    assert torch.equal(windows, shard_aware_order(counts, 8, 2, 0))
    assert not torch.equal(windows, shard_aware_order(counts, 8, 2, 1))


def test_indexed_shards_hold_the_samples_of_the_evaluation_pass(tmp_path, index_shards, monkeypatch):
    index_shards(tmp_path / "train", n=30, shard_size=8)
    data = OmegaConf.create({"source": "shards", "train_path": str(tmp_path / "train"), "num_classes": 30,
                             "img_size": 16, "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3,
                             "interpolation": "bilinear", "shuffle_buffer": 10})
    plain = OmegaConf.create({"pad_crop": 0, "hflip": False, "inception_crop": False, "randaug_magnitude": 0})
    monkeypatch.setattr("mixer_cli.data.indexed_shards.OPEN_FILES", 2)  # of 4 shards
    train = build_dataset(data, plain, "train")
    assert isinstance(train, IndexedShards) and len(train) == 30 and train.counts == [8, 8, 8, 6]
    evaluated = build_dataset(data, plain, "train", augment=False)  # the exact pass of the stream
    evaluated.batch_size = 30
    ((images, labels),) = list(evaluated)
    read = {int(y): x for x, y in (train[i] for i in range(30))}
    assert sorted(read) == labels.tolist() and all(torch.equal(read[int(y)], x) for x, y in zip(images, labels))
    assert list(train._files) == [2, 3]  # the two latest shards' files are open, the others closed
    monkeypatch.setattr("mixer_cli.data.indexed_shards.sample_spans", lambda path: pytest.fail("read the tar again"))
    assert len(build_dataset(data, plain, "train")) == 30  # the index came from the cache
    half = build_dataset(OmegaConf.merge(data, {"train_fraction": 0.5}), plain, "train")
    kept = Selection("train", 0.0, 0.5, 0)
    assert sorted(int(half[i][1]) for i in range(len(half))) == [i for i in range(30) if kept.keeps(f"{i:09d}")]


def test_a_damaged_sample_gives_way_to_the_next_and_a_damaged_header_ends_the_shard(tmp_path, index_shards):
    index_shards(tmp_path / "s", n=3, shard_size=3)
    shard = tmp_path / "s" / "shard-000000.tar"
    _, spans = sample_spans(str(shard))
    raw = bytearray(shard.read_bytes())
    raw[spans[1][1] - 600:spans[1][1] - 500] = bytes(100)  # inside sample 1's last member, its PNG
    shard.write_bytes(bytes(raw))
    dataset = IndexedShards([str(shard)], None, channels=3, window=3)
    assert len(dataset) == 3 and [dataset[i][1] for i in range(3)] == [0, 2, 2] and dataset.corrupt.count == 1
    raw[spans[1][0] + 148] ^= 0xFF  # sample 1's first header's checksum: the stream reads no further either
    shard.write_bytes(bytes(raw))
    assert dataset[1][1] == 2 and dataset.corrupt.count == 2  # damaged since it was indexed: counted too
    assert len(IndexedShards([str(shard)], None, channels=3, window=3)) == 1


def test_compressed_or_remote_shards_are_streamed(tmp_path, index_shards):
    index_shards(tmp_path / "s", n=4, shard_size=4)
    packed = tmp_path / "shard.tar.gz"
    packed.write_bytes(gzip.compress((tmp_path / "s" / "shard-000000.tar").read_bytes()))
    assert seekable(str(tmp_path / "s" / "shard-000000.tar"))
    assert not seekable(str(packed)) and not seekable("https://example.com/a.tar") and not seekable("pipe:cat a.tar")


def test_lightning_sets_the_epoch_of_the_training_loaders_sampler():
    from lightning.fabric.utilities.data import _set_sampler_epoch

    from mixer_cli.train.datamodule import ImageDataModule

    dataset = demo_training_set().dataset  # the DataModule seeds the samples itself
    loader = ImageDataModule(dataset, 8, 0, train_set=dataset, micro_batches_per_epoch=8).train_dataloader()
    first = [i for _, i in next(iter(loader.batch_sampler))]
    _set_sampler_epoch(loader, 3)  # as Lightning's fit loop does before every epoch
    assert loader.batch_sampler.epoch == 3 and next(iter(loader))[1].shape == (8,)
    assert [i for _, i in next(iter(loader.batch_sampler))] == epoch_order(64, 0, 3)[:8].tolist() != first
