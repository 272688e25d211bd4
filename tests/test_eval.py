"""`mixer eval`: a checkpoint's top-1, top-5, ReaL top-1 and per-class scores, with the checkpoint's preprocessing,
counted exactly."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mixer_cli.commands.eval import evaluate_checkpoint, macro_averages, with_checkpoint_preprocessing
from mixer_cli.config.compose import compose
from mixer_cli.core.errors import UserError
from mixer_cli.data import build_dataset
from mixer_cli.models import load_mixer
from mixer_cli.models.contract import with_class_names
from mixer_cli.train.module import ClassMetrics, Evaluator

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


# ---- per-class metrics and the confusion matrix ------------------------------------------------------

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def read_csv(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def centroid_mixer(tiny_mixer):
    """A tiny 10-class digit Mixer whose head scores each class by the distance to its mean feature over
    training digits: a spread of right and wrong classes (a random head gives every digit one class).
    Class 9 is never predicted (its precision is 0/0)."""
    from mixer_cli.data import demo_arrays

    model = tiny_mixer()
    x, y = demo_arrays("train")
    x, y = torch.tensor(x[::10], dtype=torch.float32)[:, None] / 255, torch.tensor(y[::10])
    with torch.no_grad():
        features = model.forward_head(model.forward_features((x - 0.5) / 0.5), pre_logits=True)
        means = torch.stack([features[y == c].mean(dim=0) for c in range(10)])
        model.head.weight.copy_(means)
        model.head.bias.copy_(-0.5 * means.pow(2).sum(dim=1))
        model.head.bias[9] = -1e4
    model.pretrained_cfg = with_class_names(model.pretrained_cfg, DIGIT_NAMES)
    return model


def predictions(cfg, checkpoint) -> tuple[np.ndarray, np.ndarray]:
    """(labels, arg-max predictions) of the checkpoint over cfg's evaluation split, in a plain loop."""
    from timm.data import resolve_data_config

    model = load_mixer(checkpoint).eval()
    cfg = with_checkpoint_preprocessing(cfg, resolve_data_config({}, model=model))
    cfg.data.decode = "pil"  # the loader's floats: `mixer eval` normalises uint8 on the device
    labels, predicted = [], []
    with torch.no_grad():
        for x, y in DataLoader(build_dataset(cfg.data, cfg.aug, "test"), batch_size=250):
            labels.append(y)
            predicted.append(model(x).argmax(dim=1))
    return torch.cat(labels).numpy(), torch.cat(predicted).numpy()


def test_per_class_scores_and_confusion_matrix_agree_with_scikit_learn_on_the_demo_digits(tmp_path, tiny_mixer,
                                                                                          write_checkpoint):
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    checkpoint = write_checkpoint(centroid_mixer(tiny_mixer))
    cfg = compose(["eval.accelerator=cpu", f"run_root={tmp_path / 'runs'}"], config_name="eval")
    results = evaluate_checkpoint(cfg, checkpoint)
    y, predicted = predictions(cfg, checkpoint)
    assert 5 <= len(set(predicted)) <= 9 and 9 not in predicted  # varied, and class 9's precision is 0/0
    precision, recall, f1, support = precision_recall_fscore_support(y, predicted, labels=range(10), zero_division=0)
    run_dir = tmp_path / "runs" / "eval" / Path(results["run_dir"]).name

    header, *rows = read_csv(run_dir / "per_class.csv")
    assert header == ["class", "name", "support", "predicted", "accuracy", "precision", "recall", "f1"]
    assert [(int(r[0]), r[1]) for r in rows] == list(enumerate(DIGIT_NAMES))
    columns = {name: np.array([float(r[i]) for r in rows]) for i, name in enumerate(header[2:], start=2)}
    assert columns["support"].tolist() == support.tolist() == [100] * 10
    assert columns["predicted"].tolist() == np.bincount(predicted, minlength=10).tolist()
    for name, expected in (("precision", precision), ("recall", recall), ("f1", f1), ("accuracy", recall)):
        np.testing.assert_allclose(columns[name], expected, atol=1e-6, err_msg=name)

    header, *rows = read_csv(run_dir / "confusion_matrix.csv")
    assert header == ["true \\ predicted", *DIGIT_NAMES] and [r[0] for r in rows] == DIGIT_NAMES
    matrix = np.array([[int(v) for v in r[1:]] for r in rows])
    assert matrix.tolist() == confusion_matrix(y, predicted, labels=range(10)).tolist()
    assert matrix.sum(axis=1).tolist() == columns["support"].tolist()
    with Image.open(run_dir / "confusion_matrix.png") as png:
        assert png.format == "PNG" and min(png.size) > 500

    macro = precision_recall_fscore_support(y, predicted, average="macro", zero_division=0)
    expected = {"macro_precision": macro[0], "macro_recall": macro[1], "macro_f1": macro[2],
                "macro_accuracy": macro[1]}
    assert {k: results[k] for k in expected} == pytest.approx(expected, abs=1e-6)
    assert results["macro_accuracy"] == pytest.approx(results["top1"], abs=1e-6)  # 100 digits of each class
    assert results["per_class"] == {
        "file": "per_class.csv", "targets": "single-label",
        "accuracy": "recall: the share of the class's images predicted as it (one label per image)",
        "zero_division": 0, "macro_classes": 10, "confusion_matrix": ["confusion_matrix.csv", "confusion_matrix.png"]}


def logits_for(predicted: list[int], num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(predicted), num_classes).float() * 4 - 2


def test_per_class_scores_by_hand_with_a_class_only_predicted_and_one_neither_seen_nor_predicted():
    from sklearn.metrics import precision_recall_fscore_support

    y, predicted = [0, 0, 1, 1, 1, 2, 2], [0, 1, 1, 1, 2, 2, 3]  # class 3: predicted once, no image; 4: neither
    metrics = ClassMetrics(5)
    for batch in (slice(0, 4), slice(4, 7)):  # counts add up over batches
        metrics.update(logits_for(predicted[batch], 5), torch.tensor(y[batch]))
    scores = metrics.compute_and_reset()
    assert scores["support"].tolist() == [2, 3, 2, 0, 0] and scores["predicted"].tolist() == [1, 3, 2, 1, 0]
    expected = {"precision": [1, 2 / 3, 1 / 2, 0, 0], "recall": [1 / 2, 2 / 3, 1 / 2, 0, 0],
                "f1": [2 / 3, 2 / 3, 1 / 2, 0, 0]}  # 0/0 (class 3's recall, all of class 4's) is 0
    assert {k: scores[k].tolist() for k in expected} == {k: pytest.approx(v) for k, v in expected.items()}
    assert scores["accuracy"].tolist() == scores["recall"].tolist()
    assert scores["confusion_matrix"].tolist() == [[1, 1, 0, 0, 0], [0, 2, 1, 0, 0], [0, 0, 1, 1, 0], [0] * 5, [0] * 5]
    # the macro averages leave out class 4 (nothing but 0/0) and keep class 3 (a false positive): scikit-learn's
    macro = macro_averages(scores)
    assert macro == pytest.approx({"macro_precision": 13 / 24, "macro_recall": 5 / 12, "macro_f1": 11 / 24,
                                   "macro_accuracy": 5 / 12})
    assert macro["macro_f1"] == pytest.approx(precision_recall_fscore_support(y, predicted, average="macro",
                                                                              zero_division=0)[2])


def test_multi_hot_rows_score_each_class_as_a_yes_no_decision_and_have_no_confusion_matrix():
    from sklearn.metrics import precision_recall_fscore_support

    rows = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 1, 0]])
    logits = torch.randn(6, 4)
    logits[:, 3] = -8  # class 3: never labelled, never predicted
    metrics = ClassMetrics(4)
    metrics.update(logits[:4], rows[:4].float())
    metrics.update(logits[4:], rows[4:].float())
    scores = metrics.compute_and_reset()
    predicted = (logits.sigmoid() > 0.5).int().numpy()
    precision, recall, f1, support = precision_recall_fscore_support(rows.numpy(), predicted, zero_division=0)
    assert scores["multi_label"] and scores["confusion_matrix"] is None
    assert scores["support"].tolist() == support.tolist() == [3, 3, 3, 0]
    for name, expected in (("precision", precision), ("recall", recall), ("f1", f1),
                           ("accuracy", (predicted == rows.numpy()).mean(axis=0))):
        np.testing.assert_allclose(scores[name].numpy(), expected, atol=1e-6, err_msg=name)
    assert macro_averages(scores)["macro_f1"] == pytest.approx(f1[:3].mean())  # class 3 left out


def test_training_does_not_count_per_class_scores_and_eval_counts_its_test_split_only():
    assert Evaluator(torch.nn.Identity(), 6).class_metrics is None
    module = Evaluator(torch.nn.Identity(), 6, per_class=True)
    module.evaluate_batch("val", (logits_for([1, 2], 6), torch.tensor([1, 2])))
    assert module.class_metrics.counts.tp.sum() == 0
    module.evaluate_batch("test", (logits_for([1, 2], 6), torch.tensor([1, 2])))
    assert module.class_metrics.counts.tp.sum() == 2


def test_a_constant_model_by_hand_and_the_confusion_matrix_cap(tmp_path, constant_checkpoint, val_folder,
                                                               monkeypatch):
    for counted_in in ("mixer_cli.train.module", "mixer_cli.commands.eval"):  # the 6 classes are above the cap
        monkeypatch.setattr(f"{counted_in}.CONFUSION_MATRIX_MAX_CLASSES", 5)
    results = evaluate_checkpoint(eval_config(tmp_path), constant_checkpoint)
    # class 1 for all 8 images: its precision 2/8, recall 1, F1 0.4; the other 5 classes score 0 (0/0 precision)
    assert {k: results[k] for k in ("macro_precision", "macro_recall", "macro_f1")} == pytest.approx(
        {"macro_precision": 0.25 / 6, "macro_recall": 1 / 6, "macro_f1": 0.4 / 6})
    assert results["per_class"]["confusion_matrix"] == ("skipped: 6 classes, above the 5 a confusion matrix is "
                                                        "kept for (it is classes x classes counts)")
    run_dir = Path(results["run_dir"])
    assert not (run_dir / "confusion_matrix.csv").exists() and not (run_dir / "confusion_matrix.png").exists()
    header, *rows = read_csv(run_dir / "per_class.csv")
    # named by the folder: the timm-format file names no classes
    assert [(r[1], r[2], r[3], r[5]) for r in rows] == [("class0", "2", "0", "0.000000"),
                                                       ("class1", "2", "8", "0.250000"),
                                                       *((f"class{c}", "1", "0", "0.000000") for c in range(2, 6))]


def test_multi_label_data_gets_per_class_scores_and_a_note_instead_of_a_confusion_matrix(
        tmp_path, tiny_mixer, write_checkpoint, multi_label_shards):
    multi_label_shards(tmp_path / "shards", ["0,2", "1", "3 4", "2", "0,1,4", "4"])
    model = tiny_mixer(num_classes=5, img_size=16, in_chans=3, patch_size=8)
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0]))  # yes to classes 0 and 2 for every image
    results = evaluate_checkpoint(compose(["data=shards", f"data.eval_path={tmp_path / 'shards'}",
                                           "data.num_classes=5", "data.num_workers=0", "eval.accelerator=cpu",
                                           f"run_root={tmp_path / 'runs'}"], config_name="eval"),
                                  write_checkpoint(model))
    note = results["per_class"]
    assert note["targets"] == "multi-label"
    assert note["confusion_matrix"] == "skipped: multi-label targets give an image no single true class (its row)"
    header, *rows = read_csv(Path(results["run_dir"]) / "per_class.csv")
    # class 0: on 2 of 6 images, said yes to all 6: precision 2/6, recall 1, right on 2 of 6 decisions
    assert rows[0][2:] == ["2", "6", "0.333333", "0.333333", "1.000000", "0.500000"]
    assert rows[1][2:] == ["2", "0", "0.666667", "0.000000", "0.000000", "0.000000"]  # said no to all 6
    assert not (Path(results["run_dir"]) / "confusion_matrix.csv").exists()


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
    counts, accuracies and per-class scores are those of one process (a padded sampler would count 10 images, or 6)."""
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

    measured = ("top1", "top5", "num_samples", "real_top1", "real_num_samples", "macro_precision", "macro_recall",
                "macro_f1", "macro_accuracy")
    assert r0["devices"] == 2 and one["devices"] == 1
    assert r0["num_samples"] == 8 and r0["real_num_samples"] == 7  # the split's size; image 3's list is empty
    assert {k: r0[k] for k in measured} == {k: r1[k] for k in measured} == pytest.approx({k: one[k] for k in measured})
    assert 0 < one["top1"] < 1  # the images get different classes: the two passes had something to disagree on
    (written,) = (tmp_path / "two" / "eval").iterdir()  # one run directory for both ranks, written by rank 0
    assert json.loads((written / "results.json").read_text()) == r0 and r1["run_dir"] == str(written)
    for counts in ("per_class.csv", "confusion_matrix.csv"):  # per-class counts are summed over the ranks too
        assert (written / counts).read_text() == (Path(one["run_dir"]) / counts).read_text()


def test_classes_are_named_by_the_class_map_else_the_model_else_the_data(tmp_path, constant_checkpoint, val_folder):
    """The timm-format file names no classes: the folder's names are shown, unless a class map gives others."""
    def names_in(results):
        with open(f"{results['run_dir']}/per_class.csv") as f:
            return [row["name"] for row in csv.DictReader(f)]

    assert names_in(evaluate_checkpoint(eval_config(tmp_path), constant_checkpoint)) == [f"class{c}" for c in range(6)]
    (tmp_path / "map.txt").write_text("\n".join("abcdef"))
    results = evaluate_checkpoint(eval_config(tmp_path, f"eval.class_map={tmp_path / 'map.txt'}"), constant_checkpoint)
    assert names_in(results) == list("abcdef")
