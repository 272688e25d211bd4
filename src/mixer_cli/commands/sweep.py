"""Sweeps (`--multirun`) through Hydra's own multirun: Hydra's sweeper expands `a=1,2,3` overrides
and its launcher runs the points, one after another (the basic launcher) or as parallel jobs
(`hydra/launcher=submitit_slurm`, or `submitit_local` on one machine). Each point runs in its own
run directory inside the sweep's; the table is built from those directories when the sweep ends,
so it is the same whichever launcher ran the points.
"""
from __future__ import annotations

import datetime as dt
import itertools
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig
from rich.table import Table

from mixer_cli.config.compose import compose, hydra_overrides, validate
from mixer_cli.core.console import console
from mixer_cli.core.errors import UserError
from mixer_cli.core.files import csv_text, package_root, write_atomic


def run_point(cfg: DictConfig, run: Callable[[DictConfig, Path], dict]) -> dict:
    """One point of the sweep: `run(cfg, run_dir)` in the run directory Hydra made for it."""
    return run(validate(cfg), Path(HydraConfig.get().runtime.output_dir))


def multirun(command: str, config_name: str, overrides: list[str],
             run: Callable[[DictConfig, Path], dict]) -> list[dict]:
    """Run the sweep the overrides describe, each point by `run(cfg, run_dir)` (a module-level function: a
    launcher may pickle it); returns the points' results, in order."""
    check_points(config_name, overrides)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    settings = [
        f"hydra.sweep.dir=${{run_root}}/{command}/{stamp}-${{name}}-sweep",
        "hydra.sweep.subdir=${hydra.job.num}",
        "hydra.output_subdir=null",  # each run saves its own resolved config.yaml
        "hydra/job_logging=none",
        "hydra/hydra_logging=none",
    ]
    with initialize_config_dir(config_dir=str(package_root() / "conf"), version_base="1.3", job_name=command):
        batches = GlobalHydra.instance().hydra.multirun(
            config_name=config_name, task_function=partial(run_point, run=run),
            overrides=[*hydra_overrides(overrides), *settings], with_log_configuration=False,
        )
    jobs = [job for batch in batches for job in batch]
    points = [job.overrides for job in jobs]
    rows = [{**varying(job.overrides, points), **read_results(Path(job.hydra_cfg.hydra.runtime.output_dir))}
            for job in jobs]
    sweep_dir = Path(jobs[0].hydra_cfg.hydra.runtime.output_dir).parent
    write_atomic(sweep_dir / "sweep.csv", csv_text(rows))
    print_sweep(rows, list(varying(points[0], points)), sweep_dir)
    return rows


def check_points(config_name: str, overrides: list[str]) -> None:
    """Compose (and so validate) every point of the sweep before any runs: a bad value in the last
    point should not cost the first ones' training."""
    for point in sweep_points(overrides):
        compose(point, config_name)


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """The points Hydra's basic sweeper runs, in its order: the cartesian product of each key's
    values, keys in order of first mention, a key given twice taking its last value."""
    try:
        choices = {o.get_key_element(): override_values(o) for o in OverridesParser.create().parse_overrides(overrides)}
    except HydraException as e:  # a syntax error; a glob(), which needs Hydra's running sweeper
        raise UserError(f"bad sweep override: {str(e).splitlines()[0]}") from None
    return [list(point) for point in itertools.product(*choices.values())]


def override_values(override: Override) -> list[str]:
    """`key=value` for each value the override takes (one unless it sweeps)."""
    key = override.get_key_element()
    if not override.is_sweep_override():
        return [f"{key}={override.get_value_element_as_str()}"]
    if not override.is_discrete_sweep():  # interval(a,b): a sweeper that samples, not the basic one
        raise UserError(f"bad sweep override: BasicSweeper does not support sweep type : {override.value_type.name}")
    return [f"{key}={value}" for value in override.sweep_string_iterator()]


def read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def varying(point: list[str], points: list[list[str]]) -> dict[str, str]:
    """The overrides of `point` whose value differs across the sweep, as {key: value}."""
    keys = {}
    for i, override in enumerate(point):
        if any(p[i] != override for p in points):
            key, _, value = override.partition("=")
            keys[key] = value
    return keys


def best_point(rows: list[dict]) -> int:
    """The point a sweep picks: the best dev top-1 where the runs held out a dev split (the paper's
    protocol), else the best test top-1."""
    key = "dev_top1" if all(r.get("dev_top1") is not None for r in rows) else "top1"
    return max(range(len(rows)), key=lambda i: rows[i].get(key) or 0.0)


def print_sweep(rows: list[dict], keys: list[str], sweep_dir: Path) -> None:
    """One row per run: the swept values, then its results; the picked point in green."""
    best = best_point(rows)
    dev = rows[0].get("dev_top1") is not None
    table = Table(title=f"Sweep: {len(rows)} runs ({sweep_dir})", title_style="bold",
                  caption=f"picked (green): the best {'dev' if dev else 'test'} top-1"
                  + ("" if dev else "; hold out a dev split with data.dev_fraction to pick as the paper does"))
    for k in keys:
        table.add_column(k, style="cyan")
    for k in (*(("dev top-1",) if dev else ()), "test top-1", "test top-5", "train loss", "steps", "run dir"):
        table.add_column(k, justify="right" if k != "run dir" else "left")
    for i, r in enumerate(rows):
        shown = ("dev_top1", "top1", "top5") if dev else ("top1", "top5")
        pct = [f"{100 * r[k]:.2f}%" if r.get(k) is not None else "-" for k in shown]
        loss = f"{r['train_loss']:.4g}" if r.get("train_loss") is not None else "-"
        cells = [*(r[k] for k in keys), *pct, loss, f"{r['steps']:,}", r["run_dir"]]
        table.add_row(*cells, style="bold green" if i == best else None)
    console.print(table)
