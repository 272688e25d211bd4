"""Sweeps (`--multirun`) through Hydra's multirun: each point in its own run directory under one
sweep directory, the sweep table built from those directories, whichever launcher ran the points."""
import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from typer.testing import CliRunner

from mixer_cli.cli import app
from mixer_cli.commands.finetune import with_lr_grid
from mixer_cli.commands.sweep import sweep_points, varying

SHORT = ["trainer.steps=2", "data.global_batch=125", "sched.warmup_steps=1"]


@pytest.fixture(scope="module")
def ckpt(tiny_mixer, write_checkpoint):
    return write_checkpoint(tiny_mixer(num_classes=7, trained=True))


def sweep(root: Path, command: str, *args: str) -> tuple[Path, list[dict]]:
    """Run `mixer COMMAND ARGS --multirun`; the one sweep directory it made and its sweep.csv rows."""
    r = CliRunner().invoke(app, [command, *args, "--multirun", f"run_root={root}"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    (sweep_dir,) = (root / command).iterdir()  # one directory for the whole sweep
    with open(sweep_dir / "sweep.csv") as f:
        return sweep_dir, list(csv.DictReader(f))


def check_points(sweep_dir: Path, rows: list[dict], lrs: list[str], steps: int) -> None:
    """Point i ran in sweep_dir/i with its own lr, and the table row is that directory's results."""
    assert [row["optim.lr"] for row in rows] == lrs
    for i, row in enumerate(rows):
        run = sweep_dir / str(i)
        results = json.loads((run / "results.json").read_text())
        assert row["run_dir"] == results["run_dir"] == str(run)
        assert float(row["top1"]) == results["top1"] and results["steps"] == steps
        assert OmegaConf.load(run / "config.yaml").optim.lr == float(row["optim.lr"])
        assert (run / "last.ckpt").is_file()


def test_varying_keeps_the_swept_overrides_only():
    points = [["recipe=ft_pets", "optim.lr=0.01", "seed=0"], ["recipe=ft_pets", "optim.lr=0.03", "seed=0"],
              ["recipe=ft_pets", "optim.lr=0.01", "seed=1"]]
    assert varying(points[2], points) == {"optim.lr": "0.01", "seed": "1"}


def test_sweep_points_are_the_basic_sweepers():
    """The cartesian product in order of first mention, the last value of a key given twice; ranges expanded."""
    assert sweep_points(["optim.lr=0.1,0.2", "seed=range(0,2)", "recipe=ft_pets", "optim.lr=0.3,0.4"]) == [
        ["optim.lr=0.3", "seed=0", "recipe=ft_pets"], ["optim.lr=0.3", "seed=1", "recipe=ft_pets"],
        ["optim.lr=0.4", "seed=0", "recipe=ft_pets"], ["optim.lr=0.4", "seed=1", "recipe=ft_pets"]]
    assert sweep_points(["data.mean=[0.5]", "+extra='a,b'"]) == [["data.mean=[0.5]", "+extra='a,b'"]]


def test_lr_grid_is_the_targets_unless_the_user_sweeps_lr():
    assert with_lr_grid(["recipe=ft_cifar10", "seed=1"]) == ["recipe=ft_cifar10", "seed=1",
                                                             "optim.lr=0.001,0.003,0.01,0.03"]
    assert with_lr_grid(["recipe=ft_cifar10", "target=imagenet"])[-1] == "optim.lr=0.003,0.01,0.03,0.06"
    assert with_lr_grid([])[-1] == "optim.lr=0.003,0.01,0.03,0.06"  # ft_demo's target: the demo row
    assert with_lr_grid(["recipe=ft_vtab"])[-1] == "optim.lr=0.01"
    assert with_lr_grid(["optim.lr=0.5,1"]) == ["optim.lr=0.5,1"]


@pytest.mark.slow
def test_lr_grid_sweep_through_the_basic_launcher(tmp_path, ckpt):
    """Without optim.lr, `--multirun` sweeps the target's lr grid (ft_demo: the demo row)."""
    sweep_dir, rows = sweep(tmp_path, "finetune", "--from", str(ckpt), *SHORT, "trainer.steps=1")
    assert sweep_dir.name.endswith("-ft_demo-sweep")
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]
    check_points(sweep_dir, rows, ["0.003", "0.01", "0.03", "0.06"], steps=1)
    assert {row["from"] for row in rows} == {str(ckpt)}


@pytest.mark.slow
def test_lr_sweep_through_submitit_local(tmp_path, ckpt):
    """The launcher that runs the points as SLURM jobs (submitit_slurm), here as local processes."""
    sweep_dir, rows = sweep(tmp_path, "finetune", "--from", str(ckpt), "optim.lr=0.01,0.03", *SHORT,
                            "hydra/launcher=submitit_local")
    check_points(sweep_dir, rows, ["0.01", "0.03"], steps=2)
    assert len(list((sweep_dir / ".submitit").glob("*/*_0_log.out"))) == 2  # one job per point


def test_a_sweep_point_may_compose_configs(tmp_path, tiny_run):
    """A point's few-shot probe on another data set (fewshot.data) composes that data config inside
    the job, where Hydra is already running the sweep (one point shows it)."""
    sweep_dir, rows = sweep(tmp_path, "pretrain", *tiny_run, "trainer.steps=1", "data.global_batch=125",
                            "fewshot.every_n_steps=1", "fewshot.data=digits")
    assert len(rows) == 1 and rows[0]["fewshot_5shot"]
    assert "fewshot/5shot" in (sweep_dir / "0" / "metrics.csv").read_text().splitlines()[0]


def test_a_bad_checkpoint_fails_before_the_sweep_starts(tmp_path):
    r = CliRunner().invoke(app, ["finetune", "--from", str(tmp_path / "nope.ckpt"), "--multirun",
                                 f"run_root={tmp_path}"])
    assert r.exit_code == 2
    assert r.output == f"error: checkpoint {tmp_path / 'nope.ckpt'} does not exist\n"
    assert not (tmp_path / "finetune").exists()
