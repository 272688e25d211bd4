"""Reading shards in one process: our training stream against webdataset's own reader.

The rows, each timed in turn (A B C, A B C, ...) and kept at its best round:
- `webdataset (reference)`: `wds.WebDataset(...).decode("torchl8").to_tuple("png", "cls").batched(128)`,
  webdataset's reader (Python's tarfile) and decoder (PIL), uint8 out, no shuffle;
- `mixer, uint8 (default)`: the training set `mixer pretrain data.source=shards` builds from local
  shards (indexed: each sample read at its place, in the seed's order; our tar reader, torchvision's
  decoder for plain PNGs), its augmentation seeded per sample, uint8 out;
- `mixer, float (data.decode=pil)`: the same, decoded by PIL and normalised to floats in the loader;
- `mixer, streamed`: the stream that URLs, pipes and compressed shards get (our tar reader, a
  shuffle buffer), uint8 out;
- `mixer, hf save_to_disk` and `mixer, hf parquet`: the same digits as a Hugging Face data set
  (`data=hf`): a `save_to_disk` folder read row by row in the seed's order, and parquet files
  (row groups of 500) streamed as the shards are, uint8 out.
All give (128, 1, 28, 28) batches of the same digits. Without --shards it writes the demo's 4,000
training digits as shards (`mixer data write --from demo`) into a temporary folder; the Hugging Face
rows are always those digits, written with `datasets` beside it.

    python benchmarks/shard_loader.py [--shards DIR] [--batches 300] [--rounds 3]
"""
from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import default_collate

from mixer_cli.config.compose import compose
from mixer_cli.data import image_transform
from mixer_cli.data.order import GlobalBatchSampler, SeededSamples, sample_order
from mixer_cli.data.shards import TrainShards, resolve_shards
from mixer_cli.data.writer import demo_samples
from mixer_cli.train.fit import build_datasets

BATCH = 128


def ours(shards: Path, decode: str, seconds_for, streamed: bool = False):
    cfg = compose(["data.source=shards", f"data.train_path={shards}", f"data.eval_path={shards}",
                   f"data.global_batch={BATCH}", "aug.pad_crop=0", f"data.decode={decode}", "trainer.accelerator=cpu"])
    if not streamed:
        return seconds_for(indexed_batches(build_datasets(cfg).train))
    urls, size = resolve_shards(str(shards), None, "train_path")
    transform = image_transform(cfg.data, cfg.aug, augment=True, decode=decode)
    dataset = TrainShards(urls, size, transform, cfg.data.channels, cfg.data.shuffle_buffer, 0,
                          num_classes=cfg.data.num_classes, decoded=decode == "pil")
    dataset.set_epoch_length(BATCH, 10**9)  # one long epoch: the shards are passed over again and again
    return seconds_for(iter(dataset))


def hf(path: Path, seconds_for):
    cfg = compose(["data=hf", f"data.train_path={path}", f"data.eval_path={path}", "data.img_size=28",
                   "data.channels=1", "data.mean=[0.5]", "data.std=[0.5]", f"data.global_batch={BATCH}",
                   "aug.pad_crop=0", "trainer.accelerator=cpu", "data.shuffle_buffer=5000"])
    dataset = build_datasets(cfg).train
    if isinstance(dataset, TrainShards):  # parquet
        dataset.set_epoch_length(BATCH, 10**9)
        return seconds_for(iter(dataset))
    return seconds_for(indexed_batches(dataset))


def write_hf_digits(root: Path) -> tuple[Path, Path]:
    """The demo's 4,000 training digits as a save_to_disk folder and a parquet file."""
    import datasets

    classes, samples = demo_samples("train")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    rows = datasets.Dataset.from_dict({"image": [{"bytes": s.read(), "path": None} for s in samples],
                                       "label": [s.label for s in samples]}, features=features)
    rows.save_to_disk(str(root / "disk"))
    rows.to_parquet(str(root / "parquet" / "train.parquet"), batch_size=500)
    return root / "disk", root / "parquet"


def indexed_batches(dataset):
    """Batches as the training loader's worker makes them, epoch after epoch."""
    samples = SeededSamples(dataset, seed=0)
    for epoch in itertools.count():
        sampler = GlobalBatchSampler(sample_order(dataset, 0), len(dataset), BATCH)
        sampler.set_epoch(epoch)
        for keys in sampler:
            yield default_collate([samples[key] for key in keys])


def webdataset_reference(shards: Path, seconds_for):
    urls, _ = resolve_shards(str(shards), None, "train_path")
    stream = wds.WebDataset(urls, shardshuffle=False, empty_check=False).repeat().decode("torchl8")
    return seconds_for(iter(stream.to_tuple("png", "cls").batched(BATCH)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, help="a folder written by `mixer data write` (grey 28x28 digits)")
    parser.add_argument("--batches", type=int, default=300, help=f"batches of {BATCH} per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if shards is None:
            mixer = str(Path(sys.executable).with_name("mixer"))
            subprocess.run([mixer, "data", "write", "--from", "demo", "--to", f"{tmp}/digits"], check=True,
                           stdout=subprocess.DEVNULL)
            shards = Path(tmp) / "digits" / "train"  # the demo is written as train/ and test/
        disk, parquet = write_hf_digits(Path(tmp) / "hf")

        def seconds_for(batches) -> float:
            next(batches)  # the first batch fills the shuffle buffer, opens the files: not the steady rate
            start = time.perf_counter()
            for _ in itertools.islice(batches, args.batches):
                pass
            return time.perf_counter() - start

        rows = {"webdataset (reference)": lambda: webdataset_reference(shards, seconds_for),
                "mixer, uint8 (default)": lambda: ours(shards, "uint8", seconds_for),
                "mixer, float (data.decode=pil)": lambda: ours(shards, "pil", seconds_for),
                "mixer, streamed": lambda: ours(shards, "uint8", seconds_for, streamed=True),
                "mixer, hf save_to_disk": lambda: hf(disk, seconds_for),
                "mixer, hf parquet": lambda: hf(parquet, seconds_for)}
        best = dict.fromkeys(rows, float("inf"))
        for _ in range(args.rounds):
            for name, run in rows.items():
                best[name] = min(best[name], run())
    reference = args.batches * BATCH / best["webdataset (reference)"]
    print(f"{'loader, one process':34} {'img/s':>8} {'vs webdataset':>14}")
    for name, seconds in best.items():
        rate = args.batches * BATCH / seconds
        print(f"{name:34} {rate:8,.0f} {rate / reference:13.2f}x")


if __name__ == "__main__":
    main()
