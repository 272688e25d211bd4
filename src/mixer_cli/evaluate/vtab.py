"""VTAB-1k (Zhai et al., 2019): the 19 tasks, their groups and fine-tuning resolution, and the score.

Each task has 1,000 training examples (800 train + 200 val); the score is top-1 on the task's test
split, averaged over the 19 tasks, and over each group (natural, specialized, structured).
Class counts are those of the reference task definitions (google-research/task_adaptation).
The paper fine-tunes by the BiT-HyperRule: at 224 on tasks with small images and at 448 on tasks
with large ones, where small means an area below 96 x 96 pixels.
`mixer finetune --from CKPT recipe=ft_vtab` runs the suite (commands/finetune.py: `finetune_vtab`);
the records and the table it ends with are made here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean

from rich.table import Table

from mixer_cli.core.console import console
from mixer_cli.core.errors import UserError
from mixer_cli.core.files import csv_text, write_atomic

GROUPS = ("natural", "specialized", "structured")
SMALL_AREA = 96 * 96  # BiT-HyperRule: images with a smaller area count as small
RESOLUTIONS = {"small": 224, "large": 448}  # the paper's; conf/data/vtab.yaml `resolutions` may change them


@dataclass(frozen=True)
class VtabTask:
    name: str  # the data folder: $MIXER_DATA/vtab/<name>/
    num_classes: int
    group: str
    image_size: tuple[int, int]  # (height, width) of the source images; typical for data sets of varied sizes

    @property
    def images(self) -> str:
        """'small' or 'large', as the BiT-HyperRule sizes the task's images."""
        height, width = self.image_size
        return "small" if height * width < SMALL_AREA else "large"

    @property
    def resolution(self) -> int:
        """The fine-tuning resolution by the BiT-HyperRule."""
        return RESOLUTIONS[self.images]


TASKS: dict[str, VtabTask] = {
    t.name: t
    for t in (
        VtabTask("caltech101", 102, "natural", (300, 200)),
        VtabTask("cifar100", 100, "natural", (32, 32)),
        VtabTask("dtd", 47, "natural", (300, 300)),
        VtabTask("oxford_flowers102", 102, "natural", (500, 500)),
        VtabTask("oxford_iiit_pet", 37, "natural", (500, 375)),
        VtabTask("sun397", 397, "natural", (400, 300)),
        VtabTask("svhn", 10, "natural", (32, 32)),
        VtabTask("patch_camelyon", 2, "specialized", (96, 96)),
        VtabTask("eurosat", 10, "specialized", (64, 64)),
        VtabTask("resisc45", 45, "specialized", (256, 256)),
        VtabTask("diabetic_retinopathy", 5, "specialized", (300, 300)),
        VtabTask("clevr_count", 8, "structured", (320, 480)),
        VtabTask("clevr_distance", 6, "structured", (320, 480)),
        VtabTask("dmlab", 6, "structured", (360, 480)),
        VtabTask("dsprites_location", 16, "structured", (64, 64)),
        VtabTask("dsprites_orientation", 16, "structured", (64, 64)),
        VtabTask("kitti_distance", 4, "structured", (375, 1242)),
        VtabTask("smallnorb_azimuth", 18, "structured", (96, 96)),
        VtabTask("smallnorb_elevation", 9, "structured", (96, 96)),
    )
}


def task(name: str) -> VtabTask:
    if name not in TASKS:
        raise UserError(f"unknown VTAB-1k task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name]


def select_tasks(names: list[str] | None) -> list[VtabTask]:
    """The tasks a suite runs (data.tasks; None: all), in the table's order."""
    if names is None:
        return list(TASKS.values())
    if not names:
        raise UserError(f"data.tasks is empty: name VTAB-1k tasks, e.g. data.tasks=[dtd,svhn], or null for all "
                        f"{len(TASKS)}")
    chosen = {task(n).name for n in names}
    return [t for t in TASKS.values() if t.name in chosen]


def vtab_scores(per_task: dict[str, float]) -> dict:
    """The three group means and the 19-task mean of per-task top-1 (fractions). A partial suite
    gets the means of the groups it completes only: a mean over fewer tasks is not VTAB-1k."""
    for name in per_task:
        task(name)
    scores: dict = {"per_task": dict(per_task)}
    for group in GROUPS:
        names = [t.name for t in TASKS.values() if t.group == group]
        scores[group] = fmean(per_task[n] for n in names) if all(n in per_task for n in names) else None
    scores["mean"] = fmean(per_task[n] for n in TASKS) if len(per_task) == len(TASKS) else None
    return scores


# ---- the suite's records ------------------------------------------------------------------------


@dataclass
class TaskResult:
    """One task of a suite: the run that gives its score, and the lr pick (runs on 800, scored on
    the 200 held out) where the grid had several values."""

    task: VtabTask
    img_size: int
    lr: float
    top1: float
    num_samples: int  # test images scored
    run_dir: str
    picks: list[dict] = field(default_factory=list)  # {"lr", "dev_top1", "run_dir"} per lr tried
    train_seconds: float = 0.0  # of all the task's runs
    device_hours: float = 0.0

    def record(self) -> dict:
        t = self.task
        return {"task": t.name, "group": t.group, "num_classes": t.num_classes, "img_size": self.img_size,
                "lr": self.lr, "top1": self.top1, "num_samples": self.num_samples, "run_dir": self.run_dir,
                "train_seconds": round(self.train_seconds, 1), "device_hours": round(self.device_hours, 4),
                "lr_pick": self.picks}


def write_suite(suite_dir: Path, checkpoint: str, results: list[TaskResult]) -> dict:
    """vtab.json, vtab.csv and the table of a finished suite; returns the scores (vtab_scores)."""
    scores = vtab_scores({r.task.name: r.top1 for r in results})
    means = {k: scores[k] for k in (*GROUPS, "mean")}
    write_atomic(suite_dir / "vtab.json", json.dumps(
        {"from": checkpoint, "tasks": [r.record() for r in results], **means}, indent=2))
    rows = [{k: v for k, v in r.record().items() if k != "lr_pick"} for r in results]
    rows += [{"task": "mean", "group": group, "top1": means[group]} for group in GROUPS]
    rows.append({"task": "mean", "group": "all", "top1": means["mean"]})
    write_atomic(suite_dir / "vtab.csv", csv_text(rows, fieldnames=list(rows[0])))
    print_suite(results, means, suite_dir)
    return scores


def percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.2f}%"


def print_suite(results: list[TaskResult], means: dict, suite_dir: Path) -> None:
    table = Table(title=f"VTAB-1k: {len(results)} of {len(TASKS)} tasks ({suite_dir})", title_style="bold",
                  caption="-: a group's mean needs all its tasks, VTAB-1k all of them")
    for column in ("group", "task", "classes", "res", "lr", "test top-1"):
        table.add_column(column, justify="left" if column in ("group", "task") else "right")
    for r in results:
        lr = f"{r.lr:g}" + (f" (of {len(r.picks)})" if r.picks else "")
        table.add_row(r.task.group, r.task.name, str(r.task.num_classes), str(r.img_size), lr, percent(r.top1))
    table.add_section()
    for group in GROUPS:
        table.add_row(group, "mean", "", "", "", percent(means[group]))
    table.add_row("VTAB-1k", f"mean of {len(TASKS)}", "", "", "", percent(means["mean"]), style="bold")
    console.print(table)
