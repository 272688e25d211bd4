"""Split a recipe's global batch over devices, with gradient accumulation where needed."""
from __future__ import annotations

import math
from dataclasses import dataclass

from mixer_cli.core.errors import UserError


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    world_size: int
    device_batch: int  # micro-batch each device runs at once
    accumulate: int  # micro-batches per optimiser step

    def describe(self) -> str:
        return (
            f"global batch {self.global_batch} = {self.world_size} device(s) x {self.device_batch}"
            f" x {self.accumulate} accumulation step(s)"
        )


def plan_batches(global_batch: int, world_size: int, max_device_batch: int | None = None) -> BatchPlan:
    if global_batch % world_size:
        raise UserError(
            f"global batch {global_batch} does not split over {world_size} devices; "
            f"use a multiple of {world_size} (data.global_batch=...)"
        )
    share = global_batch // world_size
    accumulate = 1 if not max_device_batch or share <= max_device_batch else math.ceil(share / max_device_batch)
    while share % accumulate:
        accumulate += 1
    return BatchPlan(global_batch, world_size, share // accumulate, accumulate)


def devices_per_node(accelerator: str, devices) -> int:
    """How many devices Lightning will use on each node for `trainer.accelerator` and
    `trainer.devices` (a count, a list or "0,1" string of ids, or "auto"/-1 for all of them)."""
    if isinstance(devices, str) and devices not in ("auto", "-1"):
        ids = [d for d in devices.split(",") if d.strip()]
        return len(ids) if len(ids) > 1 or devices.endswith(",") else int(ids[0])
    if isinstance(devices, int) and devices > 0:
        return devices
    if not isinstance(devices, (str, int)):  # a list of device ids
        return len(devices)
    return _accelerator_class(accelerator).auto_device_count()


def _accelerator_class(name: str):
    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator, MPSAccelerator, XLAAccelerator

    if name == "auto":  # Lightning's own order of preference
        return next((a for a in (XLAAccelerator, CUDAAccelerator, MPSAccelerator) if a.is_available()), CPUAccelerator)
    if name == "gpu":
        return CUDAAccelerator if CUDAAccelerator.is_available() else MPSAccelerator
    return {"cpu": CPUAccelerator, "cuda": CUDAAccelerator, "mps": MPSAccelerator, "tpu": XLAAccelerator,
            "xla": XLAAccelerator}[name]
