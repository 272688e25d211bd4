"""`mixer pretrain` end to end, as a user runs it (subprocess), on the bundled demo data."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from mixer_cli.cli import app
from mixer_cli.models import load_mixer

TINY = [
    "model.hidden_dim=32", "model.num_blocks=1", "model.tokens_mlp_dim=16", "model.channels_mlp_dim=64",
    "data.global_batch=1000", "sched.warmup_steps=2",  # 4 steps per epoch over the 4,000 demo images
]


def mixer(*args, cwd):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "mixer_cli.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_pretrain_writes_a_complete_run_directory_and_resumes(tmp_path):
    r = mixer("pretrain", *TINY, "trainer.epochs=1", f"run_root={tmp_path}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (run,) = (tmp_path / "pretrain").iterdir()
    assert {"config.yaml", "metrics.csv", "last.ckpt", "best.ckpt", "results.json", "curves.png"} <= {
        p.name for p in run.iterdir()}
    assert not list(run.glob(".*tmp"))
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 4 and 0.0 <= results["test_top1"] <= 1.0
    assert "Run summary" in r.stdout

    # The checkpoint describes its model and preprocessing: loading needs no guessing.
    model = load_mixer(run / "last.ckpt")
    assert (model.spec.hidden_dim, model.spec.img_size, model.spec.in_chans) == (32, 28, 1)
    assert model.preprocess["mean"] == [0.1307]
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)

    r = mixer("pretrain", "--resume", str(run), "trainer.epochs=2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((run / "results.json").read_text())["steps"] == 8
    with open(run / "metrics.csv") as f:
        epochs = {row["epoch"] for row in csv.DictReader(f) if row.get("val/acc1")}
    assert epochs == {"0", "1"}  # the resumed run appended to the first run's log
    assert len(list((tmp_path / "pretrain").iterdir())) == 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["recipe=nope"], "error: unknown recipe 'nope'; recipes: "),
        (["optim.lrr=1"], "error: unknown config key 'optim.lrr'; keys under 'optim': name, lr, betas"),
        (["data.img_size=30"], "error: image size 30 is not divisible by patch size 4;"),
        (["data.global_batch=100", "trainer.devices=3", "trainer.accelerator=cpu"],
         "error: global batch 100 does not split over 3 devices"),
    ],
)
def test_user_mistakes_end_in_one_line_and_exit_2(tmp_path, args, message):
    r = CliRunner().invoke(app, ["pretrain", *args, f"run_root={tmp_path}"])
    assert r.exit_code == 2
    assert r.stderr.startswith(message) and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.exception is None or isinstance(r.exception, SystemExit)  # no traceback
    assert not list(tmp_path.glob("pretrain/*"))  # nothing written


def test_resume_of_a_folder_without_a_checkpoint_is_a_clear_error(tmp_path):
    r = CliRunner().invoke(app, ["pretrain", "--resume", str(tmp_path)])
    assert r.exit_code == 2 and r.stderr.startswith(f"error: nothing to resume in {tmp_path}: no last.ckpt there")
