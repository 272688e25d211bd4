"""Batch planning, device counting, the learning-rate schedule, optimiser groups, crash-safe checkpoints,
and why our checkpoint-on-a-timer and SIGUSR1 handling are not Lightning's."""
import os
import re
import signal
import time
from contextlib import nullcontext
from datetime import timedelta
from functools import partial

import lightning as L
import pytest
import torch
from fsspec.implementations.local import LocalFileOpener
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from mixer_cli.core.errors import UserError
from mixer_cli.train.batching import devices_per_node, plan_batches
from mixer_cli.train.module import Classifier
from mixer_cli.train.optim import lr_factor, warmup_schedule
from mixer_cli.train.preemption import StepCheckpoint, Stopped


@pytest.mark.parametrize(
    "global_batch,world,cap,expected",
    [
        (4096, 8, None, (512, 1)),  # the paper's pre-training batch on 8 devices
        (4096, 8, 128, (128, 4)),  # 512 per device, at most 128 at once: 4 accumulation steps
        (4096, 64, 256, (64, 1)),
        (512, 1, 96, (64, 8)),  # 512 does not split into micro-batches of 96: the next divisor
    ],
)
def test_global_batch_is_split_over_devices_and_accumulation(global_batch, world, cap, expected):
    plan = plan_batches(global_batch, world, cap)
    assert (plan.device_batch, plan.accumulate) == expected
    assert plan.device_batch * plan.accumulate * world == global_batch


def test_global_batch_that_does_not_split_is_a_clear_error():
    with pytest.raises(UserError, match=r"^global batch 100 does not split over 3 devices; use a multiple of 3"):
        plan_batches(100, 3)


@pytest.mark.parametrize("devices", [2, "3", "0,1", "1,", [0, 2, 3], "auto", -1, 0])
def test_devices_per_node_counts_what_lightnings_trainer_counts(devices):
    try:
        expected = L.Trainer(accelerator="cpu", devices=devices, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False).num_devices
    except (MisconfigurationException, TypeError):  # e.g. device ids on CPUs: refused, as one line
        with pytest.raises(UserError, match=rf"^trainer\.devices={re.escape(str(devices))} on trainer\.accelerator="
                                            r"cpu: `devices` selected with `CPUAccelerator` should be an int > 0"):
            devices_per_node("cpu", devices)
    else:
        assert devices_per_node("cpu", devices) == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_an_accelerator_this_machine_lacks_is_a_clear_error():
    with pytest.raises(UserError, match=r"^trainer\.accelerator=gpu: there is no cuda device on this machine; "
                                        r"use trainer\.accelerator=cpu \(or auto\)$"):
        devices_per_node("gpu", 1)


def test_linear_warmup_then_linear_decay():
    f = [lr_factor(s, total=100, warmup=10, decay="linear") for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # warmup reaches the peak
    assert f[10] == pytest.approx(1.0) and f[55] == pytest.approx(0.5) and f[99] == pytest.approx(1 / 90)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_cosine_decay_after_warmup():
    assert lr_factor(10, total=110, warmup=10, decay="cosine") == pytest.approx(1.0)
    assert lr_factor(60, total=110, warmup=10, decay="cosine") == pytest.approx(0.5)
    assert lr_factor(110, total=110, warmup=10, decay="cosine") == pytest.approx(0.0, abs=1e-12)


def test_warmup_schedule_steps_the_optimisers_lr_by_lr_factor():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    schedule = warmup_schedule(opt, total_steps=8, warmup_steps=3, decay="cosine")
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert seen == pytest.approx([0.5 * lr_factor(s, 8, 3, "cosine") for s in range(8)])


def test_weight_decay_goes_to_kernels_only_and_none_leaves_one_group(tiny_mixer):
    model = tiny_mixer()
    kernels = {name for name, p in model.named_parameters() if p.ndim >= 2}
    names = {id(p): name for name, p in model.named_parameters()}
    assert {"stem.proj.weight", "head.weight"} <= kernels and not {"head.bias", "norm.weight"} & kernels
    for weight_decay, expected in ((0.1, {0.1: kernels, 0.0: set(names.values()) - kernels}),
                                   (0.0, {0.0: set(names.values())})):  # fine-tuning's SGD: no decay
        module = Classifier(model, torch.nn.CrossEntropyLoss(), num_classes=3,
                            optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=weight_decay),
                            scheduler=partial(warmup_schedule, total_steps=8, warmup_steps=1, decay="linear"))
        optimizer = module.configure_optimizers()["optimizer"]
        assert {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups} == expected


def test_interrupted_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    """Lightning writes checkpoints inside an fsspec transaction (temp file, then move); we rely on
    it for "a kill never corrupts a checkpoint", so check it here."""
    io = TorchCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def torn_write(self, data):
        LocalFileOpener_write(self, data[: len(data) // 2])
        raise KeyboardInterrupt  # killed mid-write

    LocalFileOpener_write = LocalFileOpener.write
    monkeypatch.setattr(LocalFileOpener, "write", torn_write)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "weights": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _SavedAfter(Callback):
    """The micro-batch after which each checkpoint was written; a clock at one minute per micro-batch."""

    def __init__(self, clock: list[float]):
        self.clock, self.batch, self.at = clock, None, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.batch, self.clock[0] = batch_idx, 60.0 * (batch_idx + 1)

    def on_save_checkpoint(self, trainer, module, checkpoint):
        self.at.append(self.batch)


@pytest.mark.parametrize("ours", [False, True])
def test_timed_checkpoints_wait_for_the_end_of_an_accumulation_cycle_which_lightnings_do_not(tmp_path, monkeypatch,
                                                                                              ours):
    # Why train/preemption.py keeps StepCheckpoint over ModelCheckpoint(train_time_interval=...): a
    # checkpoint written inside a cycle holds the loader past micro-batches whose gradients it lacks,
    # so the run continued from it is not the run left alone.
    clock = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    saved = _SavedAfter(clock)
    timed = StepCheckpoint(tmp_path, every_n_minutes=2.5) if ours else \
        ModelCheckpoint(tmp_path, train_time_interval=timedelta(minutes=2.5))
    trainer = L.Trainer(accelerator="cpu", max_steps=4, accumulate_grad_batches=2, callbacks=[saved, timed],
                        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(_Tiny(), DataLoader(TensorDataset(torch.randn(16, 2)), batch_size=2))
    assert saved.at == ([3, 7] if ours else [2, 5])  # micro-batch 2 opens the second cycle


class _SignalAt(_SavedAfter):
    """SIGUSR1 to this process after micro-batch `at` (as SLURM warns of the time limit), then as _SavedAfter."""

    def __init__(self, at: int):
        super().__init__([0.0])
        self.signal_at = at

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, module, outputs, batch, batch_idx)
        if batch_idx == self.signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.mark.parametrize("ours", [False, True])
def test_sigusr1_checkpoints_at_the_end_of_the_accumulation_cycle_which_lightnings_slurm_handler_does_not(
        tmp_path, monkeypatch, ours):
    # Why train/preemption.py handles SIGUSR1 itself over SLURMEnvironment(auto_requeue=True): Lightning
    # writes hpc_ckpt_N.ckpt from inside the signal handler, in the middle of the cycle, and trains on.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'requeued'}\n")
    (tmp_path / "bin" / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    for key, value in dict(SLURM_JOB_ID="7", SLURM_JOB_NAME="train", SLURM_NTASKS="1", SLURM_PROCID="0",
                           SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NODELIST="localhost").items():
        monkeypatch.setenv(key, value)
    saved = _SignalAt(2)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, accumulate_grad_batches=2, logger=False,
                        callbacks=[saved, StepCheckpoint(tmp_path)] if ours else [saved],
                        plugins=[] if ours else [SLURMEnvironment(auto_requeue=True)], enable_checkpointing=ours,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(Stopped) if ours else nullcontext() as stop:
        trainer.fit(_Tiny(), DataLoader(TensorDataset(torch.randn(16, 2)), batch_size=2))
    assert (tmp_path / "requeued").read_text() == "requeue 7\n"
    if ours:  # after micro-batch 3, the cycle's end; then the run stops for the requeued job to continue it
        assert saved.at == [3] and stop.value.code == 128 + signal.SIGUSR1 and (tmp_path / "last.ckpt").is_file()
    else:  # after micro-batch 2, inside the cycle; and the run goes on training
        assert saved.at == [2] and trainer.global_step == 4 and (tmp_path / "hpc_ckpt_1.ckpt").is_file()
