"""Compose and validate configs (Hydra), and create run directories.

`recipe=NAME` on the command line selects recipes/NAME.yaml, a Hydra config that picks the
groups of conf/ and sets the paper's hyper-parameters; `key=value` overrides follow Hydra's grammar.
"""
from __future__ import annotations

import datetime as _dt
import os
import re
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mixer_cli.errors import UserError
from mixer_cli.schema import check_config


def package_root() -> Path:
    """The folder holding conf/ and recipes/: the package in a wheel, the repository otherwise."""
    here = Path(__file__).resolve().parent
    for root in (here, here.parents[1]):
        if (root / "conf").is_dir() and (root / "recipes").is_dir():
            return root
    raise RuntimeError(f"conf/ and recipes/ not found near {here}")


def recipe_names() -> list[str]:
    return sorted(p.stem for p in (package_root() / "recipes").glob("*.yaml"))


def _to_hydra(override: str) -> str:
    # The recipe group lives in recipes/ (beside conf/), so Hydra knows it as `recipes`.
    return re.sub(r"^recipe=", "recipes=", override)


def hydra_overrides(overrides: list[str]) -> list[str]:
    """The user's overrides in Hydra's terms, with recipes/ on the search path."""
    return [f"hydra.searchpath=[file://{package_root()}]", *map(_to_hydra, overrides)]


def hydra_on_conf(root: Path):
    """Hydra looking at conf/: a new one, or the one a sweep's job (train/sweep.py) already runs in."""
    if GlobalHydra.instance().is_initialized():
        return nullcontext()
    return initialize_config_dir(config_dir=str(root / "conf"), version_base=None)


def compose(overrides: list[str] = (), config_name: str = "config", resolve: bool = True) -> DictConfig:
    """The resolved, validated config for `config_name` (conf/<name>.yaml) with the user's overrides.
    resolve=False keeps interpolations and ??? values (for listing recipes without their data)."""
    root = package_root()
    _check_recipe(overrides, config_name)
    try:
        with hydra_on_conf(root):
            cfg = hydra_compose(config_name=config_name, overrides=hydra_overrides(overrides))
    except MissingConfigException as e:
        raise UserError(_missing_option_message(str(e))) from None
    except HydraException as e:
        raise UserError(_override_message(str(e), root, config_name)) from None
    return validate(cfg) if resolve else cfg


def validate(cfg: DictConfig) -> DictConfig:
    """Resolve interpolations and check that every required value is set and of the right kind."""
    check_table_choice(cfg, "target", "targets", "fine-tuning target")
    check_table_choice(cfg, "subset", "subsets", "subset")
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise UserError(f"bad config value: {str(e).splitlines()[0]}") from None
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise UserError(f"config value(s) {', '.join(sorted(missing))} must be set, e.g. {sorted(missing)[0]}=...")
    check_config(cfg)
    return cfg


def check_table_choice(cfg: DictConfig, key: str, table: str, what: str) -> None:
    """A key that names a row of a table in the config (target -> targets) must name one."""
    if key in cfg and table in cfg and cfg[key] not in cfg[table]:
        raise UserError(f"unknown {what} {cfg[key]!r}; {table}: {', '.join(map(str, cfg[table]))}")


def resume_config(run_dir: Path, overrides: list[str]) -> DictConfig:
    """The saved config of an earlier run, with `key=value` overrides (e.g. more epochs)."""
    cfg = load_run_config(run_dir)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    return validate(cfg)


# A recipe's name says which command runs it: ft_* fine-tune a checkpoint, shuffle_* are Figure 4
# experiments, the others pre-train from scratch.
RECIPE_COMMANDS = {
    "ft_": ("finetune", "mixer finetune --from CKPT"),
    "shuffle_": ("shuffle", "mixer shuffle-experiment"),
}
PRETRAIN = ("config", "mixer pretrain")


def recipe_command(name: str) -> tuple[str, str]:
    """(primary config, command line) of the command that runs recipe `name`."""
    return next((cmd for prefix, cmd in RECIPE_COMMANDS.items() if name.startswith(prefix)), PRETRAIN)


def _check_recipe(overrides, config_name: str) -> None:
    for o in overrides:
        if o.startswith("recipe="):
            name = o.split("=", 1)[1]
            if name not in recipe_names():
                raise UserError(f"unknown recipe {name!r}; recipes: {', '.join(recipe_names())} (see `mixer recipes`)")
            wanted, command = recipe_command(name)
            if wanted != config_name:
                fits = ", ".join(n for n in recipe_names() if recipe_command(n)[0] == config_name)
                raise UserError(f"{name} is a recipe for `{command} recipe={name}`; recipes of this command: {fits}")


def _missing_option_message(msg: str) -> str:
    m = re.search(r"Could not find '([^/']+)/([^']+)'", msg)
    options = re.findall(r"^\t(\S+)$", msg.split("Config search path")[0], flags=re.M)
    if m:
        group = "recipe" if m.group(1) == "recipes" else m.group(1)
        return f"unknown {group} {m.group(2)!r}; choose one of: {', '.join(options)}"
    return msg.splitlines()[0]


def _override_message(msg: str, root: Path, config_name: str) -> str:
    if msg.startswith("Ambiguous value for argument"):
        return "these overrides list several values (a sweep): add --multirun"
    m = re.search(r"Could not override '([^']+)'", msg)
    if not m:
        return f"bad override: {msg.splitlines()[0]}"
    key = m.group(1)
    parent, _, leaf = key.rpartition(".")
    with hydra_on_conf(root):
        base = hydra_compose(config_name=config_name, overrides=[f"hydra.searchpath=[file://{root}]"])
    node = OmegaConf.select(base, parent) if parent else base
    if isinstance(node, DictConfig):
        where = f"under '{parent}'" if parent else "at the top level"
        keys = ", ".join(k for k in node.keys() if not str(k).startswith("_"))  # not _target_, _partial_
        return f"unknown config key '{key}'; keys {where}: {keys} (or add one with +{key}=...)"
    return f"unknown config key '{key}'"


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


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write a file so that readers see the old content or the new, never half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: ranks may write the same file
    tmp.write_bytes(content) if isinstance(content, bytes) else tmp.write_text(content)
    os.replace(tmp, path)
