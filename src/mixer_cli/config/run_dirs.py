"""Run directories: one new directory per run (not per rank), its saved config, and resuming from it."""
from __future__ import annotations

import datetime as _dt
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mixer_cli.config.compose import validate
from mixer_cli.core.errors import UserError
from mixer_cli.core.files import write_atomic

# One run directory per run, not per rank. Ranks that Lightning launches inherit rank 0's session
# through this variable; ranks started by SLURM or torchrun derive it from their shared job id.
SESSION_ENV = "MIXER_RUN_SESSION"
_runs_made = 0  # run directories this process asked for; every rank asks in the same order


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


def make_run_dir(cfg: DictConfig, command: str, same_run: Callable[[Path], bool] | None = None) -> Path:
    """runs/<command>/<session>-<name>[-n]: rank 0 creates it, new and empty (never an existing one;
    under SLURM/torchrun the job id names it); the other ranks of the run wait for the same directory.
    A requeued SLURM job gets the directory of the run it continues: one for which `same_run` holds
    (by default: its saved config is `cfg`)."""
    global _runs_made
    root = Path(cfg.run_root) / command
    job = launcher_job_id()
    suffix = f"-{_runs_made}" if _runs_made else ""
    slurm_job = os.environ.get("SLURM_JOB_ID")
    if not is_global_zero_process():
        session = os.environ.get(SESSION_ENV) or job
        if session is None:
            raise UserError("the ranks of this run cannot agree on a run directory: start them with torchrun "
                            "--rdzv-id=ID (or --standalone), under SLURM, or with trainer.devices=N")
        path = _wait_for(root / f"{session}-{cfg.name}{suffix}")
    elif job is not None:
        path = root / f"{job}-{cfg.name}{suffix}"
        path.mkdir(parents=True, exist_ok=True)  # a requeued job continues in its directory
        os.environ[SESSION_ENV] = job
    elif slurm_job:
        # One task: no rank to agree with, but a job may run several commands (or be an interactive
        # session), so the job id alone does not tell the run a requeued job continues.
        session = f"slurm{slurm_job}"
        same_run = same_run or (lambda run_dir: _same_config(run_dir, cfg))
        path = _requeued_run(root, session, cfg.name + suffix, same_run) or _new_dir(root, cfg.name, suffix, session)
    else:
        path = _new_dir(root, cfg.name, suffix, _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    _runs_made += 1
    return path


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
    path = min(runs, key=lambda d: ((d / "results.json").is_file(), -d.stat().st_mtime))
    os.environ[SESSION_ENV] = path.name.removesuffix(f"-{name}")  # for later runs and launched ranks
    return path


def _same_config(run_dir: Path, cfg: DictConfig) -> bool:
    try:
        return OmegaConf.to_container(load_run_config(run_dir)) == OmegaConf.to_container(cfg, resolve=True)
    except UserError:  # no config.yaml yet, or a damaged one: not a run to continue
        return False


def _new_dir(root: Path, name: str, suffix: str, stamp: str) -> Path:
    """A new directory; the first of a process picks a session (`stamp`, or `stamp-k` if another run
    has it) no other run uses, the later ones (sweeps) reuse it with a counter, so launched ranks can follow."""
    root.mkdir(parents=True, exist_ok=True)
    if suffix and os.environ.get(SESSION_ENV):
        path = root / f"{os.environ[SESSION_ENV]}-{name}{suffix}"
        path.mkdir()
        return path
    for k in range(1000):
        session = stamp if k == 0 else f"{stamp}-{k}"
        path = root / f"{session}-{name}{suffix}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        os.environ[SESSION_ENV] = session
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
