"""`mixer data write`: an image folder (one sub-folder per class) or the bundled demo -> webdataset shards.

Each sample is `<key>.jpg|png|webp` (the original bytes; other formats re-encoded as PNG) and
`<key>.cls` (the class index). The key is the sample's number in the sorted input, and for an image
folder the file's stem after it (`000000042_ILSVRC2012_val_00000001`): the number keeps keys unique
when two class folders hold files of the same name, the stem keeps what the name says (ImageNet's
validation image number, which the ReaL labels need). Beside the shards, `index.json` records the
classes, the per-class counts, the shards with their sample counts, and the files skipped as
unreadable. Every image is fully decoded once while writing, so a corrupt file is reported and
skipped here, not mid-training. Shards are written under temporary names and renamed when complete;
index.json comes last, so a folder with an index.json is always a complete set.
"""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from mixer_cli.core.errors import UserError
from mixer_cli.core.files import write_atomic

INDEX = "index.json"
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # stored as-is; anything else -> PNG
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass
class Sample:
    name: str  # where it came from, for the report of skipped files
    label: int
    read: Callable[[], bytes]  # the encoded image, read only when written
    stem: str = ""  # the file's name without its suffix; kept in the sample's key


@dataclass
class WriteReport:
    classes: list[str]
    counts: list[int]
    shards: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def to_dict(self, source: str) -> dict:
        return {
            "format": "mixer-shards/1",
            "source": source,
            "num_samples": self.num_samples,
            "classes": self.classes,
            "counts": self.counts,
            "shards": self.shards,
            "skipped": self.skipped,
        }


def folder_samples(root: Path) -> tuple[list[str], list[Sample]]:
    """Classes (sorted sub-folder names) and one Sample per image file under them."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{root} has no class sub-folders; expected {root}/<class>/<image files>")
    samples = [
        Sample(str(path), label, path.read_bytes, path.stem)
        for label, name in enumerate(classes)
        for path in sorted((root / name).rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    ]
    return classes, samples


def demo_samples(split: str) -> tuple[list[str], list[Sample]]:
    """The bundled demo digits of `split` as PNG-encoded samples (lossless)."""
    from mixer_cli.data.demo import demo_arrays

    x, y = demo_arrays(split)
    return [str(c) for c in range(10)], [
        Sample(f"demo/{split}/{i}", int(label), lambda img=img: _png(img)) for i, (img, label) in enumerate(zip(x, y))
    ]


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def checked_image(raw: bytes) -> tuple[str, bytes]:
    """(extension, bytes) of a fully decodable image; raises on a corrupt or truncated file."""
    with Image.open(io.BytesIO(raw)) as img:
        fmt = img.format
        img.load()  # decodes every pixel: truncated or corrupt data fails here, not in training
        if fmt in KEPT_FORMATS:
            return KEPT_FORMATS[fmt], raw
        buf = io.BytesIO()
        img.convert("RGBA" if "A" in img.getbands() else "RGB").save(buf, format="PNG")
        return "png", buf.getvalue()


def check_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty folder; choose a new --to folder")


def write_shards(
    classes: list[str],
    samples: list[Sample],
    out: Path,
    shard_size: int = 10_000,
    seed: int = 0,
    source: str = "",
    on_skip=None,
    workers: int = 1,
    on_shard=None,
) -> WriteReport:
    """Write `samples` in a seeded random order (so each shard mixes the classes) into `out`;
    `on_skip(name, reason)` hears of each unreadable file, `on_shard(samples)` of each shard written."""
    check_output(out)
    out.mkdir(parents=True, exist_ok=True)
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    report = WriteReport(classes=classes, counts=[0] * len(classes))
    records = _readable(samples, order, report, on_skip, workers)
    for number, chunk in enumerate(_chunks(records, shard_size)):
        name = f"shard-{number:06d}.tar"
        _write_tar(out / name, chunk)
        report.shards.append({"file": name, "samples": len(chunk)})
        if on_shard:
            on_shard(len(chunk))
    if not report.shards:
        out.rmdir()  # nothing half-written: no shards, no folder
        raise UserError(f"no readable images in {source or 'the input'}; nothing written")
    write_atomic(out / INDEX, json.dumps(report.to_dict(source), indent=1))
    return report


def _checked_or_error(raw: bytes | str) -> tuple[str, bytes] | str:
    """checked_image's result, or what was wrong as one line (a string crosses process boundaries)."""
    if isinstance(raw, str):
        return raw
    try:
        return checked_image(raw)
    except Exception as e:  # PIL raises many types for bad files; each one means "skip it"
        return f"{type(e).__name__}: {e}"


def _read_or_error(sample: Sample) -> bytes | str:
    try:
        return sample.read()
    except (OSError, ValueError) as e:  # ValueError: a data set's image cell that holds no image
        return f"{type(e).__name__}: {e}"


def _readable(samples, order, report: WriteReport, on_skip, workers: int) -> Iterator[dict]:
    """Records of the decodable samples, in `order`; decoding checked by `workers` processes,
    a block at a time so memory stays bounded on sets of millions of images."""
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        for start in range(0, len(order), 256 * workers):
            block = order[start : start + 256 * workers]
            raws = [_read_or_error(samples[i]) for i in block]
            checked = pool.map(_checked_or_error, raws, chunksize=16) if pool else map(_checked_or_error, raws)
            for i, result in zip(block, checked):
                s = samples[i]
                if isinstance(result, str):
                    report.skipped.append({"file": s.name, "error": result})
                    if on_skip:
                        on_skip(s.name, result)
                    continue
                ext, data = result
                report.counts[s.label] += 1
                yield {"__key__": sample_key(i, s.stem), ext: data, "cls": s.label}
    finally:
        if pool:
            pool.terminate()


def sample_key(number: int, stem: str) -> str:
    """`000000042` or `000000042_<stem>`; webdataset ends a key at its first dot, so dots become `_`."""
    return f"{number:09d}_{stem.replace('.', '_')}" if stem else f"{number:09d}"


def _chunks(records: Iterator[dict], size: int) -> Iterator[list[dict]]:
    chunk = []
    for r in records:
        chunk.append(r)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _write_tar(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with wds.TarWriter(str(tmp), mtime=int(time.time())) as sink:  # whole seconds: no PAX header per member
        for r in records:
            sink.write(r)
    os.replace(tmp, path)


def read_index(folder: Path) -> dict:
    """The index.json that `mixer data write` put beside its shards."""
    path = Path(folder) / INDEX
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = str(e).splitlines()[0]
        raise UserError(f"{path} is not a readable index ({reason}); rewrite it with `mixer data write`") from None
    missing = {"shards", "num_samples"} - set(index if isinstance(index, dict) else ())
    if missing:
        raise UserError(f"{path} is not an index written by `mixer data write` (no {', '.join(sorted(missing))})")
    return index
