"""Split a recipe's global batch over devices, with gradient accumulation where needed."""
from __future__ import annotations

import math
from dataclasses import dataclass

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.accelerators import AcceleratorRegistry

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


def devices_per_node(accelerator: str, devices, key: str = "trainer") -> int:
    """How many devices the Trainer will use on each node: Lightning's own parsing of `trainer.devices`
    for `trainer.accelerator`, as its Trainer does it. The batch plan needs the count before the Trainer
    exists (the Trainer is built in the run directory, which is made only once everything is checked).
    `key`: the config group the messages name (`eval` for `mixer eval`)."""
    name = accelerator_name(accelerator)
    found = AcceleratorRegistry[name]["accelerator"]
    if not found.is_available():
        raise UserError(f"{key}.accelerator={accelerator}: there is no {name} device on this machine; "
                        f"use {key}.accelerator=cpu (or auto)")
    try:
        count = found.auto_device_count() if devices == "auto" else devices
        return len(found.get_parallel_devices(found.parse_devices(count)))
    except (MisconfigurationException, TypeError, ValueError) as e:
        raise UserError(f"{key}.devices={devices} on {key}.accelerator={accelerator}: {e}") from None


def accelerator_name(name: str) -> str:
    """`auto` and `gpu` resolved as the Trainer resolves them: Lightning's order of preference."""
    def available(n: str) -> bool:
        return AcceleratorRegistry[n]["accelerator"].is_available()

    if name == "auto":
        return next((n for n in ("tpu", "mps", "cuda") if available(n)), "cpu")
    if name == "gpu":
        return "mps" if available("mps") else "cuda"
    return name
