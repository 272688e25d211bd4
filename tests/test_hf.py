"""data=hf: Hugging Face data sets, as `save_to_disk` folders (read row by row) and parquet files
(streamed by row group), give what the same images give as an image folder or shards."""
from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from hf_sets import hf_rows, write_hf
from mixer_cli.commands.data_write import data_write
from mixer_cli.commands.eval import evaluate_checkpoint
from mixer_cli.config.compose import compose
from mixer_cli.core.errors import UserError
from mixer_cli.data import build_dataset, class_names
from mixer_cli.data.folder import UnreadableImage
from mixer_cli.data.writer import folder_samples, write_shards

CLASSES = ["cat", "dog", "emu"]
NUMBERS = range(1, 13)  # ImageNet-style validation file numbers; image n is of class n % 3


def png(seed: int, size=(20, 24)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture()
def forms(tmp_path):
    """The same 12 images as an image folder, shards, a save_to_disk folder and parquet files (two
    files of row groups of 4), in the folder's order; the overrides that read each."""
    folder = tmp_path / "folder"
    for n in NUMBERS:
        (folder / CLASSES[n % 3]).mkdir(parents=True, exist_ok=True)
        (folder / CLASSES[n % 3] / f"ILSVRC2012_val_{n:08d}.png").write_bytes(png(n))
    classes, samples = folder_samples(folder)
    write_shards(classes, samples, tmp_path / "shards", shard_size=5)
    rows = hf_rows([s.read() for s in samples], [s.label for s in samples], classes,
                   names=[f"{s.stem}.png" for s in samples])
    disk, parquet = write_hf(rows, tmp_path / "hf")
    data_write(f"hf:{parquet}", tmp_path / "from-hf", shard_size=5, seed=0, workers=1)
    write_timm_layout(samples, tmp_path / "timm")
    return {"folder": ["data=folder", f"data.eval_path={folder}", "data.num_classes=3"],
            "shards": ["data=shards", f"data.eval_path={tmp_path / 'shards'}", "data.num_classes=3"],
            "disk": ["data=hf", f"data.eval_path={disk}"],
            "parquet": ["data=hf", f"data.eval_path={parquet}"],
            "shards from hf": ["data=shards", f"data.eval_path={tmp_path / 'from-hf'}", "data.num_classes=3"],
            "timm's layout": ["data=shards", f"data.eval_path='{tmp_path / 'timm'}/val-{{0000..0002}}.tar'",
                              "data.num_classes=3"]}


def write_timm_layout(samples, root) -> None:
    """timm's published webdataset layout: `.jpg`, `.cls` (the class number as text) and `.json` per
    sample, no index.json, read by a brace pattern."""
    import webdataset as wds

    root.mkdir()
    for shard in range(3):
        with wds.TarWriter(str(root / f"val-{shard:04d}.tar")) as sink:
            for s in samples[shard::3]:
                sink.write({"__key__": s.stem, "jpg": s.read(), "cls": str(s.label).encode(),
                            "json": json.dumps({"filename": f"{s.stem}.JPEG", "label": s.label}).encode()})


def samples(dataset) -> list[tuple]:
    """(image, label) pairs of a split, whether it reads rows (map-style) or yields batches (streamed)."""
    if isinstance(dataset, IterableDataset):
        return [pair for x, y in dataset for pair in zip(x, y)]
    return [dataset[i] for i in range(len(dataset))]


def eval_config(tmp_path, *overrides):
    return compose([*overrides, "data.num_workers=0", f"run_root={tmp_path / 'runs'}", "eval.accelerator=cpu",
                    "eval.batch_size=5"], config_name="eval")


def data_config(tmp_path, *overrides):
    """A pre-training config (its data config states the preprocessing; eval's leaves it to the checkpoint)."""
    return compose([*overrides, "data.num_workers=0", "data.img_size=16", f"run_root={tmp_path / 'runs'}"])


def test_eval_scores_the_same_images_alike_as_a_folder_shards_a_save_to_disk_folder_and_parquet_files(
        tmp_path, forms, tiny_mixer):
    model = tiny_mixer(num_classes=3, img_size=16, in_chans=3, patch_size=8)
    torch.nn.init.normal_(model.head.weight)  # the zero head would give every image class 0
    torch.save(model.state_dict(), tmp_path / "random.pth")
    real = [[n % 3, (n + 1) % 3] if n % 4 else [] for n in range(1, 13)]  # images 4, 8, 12 have no list
    (tmp_path / "real.json").write_text(json.dumps(real))
    scores = {}
    for form, overrides in forms.items():
        results = evaluate_checkpoint(eval_config(tmp_path, *overrides, f"data.real_labels={tmp_path / 'real.json'}"),
                                      tmp_path / "random.pth")
        scores[form] = {k: results[k] for k in ("top1", "top5", "num_samples", "real_top1", "real_num_samples",
                                                "macro_precision", "macro_recall", "macro_f1")}
    assert scores["folder"]["num_samples"] == 12 and scores["folder"]["real_num_samples"] == 9
    assert 0 < scores["folder"]["top1"] < 1  # the images get different classes: the forms had something to differ on
    for form in forms:
        assert scores[form] == pytest.approx(scores["folder"]), form


def test_every_form_gives_the_same_tensors_in_the_same_order(tmp_path, forms):
    def tensors(overrides):
        cfg = data_config(tmp_path, *overrides, "data.decode=pil")
        return samples(build_dataset(cfg.data, cfg.aug, "test"))

    folder = tensors(forms["folder"])
    for form in ("disk", "parquet"):
        got = tensors(forms[form])
        assert len(got) == len(folder) == 12
        for (x, y), (want_x, want_y) in zip(got, folder):
            assert torch.equal(x, want_x) and int(y) == int(want_y)


@pytest.mark.parametrize("form", ["disk", "parquet"])
def test_num_classes_and_class_names_come_from_the_class_label(tmp_path, forms, form):
    cfg = data_config(tmp_path, *forms[form])  # data.num_classes is null in conf/data/hf.yaml
    assert cfg.data.num_classes == 3 and cfg.model.num_classes == 3
    assert class_names(cfg.data) == tuple(CLASSES)


def test_plain_integer_labels_need_num_classes(tmp_path):
    disk, parquet = write_hf(hf_rows([png(0), png(1)], [0, 1]), tmp_path)
    with pytest.raises(UserError) as e:
        data_config(tmp_path, "data=hf", f"data.eval_path={disk}")
    assert str(e.value) == (f"data.eval_path={disk}: column 'label' holds plain integers, not a ClassLabel that "
                            "names its classes: set data.num_classes")
    cfg = data_config(tmp_path, "data=hf", f"data.eval_path={parquet}", "data.num_classes=2")
    assert class_names(cfg.data) is None
    assert [int(y) for _, y in samples(build_dataset(cfg.data, cfg.aug, "test"))] == [0, 1]


@pytest.mark.parametrize("form", ["disk", "parquet"])
def test_a_list_of_labels_per_row_gives_multi_hot_rows(tmp_path, form):
    labels = [[0, 2], [1], [], [3, 0]]
    paths = dict(zip(("disk", "parquet"), write_hf(hf_rows([png(i) for i in range(4)], labels, list("abcd"),
                                                           multi=True), tmp_path)))
    cfg = data_config(tmp_path, "data=hf", f"data.eval_path={paths[form]}")
    rows = [y for _, y in samples(build_dataset(cfg.data, cfg.aug, "test"))]
    assert cfg.data.num_classes == 4
    assert torch.stack(rows).tolist() == [
        [1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 1]]


def read_labels(dataset, placed: tuple[int, int], workers: int) -> list[int]:
    dataset.placed = placed
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    return [int(y) for _, labels in loader for y in labels]


def test_parquet_row_groups_are_split_over_ranks_and_workers_each_row_once(tmp_path):
    """16 rows labelled by number in 4 row groups: 2 ranks x 2 workers read each row once, in
    evaluation and in a training epoch."""
    _, parquet = write_hf(hf_rows([png(i, (8, 8)) for i in range(16)], list(range(16))), tmp_path)
    cfg = data_config(tmp_path, "data=hf", f"data.eval_path={parquet}", f"data.train_path={parquet}",
                      "data.num_classes=16", "data.img_size=8")
    evaluation = build_dataset(cfg.data, cfg.aug, "test")
    evaluation.batch_size = 3
    per_rank = [read_labels(evaluation, (rank, 2), workers=2) for rank in (0, 1)]
    assert sorted(per_rank[0] + per_rank[1]) == list(range(16)) and all(per_rank)

    training = build_dataset(cfg.data, cfg.aug, "train", seed=0)
    training.set_epoch_length(batch_size=2, batches_per_epoch=4)  # per rank: 8 rows from 2 row groups, one a worker
    per_rank = [read_labels(training, (rank, 2), workers=2) for rank in (0, 1)]
    groups = [{label // 4 for label in labels} for labels in per_rank]  # an endless stream may repeat a row
    assert len(groups[0]) == len(groups[1]) == 2 and not groups[0] & groups[1] and all(len(r) == 8 for r in per_rank)


def test_a_run_reads_each_parquet_footer_once_and_again_once_the_file_changes(tmp_path, monkeypatch):
    """A run opens its split for its classes, their names and each data set: on a network file system
    every footer read is a round trip."""
    import pyarrow.parquet as pq

    from mixer_cli.data.hf_source import open_split

    opened, real = [], pq.ParquetFile
    monkeypatch.setattr(pq, "ParquetFile", lambda path, *a, **k: opened.append(path) or real(path, *a, **k))
    _, parquet = write_hf(hf_rows([png(i, (8, 8)) for i in range(8)], [i % 3 for i in range(8)], CLASSES), tmp_path)
    cfg = data_config(tmp_path, "data=hf", f"data.eval_path={parquet}", f"data.train_path={parquet}")
    assert class_names(cfg.data) == tuple(CLASSES)
    build_dataset(cfg.data, cfg.aug, "train", seed=0)
    build_dataset(cfg.data, cfg.aug, "test")
    second = str(parquet / "part-1.parquet")
    assert opened.count(second) == 1  # the first file is opened again for its first image

    _, longer = write_hf(hf_rows([png(i, (8, 8)) for i in range(12)], [0] * 12, CLASSES), tmp_path / "longer")
    (parquet / "part-1.parquet").write_bytes((longer / "part-1.parquet").read_bytes())
    assert open_split(str(parquet), "eval_path").num_rows == 4 + 6
    assert opened.count(second) == 2


def test_data_write_from_hf_reads_the_label_column_once(tmp_path, monkeypatch):
    from mixer_cli.data.hf_source import HFSplit

    read, real = [], HFSplit.column
    monkeypatch.setattr(HFSplit, "column", lambda split, name: read.append(name) or real(split, name))
    _, parquet = write_hf(hf_rows([png(i, (8, 8)) for i in range(4)], [0, 1, 2, 0], CLASSES), tmp_path)
    data_write(f"hf:{parquet}", tmp_path / "shards", shard_size=5, seed=0, workers=1)
    assert read.count("label") == 1


def test_the_dev_split_takes_the_same_rows_from_a_save_to_disk_folder_and_parquet_files(tmp_path, forms):
    def dataset(form, split, **kwargs):
        path = next(o for o in forms[form] if o.startswith("data.eval_path=")).split("=", 1)[1]
        cfg = data_config(tmp_path, *forms[form], f"data.train_path={path}", "data.dev_fraction=0.3")
        return build_dataset(cfg.data, cfg.aug, split, **kwargs)

    dev = dataset("disk", "dev").keys()
    assert dev == dataset("parquet", "dev").keys()
    assert all(k.startswith("ILSVRC2012_val_") for k in dev)  # keys are the file names: ReaL labels read them
    every = dataset("disk", "train", augment=False).keys()
    training = dataset("disk", "train")  # without the dev rows
    assert 0 < len(dev) < 12 and set(dev) < set(every) and len(training) == 12 - len(dev)
    assert not set(dev) & {k for i, k in enumerate(every) if i in training.numbers}


def test_training_reads_the_next_row_in_place_of_an_unreadable_image_and_evaluation_names_it(tmp_path, caplog):
    images = [png(0), png(1), b"not an image", png(3)]
    disk, _ = write_hf(hf_rows(images, [0, 1, 0, 1], ["a", "b"]), tmp_path)
    cfg = data_config(tmp_path, "data=hf", f"data.eval_path={disk}", f"data.train_path={disk}")
    training = build_dataset(cfg.data, cfg.aug, "train", seed=0)
    with caplog.at_level(logging.WARNING):
        assert int(training[2][1]) == 1  # row 3's label
    assert "skipped corrupt sample #1" in caplog.text
    with pytest.raises(UnreadableImage) as e:
        build_dataset(cfg.data, cfg.aug, "test")[2]
    assert str(e.value).startswith(f"cannot read the image of row 2 of data.eval_path={disk} (")
    assert str(e.value).endswith("); an evaluation reads every row")


def test_timms_webdataset_layout_trains_from_a_brace_pattern_without_train_size(tmp_path, forms):
    pattern = f"'{tmp_path / 'timm'}/val-{{0000..0002}}.tar'"  # quoted: Hydra reads braces otherwise
    cfg = data_config(tmp_path, "data=shards", f"data.train_path={pattern}", "data.num_classes=3",
                      "data.train_size=null")
    training = build_dataset(cfg.data, cfg.aug, "train")
    assert len(training) == 12
    assert sorted(int(training[i][1]) for i in range(12)) == sorted(n % 3 for n in NUMBERS)


def test_data_write_from_hf_keeps_classes_counts_and_file_names(tmp_path, forms):
    from mixer_cli.data.writer import read_index

    index = read_index(tmp_path / "from-hf")
    assert index["classes"] == CLASSES and index["counts"] == [4, 4, 4] and index["num_samples"] == 12
    cfg = data_config(tmp_path, *forms["shards from hf"])
    keys = build_dataset(cfg.data, cfg.aug, "test").keys()
    assert sorted(k.split("_", 1)[1] for k in keys) == [f"ILSVRC2012_val_{n:08d}" for n in NUMBERS]
