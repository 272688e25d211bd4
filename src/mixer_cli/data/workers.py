"""DataLoader workers: what each worker of every loader of ours does when it starts.

Workers leave the job's stop signals to the main process (which checkpoints, then ends them; see
train/preemption.py) and seed themselves as Lightning seeds workers."""
from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from functools import partial

from lightning.fabric.utilities.seed import pl_worker_init_function


def worker_init(rank: int | None = None) -> Callable[[int], None]:
    """The worker_init_fn of every DataLoader of ours, made in the process that iterates the loader."""
    return partial(start_worker, main_pid=os.getpid(), rank=rank)


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
