"""VTAB-1k (Zhai et al., 2019): the 19 tasks, their groups and fine-tuning resolution, and the score.

Each task has 1,000 training examples (800 train + 200 val); the score is top-1 on the task's test
split, averaged over the 19 tasks, and over each group (natural, specialized, structured).
Class counts are those of the reference task definitions (google-research/task_adaptation).
The paper fine-tunes by the BiT-HyperRule: at 224 on tasks with small images and at 448 on tasks
with large ones, where small means an area below 96 x 96 pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from statistics import fmean

from mixer_cli.errors import UserError

GROUPS = ("natural", "specialized", "structured")
SMALL_AREA = 96 * 96  # BiT-HyperRule: images with a smaller area count as small


@dataclass(frozen=True)
class VtabTask:
    name: str  # the data folder: $MIXER_DATA/vtab/<name>/
    num_classes: int
    group: str
    image_size: tuple[int, int]  # (height, width) of the source images; typical for data sets of varied sizes

    @property
    def resolution(self) -> int:
        """The fine-tuning resolution by the BiT-HyperRule."""
        height, width = self.image_size
        return 224 if height * width < SMALL_AREA else 448


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
