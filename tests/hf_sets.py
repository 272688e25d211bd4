"""Small Hugging Face data sets for the tests, written as `save_to_disk` folders and parquet files."""
from __future__ import annotations

from pathlib import Path

from datasets import ClassLabel, Dataset, Features, Image, List, Value


def hf_rows(images: list[bytes], labels: list, classes: list[str] | None = None, names: list[str] | None = None,
            multi: bool = False, image_key: str = "image", label_key: str = "label") -> Dataset:
    """Rows of encoded images (with file names, or none) and labels: ClassLabel where `classes` names
    them, else plain integers; a list of them per row where `multi`."""
    label = ClassLabel(names=classes) if classes else Value("int64")
    features = Features({image_key: Image(), label_key: List(label) if multi else label})
    cells = [{"bytes": raw, "path": name} for raw, name in zip(images, names or [None] * len(images))]
    return Dataset.from_dict({image_key: cells, label_key: labels}, features=features)


def write_hf(rows: Dataset, root: Path, files: int = 2, rows_per_group: int = 4) -> tuple[Path, Path]:
    """(the `save_to_disk` folder, the folder of parquet files): the same rows in the same order, the
    parquet ones in `files` files of row groups of `rows_per_group`."""
    rows.save_to_disk(str(root / "disk"))
    for i in range(files):
        rows.shard(files, i, contiguous=True).to_parquet(str(root / "parquet" / f"part-{i}.parquet"),
                                                         batch_size=rows_per_group)
    return root / "disk", root / "parquet"
