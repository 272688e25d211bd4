"""`mixer predict`: a checkpoint's top-k classes for a user's images, with its preprocessing and class names."""
import csv
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from timm.data import create_transform, resolve_data_config
from typer.testing import CliRunner

from mixer_cli.cli import app, split_overrides
from mixer_cli.models import load_mixer
from mixer_cli.models.contract import with_class_names

# The `constant_checkpoint` fixture's logits, the same for every image.
CONSTANT_LOGITS = torch.tensor([0.0, 5.0, 1.0, 4.0, 2.0, 3.0])


def predict(*args):
    return CliRunner().invoke(app, ["predict", *map(str, args)], env={"COLUMNS": "200"})


def rgb_images(folder, count, size=(20, 24)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return sorted(folder.glob("*.png"))


def the_run(tmp_path):
    (run_dir,) = (tmp_path / "runs" / "predict").iterdir()
    rows = list(csv.DictReader(open(run_dir / "predictions.csv")))
    return run_dir, rows


def test_constant_logits_give_the_hand_computed_softmax_and_every_readable_image(tmp_path, constant_checkpoint):
    images = rgb_images(tmp_path / "photos", 3)
    (tmp_path / "photos" / "notes.png").write_text("not an image")  # listed and skipped, not fatal
    r = predict("--from", constant_checkpoint, tmp_path / "photos", tmp_path / "missing.jpg", "--topk", 3,
                f"run_root={tmp_path / 'runs'}", "predict.num_workers=0", "predict.batch_size=2")
    assert r.exit_code == 0, r.output
    run_dir, rows = the_run(tmp_path)
    expected = CONSTANT_LOGITS.softmax(0)
    assert [row["path"] for row in rows] == [str(p) for p in images]  # input order; a folder's files sorted
    for row in rows:  # timm weights name no classes (6 is no ImageNet size): the index is the name
        assert [row[f"class_{k}"] for k in (1, 2, 3)] == ["1", "3", "5"]
        assert [float(row[f"prob_{k}"]) for k in (1, 2, 3)] == pytest.approx(expected[[1, 3, 5]].tolist(), abs=1e-6)
    skipped = {row["path"]: row["reason"] for row in csv.DictReader(open(run_dir / "skipped.csv"))}
    assert skipped == {str(tmp_path / "missing.jpg"): "no such file or folder",
                       str(tmp_path / "photos" / "notes.png"): "not an image file PIL reads"}
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["num_predicted"], results["num_skipped"], results["topk"]) == (3, 2, 3)
    assert "img0.png" in r.output and "skipped 2" in r.output
    assert "3 images predicted by" in r.output and "the table shows" not in r.output


def test_the_summary_counts_one_image_and_says_the_table_shows_fewer_classes_than_the_csv(tmp_path,
                                                                                        constant_checkpoint):
    (image,) = rgb_images(tmp_path / "photos", 1)
    r = predict("--from", constant_checkpoint, image, "--topk", 5, f"run_root={tmp_path / 'runs'}",
                "predict.num_workers=0")
    assert r.exit_code == 0, r.output
    assert "1 image predicted by" in r.output and "(the table shows the top 3 of 5)" in r.output
    _, (row,) = the_run(tmp_path)
    assert [row[f"class_{k}"] for k in range(1, 6)] == ["1", "3", "5", "4", "2"]


def test_probabilities_match_timms_own_preprocessing_and_the_model(tmp_path, tiny_mixer, write_checkpoint):
    """An independent path: timm's transform from the model's data config, then the network's softmax."""
    model = tiny_mixer(num_classes=4, img_size=16, in_chans=3, trained=True)
    model.pretrained_cfg = with_class_names({**model.pretrained_cfg, "interpolation": "bicubic", "crop_pct": 0.8,
                                             "crop_mode": "center"}, ["ant", "bee", "cow", "dog"])
    checkpoint = write_checkpoint(model)
    images = rgb_images(tmp_path / "in", 5, size=(30, 22))
    r = predict("--from", checkpoint, *images, "--topk", 4, f"run_root={tmp_path / 'runs'}", "predict.num_workers=0")
    assert r.exit_code == 0, r.output
    _, rows = the_run(tmp_path)
    loaded = load_mixer(checkpoint).eval()
    transform = create_transform(**resolve_data_config({}, model=loaded))
    with torch.no_grad():
        probs = loaded(torch.stack([transform(Image.open(p).convert("RGB")) for p in images])).softmax(1)
    names = ["ant", "bee", "cow", "dog"]
    for row, p in zip(rows, probs):
        order = p.argsort(descending=True).tolist()
        assert [row[f"class_{k + 1}"] for k in range(4)] == [names[c] for c in order]
        assert [float(row[f"prob_{k + 1}"]) for k in range(4)] == pytest.approx(p[order].tolist(), abs=1e-5)


def test_a_sigmoid_trained_head_gives_independent_per_class_probabilities(tmp_path, constant_checkpoint,
                                                                          write_checkpoint):
    model = load_mixer(constant_checkpoint)
    model.pretrained_cfg["head_activation"] = "sigmoid"  # as a run with loss=sigmoid records it
    images = rgb_images(tmp_path / "in", 1)
    r = predict("--from", write_checkpoint(model), *images, "--topk", 6, f"run_root={tmp_path / 'runs'}",
                "predict.num_workers=0")
    assert r.exit_code == 0, r.output
    _, (row,) = the_run(tmp_path)
    probs = [float(row[f"prob_{k}"]) for k in range(1, 7)]
    assert probs == pytest.approx(CONSTANT_LOGITS.sigmoid().sort(descending=True).values.tolist(), abs=1e-6)
    assert sum(probs) > 3  # independent decisions, not one distribution


def test_a_class_map_names_the_classes_of_weights_that_carry_none(tmp_path, constant_checkpoint):
    names = ["apple", "banana", "cherry", "date", "elder", "fig"]
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    images = rgb_images(tmp_path / "in", 1)
    r = predict("--from", constant_checkpoint, *images, "--class-map", tmp_path / "classes.txt", "--topk", 2,
                f"run_root={tmp_path / 'runs'}", "predict.num_workers=0")
    assert r.exit_code == 0, r.output
    _, (row,) = the_run(tmp_path)
    assert (row["class_1"], row["index_1"], row["class_2"]) == ("banana", "1", "date")
    assert "banana" in r.output


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "error: no image to predict: {missing}: no such file or folder"),
    (["{tmp}/*.gif"], "error: no image to predict: {tmp}/*.gif: matches no file"),
    (["{bad}"], "error: none of the 1 images could be read, e.g. {bad}: not an image file PIL reads"),
    (["{image}", "--class-map", "{two}"], "error: --class-map {two} names 2 classes, the model has 6: one name "
                                          "per line, in class order"),
    (["{image}", "--topk", "0"], "error: predict.topk must be a whole number >= 1, got 0"),
])
def test_bad_input_is_one_line_exit_2_and_no_run(tmp_path, constant_checkpoint, args, message):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG but cut")
    (tmp_path / "two.txt").write_text("a\nb\n")
    (image,) = rgb_images(tmp_path / "in", 1)
    places = {"missing": tmp_path / "missing.jpg", "tmp": tmp_path, "bad": tmp_path / "bad.png", "image": image,
              "two": tmp_path / "two.txt"}
    r = predict("--from", constant_checkpoint, *(a.format(**places) for a in args), f"run_root={tmp_path / 'runs'}",
                "predict.num_workers=0")
    assert r.exit_code == 2 and message.format(**places) in r.output and "Traceback" not in r.output
    predict_runs = tmp_path / "runs" / "predict"
    assert not predict_runs.exists() or not any(predict_runs.iterdir())  # a failed run leaves no directory


def test_overrides_are_told_from_paths(tmp_path):
    odd = tmp_path / "a=b.png"  # a file whose name reads like an override is still a file
    odd.write_bytes(b"")
    assert split_overrides([str(odd), "predict.topk=3", "x.png", "name=cats"]) == (
        [str(odd), "x.png"], ["predict.topk=3", "name=cats"])


def test_a_model_without_a_head_has_nothing_to_predict(tmp_path, tiny_mixer, write_checkpoint):
    checkpoint = write_checkpoint(tiny_mixer(num_classes=0))
    r = predict("--from", checkpoint, *rgb_images(tmp_path / "in", 1), f"run_root={tmp_path / 'runs'}")
    assert r.exit_code == 2 and r.output.startswith(f"error: {checkpoint} has no classification head (num_classes 0)")


def test_demo_digits_as_png_files_get_the_classes_the_demo_pipeline_gives(tmp_path, tiny_mixer, write_checkpoint):
    """Grey 28x28 PNGs of the demo's test digits, read as files, against the same images through the
    demo's in-memory pipeline: the same logits, so the same classes, named by digit."""
    from mixer_cli.config.compose import compose
    from mixer_cli.data import build_dataset, demo_arrays

    model = tiny_mixer(trained=True)  # 1 channel, 28 px, 10 classes, the demo's mean/std below
    cfg = compose(["data=demo"])
    model.pretrained_cfg = with_class_names({**model.pretrained_cfg, "mean": tuple(cfg.data.mean),
                                             "std": tuple(cfg.data.std), "crop_pct": 1.0, "crop_mode": "squash"},
                                            [str(d) for d in range(10)])
    images, _ = demo_arrays("test")
    (tmp_path / "digits").mkdir()
    picked = range(0, 1000, 50)
    for i in picked:
        Image.fromarray(images[i]).save(tmp_path / "digits" / f"{i:04d}.png")
    r = predict("--from", write_checkpoint(model), tmp_path / "digits", f"run_root={tmp_path / 'runs'}",
                "predict.num_workers=0", "--topk", 2)
    assert r.exit_code == 0, r.output
    _, rows = the_run(tmp_path)
    demo = build_dataset(OmegaConf.merge(cfg.data, {"decode": "pil"}), cfg.aug, "test")  # floats
    with torch.no_grad():
        probs = model.eval()(torch.stack([demo[i][0] for i in picked])).softmax(1)
    assert [row["class_1"] for row in rows] == [str(c) for c in probs.argmax(1).tolist()]
    assert [float(row["prob_1"]) for row in rows] == pytest.approx(probs.max(1).values.tolist(), abs=1e-5)
