"""Stopping a run so that it can continue exactly: pre-emption signals, checkpoints inside an epoch,
and the random state.

A cluster ends a job with a signal: SLURM sends SIGUSR1 some time before the time limit (when asked
with `sbatch --signal=USR1@90`) and SIGTERM when it pre-empts or cancels; a user presses Ctrl+C
(SIGINT). On any of them the run finishes the optimiser step it is in (never stopping inside a
gradient-accumulation cycle, whose gradients no checkpoint holds), writes run_dir/last.ckpt, says how
to continue and exits with status 128 + the signal's number, as a shell reports a process that a
signal ended: 143 (SIGTERM), 130 (SIGINT), 138 (SIGUSR1). A second Ctrl+C stops at once. Under SLURM,
SIGUSR1 also requeues the job; the requeued job (SLURM_RESTART_COUNT >= 1) finds its run directory
(named after the job id; see config/run_dirs.py) and continues from its last.ckpt.

Lightning's own handling does not do this: its SIGTERM handler ends the loop after any micro-batch
and saves nothing, and its SLURM handler (`SLURMEnvironment(auto_requeue=True)`) writes
hpc_ckpt_N.ckpt from inside the signal handler, in the middle of a step, and trains on
(tests/test_train.py shows it). Ours replace both from Lightning's sanity check to the end of the training loop,
and during the final evaluation; Lightning restores them after.

A continued run is the run left alone because the checkpoint holds all it depends on: weights,
optimiser, schedule and loop position (Lightning), the training loader's position (torchdata's
StatefulDataLoader, see train/datamodule.py) and the random generators (`RandomState`). Augmentation,
mixup and dropout draw from generators seeded by the sample or the step (data/order.py,
train/draws.py), except a shard stream's, which draws from its loader workers' generators, kept in the
loader's state.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, Checkpoint

from mixer_cli.data.shards import rng_states, set_rng_states

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Stopped(SystemExit):
    """The run stopped on a signal after writing its resumable checkpoint; the code is 128 + the signal."""


class StepCheckpoint(Checkpoint):
    """Writes dirpath/last.ckpt between optimiser steps: every `every_n_steps` steps, every `every_n_minutes`
    of training (None: never), and on a stop signal, before the run exits.

    Lightning's ModelCheckpoint has both periods (every_n_train_steps, train_time_interval), but one
    callback takes only one of them, and its timer may fire inside a gradient-accumulation cycle: the
    checkpoint then holds the loader past micro-batches whose gradients it lacks, and the continued run
    is not the run left alone (tests/test_train.py shows it).
    As a `Checkpoint` it runs after the other callbacks of a step (Lightning orders them so), so what
    they did at this step is in the checkpoint."""

    def __init__(self, dirpath: str | Path, every_n_steps: int | None = None, every_n_minutes: float | None = None):
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_steps, self.every_n_minutes = every_n_steps, every_n_minutes
        self.received: int | None = None
        self._previous_handlers: dict = {}
        self._step = -1
        self._saved_at = 0.0

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._take_signals()  # from here Lightning's SIGTERM handler would end the run with exit status 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._step, self._saved_at = trainer.global_step, time.monotonic()
        self._take_signals()  # a signal since the sanity check stops the run after its first step

    def on_test_start(self, trainer, pl_module) -> None:
        # The final evaluation (the test loop, after training) runs to its end whatever arrives (a second
        # Ctrl+C aside): it is short, and its numbers are what the run was for. Lightning's SIGTERM
        # handler would end it with exit status 0 and no results.
        self._take_signals()

    def on_test_end(self, trainer, pl_module) -> None:
        self._restore_handlers()

    def _take_signals(self) -> None:
        if not self._previous_handlers and threading.current_thread() is threading.main_thread():  # Python's rule
            self._previous_handlers = {s: signal.signal(s, self._receive) for s in STOP_SIGNALS}

    def _receive(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # a second Ctrl+C: the user does not want to wait for the step
        self.received = signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step:
            return  # inside a gradient-accumulation cycle
        self._step = trainer.global_step
        # Every rank must stop at the same step, or the others wait forever in the next collective.
        stop = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        if stop or self._due(trainer):
            trainer.save_checkpoint(self.path, weights_only=False)
            self._saved_at = time.monotonic()
        if stop:
            self._exit(trainer)

    def _due(self, trainer) -> bool:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            return True
        if not self.every_n_minutes:
            return False
        late = time.monotonic() - self._saved_at >= 60 * self.every_n_minutes
        return trainer.strategy.reduce_boolean_decision(late, all=False)  # the ranks' clocks may disagree

    def _exit(self, trainer) -> None:
        signum = self.received or signal.SIGTERM  # on a rank that did not get it: as if pre-empted
        if trainer.is_global_zero:
            name = signal.Signals(signum).name
            job = requeue_slurm_job() if signum == signal.SIGUSR1 else None
            then = (f"SLURM requeued job {job}, which continues from it" if job else
                    f"continue with --resume {self.path.parent}")
            print(f"stopped by {name} after step {trainer.global_step} (epoch {trainer.current_epoch}); "
                  f"{self.path} holds it; {then}", file=sys.stderr, flush=True)
        raise Stopped(128 + signum)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handlers()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}
        self.received = None


def requeue_slurm_job() -> str | None:
    """Put this SLURM job back in the queue, as Lightning's SLURM environment does on SIGUSR1; the job
    id, or None outside a SLURM batch job or when scontrol fails. Lightning's detection wants
    SLURM_NTASKS, which a one-task job submitted without --ntasks lacks; its test for an interactive
    session (a job named bash or interactive) is kept."""
    env = os.environ
    if not env.get("SLURM_JOB_ID") or SLURMEnvironment.job_name() in ("bash", "interactive"):
        return None
    array = env.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{env['SLURM_ARRAY_TASK_ID']}" if array else env["SLURM_JOB_ID"]
    try:
        return job if subprocess.call(["scontrol", "requeue", job]) == 0 else None
    except OSError:  # no scontrol on this node
        return None


class RandomState(Callback):
    """The random generators of every rank in each checkpoint, set again when training continues.

    They are set at the start of the training loop, not when the checkpoint is read: building the
    loaders draws from them, and the run being continued had made those draws before it saved. A run
    continued on another number of devices cannot draw as before and keeps its fresh generators."""

    def __init__(self):
        self._loaded: list[dict] | None = None

    def state_dict(self) -> dict:
        return {"ranks": every_rank(rng_states())}  # ranks differ: each augments other images

    def load_state_dict(self, state_dict: dict) -> None:
        self._loaded = state_dict["ranks"]

    def on_train_start(self, trainer, pl_module) -> None:
        if self._loaded is not None and len(self._loaded) == trainer.world_size:
            set_rng_states(self._loaded[trainer.global_rank])
        self._loaded = None


def every_rank(obj) -> list:
    """[rank 0's obj, rank 1's obj, ...]; every rank must call it (Lightning saves checkpoints on all ranks)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
