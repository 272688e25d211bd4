"""Whether a launch can run, decided before a run directory exists or a process starts.

Lightning finds some impossible launches only once it has started (FSDP on a CPU, a strategy whose
package is missing) and others never: a count of nodes that no launcher provides waits forever for
them. Here the `trainer` config is checked against Lightning's own rules and against the launcher's
environment (SLURM, torchrun), so such a launch ends at once with one line. Every rank reads the
same config and the same launcher variables, so every rank takes the same decision.
"""
from __future__ import annotations

import os
import warnings

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig

from mixer_cli.core.errors import UserError
from mixer_cli.train.batching import accelerator_name, devices_per_node
from mixer_cli.train.trainer import build_strategy

LAUNCH_DOCS = "docs/reliability.md, 'Launching on several nodes'"


def check_launch(t: DictConfig, key: str = "trainer") -> int:
    """The number of processes the `trainer` config (or `mixer eval`'s `eval` config, `key`) runs
    (devices per node x nodes), once it is known that they can run here; else a UserError naming the
    key to change. `auto` precision and compile are settled first, in place, so config.yaml records
    what ran."""
    settle_auto(t)
    per_node = devices_per_node(t.accelerator, t.devices, key)
    check_lightning_accepts(t, key)
    check_nodes(t, per_node, key)
    return per_node * t.num_nodes


def settle_auto(t: DictConfig) -> None:
    """trainer.precision=auto and trainer.compile=auto for the device the Trainer picks: bf16 autocast
    (fp16 with loss scaling on a GPU without bf16) and torch.compile on a CUDA GPU, where eager fp32
    leaves most of its matmul peak unused (docs/benchmark.md); fp32 and eager elsewhere: a CPU without
    bf16 instructions runs bf16 slower than fp32, and compiling gains nothing there."""
    on_cuda = accelerator_name(t.accelerator) == "cuda"
    if t.precision == "auto":
        t.precision = ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed") if on_cuda else "32-true"
    if t.get("compile") == "auto":
        t.compile = on_cuda


def check_lightning_accepts(t: DictConfig, key: str) -> None:
    """Lightning's checks of accelerator, devices, strategy and precision together, done by building a
    Trainer of them: it starts nothing and writes nothing."""
    strategy = build_strategy(t) if "strategy" in t else "auto"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            L.Trainer(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
                      precision=t.precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    except (MisconfigurationException, ValueError, TypeError, RuntimeError, ImportError) as e:
        reason = " ".join(str(e).split())
        launch = f"devices={t.devices}, precision={t.precision}"
        if "strategy" not in t:
            raise UserError(f"{key}.accelerator={t.accelerator} cannot run ({launch}): {reason}") from None
        named = t.strategy if isinstance(t.strategy, str) else t.strategy["_target_"].rsplit(".", 1)[-1]
        raise UserError(f"{key}.strategy={named} cannot run with {key}.accelerator={t.accelerator} ({launch}): "
                        f"{reason}") from None


def check_nodes(t: DictConfig, per_node: int, key: str) -> None:
    """trainer.devices and trainer.num_nodes against what the launcher started: SLURM's tasks and
    nodes, torchrun's WORLD_SIZE; with no launcher, a single node (no one would start the others).
    The trainer group's advice names its launcher configs; `mixer eval` has none."""
    world, training = per_node * t.num_nodes, key == "trainer"
    processes = f"{key}.devices={t.devices} x {key}.num_nodes={t.num_nodes} = {world} processes"
    if SLURMEnvironment.detect():
        nodes, tasks = int(os.environ.get("SLURM_NNODES", "1")), int(os.environ["SLURM_NTASKS"])
        if t.num_nodes != nodes:
            advice = "use trainer=slurm (it reads SLURM_NNODES) or" if training else "set"
            raise UserError(f"{key}.num_nodes={t.num_nodes}, but this SLURM job has {nodes} node(s): "
                            f"{advice} {key}.num_nodes={nodes}")
        if world != tasks:
            raise UserError(f"{processes}, but SLURM started {tasks} tasks: one task per device "
                            "(--ntasks-per-node=devices)")
    elif TorchElasticEnvironment.detect():
        started = int(os.environ["WORLD_SIZE"])
        if world != started:
            advice = ("use trainer=torchrun (it reads torchrun's sizes)" if training
                      else "set eval.devices to torchrun's --nproc-per-node, eval.num_nodes to its --nnodes")
            raise UserError(f"{processes}, but torchrun started {started}: {advice}")
    elif t.num_nodes > 1:
        launchers = "SLURM (trainer=slurm) or torchrun (trainer=torchrun)" if training else "SLURM or torchrun"
        raise UserError(f"{key}.num_nodes={t.num_nodes}, but no launcher started the other nodes: run every "
                        f"node under {launchers}; see {LAUNCH_DOCS}")
