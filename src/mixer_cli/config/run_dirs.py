"""Run directories: one new directory per run (not per rank), its life (`Run`), and resuming from it."""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mixer_cli.config.compose import validate
from mixer_cli.core.errors import UserError
from mixer_cli.core.files import write_atomic
from mixer_cli.core.peers import has_torchrun_peers

# The run directory, for the ranks Lightning launches while a run is open (they inherit rank 0's
# environment); ranks started by SLURM or torchrun derive it from their shared job id instead.
RUN_DIR_ENV = "MIXER_RUN_DIR"
OPEN_RUNS: list[Run] = []  # this process's open runs, innermost last


def is_global_zero_process() -> bool:
    """Rank 0 by the launchers' variables (torchrun: RANK; SLURM: SLURM_PROCID; Lightning: NODE_RANK,
    LOCAL_RANK); true for a plain local start."""
    return all(os.environ.get(v, "0") == "0" for v in ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK"))


def launcher_job_id() -> str | None:
    """The id every rank of a SLURM job of several tasks or a torchrun job shares; None otherwise."""
    if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return f"slurm{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_STEP_ID', '0')}"
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return f"torchrun-{run_id[:8]}"
    return None


def discard_open_runs() -> None:
    """For a process about to end from outside its main thread (another rank failed): its open runs
    left as a failure leaves them."""
    for run in reversed(OPEN_RUNS):
        run.discard()


class Run:
    """The life of a run directory, the same for every command that writes one:

        with Run(cfg, "eval") as run:      # created (rank 0; the other ranks find it), config.yaml saved
            run.write("table.csv", text)   # each file atomically
            run.finish(results)            # results.json last: its presence means the run is complete

    A run that fails is removed, unless it holds a checkpoint (work that can be continued or is
    worth keeping) or was not created by this `Run` (one continued: `path=`, or a requeued job's).
    Only rank 0 writes or removes anything. `record=False` for outputs that are not a config's run
    (a report, a VTAB suite with its own record)."""

    def __init__(self, cfg: DictConfig, command: str, *, path: Path | None = None,
                 same_run: Callable[[Path], bool] | None = None, record: bool = True):
        self.cfg, self.command, self.record = cfg, command, record
        self.path: Path = path  # type: ignore[assignment]  # chosen on entry when None
        self.same_run = same_run
        self.is_main = is_global_zero_process()
        self._publish = path is None
        self._created = False
        self._env_before: str | None = None

    def __enter__(self) -> Run:
        if self.path is None:
            self.path = make_run_dir(self.cfg, self.command, self.same_run)
            self._created = not any(self.path.iterdir())  # not a restarted job's directory
        if self._publish:  # for the ranks Lightning launches inside this run
            self._env_before = os.environ.get(RUN_DIR_ENV)
            os.environ[RUN_DIR_ENV] = str(self.path)
        if self.record and self.is_main and not (self.path / "config.yaml").is_file():
            save_config(self.cfg, self.path)
        OPEN_RUNS.append(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        OPEN_RUNS.remove(self)
        if self._publish:
            if self._env_before is None:
                os.environ.pop(RUN_DIR_ENV, None)
            else:
                os.environ[RUN_DIR_ENV] = self._env_before
        if exc_type is not None:
            self.discard()

    def discard(self) -> None:
        """What a failed run leaves: nothing, unless it holds a checkpoint or was not created here."""
        if self._created and self.is_main and not any(self.path.rglob("*.ckpt")):
            shutil.rmtree(self.path, ignore_errors=True)

    @property
    def continues(self) -> bool:
        """Whether the directory holds a run to continue (its last.ckpt): a resumed or requeued one."""
        return (self.path / "last.ckpt").is_file()

    def write(self, name: str, content: str | bytes) -> None:
        if self.is_main:
            write_atomic(self.path / name, content)

    def finish(self, results: dict | list) -> None:
        """results.json, written last (and atomically): its presence means the run is complete."""
        self.write("results.json", json.dumps(results, indent=2))


def make_run_dir(cfg: DictConfig, command: str, same_run: Callable[[Path], bool] | None = None) -> Path:
    """runs/<command>/<session>-<name>: rank 0 creates it, new and empty (never an existing one;
    under SLURM/torchrun the job id names it); the other ranks of the run wait for the same directory.
    A requeued SLURM job gets the directory of the run it continues: one for which `same_run` holds
    (by default: its saved config is `cfg`)."""
    root = Path(cfg.run_root) / command
    job = launcher_job_id()
    slurm_job = os.environ.get("SLURM_JOB_ID")
    # Every rank of a launch without a shared id refuses, rank 0 included: were it to go on, it would
    # make a directory and then wait for the others in its first collective, for ever.
    if job is None and not os.environ.get(RUN_DIR_ENV) and (has_torchrun_peers() or not is_global_zero_process()):
        raise UserError("the ranks of this run cannot agree on a run directory: start them with torchrun "
                        "--rdzv-id=ID (or --standalone), under SLURM, or with trainer.devices=N")
    if not is_global_zero_process():
        return _wait_for(Path(os.environ[RUN_DIR_ENV]) if os.environ.get(RUN_DIR_ENV) else root / f"{job}-{cfg.name}")
    if job is not None:
        path = root / f"{job}-{cfg.name}"
        path.mkdir(parents=True, exist_ok=True)  # a restarted job continues in its directory
        return path
    if slurm_job:
        # One task: no rank to agree with, but a job may run several commands (or be an interactive
        # session), so the job id alone does not tell the run a requeued job continues.
        session = f"slurm{slurm_job}"
        same_run = same_run or (lambda run_dir: _same_config(run_dir, cfg))
        return _requeued_run(root, session, cfg.name, same_run) or _new_dir(root, cfg.name, session)
    return _new_dir(root, cfg.name, _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))


def _requeued_run(root: Path, session: str, name: str, same_run: Callable[[Path], bool]) -> Path | None:
    """Under a requeued SLURM job (SLURM_RESTART_COUNT >= 1), the directory of the run this command
    started before: one of this job's runs named `name` for which `same_run` holds and that has a
    last.ckpt (fit continues from it) or no results.json (it never finished), the unfinished one
    first; None on a job's first start or when there is none. A finished run with nothing to
    continue from (a few-shot evaluation's) is left as it is."""
    if int(os.environ.get("SLURM_RESTART_COUNT") or 0) < 1:
        return None
    named = re.compile(rf"{re.escape(session)}(-\d+)?-{re.escape(name)}")
    runs = [d for d in root.glob(f"{session}*") if named.fullmatch(d.name) and same_run(d)
            and ((d / "last.ckpt").is_file() or not (d / "results.json").is_file())]
    if not runs:
        return None
    return min(runs, key=lambda d: ((d / "results.json").is_file(), -d.stat().st_mtime))


def _same_config(run_dir: Path, cfg: DictConfig) -> bool:
    try:
        return OmegaConf.to_container(load_run_config(run_dir)) == OmegaConf.to_container(cfg, resolve=True)
    except UserError:  # no config.yaml yet, or a damaged one: not a run to continue
        return False


def _new_dir(root: Path, name: str, stamp: str) -> Path:
    """A new directory <session>-<name>, the session `stamp`, or `stamp-k` if another run has it."""
    root.mkdir(parents=True, exist_ok=True)
    for k in range(1000):
        path = root / f"{stamp if k == 0 else f'{stamp}-{k}'}-{name}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise UserError(f"could not create a new run directory under {root}")


def _wait_for(path: Path, timeout_s: float = 600.0) -> Path:
    deadline = time.monotonic() + timeout_s
    while not path.is_dir():
        if time.monotonic() > deadline:
            raise UserError(f"rank 0 did not create the run directory {path} within {timeout_s:.0f}s")
        time.sleep(0.2)
    return path


def save_config(cfg: DictConfig, run_dir: Path) -> Path:
    path = run_dir / "config.yaml"
    write_atomic(path, OmegaConf.to_yaml(cfg, resolve=True))
    return path


def load_run_config(run_dir: Path) -> DictConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml); pass the folder of an earlier run")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml's and OmegaConf's many error types: the file is damaged
        raise UserError(f"{path} is not a readable config ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, DictConfig) or "name" not in cfg or "trainer" not in cfg:
        raise UserError(f"{path} is not the config.yaml of a training run (no name or trainer)")
    return cfg


def resume_config(run_dir: Path, overrides: list[str]) -> DictConfig:
    """The saved config of an earlier run, with `key=value` overrides (e.g. more epochs)."""
    cfg = load_run_config(run_dir)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    return validate(cfg)
