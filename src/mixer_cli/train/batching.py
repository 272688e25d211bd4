"""Split a recipe's global batch over devices, with gradient accumulation where needed."""
from __future__ import annotations

import math
from dataclasses import dataclass

from mixer_cli.errors import UserError


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
