"""One rank's failure ends the other ranks of a torchrun launch within seconds.

torchrun's agents keep a key-value store for the processes they start (MASTER_ADDR:MASTER_PORT, the
store torch's own process-group set-up joins). A rank that fails writes its one-line reason there
(`tell_peers`); every rank watches for it from a thread (`watch_peers`) and, on seeing it, ends too.
Without this the others waited in their first or next collective until its timeout (30 minutes for
gloo, 10 for NCCL) or, while the process group was still forming, for ever. The store going away
ends a rank as well: the node whose torchrun held it has ended.

Under SLURM, `srun --kill-on-bad-exit=1` does the same (docs/reliability.md).
"""
from __future__ import annotations

import datetime
import os
import threading
import time
from collections.abc import Callable

POLL_SECONDS = 1.0
GONE_AFTER_SECONDS = 10.0  # a store unreachable this long has ended, not hiccuped


def has_torchrun_peers() -> bool:
    """Whether this process is one of several that torchrun started (and so has its agent's store)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _connect():
    from torch.distributed import TCPStore

    return TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                    timeout=datetime.timedelta(seconds=5))


def _failure_key() -> str:
    # per launch attempt: a run torchrun restarts (--max-restarts) must not read the last attempt's failure
    return f"mixer/{os.environ['TORCHELASTIC_RUN_ID']}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/failed"


def tell_peers(reason: str, status: int) -> None:
    """Put this rank's failure where the other ranks look: `status` is the exit status they take."""
    if not has_torchrun_peers():
        return
    try:
        _connect().compare_set(_failure_key(), "", f"{status} rank {os.environ.get('RANK', '?')} failed: {reason}")
    except Exception:  # noqa: BLE001 - the store is gone: the others learn that from their own watch
        pass


def watch_peers(end: Callable[[str, int], None]) -> None:
    """From a daemon thread, call end(reason, status) once another rank has failed (the first failure
    only) or the store has gone; `end` must end the process. Nothing outside a torchrun launch."""
    if has_torchrun_peers():
        threading.Thread(target=_watch, args=(end,), name="mixer-peers", daemon=True).start()


def _watch(end: Callable[[str, int], None]) -> None:
    key, unreachable_since, store = _failure_key(), None, None
    while True:
        try:
            store = store or _connect()
            if store.check([key]):
                status, reason = store.get(key).decode().split(" ", 1)
                end(reason, int(status))
                return
            unreachable_since = None
        except Exception:  # noqa: BLE001 - any failure to reach the store counts the same
            store, unreachable_since = None, unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since > GONE_AFTER_SECONDS:
                address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
                end(f"torchrun's store at {address} is gone: the node that held it has ended", 1)
                return
        time.sleep(POLL_SECONDS)
