"""The device a command that runs outside Lightning (few-shot, benchmark) puts its model on, and
the threads it runs on."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from mixer_cli.core.errors import UserError


def pick_device(name: str) -> torch.device:
    """`auto` (CUDA when torch sees a GPU, else the CPU), `cpu`, `cuda` or `cuda:N` (the schema's
    DEVICE rule checked the name); one line when this machine lacks the device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but torch sees no CUDA GPU here; use device=cpu")
    return device


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `count` (None: left as they are) for the block, then put
    back: a benchmark called in a longer process (the tests, a notebook) must not leave it slower,
    or its float kernels rounding as a different thread count rounds."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
