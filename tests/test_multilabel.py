"""Multi-label shards (JFT-300M's kind): `.labels` holds several classes, which become multi-hot
targets for the sigmoid loss, mixup and precision@1."""

import pytest
import torch

from mixer_cli.commands.pretrain import pretrain
from mixer_cli.config.compose import compose
from mixer_cli.data import build_dataset
from mixer_cli.data.shard_samples import parse_label

LABELS = ["0,2", "1", "3 4", "2", "0,1,4", "4", "1,3", "2,3"]


def test_labels_text_becomes_a_multi_hot_row():
    assert parse_label(3, 5) == 3
    assert parse_label(b"0,2 4", 5).tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="outside"):
        parse_label(b"7", 5)


def test_multi_label_shards_train_with_sigmoid_loss_and_mixup(tmp_path, tiny_run, multi_label_shards):
    multi_label_shards(tmp_path / "s", LABELS)
    cfg = compose(["data=imagenet", f"data.train_path={tmp_path / 's'}", f"data.eval_path={tmp_path / 's'}",
                   "data.train_size=null", "data.eval_size=null", "data.num_classes=5", "data.img_size=16",
                   "data.global_batch=4", "data.num_workers=0", "loss=sigmoid", "aug.randaug_magnitude=0",
                   "aug.mixup=0.5", *tiny_run, "model.patch_size=4", "trainer.steps=2",
                   f"run_root={tmp_path / 'runs'}"])
    eval_set = build_dataset(cfg.data, cfg.aug, "test")
    eval_set.batch_size = 8
    (x, y), = list(eval_set)
    assert x.shape == (8, 3, 16, 16) and y.shape == (8, 5)
    assert y.sum(dim=1).tolist() == [2, 1, 2, 1, 3, 1, 2, 2]
    results = pretrain(cfg, progress=False)
    assert results["steps"] == 2 and results["num_samples"] == 8
    # a hit is any of the image's classes among the top k: with all 5 classes in the top 5, every image hits
    assert results["top5"] == 1.0 and 0 <= results["top1"] <= 1
    assert torch.isfinite(torch.tensor(results["train_loss"]))
