"""A Hugging Face data set's split, opened and checked (data=hf): a folder that `Dataset.save_to_disk`
wrote, or parquet files; its image and label columns, its classes, and the checks made before a run
writes anything. data/hf.py reads its rows."""
from __future__ import annotations

import glob
import io
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import UnidentifiedImageError

from mixer_cli.core.errors import UserError
from mixer_cli.data.folder import DECODE_ERRORS, probe_image

HUB_FILE = re.compile(r"^(?P<split>[A-Za-z0-9_.]+?)-\d{5}-of-\d{5}")  # the Hub's train-00000-of-00294.parquet


@dataclass(frozen=True)
class Columns:
    """Which columns hold the image and the label, and how a row becomes a shard's sample."""

    image: str
    label: str
    multi: bool = False  # a list of classes per row: multi-hot targets

    def sample(self, row: dict, number: int) -> dict:
        raw, name = image_bytes(row[self.image])
        label = row[self.label]
        labels = {"labels": " ".join(map(str, label)).encode()} if self.multi else {"cls": str(label).encode()}
        # PIL tells the format from the bytes; "jpg" only marks the member as the image.
        return {"__key__": row_key(name, number), "jpg": raw, **labels}


def row_key(file_name: str | None, number: int) -> str:
    """A row's key: its image's file name without the suffix, else its number (streamed and indexed alike)."""
    return Path(file_name).stem if file_name else f"{number:09d}"


def image_bytes(value) -> tuple[bytes, str]:
    """(encoded image, its file name or "") of an image cell: datasets' Image ({bytes, path}) or bytes."""
    if isinstance(value, bytes):
        return value, ""
    if isinstance(value, dict) and {"bytes", "path"} <= value.keys():
        if value["bytes"] is not None:
            return value["bytes"], value["path"] or ""
        if value["path"]:
            with open(value["path"], "rb") as f:
                return f.read(), value["path"]
    raise ValueError(f"the image cell holds {type(value).__name__} {str(value)[:60]!r}, not an image")


@dataclass
class HFSplit:
    """One split of a data set: a `save_to_disk` folder (`table`) or parquet files (`files`)."""

    where: str  # data.<key>=<path>, for messages
    features: object  # datasets.Features
    num_rows: int
    table: object = None  # datasets.Dataset
    files: tuple[str, ...] = ()
    group_rows: tuple[tuple[int, ...], ...] = ()  # each file's row groups' sizes

    def column(self, name: str) -> list:
        """A column's values; "image.path" reads the images' file names alone."""
        if self.table is not None:
            column, *field = name.split(".")
            chunks = self.table.data.column(column).chunks
            return [v for chunk in chunks for v in (chunk.field(field[0]) if field else chunk).to_pylist()]
        import pyarrow.parquet as pq

        return pq.read_table(list(self.files), columns=[name]).column(0).to_pylist()

    def file_names(self, image: str) -> list[str | None]:
        """The image column's file names, read without the images; None for each row where it has none."""
        return self.column(f"{image}.path") if has_file_names(self.features[image]) else [None] * self.num_rows

    def keys(self, image: str) -> list[str]:
        """The rows' keys (`row_key`), from the image column's file names alone."""
        return [row_key(name, i) for i, name in enumerate(self.file_names(image))]

    def first_row(self, columns: list[str]) -> dict:
        if self.table is not None:
            return self.table.data.slice(0, 1).to_pylist()[0]
        import pyarrow.parquet as pq

        first = next(pq.ParquetFile(self.files[0]).iter_batches(batch_size=1, columns=columns))  # not its row group
        return first.to_pylist()[0]


def has_file_names(feature) -> bool:
    """An image column whose cells carry file names: datasets' Image, or a {bytes, path} struct."""
    from datasets import Image as ImageFeature

    return isinstance(feature, ImageFeature) or isinstance(feature, dict) and "path" in feature


def open_split(path: str, key: str | None) -> HFSplit:
    """The split at data.<key>: a `save_to_disk` folder, or parquet files (a file, a folder of them, a glob)."""
    option = f"data.{key}=" if key else "--from hf:"  # a config key, or `mixer data write`'s option
    where = f"{option}{path}"
    root = Path(path).expanduser()
    if (root / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in root.iterdir() if (p / "state.json").is_file())
        raise UserError(f"{where} holds the splits {', '.join(splits)} (a DatasetDict): name one, "
                        f"e.g. {option}{root / (splits[0] if splits else 'train')}")
    if (root / "state.json").is_file():
        return arrow_split(root, where)
    files = parquet_files(path, root)
    if not files:
        raise UserError(f"no Hugging Face data set at {where}: give a folder that save_to_disk wrote, or parquet "
                        "files (a file, a folder of them, or a glob)")
    if root.is_dir():
        check_one_split(files, where, option, root)
    return parquet_split(files, where)


def parquet_files(path: str, root: Path) -> list[str]:
    if root.is_dir():
        return sorted(str(p) for p in root.rglob("*.parquet"))
    if root.is_file():
        return [str(root)]
    return sorted(glob.glob(str(root), recursive=True)) if glob.has_magic(path) else []


def check_one_split(files: list[str], where: str, option: str, root: Path) -> None:
    """A folder of the Hub's parquet files often holds several splits: training on all would mix them."""
    splits = sorted({m["split"] for f in files if (m := HUB_FILE.match(Path(f).name))})
    if len(splits) > 1:
        raise UserError(f"{where} holds parquet files of the splits {', '.join(splits)}: name one with a glob, "
                        f"e.g. {option}'{root}/**/{splits[-1]}-*.parquet'")


def arrow_split(root: Path, where: str) -> HFSplit:
    import datasets

    datasets.disable_progress_bars()
    table = datasets.load_from_disk(str(root))
    return HFSplit(where, table.features, len(table), table=table)


def parquet_split(files: list[str], where: str) -> HFSplit:
    from datasets import Features

    schemas, group_rows = zip(*map(footer, files))
    for f, schema in zip(files, schemas):
        if not schema.remove_metadata().equals(schemas[0].remove_metadata()):
            raise UserError(f"{where}: {f} has columns ({', '.join(schema.names)}) unlike {files[0]} "
                            f"({', '.join(schemas[0].names)}): a split's parquet files must share one schema")
    return HFSplit(where, Features.from_arrow_schema(schemas[0]), sum(map(sum, group_rows)), files=tuple(files),
                   group_rows=group_rows)


def footer(path: str) -> tuple:
    """A parquet file's arrow schema and its row groups' sizes."""
    stat = os.stat(path)
    return footer_of_version(path, stat.st_mtime_ns, stat.st_size)


@cache
def footer_of_version(path: str, mtime_ns: int, size: int) -> tuple:
    """Read once per process for each version of the file: a run opens a split several times (its
    classes, their names, the data set) and on a network file system each footer is a round trip."""
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    meta = file.metadata
    return file.schema_arrow, tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))


def columns_of(split: HFSplit, data: DictConfig) -> Columns:
    """The image and label columns data.image_key and data.label_key name, checked against the split."""
    image, label = data.get("image_key", "image"), data.get("label_key", "label")
    for name, what in ((image, "image_key"), (label, "label_key")):
        if name not in split.features:
            raise UserError(f"{split.where} has no column {name!r} (data.{what}); its columns: "
                            f"{', '.join(split.features)}; set data.{what}=...")
    feature = split.features[label]
    inner = getattr(feature, "feature", None)  # a list column: several classes per row
    if not holds_class_numbers(inner if inner is not None else feature):
        raise UserError(f"{split.where}: column {label!r} (data.label_key) holds {feature}, not class numbers")
    return Columns(image, label, multi=inner is not None)


def holds_class_numbers(feature) -> bool:
    from datasets import ClassLabel, Value

    return isinstance(feature, ClassLabel) or isinstance(feature, Value) and feature.dtype.startswith(("int", "uint"))


def class_label(split: HFSplit, columns: Columns):
    """The label column's ClassLabel feature (num_classes, names), or None for plain integers."""
    from datasets import ClassLabel

    feature = split.features[columns.label]
    feature = feature.feature if columns.multi else feature
    return feature if isinstance(feature, ClassLabel) else None


def check_split(split: HFSplit, columns: Columns, num_classes: int, labels: list | None = None) -> None:
    """Refuse, before a run writes anything, labels outside 0..num_classes-1 and an image PIL cannot read.
    `labels`: the label column, where the caller has read it already."""
    named = class_label(split, columns)
    if named is not None and named.num_classes != num_classes:
        raise UserError(f"{split.where} has {named.num_classes} classes (the ClassLabel of {columns.label!r}), "
                        f"data.num_classes={num_classes}; set data.num_classes={named.num_classes}")
    check_labels(split, columns, num_classes, split.column(columns.label) if labels is None else labels)
    check_first_image(split, columns)


def check_labels(split: HFSplit, columns: Columns, num_classes: int, labels: list) -> None:
    if columns.multi:
        rows = np.repeat(np.arange(len(labels)), [len(row or ()) for row in labels])
        labels = [c for row in labels for c in row or ()]
    else:
        rows = np.arange(len(labels))
    values = np.array([-1 if v is None else v for v in labels], dtype=np.int64)
    outside = np.flatnonzero((values < 0) | (values >= num_classes))
    if len(outside):
        row, value = int(rows[outside[0]]), int(values[outside[0]])
        raise UserError(f"{split.where}: row {row} has label {value}, outside 0..{num_classes - 1} ({num_classes} "
                        f"classes; {len(outside)} such label(s); the Hub marks unlabelled rows -1)")


def check_first_image(split: HFSplit, columns: Columns) -> None:
    """Decode the first row's image: cheap, and enough to refuse a column of something else."""
    try:
        raw, _ = image_bytes(split.first_row([columns.image, columns.label])[columns.image])
        probe_image(io.BytesIO(raw))
    except DECODE_ERRORS as e:  # UnidentifiedImageError is an OSError
        reason = "not an image PIL reads" if isinstance(e, UnidentifiedImageError) else str(e).splitlines()[0]
        raise UserError(f"{split.where}: cannot read the image of row 0 (column {columns.image!r}): {reason}") from None


def hf_num_classes(data: DictConfig) -> int:
    """data.num_classes when it is null: the ClassLabel of the label column, in the first split that exists."""
    split = existing_split(data)
    named = class_label(split, columns_of(split, data))
    if named is None:
        raise UserError(f"{split.where}: column {data.get('label_key', 'label')!r} holds plain integers, not a "
                        "ClassLabel that names its classes: set data.num_classes")
    return named.num_classes


def hf_class_names(data: DictConfig) -> tuple[str, ...] | None:
    try:
        split = existing_split(data)
        named = class_label(split, columns_of(split, data))
    except UserError:
        return None
    return tuple(named.names) if named is not None else None


def existing_split(data: DictConfig) -> HFSplit:
    """The train split, or the evaluation split where there is no train split (`mixer eval`)."""
    keys = [k for k in ("train_path", "eval_path") if data.get(k)]
    for key in keys:
        path = str(data[key])
        if Path(path).expanduser().exists() or glob.has_magic(path) and glob.glob(str(Path(path).expanduser())):
            return open_split(path, key)
    return open_split(str(data[keys[0]]), keys[0])  # raises: there is no data
