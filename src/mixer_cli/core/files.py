"""Files the toolkit writes and reads: atomic writes, CSV text, and where conf/ and recipes/ live."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path


def package_root() -> Path:
    """The folder holding conf/ and recipes/: the package in a wheel, the repository otherwise."""
    here = Path(__file__).resolve().parents[1]
    for root in (here, here.parents[1]):
        if (root / "conf").is_dir() and (root / "recipes").is_dir():
            return root
    raise RuntimeError(f"conf/ and recipes/ not found near {here}")


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write a file so that readers see the old content or the new, never half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: ranks may write the same file
    tmp.write_bytes(content) if isinstance(content, bytes) else tmp.write_text(content)
    os.replace(tmp, path)


def csv_text(rows: list[dict], fieldnames: list[str] | None = None) -> str:
    """Rows as CSV text with a header (columns: `fieldnames`, or the first row's keys)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fieldnames or list(rows[0]), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def csv_table(header: list, rows: list[list]) -> str:
    """CSV text of a header and rows of values, for tables whose columns are not all distinct names (a
    confusion matrix's columns are the class names, which may repeat)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()
