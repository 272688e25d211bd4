"""What a shard's samples become, in both ways of reading shards (streamed, data/shards.py; sample by
sample, data/indexed_shards.py, and so Hugging Face rows, data/hf.py): webdataset pipeline stages
from tar members to (image, label), and the handler that skips a corrupt sample.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from functools import partial

import torch
import webdataset as wds

from mixer_cli.core.errors import UserError
from mixer_cli.data.subsets import Selection
from mixer_cli.data.tar_stream import samples_of_tars

log = logging.getLogger(__name__)
IMAGE_KEYS = "jpg;jpeg;png;webp"


class SkipCorrupt:
    """Webdataset error handler: skip the sample (or the rest of a truncated shard), count, log.
    So many failures in a row with no good sample between means the data is broken, not a few
    samples: stop then, rather than let an endless training stream spin without yielding."""

    MAX_IN_A_ROW = 1000

    def __init__(self):
        self.count = 0
        self.in_a_row = 0

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        self.in_a_row += 1
        log.warning("data: skipped corrupt sample #%d in this loader worker: %s", self.count, str(exn)[:200])
        if self.in_a_row >= self.MAX_IN_A_ROW:
            raise UserError(f"{self.in_a_row} corrupt samples in a row, the last: {str(exn)[:200]}; check the shards")
        return True

    def good(self, samples):
        """Pipeline stage after decoding: each sample that got through ends a run of failures."""
        for sample in samples:
            self.in_a_row = 0
            yield sample


def decoded_samples(transform, channels: int, handler: SkipCorrupt, selection: Selection | None = None,
                    num_classes: int | None = None, decoded: bool = True, keys: bool = False, read=samples_of_tars):
    """Pipeline stages: tar streams -> (image, label) pairs, of the samples that `selection` keeps (by
    key, before anything is decoded). The image is decoded to PIL (decoded=False: its bytes, for the
    uint8 and GPU-decode paths) and transformed; the label is `.cls` (one class) or `.labels` (several,
    e.g. "3,17,42" for multi-label data such as JFT-300M), which becomes a multi-hot row. keys=True:
    (image, label, key) triples. `read`: the first stage, shards -> samples (tar files; data/hf.py's
    parquet row groups)."""
    keep = [] if selection is None or selection.everything else [wds.select(lambda s: selection.keeps(s["__key__"]))]
    images = ["pil" if channels == 3 else "pill"] if decoded else []
    return [
        partial(read, handler=handler),
        *keep,
        wds.decode(*images, handler=handler),
        wds.to_tuple(IMAGE_KEYS, "cls;labels", *(["__key__"] if keys else []), handler=handler),
        wds.map_tuple(transform or encoded_bytes, partial(parse_label, num_classes=num_classes), handler=handler),
        handler.good,
    ]


def encoded_bytes(raw: bytes) -> bytes:
    """The GPU-decode path's image: the file's bytes, for the device to decode."""
    return raw


def parse_label(value, num_classes: int | None):
    """`.cls` -> the class index; `.labels` (text of class indices) -> a multi-hot float row."""
    if isinstance(value, int):
        return value
    text = value.decode() if isinstance(value, bytes) else str(value)
    classes = [int(c) for c in text.replace(",", " ").split()]
    if num_classes is None or any(not 0 <= c < num_classes for c in classes):
        raise ValueError(f"labels {text!r} outside 0..{num_classes} (data.num_classes)")
    row = torch.zeros(num_classes)
    row[classes] = 1.0
    return row


class OneAtATime:
    """For a map-style source whose raw samples (dicts of members, as a tar holds them) go through the
    stages one at a time; it has `channels`, `corrupt` (the handler), `num_classes` and `decoded`."""

    _transform = None
    _with_keys = False

    @property
    def transform(self):
        return self._transform

    @transform.setter
    def transform(self, value) -> None:
        """The image's transform (the shuffle experiment wraps it), and so the stages that apply it."""
        self._transform = value
        self._restage()

    @property
    def with_keys(self) -> bool:
        """Samples as (image, label, key): the ReaL labels read the key."""
        return self._with_keys

    @with_keys.setter
    def with_keys(self, value: bool) -> None:
        self._with_keys = value
        self._restage()

    def _restage(self) -> None:
        _, *self.stages = decoded_samples(self._transform, self.channels, self.corrupt, None, self.num_classes,
                                          self.decoded, self._with_keys)

    def staged(self, raw: Iterable[dict]):
        """The sample the stages make of `raw`; None where the handler skipped it."""
        for stage in self.stages:
            raw = stage(raw)
        return next(iter(raw), None)
