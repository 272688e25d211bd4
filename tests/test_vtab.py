"""The VTAB-1k suite (`mixer finetune --from CKPT recipe=ft_vtab`) on tiny tasks the tests write: one run
per task from the same checkpoint at its resolution, the lr picked on the dev split, the scores, the report."""
import csv
import io
import json
import shutil
from pathlib import Path
from statistics import fmean

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from mixer_cli.cli import app
from mixer_cli.data.writer import Sample, write_shards
from mixer_cli.evaluate import vtab
from mixer_cli.models import load_mixer
from mixer_cli.reporting.paper import Measure, Runs, find_runs
from mixer_cli.train.fit import Job

# A table of four tiny tasks in place of the 19: small images fine-tune at data.resolutions.small
# (16, the checkpoint's own), large ones at .large (32: the token-mixing MLPs grow, Appendix C).
FAKE_TASKS = {t.name: t for t in (
    vtab.VtabTask("alpha", 3, "natural", (32, 32)),
    vtab.VtabTask("beta", 3, "natural", (300, 300)),
    vtab.VtabTask("gamma", 2, "specialized", (64, 64)),
    vtab.VtabTask("delta", 4, "structured", (96, 96)),
)}
FAST = ["recipe=ft_vtab", "trainer.steps=2", "sched.warmup_steps=1", "data.global_batch=8", "data.num_workers=0",
        "data.shuffle_buffer=16", "data.resolutions.small=16", "data.resolutions.large=32"]
COLOURS = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220], [220, 220, 30]])


def png(label: int, i: int) -> bytes:
    """A noisy image of the class's colour: learnable in a few steps, different per sample."""
    rng = np.random.default_rng(1000 * label + i)
    pixels = np.clip(COLOURS[label] + rng.normal(0, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_task(root: Path, task: vtab.VtabTask, train: int = 30, test: int = 12) -> None:
    for split, n in (("train800val200", train), ("test", test)):
        labels = [i % task.num_classes for i in range(n)]
        samples = [Sample(f"{task.name}/{split}/{i}", c, lambda i=i, c=c: png(c, i)) for i, c in enumerate(labels)]
        write_shards([str(c) for c in range(task.num_classes)], samples, root / "vtab" / task.name / split)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for task in FAKE_TASKS.values():
        write_task(root, task)
    return root


@pytest.fixture(scope="module")
def ckpt(tiny_mixer, write_checkpoint) -> Path:
    torch.manual_seed(0)  # module-scoped: made before the per-test seed, whichever test comes first
    return write_checkpoint(tiny_mixer(num_classes=5, img_size=16, in_chans=3, patch_size=4, trained=True))


@pytest.fixture
def fake_tasks(monkeypatch):
    monkeypatch.setattr(vtab, "TASKS", FAKE_TASKS)


def suite(runs: Path, data: Path, *args: str):
    return CliRunner().invoke(app, ["finetune", *args, f"run_root={runs}"],
                              env={"MIXER_DATA": str(data), "COLUMNS": "200"})


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def test_the_suite_fine_tunes_every_task_and_scores_them(tmp_path, data_root, ckpt, fake_tasks):
    r = suite(tmp_path / "runs", data_root, "--from", str(ckpt), *FAST)
    assert r.exit_code == 0, r.output
    (suite_dir,) = (tmp_path / "runs" / "finetune").iterdir()
    assert suite_dir.name.endswith("-ft_vtab")
    assert sorted(p.name for p in suite_dir.iterdir() if p.is_dir()) == ["alpha", "beta", "delta", "gamma"]
    top1 = {}
    for name, task in FAKE_TASKS.items():
        run = suite_dir / name
        res, cfg = results(run), yaml.safe_load((run / "config.yaml").read_text())
        assert (res["command"], res["from"], res["steps"], res["num_samples"]) == ("finetune", str(ckpt), 2, 12)
        assert "dev_top1" not in res and cfg["data"]["dev_fraction"] == 0.0  # the final run trains on all 1,000
        assert (cfg["data"]["task"], cfg["data"]["num_classes"], cfg["optim"]["lr"]) == (name, task.num_classes, 0.01)
        size = 32 if task.images == "large" else 16
        spec = load_mixer(run / "last.ckpt").spec
        assert (cfg["data"]["img_size"], spec.img_size, spec.num_classes) == (size, size, task.num_classes)
        top1[name] = res["top1"]
        assert f"] {name} ({task.group}, {task.num_classes} classes, {size}px): lr 0.01, 2 steps" in r.output
        assert f"] {name}: test top-1 {100 * res['top1']:.2f}% at lr 0.01" in r.output

    record = json.loads((suite_dir / "vtab.json").read_text())
    assert {t["task"]: t["top1"] for t in record["tasks"]} == top1
    means = {"natural": fmean([top1["alpha"], top1["beta"]]), "specialized": top1["gamma"],
             "structured": top1["delta"], "mean": fmean(top1.values())}  # the tasks weigh, not the groups
    assert {k: record[k] for k in means} == pytest.approx(means)
    suite_results = results(suite_dir)
    assert suite_results["vtab1k"]["per_task"] == top1 and suite_results["from"] == str(ckpt)
    assert {k: suite_results["vtab1k"][k] for k in means} == pytest.approx(means)
    rows = {(row["group"], row["task"]): row for row in csv.DictReader((suite_dir / "vtab.csv").open())}
    assert float(rows[("natural", "beta")]["top1"]) == top1["beta"] and rows[("natural", "beta")]["img_size"] == "32"
    assert float(rows[("all", "mean")]["top1"]) == pytest.approx(means["mean"])
    assert f"{100 * means['mean']:.2f}%" in r.output.split("VTAB-1k: 4 of 4 tasks")[1]  # the table at the end

    # `mixer report` reads the suite's mean for the checkpoint's VTAB-1k column; the tasks' own runs
    # count through it, not in the list of the checkpoint's fine-tunes
    measure = Measure(Runs(find_runs([tmp_path / "runs"])))
    assert measure.vtab1k(str(ckpt)) == pytest.approx(means["mean"]) and measure.finetune_list(str(ckpt)) == "-"


def test_a_grid_of_two_lrs_is_picked_on_the_dev_split(tmp_path, data_root, ckpt, fake_tasks):
    lrs = [0.01, 0.3]  # in 8 steps 0.01 barely moves off the zero head (train loss ~1.06 vs ~0.08)
    r = suite(tmp_path / "runs", data_root, "--from", str(ckpt), *FAST, "trainer.steps=8", "data.tasks=[alpha]",
              f"targets.vtab.lr_grid=[{lrs[0]},{lrs[1]}]")
    assert r.exit_code == 0, r.output
    (suite_dir,) = (tmp_path / "runs" / "finetune").iterdir()
    assert sorted(p.name for p in suite_dir.iterdir() if p.is_dir()) == ["alpha", "alpha-lr0.01", "alpha-lr0.3"]
    picks = [results(suite_dir / f"alpha-lr{lr:g}") for lr in lrs]
    dev = [p["dev_top1"] for p in picks]
    assert dev[0] != dev[1]  # else the pick would not show
    assert all(0 < p["dev_num_samples"] < 30 for p in picks)  # held out of the 30 training images
    best = lrs[dev.index(max(dev))]
    assert best == lrs[1]  # the later one: picking the first would fail
    final = yaml.safe_load((suite_dir / "alpha" / "config.yaml").read_text())
    assert (final["optim"]["lr"], final["data"]["dev_fraction"]) == (best, 0.0)
    (task,) = json.loads((suite_dir / "vtab.json").read_text())["tasks"]
    assert task["lr"] == best and [(p["lr"], p["dev_top1"]) for p in task["lr_pick"]] == list(zip(lrs, dev))
    assert task["top1"] == results(suite_dir / "alpha")["top1"]
    assert "picking the lr of 0.01, 0.3 on the dev split" in r.output


@pytest.fixture
def trained(monkeypatch) -> list[tuple[str, bool]]:
    """(run directory name, whether it continues a stopped run) of every fine-tune the suite trains from here on."""
    calls = []

    run = Job.run

    def spy(job, command, run_dir, progress):
        calls.append((run_dir.name, (run_dir / "last.ckpt").is_file()))
        return run(job, command, run_dir, progress)

    monkeypatch.setattr(Job, "run", spy)
    return calls


def test_a_stopped_suite_continues_where_it_stopped(tmp_path, data_root, ckpt, fake_tasks, trained):
    runs = tmp_path / "runs"
    r = suite(runs, data_root, "--from", str(ckpt), *FAST, "data.tasks=[alpha,beta,gamma]")
    assert r.exit_code == 0, r.output
    (suite_dir,) = (runs / "finetune").iterdir()
    assert f"(if stopped: mixer finetune --resume {suite_dir})" in r.output
    whole = results(suite_dir)
    # as a stop leaves it: alpha finished, beta stopped after writing its last.ckpt, gamma not begun
    for name in ("results.json", "vtab.json", "vtab.csv", "beta/results.json"):
        (suite_dir / name).unlink()
    shutil.rmtree(suite_dir / "gamma")
    alpha_written = (suite_dir / "alpha" / "results.json").stat().st_mtime_ns
    trained.clear()
    r = suite(runs, data_root, "--resume", str(suite_dir))  # the suite's own overrides, kept in suite.json
    assert r.exit_code == 0, r.output
    assert trained == [("beta", True), ("gamma", False)]
    assert (suite_dir / "alpha" / "results.json").stat().st_mtime_ns == alpha_written
    assert [p.name for p in (runs / "finetune").iterdir()] == [suite_dir.name]  # no new suite
    again = results(suite_dir)
    assert again["vtab1k"]["per_task"] == whole["vtab1k"]["per_task"] and again["tasks"] == 3


def test_a_requeued_slurm_job_continues_its_suite_by_itself(tmp_path, data_root, ckpt, fake_tasks, trained,
                                                            monkeypatch, no_launcher):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    runs, command = tmp_path / "runs", ["--from", str(ckpt), *FAST, "data.tasks=[alpha,beta]"]

    def start(*args: str, restarts: int) -> list[str]:
        """The job's command started anew, in a process of its own; the suites there after it."""
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(restarts))
        r = suite(runs, data_root, *args)
        assert r.exit_code == 0, r.output
        return sorted(p.name for p in (runs / "finetune").iterdir())

    assert start(*command, restarts=0) == ["slurm4242-ft_vtab"]
    suite_dir = runs / "finetune" / "slurm4242-ft_vtab"
    for name in ("results.json", "beta/results.json"):  # stopped in beta, which SLURM requeued
        (suite_dir / name).unlink()
    trained.clear()
    assert start(*command, restarts=1) == ["slurm4242-ft_vtab"]
    assert trained == [("beta", True)] and results(suite_dir)["tasks"] == 2
    (suite_dir / "results.json").unlink()  # unfinished again: still no suite for another command of the job
    assert start(*command[:-1], "data.tasks=[alpha]", restarts=1) == ["slurm4242-1-ft_vtab", "slurm4242-ft_vtab"]


def test_a_damaged_suite_record_is_one_line(tmp_path):
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "suite.json").write_text("[]")
    r = suite(tmp_path / "runs", tmp_path, "--resume", str(tmp_path / "suite"))
    assert r.exit_code == 2, r.output
    assert r.output == (f"error: {tmp_path}/suite/suite.json is damaged: not the JSON object with the overrides the "
                        "suite started with, so the suite cannot be continued\n")


@pytest.mark.parametrize("args,message", [
    (["data.tasks=[dtd,pets]"], "error: unknown VTAB-1k task 'pets'; tasks: caltech101, cifar100, dtd, "),
    (["data.tasks=[]"], "error: data.tasks is empty: name VTAB-1k tasks, e.g. data.tasks=[dtd,svhn], or null for "
                        "all 19"),
    (["data.tasks=[svhn,dtd,eurosat]"], "error: no VTAB-1k shards in {data}/vtab/dtd/train800val200, "
     "{data}/vtab/dtd/test, {data}/vtab/eurosat/train800val200, {data}/vtab/eurosat/test; write each split with "
     "`mixer data write --from FOLDER --to PATH` (the root is $MIXER_DATA/vtab/<task>/)"),
    (["--res", "448"], "error: the VTAB-1k suite sets data.task, data.num_classes, data.img_size (--res) per "
     "task; drop data.img_size=448"),
    (["--multirun"], "error: the VTAB-1k suite picks each task's lr itself"),
])
def test_suite_mistakes_end_in_one_line_before_anything_is_written(tmp_path, ckpt, args, message):
    data = tmp_path / "data"
    write_task(data, vtab.TASKS["svhn"], train=4, test=2)
    r = suite(tmp_path / "runs", data, "--from", str(ckpt), "recipe=ft_vtab", *args)
    assert r.exit_code == 2, r.output
    assert r.output.startswith(message.replace("{data}", str(data))) and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
