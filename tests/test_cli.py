"""`mixer pretrain` end to end, as a user runs it (subprocess), on the bundled demo data."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch
import typer
from typer.testing import CliRunner

from mixer_cli.cli import app
from mixer_cli.models import load_mixer

SHORT = ["data.global_batch=1000", "sched.warmup_steps=2"]  # 4 steps per epoch over the 4,000 demo images


def mixer(*args, cwd):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "mixer_cli.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_pretrain_writes_a_complete_run_directory_and_resumes(tmp_path, tiny_run):
    r = mixer("pretrain", *tiny_run, *SHORT, "trainer.epochs=1", f"run_root={tmp_path}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (run,) = (tmp_path / "pretrain").iterdir()
    assert {"config.yaml", "metrics.csv", "last.ckpt", "best.ckpt", "results.json", "curves.png"} <= {
        p.name for p in run.iterdir()}
    assert not list(run.glob(".*tmp"))
    results = json.loads((run / "results.json").read_text())
    assert results["command"] == "pretrain" and results["name"] == "demo" and results["run_dir"] == str(run)
    assert results["steps"] == 4 and results["devices"] == 1 and results["num_samples"] == 1000
    assert 0.0 <= results["top1"] <= results["top5"] <= 1.0
    assert results["parameters"] == sum(p.numel() for p in load_mixer(run / "last.ckpt").parameters())
    assert results["device_hours"] == pytest.approx(results["train_seconds"] / 3600, abs=1e-4)
    assert "Run summary" in r.stdout

    # The checkpoint describes its model and preprocessing: loading needs no guessing.
    model = load_mixer(run / "last.ckpt")
    assert (model.spec.hidden_dim, model.spec.img_size, model.spec.in_chans) == (16, 28, 1)  # tiny_run's width
    assert tuple(model.pretrained_cfg["mean"]) == (0.1307,) and tuple(model.pretrained_cfg["input_size"]) == (1, 28, 28)
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)

    r = mixer("pretrain", "--resume", str(run), "trainer.epochs=2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((run / "results.json").read_text())["steps"] == 8
    with open(run / "metrics.csv") as f:
        epochs = [row["epoch"] for row in csv.DictReader(f) if row.get("val/top1")]
    assert epochs == ["0", "1"]  # the resumed run appended to the first run's log, one evaluation per epoch
    assert len(list((tmp_path / "pretrain").iterdir())) == 1


def test_a_global_batch_that_does_not_split_over_the_devices_ends_in_one_line_and_writes_nothing(tmp_path):
    # the batch plan is made before the run directory (other user mistakes: tests/test_bad_inputs.py)
    args = ["data.global_batch=100", "trainer.devices=3", "trainer.accelerator=cpu", f"run_root={tmp_path}"]
    r = CliRunner().invoke(app, ["pretrain", *args])
    assert r.exit_code == 2 and (r.exception is None or isinstance(r.exception, SystemExit))  # no traceback
    assert r.stderr == ("error: global batch 100 does not split over 3 devices; "
                        "use a multiple of 3 (data.global_batch=...)\n")
    assert not list(tmp_path.glob("pretrain/*"))



@pytest.mark.parametrize("group", [[], ["data"]])
def test_help_lists_one_line_per_command(group):
    # each command's line is its short_help, never its docstring wrapped mid-sentence onto more lines
    r = CliRunner().invoke(app, [*group, "--help"], env={"COLUMNS": "100", "TERM": "dumb"})
    assert r.exit_code == 0
    panel = [line for line in r.stdout.split("Commands")[1].splitlines() if line.startswith("│")]
    rows = [line.strip("│ ").split(maxsplit=1) for line in panel]
    command = typer.main.get_command(app)
    names = command.commands[group[0]].commands if group else command.commands
    assert sorted(row[0] for row in rows) == sorted(names)
    assert all(len(row) == 2 and row[1].endswith(".") for row in rows), panel


def test_main_pauses_garbage_collection_for_the_imports_and_a_command_runs_with_it_frozen(monkeypatch):
    # `mixer` pauses collection while torch, Lightning and timm load, then freezes what they left,
    # so the run collects only its own objects (docs/benchmark.md); in-process callers keep theirs
    import gc

    from mixer_cli import cli

    seen = []
    command = cli.user_errors(lambda: seen.append((gc.isenabled(), gc.get_freeze_count())))
    before = gc.get_freeze_count()
    command()
    assert seen == [(True, before)]  # called in-process (CliRunner, the tests): nothing frozen

    def typer_app(prog_name):
        seen.append(gc.isenabled())
        command()

    monkeypatch.setattr(cli, "app", typer_app)
    try:
        cli.main()
    finally:
        gc.unfreeze()
        gc.enable()
    assert seen[1] is False
    assert seen[2][0] is True and seen[2][1] > before + 10_000  # torch's, Lightning's objects frozen
