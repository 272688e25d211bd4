"""Strategies: trainer configs for every launcher, one run directory per run, DDP = single device."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate

from mixer_cli.config.compose import compose
from mixer_cli.config.run_dirs import make_run_dir

# Full-batch steps over the 4,000 demo images with no augmentation: every step sees the same samples
# however they are shuffled or split over ranks, so two ranks x 2,000 must equal one process x 4,000.
FULL_BATCH = ["data.global_batch=4000", "aug.pad_crop=0", "optim=sgd", "optim.lr=0.5", "sched=warmup_cosine",
              "sched.warmup_steps=1", "trainer.steps=3", "trainer.log_every_steps=1"]


@pytest.mark.slow
def test_two_process_ddp_matches_single_process_with_same_global_batch(tmp_path, tiny_run, tiny_mixer):
    from mixer_cli.commands.pretrain import pretrain

    pretrain(compose([*tiny_run, *FULL_BATCH, "trainer.devices=1", f"run_root={tmp_path / 'single'}"]), progress=False)
    env = {k: v for k, v in os.environ.items() if k not in ("MIXER_RUN_DIR", "LOCAL_RANK", "RANK")}
    r = subprocess.run([sys.executable, "-m", "mixer_cli.cli", "pretrain", *tiny_run, *FULL_BATCH, "trainer=ddp",
                        "trainer.devices=2", "trainer.progress_every_steps=1", f"run_root={tmp_path / 'ddp'}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [line.split("  ")[1] for line in r.stdout.splitlines() if line.startswith("epoch")] == [
        "step 2/3", "step 3/3"]  # progress lines in a log come from rank 0 only
    (single,) = (tmp_path / "single" / "pretrain").iterdir()
    (ddp,) = (tmp_path / "ddp" / "pretrain").iterdir()  # one directory per run, not per rank
    results = json.loads((ddp / "results.json").read_text())
    assert results["batch"] == "global batch 4000 = 2 device(s) x 2000 x 1 accumulation step(s)"
    assert results["devices"] == 2 and results["num_samples"] == 1000  # exact evaluation split over the ranks
    a = torch.load(single / "last.ckpt", weights_only=True)
    b = torch.load(ddp / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 3
    init = tiny_mixer().state_dict()
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], tensor, atol=2e-5, rtol=1e-4, msg=name)
    moved = a["state_dict"]["model.head.weight"] - init["head.weight"]  # zero at init: training did move it
    assert moved.abs().max() > 1e-3
    # Validation on 2 ranks (500 images each) scores what 1 process scores on all 1,000, every value
    # summed over the ranks, and Lightning has nothing to warn about
    assert logged(ddp / "metrics.csv", "train/loss") == pytest.approx(logged(single / "metrics.csv", "train/loss"),
                                                                      rel=1e-4)  # the mean over both ranks
    one, two = validations(single / "metrics.csv"), validations(ddp / "metrics.csv")
    assert len(one) == len(two) == 3 and [v["val/num_samples"] for v in two] == [1000.0] * 3
    for a_row, b_row in zip(one, two):
        assert b_row == pytest.approx(a_row, rel=1e-4, abs=1e-3), (a_row, b_row)  # abs: a top-1 within one image
    assert "Warning" not in r.stderr and "sync_dist" not in r.stderr, r.stderr[-3000:]


def logged(metrics_csv, name: str) -> list[float]:
    with open(metrics_csv) as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


def validations(metrics_csv) -> list[dict[str, float]]:
    with open(metrics_csv) as f:
        return [{k: float(v) for k, v in row.items() if k.startswith("val/")} for row in csv.DictReader(f)
                if row.get("val/loss")]


@pytest.mark.parametrize("name", ["default", "ddp", "fsdp", "xla", "slurm", "torchrun"])
def test_trainer_configs_keep_the_default_keys(name):
    keys = set(compose(["trainer=default"]).trainer)
    assert set(compose([f"trainer={name}"]).trainer) == keys


def test_launcher_sizes_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("SLURM_NNODES", "4")
    assert compose(["trainer=slurm"]).trainer.num_nodes == 4
    monkeypatch.setenv("GROUP_WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    t = compose(["trainer=torchrun"]).trainer
    assert (t.num_nodes, t.devices, t.strategy) == (3, 8, "ddp")


def test_fsdp_wraps_each_mixer_block():
    from lightning.pytorch.strategies import FSDPStrategy

    from mixer_cli.models.mixer import MixerBlock

    strategy = instantiate(compose(["trainer=fsdp"]).trainer.strategy)
    assert isinstance(strategy, FSDPStrategy) and strategy.kwargs["auto_wrap_policy"]._module_classes == {MixerBlock}


def test_torchrun_ranks_agree_on_one_run_directory(tmp_path, monkeypatch, no_launcher):
    cfg = compose([f"run_root={tmp_path}"])
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "5e1f0c2a-job")
    dirs = []
    for rank in ("0", "1"):  # rank 1 finds the directory rank 0 made
        monkeypatch.setenv("RANK", rank)
        dirs.append(make_run_dir(cfg, "pretrain"))
    assert dirs[0] == dirs[1] == tmp_path / "pretrain" / "torchrun-5e1f0c2a-demo"


def test_slurm_ranks_agree_on_one_run_directory(tmp_path, monkeypatch, no_launcher):
    cfg = compose([f"run_root={tmp_path}"])
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    dirs = []
    for rank in ("0", "9"):
        monkeypatch.setenv("SLURM_PROCID", rank)
        dirs.append(make_run_dir(cfg, "pretrain"))
    assert dirs[0] == dirs[1] == tmp_path / "pretrain" / "slurm4242.0-demo"


@pytest.mark.parametrize("rank", ["0", "1"])  # rank 0 too: it would make a directory, then wait for the others
def test_ranks_without_a_shared_id_are_a_clear_error(tmp_path, monkeypatch, no_launcher, rank):
    cfg = compose([f"run_root={tmp_path}"])
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's static launch: --master-addr, --node-rank
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # as torchrun sets for every launch
    with pytest.raises(ValueError, match=r"^the ranks of this run cannot agree on a run directory: start them with "
                                         r"torchrun --rdzv-id=ID"):
        make_run_dir(cfg, "pretrain")
    assert not (tmp_path / "pretrain").exists()
