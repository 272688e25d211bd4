"""`mixer eval`: a checkpoint's top-1, top-5 and ReaL top-1, with the checkpoint's preprocessing, counted exactly."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mixer_cli.commands.eval import evaluate_checkpoint, with_checkpoint_preprocessing
from mixer_cli.config.compose import compose
from mixer_cli.core.errors import UserError

NUM_CLASSES = 6  # those of the `constant_checkpoint` fixture
# Image number -> its class folder (ImageNet's validation images are numbered across classes).
IMAGES = {1: 0, 2: 1, 3: 2, 4: 1, 5: 3, 6: 4, 7: 5, 8: 0}
# ReaL lists of images 1..8 (image 3's list is empty: it is left out; image 9 is in the file, not the folder).
REAL = [[0, 1], [1], [], [2], [3], [1, 4], [5], [0], [1]]


@pytest.fixture()
def val_folder(tmp_path):
    root = tmp_path / "val"
    for number, cls in IMAGES.items():
        (root / f"class{cls}").mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(number).integers(0, 256, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"class{cls}" / f"ILSVRC2012_val_{number:08d}.png")
    return root


def eval_config(tmp_path, *overrides):
    return compose(["data=folder", f"data.eval_path={tmp_path / 'val'}", f"data.num_classes={NUM_CLASSES}",
                    "data.num_workers=0", f"run_root={tmp_path / 'runs'}", "eval.accelerator=cpu", *overrides],
                   config_name="eval")


def test_top1_top5_and_real_top1_by_hand(tmp_path, constant_checkpoint, val_folder):
    (tmp_path / "real.json").write_text(json.dumps(REAL))
    results = evaluate_checkpoint(eval_config(tmp_path, f"data.real_labels={tmp_path / 'real.json'}",
                                              "eval.batch_size=3"), constant_checkpoint)
    # top-1: class 1 is right for images 2 and 4 (2 of 8); top-5 misses the two class-0 images (6 of 8).
    # ReaL: class 1 is in the lists of images 1, 2, 6 (3 of the 7 with a non-empty list; image 3 left out).
    expected = {"top1": 2 / 8, "top5": 6 / 8, "num_samples": 8, "real_top1": 3 / 7, "real_num_samples": 7}
    assert {k: results[k] for k in expected} == pytest.approx(expected)
    # the folder config says 224px bilinear; the timm-format file says 16px, timm's bicubic centre crop 0.875
    assert results["preprocessing"] == {"img_size": 16, "mean": [0.5] * 3, "std": [0.5] * 3,
                                        "interpolation": "bicubic", "crop_mode": "center", "crop_pct": 0.875}
    run_dir = tmp_path / "runs" / "eval"
    (written,) = run_dir.iterdir()
    assert "-tiny" in written.name and results["run_dir"] == str(written)
    assert json.loads((written / "results.json").read_text()) == results
    assert (written / "config.yaml").is_file()
    assert results["from"] == str(constant_checkpoint) and results["command"] == "eval"


def test_the_checkpoints_preprocessing_fills_what_the_user_left_unset():
    cfg = compose(["data=imagenet", "aug.eval_crop_pct=0.9", "data.interpolation=bilinear"], config_name="eval")
    timm_cfg = {"input_size": (3, 448, 448), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
                "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center"}
    filled = with_checkpoint_preprocessing(cfg, timm_cfg)
    assert (filled.data.img_size, filled.data.channels, list(filled.data.mean)) == (448, 3, [0.5] * 3)
    assert filled.aug.eval_crop_mode == "center"
    assert (filled.aug.eval_crop_pct, filled.data.interpolation) == (0.9, "bilinear")  # the user's values win
    assert cfg.data.img_size is None  # the given config is not changed


def test_a_bad_eval_crop_is_refused_when_the_config_is_composed():
    """The schema is the one check: `mixer eval` leaves the crop null for the checkpoint's, not unchecked."""
    with pytest.raises(UserError, match=r"^aug\.eval_crop_mode must be one of squash, center or null, "
                                        r"got 'resize-crop'$"):
        compose(["aug.eval_crop_mode=resize-crop"], config_name="eval")
    with pytest.raises(UserError, match=r"^aug\.eval_crop_pct must be a number in \(0, 1\] or null, got 1\.14$"):
        compose(["aug.eval_crop_pct=1.14"], config_name="eval")


def test_a_checkpoint_for_other_classes_is_a_one_line_error_and_writes_nothing(tmp_path, constant_checkpoint,
                                                                                 val_folder):
    cfg = eval_config(tmp_path, "data.num_classes=1000")
    with pytest.raises(UserError, match=r"tiny.pth predicts 6 classes, the data has data.num_classes=1000"):
        evaluate_checkpoint(cfg, constant_checkpoint)
    assert not (tmp_path / "runs").exists()


def test_a_resolution_override_the_checkpoint_cannot_take_is_a_one_line_error(tmp_path, constant_checkpoint,
                                                                                val_folder):
    with pytest.raises(UserError, match="takes 3-channel 16x16 images, the config asks for 3-channel 32x32"):
        evaluate_checkpoint(eval_config(tmp_path, "data.img_size=32"), constant_checkpoint)


def test_an_image_beyond_the_labels_file_stops_before_anything_is_written(tmp_path, constant_checkpoint,
                                                                            val_folder):
    (tmp_path / "real.json").write_text(json.dumps(REAL[:5]))
    # checked before the pass over the images; 8 is the first beyond 5 in the folder's order (class0: 1, 8)
    with pytest.raises(UserError, match="validation image number 8 is beyond the ReaL labels file"):
        evaluate_checkpoint(eval_config(tmp_path, f"data.real_labels={tmp_path / 'real.json'}"), constant_checkpoint)
    assert not (tmp_path / "runs").exists()


# ---- VTAB-1k ------------------------------------------------------------------------------------

# The reference task definitions (google-research/task_adaptation): classes per task.
VTAB_CLASSES = {
    "caltech101": 102, "cifar100": 100, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37, "sun397": 397,
    "svhn": 10, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5, "clevr_count": 8,
    "clevr_distance": 6, "dmlab": 6, "dsprites_location": 16, "dsprites_orientation": 16, "kitti_distance": 4,
    "smallnorb_azimuth": 18, "smallnorb_elevation": 9,
}


def test_vtab_has_19_tasks_in_three_groups_with_the_reference_classes():
    from mixer_cli.evaluate.vtab import TASKS

    assert {name: t.num_classes for name, t in TASKS.items()} == VTAB_CLASSES
    groups = {g: [n for n, t in TASKS.items() if t.group == g] for g in ("natural", "specialized", "structured")}
    assert {g: len(names) for g, names in groups.items()} == {"natural": 7, "specialized": 4, "structured": 8}
    assert groups["specialized"] == ["patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"]


def test_vtab_resolution_by_the_bit_hyperrule():
    from mixer_cli.evaluate.vtab import TASKS

    # images with an area below 96 x 96 fine-tune at 224: the 32px and 64px data sets; 96 x 96 is not below
    small = {n for n, t in TASKS.items() if t.resolution == 224}
    assert small == {"cifar100", "svhn", "eurosat", "dsprites_location", "dsprites_orientation"}
    assert {t.resolution for t in TASKS.values()} == {224, 448}


def test_vtab_scores_by_hand():
    from mixer_cli.evaluate.vtab import vtab_scores

    # natural tasks score 0.7, specialized 0.8; structured 0.3 except dmlab at 0.7
    per_task = {n: 0.7 for n in list(VTAB_CLASSES)[:7]} | {n: 0.8 for n in list(VTAB_CLASSES)[7:11]}
    per_task |= {n: 0.3 for n in list(VTAB_CLASSES)[11:]} | {"dmlab": 0.7}
    scores = vtab_scores(per_task)
    assert scores["natural"] == pytest.approx(0.7) and scores["specialized"] == pytest.approx(0.8)
    assert scores["structured"] == pytest.approx((7 * 0.3 + 0.7) / 8)  # 0.35
    assert scores["mean"] == pytest.approx((7 * 0.7 + 4 * 0.8 + 7 * 0.3 + 0.7) / 19)  # tasks, not groups, weigh
    assert scores["per_task"] == per_task


def test_a_partial_vtab_suite_has_no_mean_and_an_unknown_task_is_an_error():
    from mixer_cli.evaluate.vtab import vtab_scores

    natural = {n: 0.5 for n in list(VTAB_CLASSES)[:7]}
    scores = vtab_scores(natural | {"eurosat": 0.9})
    assert (scores["natural"], scores["specialized"], scores["structured"], scores["mean"]) == (0.5, None, None, None)
    with pytest.raises(UserError, match="unknown VTAB-1k task 'pets'; tasks: caltech101, cifar100, "):
        vtab_scores({"pets": 0.9})


# ---- exact under DDP --------------------------------------------------------------------------------

DDP_SCRIPT = """
import json, os, sys
from pathlib import Path

from mixer_cli.config.compose import compose
from mixer_cli.commands.eval import evaluate_checkpoint

results = evaluate_checkpoint(compose(sys.argv[3:], config_name="eval"), Path(sys.argv[2]))
Path(sys.argv[1], f"rank{os.environ.get('LOCAL_RANK', '0')}.json").write_text(json.dumps(results))
"""


@pytest.mark.slow
def test_two_ranks_evaluate_every_image_once_and_agree_with_one_process(tmp_path, val_folder, tiny_mixer):
    """2 CPU processes (gloo): 8 images in shards of 3, 3, 2, so rank 0 reads 5 and rank 1 reads 3; the
    counts and accuracies are those of one process (a padded sampler would count 10 images, or 6)."""
    import subprocess
    import sys

    from mixer_cli.data.writer import folder_samples, write_shards

    write_shards(*folder_samples(val_folder), tmp_path / "shards", shard_size=3)
    model = tiny_mixer(num_classes=NUM_CLASSES, img_size=16, in_chans=3, patch_size=8)
    torch.nn.init.normal_(model.head.weight)  # the zero head would give every image class 0
    torch.save(model.state_dict(), tmp_path / "random.pth")
    (tmp_path / "real.json").write_text(json.dumps(REAL))
    args = ["data=shards", f"data.eval_path={tmp_path / 'shards'}", f"data.num_classes={NUM_CLASSES}",
            "data.num_workers=0", f"data.real_labels={tmp_path / 'real.json'}", "eval.accelerator=cpu",
            "eval.batch_size=2"]
    one = evaluate_checkpoint(compose([*args, f"run_root={tmp_path / 'one'}"], config_name="eval"),
                              tmp_path / "random.pth")
    (tmp_path / "run.py").write_text(DDP_SCRIPT)
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path), str(tmp_path / "random.pth"),
                           *args, "eval.devices=2", f"run_root={tmp_path / 'two'}"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))

    measured = ("top1", "top5", "num_samples", "real_top1", "real_num_samples")
    assert r0["devices"] == 2 and one["devices"] == 1
    assert r0["num_samples"] == 8 and r0["real_num_samples"] == 7  # the split's size; image 3's list is empty
    assert {k: r0[k] for k in measured} == {k: r1[k] for k in measured} == pytest.approx({k: one[k] for k in measured})
    assert 0 < one["top1"] < 1  # the images get different classes: the two passes had something to disagree on
    (written,) = (tmp_path / "two" / "eval").iterdir()  # one run directory for both ranks, written by rank 0
    assert json.loads((written / "results.json").read_text()) == r0 and r1["run_dir"] == str(written)
