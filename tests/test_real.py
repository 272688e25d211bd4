"""ReaL top-1: the reassessed labels file, image numbers from names, and the metric on hand-computed cases."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from mixer_cli.core.errors import UserError
from mixer_cli.evaluate.real_labels import (
    FolderWithImageNumbers,
    RealTop1,
    image_number,
    image_numbers,
    read_real_labels,
    with_image_numbers,
)

# Images 1..5: image 2 has no correct label (left out), image 3 has two.
LABELS = [[3], [], [1, 3], [0], [2]]


def one_hot_logits(classes, num_classes=4):
    return torch.nn.functional.one_hot(torch.tensor(classes), num_classes).float()


def test_real_top1_by_hand():
    metric = RealTop1(LABELS)
    # predictions 3, 0, 1, 2 for images 1-4: right, left out, right (1 is in [1, 3]), wrong (2 not in [0])
    metric.update(one_hot_logits([3, 0, 1, 2]), torch.tensor([1, 2, 3, 4]))
    assert metric.compute().item() == pytest.approx(2 / 3)
    metric.update(one_hot_logits([2]), torch.tensor([5]))  # right
    assert metric.compute().item() == pytest.approx(3 / 4)
    assert (int(metric.mean_value), metric.num_counted()) == (3, 4)  # images right, images with a list


def test_real_top1_counts_add_up_over_shards_of_the_data():
    """Under DDP each rank counts its images and the counts are summed: the same as one pass."""
    whole, first, second = RealTop1(LABELS), RealTop1(LABELS), RealTop1(LABELS)
    logits, numbers = one_hot_logits([3, 0, 1, 2, 1]), torch.tensor([1, 2, 3, 4, 5])
    whole.update(logits, numbers)
    first.update(logits[:2], numbers[:2])
    second.update(logits[2:], numbers[2:])
    assert int(first.mean_value + second.mean_value) == int(whole.mean_value) == 2
    assert first.num_counted() + second.num_counted() == whole.num_counted() == 4


def test_an_image_without_labels_only_is_nan_not_zero():
    metric = RealTop1(LABELS)
    metric.update(one_hot_logits([0]), torch.tensor([2]))
    assert torch.isnan(metric.compute())


def test_an_image_number_beyond_the_file_is_a_one_line_error():
    metric = RealTop1(LABELS)
    with pytest.raises(UserError, match=r"^validation image number 6 is beyond the ReaL labels file, which has 5 "
                                        r"entries; the full real.json has 50,000$"):
        metric.update(one_hot_logits([0, 1]), torch.tensor([1, 6]))


@pytest.mark.parametrize("name,number", [
    ("ILSVRC2012_val_00000042.JPEG", 42),
    ("/data/imagenet/val/n01440764/ILSVRC2012_val_00000293.JPEG", 293),
    ("ILSVRC2012_val_00050000", 50000),  # a shard key that keeps the file's stem
])
def test_image_number_from_file_names_and_keys(name, number):
    assert image_number(name) == number


def test_a_name_without_an_image_number_is_a_one_line_error():
    with pytest.raises(UserError, match=r"^'cat.jpg' names no ImageNet validation image"):
        image_numbers(["ILSVRC2012_val_00000001", "cat.jpg"])


def test_reads_real_json(tmp_path):
    path = tmp_path / "real.json"
    path.write_text(json.dumps(LABELS))
    assert read_real_labels(path) == LABELS


@pytest.mark.parametrize("text,reason", [
    ("[[1], [2, 3], [", "Expecting value"),  # truncated
    ("", "Expecting value"),  # empty
    ("[]", "expected a non-empty JSON list of lists"),
    ('{"1": [2]}', "expected a non-empty JSON list of lists"),
    ("[[1], 2]", "entry 1 is 2, not a list of class numbers"),
    ('[[1], ["n01440764"]]', "entry 1 is \\['n01440764'\\], not a list of class numbers"),
])
def test_a_bad_labels_file_is_a_one_line_error_naming_it(tmp_path, text, reason):
    path = tmp_path / "real.json"
    path.write_text(text)
    with pytest.raises(UserError, match=rf"^{path} is not a ReaL labels file \(real.json\): .*{reason}") as e:
        read_real_labels(path)
    assert "\n" not in str(e.value)


def test_a_missing_labels_file_says_which_key_to_set(tmp_path):
    with pytest.raises(UserError, match="ReaL labels file .*nope.json does not exist; set data.real_labels="):
        read_real_labels(tmp_path / "nope.json")


def test_an_image_folder_yields_each_image_number(tmp_path):
    for cls, number in (("n01", 7), ("n01", 3), ("n02", 12)):
        (tmp_path / cls).mkdir(exist_ok=True)
        Image.fromarray(np.full((4, 4, 3), number, np.uint8)).save(tmp_path / cls / f"ILSVRC2012_val_{number:08d}.png")
    dataset = with_image_numbers(ImageFolder(str(tmp_path), transform=lambda im: np.asarray(im)[0, 0, 0]))
    assert isinstance(dataset, FolderWithImageNumbers)
    # the pixel value was set to the image's number: each sample carries its own number
    assert sorted((int(x), y, n) for x, y, n in (dataset[i] for i in range(len(dataset)))) == [
        (3, 0, 3), (7, 0, 7), (12, 1, 12)]


def test_a_source_without_file_names_cannot_give_real_labels():
    with pytest.raises(UserError, match="ReaL labels need ImageNet's validation file names"):
        with_image_numbers(torch.utils.data.TensorDataset(torch.zeros(2, 1)))


# ---- ReaL over webdataset shards: `mixer data write` keeps the names, `mixer eval` and training read them ----

# Image number -> class folder: six validation images, numbered with gaps as a class's images are.
VAL_IMAGES = {2: 0, 3: 1, 5: 2, 6: 1, 7: 0, 8: 2}
# ReaL lists of images 1..8: image 3's is empty (left out); images 1 and 4 are in the file, not the data.
VAL_REAL = [[1], [1], [], [1], [0, 1], [2], [1, 2], [0]]


def val_pixels(number: int) -> np.ndarray:
    return np.random.default_rng(number).integers(0, 256, (16, 16, 3), dtype=np.uint8)


def write_val_shards(root, images=VAL_IMAGES, shard_size=4, extra=()):
    """ImageNet-style validation PNGs (class folders, ILSVRC2012_val_* names, plus `extra` (class, name)
    files), written as shards by `mixer data write`'s writer; returns the shards' folder."""
    from mixer_cli.data.writer import folder_samples, write_shards

    files = [(c, f"ILSVRC2012_val_{n:08d}") for n, c in images.items()] + list(extra)
    for c, stem in files:
        (root / "val" / f"class{c}").mkdir(parents=True, exist_ok=True)
        number = int(stem[-8:]) if stem.startswith("ILSVRC") else 99
        Image.fromarray(val_pixels(number)).save(root / "val" / f"class{c}" / f"{stem}.png")
    write_shards(*folder_samples(root / "val"), root / "shards", shard_size=shard_size)
    return root / "shards"


def shard_keys(folder) -> list[str]:
    import webdataset as wds

    from mixer_cli.data.shards import resolve_shards

    urls, _ = resolve_shards(str(folder), None, "eval_path")
    return [s["__key__"] for s in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())]


def test_data_write_keeps_the_file_stem_after_the_sample_number(tmp_path):
    from mixer_cli.data.writer import folder_samples

    shards = write_val_shards(tmp_path, extra=[(0, "a.b")])  # webdataset ends a key at its first dot
    names = [Path(s.name).stem for s in folder_samples(tmp_path / "val")[1]]
    assert sorted(shard_keys(shards)) == [f"{i:09d}_{stem.replace('.', '_')}" for i, stem in enumerate(names)]
    # class0 sorted: ILSVRC2012_val_00000002, ILSVRC2012_val_00000007, a.b
    assert {"000000000_ILSVRC2012_val_00000002", "000000002_a_b"} <= set(shard_keys(shards))


def test_eval_shards_carry_each_samples_key_when_asked(tmp_path):
    from omegaconf import OmegaConf

    from mixer_cli.data.shards import eval_shards
    from mixer_cli.data.transforms import eval_transform

    data = OmegaConf.create({"eval_path": str(write_val_shards(tmp_path)), "num_classes": 3, "img_size": 16,
                             "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
                             "decode": "pil"})
    aug = OmegaConf.create({"eval_crop_mode": "squash", "eval_crop_pct": 1.0})
    shards = eval_shards(data, eval_transform(data, aug))
    shards.batch_size = 4
    assert all(len(batch) == 2 for batch in shards)  # (images, labels) unless asked
    dataset = with_image_numbers(shards)
    assert dataset is shards and dataset.keys() == shard_keys(tmp_path / "shards")  # from the tar headers alone
    seen = {}
    for x, y, keys in dataset:
        for img, label, key in zip(x, y, keys):
            n = image_number(key)
            seen[n] = int(label)  # the key travels with its own image: its pixels are the ones written for n
            assert np.abs(np.round((img.permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255) - val_pixels(n)).max() <= 1
    assert seen == VAL_IMAGES


def shards_eval_args(tmp_path, ckpt, real_file):
    return ["eval", "--from", str(ckpt), "data=shards", f"data.eval_path={tmp_path / 'shards'}", "data.num_classes=6",
            "data.num_workers=0", f"data.real_labels={real_file}", "eval.accelerator=cpu", "eval.batch_size=4",
            f"run_root={tmp_path / 'runs'}"]


def test_mixer_eval_gives_real_top1_over_shards_by_hand(tmp_path, constant_checkpoint):
    from typer.testing import CliRunner

    from mixer_cli.cli import app

    write_val_shards(tmp_path, shard_size=4)
    (tmp_path / "real.json").write_text(json.dumps(VAL_REAL))
    r = CliRunner().invoke(app, shards_eval_args(tmp_path, constant_checkpoint, tmp_path / "real.json"))
    assert r.exit_code == 0, r.output
    (run,) = (tmp_path / "runs" / "eval").iterdir()
    results = json.loads((run / "results.json").read_text())
    # Every image gets class 1 (top-5: all but class 0). Labels 0 1 2 1 0 2: top-1 2/6, top-5 4/6.
    # ReaL lists of images 2 3 5 6 7 8: [1] hit, [] left out, [0, 1] hit, [2] miss, [1, 2] hit, [0] miss: 3/5.
    expected = {"top1": 2 / 6, "top5": 4 / 6, "num_samples": 6, "real_top1": 3 / 5, "real_num_samples": 5}
    assert {k: results[k] for k in expected} == pytest.approx(expected)


def eval_error(tmp_path, ckpt, real):
    from typer.testing import CliRunner

    from mixer_cli.cli import app

    (tmp_path / "real.json").write_text(json.dumps(real))
    r = CliRunner().invoke(app, shards_eval_args(tmp_path, ckpt, tmp_path / "real.json"))
    assert r.exit_code == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1, r.output
    assert not (tmp_path / "runs").exists()
    return r.stderr.strip()


def test_a_shard_image_beyond_the_labels_file_is_one_line_exit_2(tmp_path, constant_checkpoint):
    write_val_shards(tmp_path)
    assert eval_error(tmp_path, constant_checkpoint, VAL_REAL[:7]) == (
        "error: validation image number 8 is beyond the ReaL labels file, which has 7 entries; the full real.json "
        "has 50,000")


def test_a_shard_key_without_an_image_number_is_one_line_naming_it(tmp_path, constant_checkpoint):
    write_val_shards(tmp_path, extra=[(2, "cat")])
    key = next(k for k in shard_keys(tmp_path / "shards") if k.endswith("_cat"))
    assert eval_error(tmp_path, constant_checkpoint, VAL_REAL) == (
        f"error: '{key}' names no ImageNet validation image (ILSVRC2012_val_NNNNNNNN): ReaL labels need the "
        "original file names, in folders or as shard keys")


def test_pretraining_logs_real_top1_that_its_last_checkpoint_gives(tmp_path, tiny_run):
    """val/real_top1 in metrics.csv and results.json equals ReaL top-1 computed here, by hand, from the
    predictions of last.ckpt on the validation images."""
    import csv

    from mixer_cli.commands.pretrain import pretrain
    from mixer_cli.config.compose import compose
    from mixer_cli.data.writer import folder_samples, write_shards
    from mixer_cli.models import load_mixer

    write_val_shards(tmp_path)
    for c in range(3):
        (tmp_path / "train" / f"class{c}").mkdir(parents=True)
        for j in range(4):
            Image.fromarray(val_pixels(100 + 10 * c + j)).save(tmp_path / "train" / f"class{c}" / f"{j}.png")
    write_shards(*folder_samples(tmp_path / "train"), tmp_path / "train_shards", shard_size=12)
    (tmp_path / "real.json").write_text(json.dumps(VAL_REAL))
    cfg = compose([
        "data=shards", f"data.train_path={tmp_path / 'train_shards'}", f"data.eval_path={tmp_path / 'shards'}",
        "data.num_classes=3", "data.img_size=16", "data.global_batch=4", "data.num_workers=0",
        f"data.real_labels={tmp_path / 'real.json'}", "aug=demo", "aug.pad_crop=0", *tiny_run, "optim.lr=0.01",
        "sched.warmup_steps=1", "trainer.epochs=2",
        f"run_root={tmp_path / 'runs'}", "name=real",
    ])
    results = pretrain(cfg, progress=False)
    run = Path(results["run_dir"])

    model = load_mixer(run / "last.ckpt").eval()
    numbers = sorted(VAL_IMAGES)
    x = torch.tensor(np.stack([val_pixels(n) for n in numbers])).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    with torch.no_grad():
        predicted = model(x).argmax(dim=1).tolist()
    counted = [(p in VAL_REAL[n - 1]) for n, p in zip(numbers, predicted) if VAL_REAL[n - 1]]
    by_hand = sum(counted) / len(counted)

    assert results["real_top1"] == pytest.approx(by_hand) and results["real_num_samples"] == 5
    assert json.loads((run / "results.json").read_text())["real_top1"] == pytest.approx(by_hand)
    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("val/real_top1")]
    assert len(rows) == 2 and float(rows[-1]["val/real_top1"]) == pytest.approx(by_hand)  # one per epoch
    (tested,) = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("test/real_top1")]
    assert float(tested["test/real_top1"]) == pytest.approx(by_hand)  # the final evaluation
