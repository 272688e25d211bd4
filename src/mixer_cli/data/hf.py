"""Hugging Face `datasets` as a source (data=hf): a folder that `Dataset.save_to_disk` wrote, or
parquet files (one file, a folder of them, or a glob), the form the Hub keeps ImageNet-1k in.

A row becomes the sample a shard holds (`__key__`, the image's bytes, `.cls` or `.labels`), and
the shards' stages (data/shard_samples.py) do the rest: the same decoding, transforms, labels and
handling of a corrupt image, whichever form the images come in.

- A `save_to_disk` folder is memory-mapped Arrow, read row by row (`HFRows`): in training in the
  order the seed fixes (data/order.py), as image folders and local shards are read.
- Parquet cannot be read row by row (a row group is the smallest read), so parquet files stream as
  remote shards do (data/shards.py), one row group per shard: split by node and by worker, shuffled
  through a buffer, resumable, and read exactly once in evaluation.

A sample's key is its image's file name without the suffix (ImageNet's keep ILSVRC2012_val_*,
which the ReaL labels need) or, where the image has none, its row number. data.dev_fraction and
data.train_fraction choose by it, so a folder and parquet files of the same rows split alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from torch.utils.data import Dataset

from mixer_cli.core.errors import UserError
from mixer_cli.data.folder import UnreadableImage
from mixer_cli.data.hf_source import (
    Columns,
    HFSplit,
    check_split,
    class_label,
    columns_of,
    image_bytes,
    open_split,
)
from mixer_cli.data.shard_samples import OneAtATime, SkipCorrupt
from mixer_cli.data.shards import EvalShards, TrainShards
from mixer_cli.data.subsets import Selection
from mixer_cli.data.transforms import hands_over_uint8
from mixer_cli.data.writer import Sample


class Recorded:
    """Corrupt-sample handler of an evaluation: keep the error, so the caller can name the row."""

    def __init__(self):
        self.error: Exception | None = None

    def __call__(self, exn: Exception) -> bool:
        self.error = exn
        return True

    def good(self, samples):
        return samples


def image_rows(table, columns: Columns):
    """A datasets.Dataset's image and label columns, the images as encoded bytes ({bytes, path})."""
    from datasets import Image as ImageFeature

    table = table.select_columns([columns.image, columns.label])
    if isinstance(table.features[columns.image], ImageFeature):
        table = table.cast_column(columns.image, ImageFeature(decode=False))
    return table


class HFRows(OneAtATime, Dataset):
    """The rows of a `save_to_disk` folder that `selection` keeps, by number: (image, label), and with
    `with_keys` the key after them. In training an unreadable image gives way to the next readable row
    (SkipCorrupt counts it); an evaluation reads every row, so there it ends the run, naming the row."""

    def __init__(self, split: HFSplit, columns: Columns, transform, channels: int, num_classes: int,
                 decoded: bool, selection: Selection | None = None, training: bool = False):
        self.rows, self.columns, self.split, self.where = image_rows(split.table, columns), columns, split, split.where
        self.channels, self.num_classes, self.decoded, self.training = channels, num_classes, decoded, training
        self.corrupt = SkipCorrupt() if training else Recorded()
        self.numbers = np.arange(split.num_rows)
        if selection is not None and not selection.everything:
            self.numbers = np.array([i for i, k in enumerate(split.keys(columns.image)) if selection.keeps(k)],
                                    dtype=np.int64)
        self.transform = transform

    def keys(self) -> list[str]:
        """The samples' keys, from the image column's file names alone (no image is read)."""
        keys = self.split.keys(self.columns.image)
        return [keys[i] for i in self.numbers]

    def __len__(self) -> int:
        return len(self.numbers)

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")  # also ends a plain `for` over the rows
        for tried in range(len(self)):
            number = int(self.numbers[(index + tried) % len(self)])
            sample = self.read(number)
            if sample is not None:
                return sample
            if not self.training:
                reason = str(self.corrupt.error).splitlines()[0][:200]
                raise UnreadableImage(f"cannot read the image of row {number} of {self.where} ({reason}); "
                                      "an evaluation reads every row")
        raise UserError(f"no readable image in the {len(self)} rows of {self.where}")

    def read(self, number: int):
        try:
            samples = iter([self.columns.sample(self.rows[number], number)])
        except (OSError, ValueError) as e:
            self.corrupt(e)
            return None
        return self.staged(samples)


@dataclass(frozen=True)
class RowGroup:
    """A parquet file's row group: the streamed reader's shard."""

    path: str
    index: int
    first_row: int  # its first row's number in the split

    def __str__(self) -> str:
        return f"{self.path} (row group {self.index})"


def row_groups(split: HFSplit) -> list[RowGroup]:
    groups, first = [], 0
    for f, sizes in zip(split.files, split.group_rows):
        for i, rows in enumerate(sizes):
            groups.append(RowGroup(f, i, first))
            first += rows
    return groups


@dataclass(frozen=True)
class ParquetRows:
    """Pipeline stage, as data/tar_stream.py's `samples_of_tars` for tar files: row groups -> samples."""

    columns: Columns

    def __call__(self, sources, handler):
        import pyarrow as pa
        import pyarrow.parquet as pq

        for source in sources:
            group: RowGroup = source["url"]
            try:
                rows = pq.ParquetFile(group.path).read_row_group(group.index, columns=[self.columns.image,
                                                                                    self.columns.label]).to_pylist()
            except (OSError, pa.ArrowException) as exn:
                exn.args = (*exn.args, str(group))
                if handler(exn):
                    continue
                return
            for offset, row in enumerate(rows):
                try:
                    yield self.columns.sample(row, group.first_row + offset)
                except (OSError, ValueError) as exn:
                    if not handler(exn):
                        return


class ParquetTrainRows(TrainShards):
    """Parquet files streamed for training: TrainShards with row groups for shards."""

    units = "parquet row group(s)"
    smaller_units = "write the parquet files in smaller row groups (Dataset.to_parquet(batch_size=...))"


class ParquetEvalRows(EvalShards):
    """Parquet files read once for evaluation: EvalShards with row groups for shards."""

    def __init__(self, split: HFSplit, columns: Columns, *args, **kwargs):
        super().__init__(row_groups(split), split.num_rows, *args, read=ParquetRows(columns), **kwargs)
        self.split, self.columns = split, columns

    def all_keys(self) -> list[str]:
        return self.split.keys(self.columns.image)


def hf_dataset(data: DictConfig, transform, key: str, selection: Selection | None, training: bool, seed: int):
    """The split at data.<key>: rows of a `save_to_disk` folder, or parquet files streamed."""
    split = open_split(str(data[key]), key)
    columns = columns_of(split, data)
    check_split(split, columns, data.num_classes)
    decoded = not hands_over_uint8(data)
    if split.table is not None:
        return HFRows(split, columns, transform, data.channels, data.num_classes, decoded, selection, training)
    if not training:
        return ParquetEvalRows(split, columns, transform, data.channels, selection, data.num_classes, decoded)
    return ParquetTrainRows(row_groups(split), split.num_rows, transform, data.channels,
                            data.get("shuffle_buffer", 10_000), seed, selection, data.num_classes, decoded,
                            read=ParquetRows(columns))


def hf_samples(path: str, image_key: str, label_key: str, cache_dir: Path) -> tuple[list[str], list[Sample]]:
    """A split's classes and rows as the samples `mixer data write --from hf:PATH` writes. The writer
    reads rows in a seeded random order and a parquet row costs its whole row group, so parquet files
    are first gathered, in one pass, into memory-mapped Arrow under `cache_dir`."""
    split = open_split(path, None)
    columns = columns_of(split, {"image_key": image_key, "label_key": label_key})
    if columns.multi:
        raise UserError(f"{split.where}: column {label_key!r} lists several classes per row; shards written by "
                        "`mixer data write` hold one class per image: train on the data set with data=hf")
    named, labels = class_label(split, columns), split.column(label_key)
    classes = list(named.names) if named else [str(c) for c in range(max(filter(None, labels), default=0) + 1)]
    check_split(split, columns, len(classes), labels=labels)
    names = split.file_names(image_key)
    rows = image_rows(split.table if split.table is not None else gathered(split, columns, cache_dir), columns)
    return classes, [Sample(f"row {i}", label, partial(row_image, rows, i, image_key), Path(name).stem if name else "")
                     for i, (label, name) in enumerate(zip(labels, names))]


def gathered(split: HFSplit, columns: Columns, cache_dir: Path):
    import datasets

    datasets.enable_progress_bars()  # one pass over every file: worth a bar
    return datasets.Dataset.from_parquet(list(split.files), cache_dir=str(cache_dir),
                                         columns=[columns.image, columns.label])


def row_image(rows, number: int, image_key: str) -> bytes:
    return image_bytes(rows[number][image_key])[0]
