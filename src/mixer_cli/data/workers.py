"""DataLoader workers: what each worker of every loader of ours does when it starts.

Workers leave the job's stop signals to the main process (which checkpoints, then ends them; see
train/preemption.py) and seed themselves as Lightning seeds workers."""
from __future__ import annotations

import multiprocessing.context
import os
import signal
import threading
from functools import partial

from lightning.fabric.utilities.seed import pl_worker_init_function


def worker_options(num_workers: int, rank: int | None = None) -> dict:
    """DataLoader keywords for every loader of ours, made in the process that iterates the loader: its
    workers, their start (worker_init_fn) and, where the sender of a signal can be known, the context
    that starts them with SIGTERM blocked (SigtermBlockedForks; torch takes a context only with workers)."""
    options = {"num_workers": num_workers, "worker_init_fn": partial(start_worker, main_pid=os.getpid(), rank=rank)}
    if num_workers > 0 and hasattr(signal, "sigwaitinfo"):
        options["multiprocessing_context"] = SIGTERM_BLOCKED_FORKS
    return options


class SigtermBlockedProcess(multiprocessing.context.ForkProcess):
    """A process forked with SIGTERM blocked, so that every thread a loader worker starts inherits the
    block, those it starts before its worker_init_fn runs included (torch's thread pool, as the worker
    sets its thread count). A job's SIGTERM that reached such a thread met torch's worker handler,
    which ends a worker unless the main process sent it: under torchrun, whose launcher passes SIGTERM
    on to the whole process group, it killed a worker, and so the run, before the step checkpoint.
    Blocked everywhere, it reaches the worker's waiting thread only (leave_stop_signals_to). Only our
    loaders' workers start so: other children of the process (a multiprocessing Pool's) keep SIGTERM."""

    def start(self) -> None:
        before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)


class SigtermBlockedForks(multiprocessing.context.ForkContext):
    Process = SigtermBlockedProcess


SIGTERM_BLOCKED_FORKS = SigtermBlockedForks()


def start_worker(worker_id: int, main_pid: int, rank: int | None) -> None:
    """A loader worker's start: it leaves the stop signals to the main process, then seeds itself as
    Lightning seeds the workers of a loader that has no worker_init_fn of its own."""
    leave_stop_signals_to(main_pid)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        pl_worker_init_function(worker_id, rank=rank)


def leave_stop_signals_to(main_pid: int) -> None:
    """Run in a DataLoader worker: the stop signals that reach it are the job's, not its own.

    A pre-emption, `scancel`, `timeout` or Ctrl+C signals every process of the job, loader workers
    included. A worker that died of it would fail the main process's next batch, or its evaluation,
    before the step checkpoint is written; the main process stops the workers itself once it is.
    SIGTERM from the main process is still the end torch means by it (it terminates a worker that does
    not stop when told, and at exit): a thread takes SIGTERM with its sender and ends the worker only
    when the main process sent it, as torch's own worker handler does. Where the sender cannot be
    known (macOS has no sigwaitinfo), the worker keeps torch's handling."""
    if not hasattr(signal, "sigwaitinfo"):
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started after this inherit it
    threading.Thread(target=_end_on_sigterm_from, args=(main_pid,), name="sigterm", daemon=True).start()


def _end_on_sigterm_from(main_pid: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != main_pid:
        pass
    os._exit(0)
