"""A bad input to any command ends before anything is written: exit status 2, exactly one line on
stderr that names the key or file and what is wrong, no traceback, no new file or directory.

Bad config values are refused by the schema (mixer_cli/config/schema.py) when the config is composed;
bad files when they are opened. So nothing here trains: every case runs in-process through
Typer's CliRunner, and Trainer.fit fails the test if a case gets that far.
"""
from __future__ import annotations

import io
import json
import logging
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from mixer_cli.cli import app
from mixer_cli.config.compose import compose
from mixer_cli.config.run_dirs import save_config
from mixer_cli.core.errors import UserError
from mixer_cli.data import build_dataset
from mixer_cli.data.folder import UnreadableImage
from mixer_cli.data.subsets import Selection
from mixer_cli.data.workers import worker_options
from mixer_cli.models.checkpoints import export_safetensors


class Match(str):
    """An expected error line given as a regular expression ({files}/{tmp} filled in, escaped)."""


def names(file: str) -> Match:
    """The error line names this file (its wording is the loader's)."""
    return Match(rf".*{{files}}/{re.escape(file)}\b.*")


def write_checkpoints(d: Path, model) -> None:
    """A good checkpoint (ckpt.safetensors of `model`, for the digits of the demo) and bad ones of every format."""
    export_safetensors(model, d / "ckpt.safetensors")
    torch.save(model.state_dict(), d / "timm.pth")
    np.savez(d / "other.npz", kernel=np.zeros((3, 3)))  # an .npz, but not the paper's parameter names
    for name in ("ckpt.safetensors", "timm.pth", "other.npz"):
        good = (d / name).read_bytes()
        (d / f"truncated-{name}").write_bytes(good[: len(good) // 2])
    (d / "empty.ckpt").write_bytes(b"")
    (d / "notes.ckpt").write_text("not a checkpoint\n")
    state = model.state_dict()
    state["head.weight"] = torch.zeros(10, 7)  # the model is 8 wide
    torch.save(state, d / "mismatch.pth")

    class RunsCode:
        def __reduce__(self):
            return shutil.which, ("true",)

    # torch.save writes protocol 2; torch's safe loader refuses the framing of protocol 4, and warns first
    (d / "pickle.ckpt").write_bytes(pickle.dumps({"state_dict": RunsCode()}, protocol=4))
    (d / "pickle-2.ckpt").write_bytes(pickle.dumps({"state_dict": RunsCode()}, protocol=2))


def write_run_dirs(d: Path) -> None:
    """Run directories to --resume: a good config (with a last.ckpt that is never read, the override
    being refused first), an empty last.ckpt, no last.ckpt, an empty and a truncated config.yaml."""
    for name, config in (("run", "config"), ("run-empty-ckpt", "finetune")):
        (d / name).mkdir()
        save_config(compose([f"run_root={d}/runs"], config_name=config), d / name)
    (d / "run" / "last.ckpt").write_bytes((d / "timm.pth").read_bytes())
    (d / "run-empty-ckpt" / "last.ckpt").write_bytes(b"")
    (d / "run-no-ckpt").mkdir()
    for name, text in (("run-empty-config", ""), ("run-truncated-config", "name: demo\ntrainer: {epochs: [1,\n")):
        (d / name).mkdir()
        (d / name / "config.yaml").write_text(text)
        (d / name / "last.ckpt").write_bytes((d / "timm.pth").read_bytes())


def write_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((28, 28), 128, np.uint8)).save(path)


def write_data(d: Path) -> None:
    """Image folders (good; a class whose first image is empty, a Git LFS pointer or cut short; no class
    folders) and shard folders with bad index.json."""
    for cls in ("a", "b"):
        write_image(d / "folder" / cls / "0.png")
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), np.uint8)).save(noise, "PNG")
    bad = {"corrupt": b"", "lfs": b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 100\n",
           "cut": noise.getvalue()[:400]}  # the header, then part of the pixel data
    for kind, content in bad.items():
        write_image(d / f"{kind}-folder" / "a" / "0.png")
        write_image(d / f"{kind}-folder" / "b" / "1.png")  # after the first: only training would read it
        (d / f"{kind}-folder" / "b" / "0.png").write_bytes(content)
    write_image(d / "flat-folder" / "0.png")
    index = {"format": "mixer-shards/1", "num_samples": 2, "classes": ["a", "b"], "counts": [1, 1],
             "shards": [{"file": "shard-000000.tar", "samples": 2}]}
    for name, text in (("index-empty", ""), ("index-truncated", json.dumps(index)[:40]), ("index-list", "[1, 2]"),
                       ("index-missing-shard", json.dumps(index))):
        (d / name).mkdir()
        (d / name / "index.json").write_text(text)
    (d / "no-index").mkdir()
    write_hf_data(d / "hf")


def write_hf_data(d: Path) -> None:
    """Hugging Face data sets: good ones, a row labelled beyond num_classes, a first image that is not
    one, parquet files of two schemas, a DatasetDict folder, and a folder of the Hub's files of two splits."""
    from hf_sets import hf_rows, write_hf

    good = io.BytesIO()
    Image.fromarray(np.full((28, 28), 128, np.uint8)).save(good, "PNG")
    pixels = [good.getvalue()] * 3
    write_hf(hf_rows(pixels, [0, 1, 0], ["a", "b"]), d / "good", files=1)
    write_hf(hf_rows(pixels, [0, 1, 5]), d / "label-5", files=1)
    write_hf(hf_rows(pixels, [0, -1, 1]), d / "unlabelled", files=1)
    write_hf(hf_rows([b"GIF89a, then nothing", *pixels[1:]], [0, 1, 0], ["a", "b"]), d / "not-an-image", files=1)
    other = hf_rows(pixels, [0, 1, 0], ["a", "b"], label_key="class")
    other.to_parquet(str(d / "good" / "parquet" / "part-other.parquet"))
    shutil.copytree(d / "good" / "parquet", d / "two-schemas")
    (d / "good" / "parquet" / "part-other.parquet").unlink()
    from datasets import DatasetDict

    DatasetDict({"train": other, "test": other}).save_to_disk(str(d / "dataset-dict"))
    (d / "hub").mkdir()
    for split in ("train", "validation"):
        shutil.copy(d / "good" / "parquet" / "part-0.parquet", d / "hub" / f"{split}-00000-of-00001.parquet")


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_mixer) -> Path:
    d = tmp_path_factory.mktemp("files")
    write_checkpoints(d, tiny_mixer())
    write_run_dirs(d)
    write_data(d)
    return d


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a bad input started training")

    monkeypatch.setattr(L.Trainer, "fit", refuse)
    monkeypatch.setattr(L.Trainer, "validate", refuse)


def tree(root: Path) -> set[Path]:
    return set(root.rglob("*"))


CKPT = "--from={files}/ckpt.safetensors"
SHARDS = ["data.source=shards", "data.train_path={files}/%s", "data.eval_path={files}/%s"]
FOLDER = ["data=folder", "data.train_path={files}/%s", "data.eval_path={files}/%s", "data.num_classes=2",
          "data.img_size=28", "data.channels=1", "data.mean=[0.5]", "data.std=[0.5]"]


def hf(path: str, *more: str) -> list[str]:
    return ["data=hf", f"data.train_path={{files}}/hf/{path}", f"data.eval_path={{files}}/hf/{path}",
            "data.img_size=28", "data.channels=1", "data.mean=[0.5]", "data.std=[0.5]", *more]


def shards(folder: str) -> list[str]:
    return [a.replace("%s", folder) for a in SHARDS]


def folder(name: str) -> list[str]:
    return [a.replace("%s", name) for a in FOLDER]


# (command line, expected error line without the "error: " prefix)
CASES = [
    # ---- pretrain: the examples, then every group of conf/
    (["pretrain", "optim.lr=notanumber"], "optim.lr must be a number > 0, got 'notanumber'"),
    (["pretrain", "optim.lr=-0.1"], "optim.lr must be a number > 0, got -0.1"),
    (["pretrain", "data.global_batch=0"], "data.global_batch must be a whole number >= 1, got 0"),
    (["pretrain", "data.global_batch=-5"], "data.global_batch must be a whole number >= 1, got -5"),
    (["pretrain", "trainer.precision=fp77"],
     Match(r"(?=.* 32-true,)(?=.* bf16-mixed,)trainer\.precision must be one of .*, got 'fp77'")),
    (["pretrain", "model.hidden_dim=0"], "model.hidden_dim must be a whole number >= 1 or null, got 0"),
    (["pretrain", "data.num_workers=-1"], "data.num_workers must be a whole number >= 0, got -1"),
    (["pretrain", "trainer.epochs=0"], "trainer.epochs must be a whole number >= 1, got 0"),
    (["pretrain", "trainer.steps=0"], "trainer.steps must be a whole number >= 1 or null, got 0"),
    (["pretrain", "trainer.devices=0"],
     "trainer.devices must be auto, a count >= 1 (-1: all), a list of device ids or a string of ids such as '0,1', "
     "got 0"),
    (["pretrain", "trainer.num_nodes=0"], "trainer.num_nodes must be a whole number >= 1, got 0"),
    (["pretrain", "trainer.accelerator=gpus"], Match(r"trainer\.accelerator must be one of auto, gpu, .*cpu.*, "
                                                     r"got 'gpus'")),
    (["pretrain", "trainer.strategy=ddpp"], Match(r"trainer\.strategy must be one of auto, ddp, .*fsdp.* or a "
                                                  r"_target_ config, got 'ddpp'")),
    (["pretrain", "trainer.grad_clip=0"], "trainer.grad_clip must be a number > 0 or null, got 0"),
    (["pretrain", "trainer.compile=yes"], "trainer.compile must be true, false, auto or a torch.compile mode "
     "(default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs), got 'yes'"),
    (["pretrain", "trainer.device_batch=0"], "trainer.device_batch must be a whole number >= 1 or null, got 0"),
    (["pretrain", "trainer.checkpoint_every_minutes=0"],
     "trainer.checkpoint_every_minutes must be a number > 0 or null, got 0"),
    (["pretrain", "optim.weight_decay=-1"], "optim.weight_decay must be a number >= 0, got -1"),
    (["pretrain", "optim.betas=[0.9,1.0]"], "optim.betas must be two numbers in [0, 1), got [0.9, 1.0]"),
    (["pretrain", "optim._target_=torch.optim.RMSprop"],
     "optim._target_ must be one of torch.optim.AdamW, torch.optim.SGD (the _target_ of a conf/optim file), "
     "got 'torch.optim.RMSprop'"),
    (["pretrain", "loss._target_=torch.nn.MSELoss"],
     "loss._target_ must be one of mixer_cli.train.losses.SigmoidCrossEntropy, "
     "mixer_cli.train.losses.SoftmaxCrossEntropy (the _target_ of a conf/loss file), got 'torch.nn.MSELoss'"),
    (["pretrain", "loss=hinge"], "unknown loss 'hinge'; choose one of: sigmoid, softmax"),
    (["pretrain", "sched.warmup_steps=-1"], "sched.warmup_steps must be a whole number >= 0, got -1"),
    (["pretrain", "sched.decay=cosin"], "sched.decay must be one of linear, cosine, got 'cosin'"),
    (["pretrain", "model.variant=B/17"],
     "model.variant must be one of S/32, S/16, B/32, B/16, L/32, L/16, H/14 or null, got 'B/17'"),
    (["pretrain", "model.gelu=null"], "model.gelu must be one of tanh, exact, got null"),  # null: finetune's only
    (["pretrain", "model.token_mixing=bmm"],
     "model.token_mixing must be one of transpose, matmul, einsum or null, got 'bmm'"),
    (["pretrain", "model.dropout=1.5"], "model.dropout must be a number in [0, 1), got 1.5"),
    (["pretrain", "model.drop_path=-0.1"], "model.drop_path must be a number in [0, 1), got -0.1"),
    (["pretrain", "data.img_size=30"],
     "data.img_size must be a multiple of model.patch_size=4 (e.g. 28 or 32), got 30"),
    (["pretrain", "model.variant=S/16", "model.patch_size=null"],
     "data.img_size must be a multiple of the S/16 patch size 16 (e.g. 16 or 32), got 28"),
    (["pretrain", "data.img_size=null"], "data.img_size must be a whole number >= 1, got null"),
    (["pretrain", "data.channels=3"],
     "data.mean must be a list of 3 numbers, one per channel (data.channels=3), got [0.1307]"),
    (["pretrain", "data.std=[0.0]"], "data.std must be a list of numbers > 0, got [0.0]"),
    (["pretrain", "data.num_classes=1"], "data.num_classes must be a whole number >= 2, got 1"),
    (["pretrain", "data.interpolation=cubic"],
     "data.interpolation must be one of bilinear, bicubic, nearest, box, hamming, lanczos, got 'cubic'"),
    (["pretrain", "data.source=hdf5"], "data.source must be one of demo, digits, folder, shards, hf, got 'hdf5'"),
    (["pretrain", "data.dev_fraction=1.0"], "data.dev_fraction must be a number in [0, 1), got 1.0"),
    (["pretrain", "data.train_fraction=0"], "data.train_fraction must be a number in (0, 1], got 0"),
    (["pretrain", "aug.mixup=-1"], "aug.mixup must be a number >= 0, got -1"),
    (["pretrain", "aug.randaug_magnitude=-1"], "aug.randaug_magnitude must be a number >= 0, got -1"),
    (["pretrain", "aug.randaug_layers=-1"], "aug.randaug_layers must be a whole number >= 0, got -1"),
    (["pretrain", "aug.eval_crop_mode=crop"], "aug.eval_crop_mode must be one of squash, center, got 'crop'"),
    (["pretrain", "aug.eval_crop_pct=0"], "aug.eval_crop_pct must be a number in (0, 1], got 0"),
    (["pretrain", "seed=-1"], "seed must be a whole number in [0, 4294967295], got -1"),
    (["pretrain", "name=a/b"], "name must be a non-empty name without '/', got 'a/b'"),
    (["pretrain", "fewshot.l2=zero"], "fewshot.l2 must be a number > 0 or 'select', got 'zero'"),
    (["pretrain", "fewshot.every_n_steps=5", "fewshot.l2=select"],
     "fewshot.l2=select is for `mixer fewshot`; during training give a number (default 1024)"),
    (["pretrain", "fewshot.every_n_steps=-1"], "fewshot.every_n_steps must be a whole number >= 0, got -1"),
    (["pretrain", "fewshot.data=imagenett"], Match(r"fewshot\.data must be one of cifar10, .*imagenet, .* or null, "
                                                   r"got 'imagenett'")),
    (["pretrain", "optim.lrr=1"], Match(r"unknown config key 'optim\.lrr'; keys under 'optim': .*lr, .*")),
    (["pretrain", "optim.lr=["], "bad override: no viable alternative at input '['"),
    (["pretrain", "optim.lr=range(1,3)"], "these overrides list several values (a sweep): add --multirun"),
    (["pretrain", "optim=rmsprop"], "unknown optim 'rmsprop'; choose one of: adamw, sgd"),
    (["pretrain", "optim.betas.0.x=1"], "unknown config key 'optim.betas.0.x'"),
    (["pretrain", "nothere.lr=1"], "unknown config key 'nothere.lr'"),
    (["pretrain", "--multirun", "optim.lr=interval(0,1)"],
     "bad sweep override: BasicSweeper does not support sweep type : INTERVAL_SWEEP"),
    (["pretrain", "--multirun", "optim.lr=["], "bad sweep override: no viable alternative at input '['"),
    (["pretrain", "recipe=nope"], Match(r"unknown recipe 'nope'; recipes: .*demo.*")),
    (["pretrain", "recipe=ft_cifar10"], Match(r"ft_cifar10 is a recipe for `mixer finetune --from CKPT "
                                              r"recipe=ft_cifar10`; recipes of this command: .*")),
    # ---- pretrain: files it reads
    (["pretrain", *shards("no-index")], Match(r"data\.train_path={files}/no-index has no index\.json; .*")),
    pytest.param(["pretrain", *shards("index-empty")], names("index-empty/index.json")),
    pytest.param(["pretrain", *shards("index-truncated")], names("index-truncated/index.json")),
    pytest.param(["pretrain", *shards("index-list")], names("index-list/index.json")),
    pytest.param(["pretrain", *shards("index-missing-shard")], names("index-missing-shard/shard-000000.tar")),
    # ---- data=hf: Hugging Face datasets
    (["pretrain", *hf("nowhere")], "no Hugging Face data set at data.train_path={files}/hf/nowhere: give a folder "
     "that save_to_disk wrote, or parquet files (a file, a folder of them, or a glob)"),
    (["pretrain", *hf("good/disk", "data.label_key=fine_label")],
     "data.train_path={files}/hf/good/disk has no column 'fine_label' (data.label_key); its columns: image, label; "
     "set data.label_key=..."),
    (["pretrain", *hf("good/parquet", "data.num_classes=3")], "data.train_path={files}/hf/good/parquet has 2 classes "
     "(the ClassLabel of 'label'), data.num_classes=3; set data.num_classes=2"),
    (["pretrain", *hf("label-5/parquet", "data.num_classes=2")], "data.train_path={files}/hf/label-5/parquet: row 2 "
     "has label 5, outside 0..1 (2 classes; 1 such label(s); the Hub marks unlabelled rows -1)"),
    (["pretrain", *hf("not-an-image/disk")], "data.train_path={files}/hf/not-an-image/disk: cannot read the image "
     "of row 0 (column 'image'): not an image PIL reads"),
    (["pretrain", *hf("two-schemas")], "data.train_path={files}/hf/two-schemas: {files}/hf/two-schemas/"
     "part-other.parquet has columns (image, class) unlike {files}/hf/two-schemas/part-0.parquet (image, label): "
     "a split's parquet files must share one schema"),
    (["pretrain", *hf("dataset-dict")], "data.train_path={files}/hf/dataset-dict holds the splits test, train (a "
     "DatasetDict): name one, e.g. data.train_path={files}/hf/dataset-dict/test"),
    (["pretrain", *hf("hub")], "data.train_path={files}/hf/hub holds parquet files of the splits train, validation: "
     "name one with a glob, e.g. data.train_path='{files}/hf/hub/**/validation-*.parquet'"),
    (["eval", CKPT, "data=hf", "data.eval_path={files}/hf/good/parquet", "data.image_key=img"],
     "data.eval_path={files}/hf/good/parquet has no column 'img' (data.image_key); its columns: image, label; set "
     "data.image_key=..."),
    (["pretrain", *folder("nowhere")], "no image folder at data.train_path={files}/nowhere; set data.train_path=... "
                                       "(or the MIXER_DATA root)"),
    (["pretrain", *folder("flat-folder")], Match(r"data\.train_path={files}/flat-folder: .*class folder.*")),
    (["pretrain", *folder("folder"), "data.num_classes=3"],
     "data.train_path={files}/folder has 2 classes, data.num_classes=3; set data.num_classes=2"),
    (["pretrain", *folder("corrupt-folder")],
     "data.train_path={files}/corrupt-folder: cannot read the first image of class b, {files}/corrupt-folder/b/0.png "
     "(empty: 0 bytes)"),
    (["pretrain", *folder("lfs-folder")],
     "data.train_path={files}/lfs-folder: cannot read the first image of class b, {files}/lfs-folder/b/0.png "
     "(not an image file PIL reads)"),
    (["pretrain", *folder("folder"), "data.eval_path={files}/cut-folder"],  # the later value wins
     "data.eval_path={files}/cut-folder: cannot read the first image of class b, {files}/cut-folder/b/0.png "
     "(image file is truncated)"),
    (["pretrain", "--resume={files}/run", "optim.lr=-1"], "optim.lr must be a number > 0, got -1"),
    (["pretrain", "--resume={files}/run-no-ckpt"], "nothing to resume in {files}/run-no-ckpt: no last.ckpt there"),
    pytest.param(["pretrain", "--resume={files}/run-empty-config"], names("run-empty-config/config.yaml")),
    pytest.param(["pretrain", "--resume={files}/run-truncated-config"], names("run-truncated-config/config.yaml")),
    pytest.param(["pretrain", "--multirun", "optim.lr=-1,-2"], "optim.lr must be a number > 0, got -1"),
    # ---- finetune
    (["finetune", CKPT, "optim.lr=abc"], "optim.lr must be a number > 0, got 'abc'"),
    (["finetune", CKPT, "optim.momentum=1.0"], "optim.momentum must be a number in [0, 1), got 1.0"),
    (["finetune", CKPT, "targets.demo.steps=0"], "targets.demo.steps must be a whole number >= 1, got 0"),
    (["finetune", CKPT, "model.gelu=relu"], "model.gelu must be one of tanh, exact or null, got 'relu'"),
    pytest.param(["finetune", CKPT, "target=nope"], Match(r"unknown fine-tuning target 'nope'; targets: imagenet, .*")),
    (["finetune", CKPT, "recipe=i1k_b16"], Match(r"i1k_b16 is a recipe for `mixer pretrain recipe=i1k_b16`; .*")),
    (["finetune", "--from={files}/empty.ckpt"], names("empty.ckpt")),
    (["finetune", "--from={files}/truncated-ckpt.safetensors"], names("truncated-ckpt.safetensors")),
    (["finetune", "--from={files}/truncated-timm.pth"], names("truncated-timm.pth")),
    (["finetune", "--from={files}/truncated-other.npz"], names("truncated-other.npz")),
    (["finetune", "--from={files}/other.npz"], names("other.npz")),
    (["finetune", "--from={files}/notes.ckpt"], names("notes.ckpt")),
    (["finetune", "--from={files}/mismatch.pth"], names("mismatch.pth")),
    (["finetune", "--from={files}/missing.ckpt"], names("missing.ckpt")),
    (["finetune", "--resume={files}/run-empty-ckpt"], names("run-empty-ckpt/last.ckpt")),
    (["finetune", "--from={files}/pickle-2.ckpt"],
     "{files}/pickle-2.ckpt holds pickled Python objects besides tensors (shutil.which); unpickling them could "
     "run code, so the file is refused"),
    (["finetune", "--from={files}/pickle.ckpt"],
     "{files}/pickle.ckpt is pickled with protocol 4, which torch's safe loader does not read (torch.save writes "
     "protocol 2); unpickling it otherwise could run code, so it is refused"),
    # ---- fewshot
    (["fewshot", CKPT, "fewshot.l2=-1"], "fewshot.l2 must be a number > 0 or 'select', got -1"),
    (["fewshot", CKPT, "fewshot.seeds=0"], "fewshot.seeds must be a whole number >= 1, got 0"),
    (["fewshot", CKPT, "fewshot.device=gpu0"], "fewshot.device must be auto, cpu, cuda or cuda:N, got 'gpu0'"),
    (["fewshot", CKPT, "--shots=0"], "--shots must be at least 1, e.g. --shots 1,5,10,25; got '0'"),
    (["fewshot", "--from={files}/empty.ckpt"], names("empty.ckpt")),
    # ---- shuffle-experiment
    (["shuffle-experiment", "shuffle.tolerance=2"], "shuffle.tolerance must be a number in [0, 1), got 2"),
    (["shuffle-experiment", "shuffle.models=[mixer,vit]"],
     "shuffle.models must list some of mixer, resnet, got ['mixer', 'vit']"),
    (["shuffle-experiment", "trainer.epochs=0"], "trainer.epochs must be a whole number >= 1, got 0"),
    (["shuffle-experiment", "shuffle.models=[]"], "shuffle.models must be a non-empty list of model names, got []"),
    (["shuffle-experiment", "recipe=demo"], Match(r"demo is a recipe for `mixer pretrain recipe=demo`; .*")),
    # ---- visualize, export
    (["visualize", "--from={files}/empty.ckpt", "--out={tmp}/units"], names("empty.ckpt")),
    (["visualize", "--from={files}/notes.ckpt", "--out={tmp}/units"], names("notes.ckpt")),
    (["visualize", CKPT, "--blocks=0", "--out={tmp}/units"], "--blocks must be at least 1, not 0"),
    (["export", "--from={files}/empty.ckpt", "--to={tmp}/m.safetensors"], names("empty.ckpt")),
    (["export", "--from={files}/truncated-timm.pth", "--to={tmp}/m.safetensors"], names("truncated-timm.pth")),
    (["export", CKPT, "--to={tmp}/m.pt"],
     "--to {tmp}/m.pt: the export is a .safetensors or .onnx file, e.g. {tmp}/m.safetensors or {tmp}/m.onnx"),
    (["export", CKPT, "--to={tmp}/no/m.safetensors"], "--to {tmp}/no/m.safetensors: folder {tmp}/no does not exist"),
    # ---- data write, data bench
    (["data", "write", "--from={files}/nowhere", "--to={tmp}/shards"],
     "--from {files}/nowhere: no such folder; give an image folder (a sub-folder per class), hf:PATH (a Hugging Face "
     "data set) or 'demo'"),
    (["data", "write", "--from=hf:{files}/hf/dataset-dict", "--to={tmp}/shards"], "--from hf:{files}/hf/dataset-dict "
     "holds the splits test, train (a DatasetDict): name one, e.g. --from hf:{files}/hf/dataset-dict/test"),
    (["data", "write", "--from=hf:{files}/hf/unlabelled/parquet", "--to={tmp}/shards"], "--from hf:{files}/hf/"
     "unlabelled/parquet: row 1 has label -1, outside 0..1 (2 classes; 1 such label(s); the Hub marks unlabelled rows "
     "-1)"),
    (["data", "write", "--from={files}/flat-folder", "--to={tmp}/shards"],
     "{files}/flat-folder has no class sub-folders; expected {files}/flat-folder/<class>/<image files>"),
    (["data", "write", "--from={files}/folder", "--to={files}/folder"],
     "{files}/folder already exists and is not an empty folder; choose a new --to folder"),
    (["data", "write", "--from={files}/folder", "--to={tmp}/shards", "--workers=0"],
     "--workers must be at least 1, got 0"),
    pytest.param(["data", "write", "--from={files}/folder", "--to={tmp}/shards", "--shard-size=0"],
                 "--shard-size must be at least 1, got 0"),
    (["data", "bench", "--images=0"], "--images must be at least 1 and --seconds above 0"),
    (["data", "bench", "--seconds=0"], "--images must be at least 1 and --seconds above 0"),
    # ---- benchmark, recipes
    (["benchmark", "--res=0"], "res must be a non-empty list of whole numbers >= 1, got [0]"),
    (["benchmark", "warmup=abc"], "warmup must be a whole number >= 0, got 'abc'"),
    (["benchmark", "repeats=0"], "repeats must be a whole number >= 1, got 0"),
    (["benchmark", "batch_sizes=[0]"], "batch_sizes must be a non-empty list of whole numbers >= 1 or null, got [0]"),
    (["benchmark", "iters=0"], "iters must be a whole number >= 1 or null, got 0"),
    (["benchmark", "threads=0"], "threads must be a whole number >= 1 or null, got 0"),
    (["benchmark", "memory_batches=[8,4]"],
     "memory_batches must be two increasing batch sizes, e.g. [32, 64], got [8, 4]"),
    (["benchmark", "models=[]"], "models must be a non-empty list of model names, got []"),
    (["benchmark", "models=[nope]"], Match(r"unknown model\(s\) nope; choose from .*")),
    (["benchmark", "--precision=fp16"], "precision must be one of fp32, bf16, not 'fp16'"),
    (["recipes", "nope"], Match(r"unknown recipe 'nope'.*")),
]


def case_id(param) -> str:
    args = param.values[0] if hasattr(param, "values") else param[0]
    return " ".join(args).replace("{files}/", "").replace("{tmp}/", "")


@pytest.mark.parametrize("args,expected", CASES, ids=[case_id(c) for c in CASES])
def test_a_bad_input_ends_in_one_line_exit_2_and_writes_nothing(files, tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)  # a run_root left relative would land here
    args = [a.format(files=files, tmp=tmp_path) for a in args]
    command_with_config = args[0] in ("pretrain", "finetune", "fewshot", "shuffle-experiment", "benchmark")
    if command_with_config and not any(a.startswith("--resume") for a in args):
        args.append(f"run_root={tmp_path}/runs")
    before = tree(tmp_path), tree(files)

    r = CliRunner().invoke(app, args)

    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception  # no traceback
    assert r.exit_code == 2, r.output
    assert r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr
    line = r.stderr.strip().removeprefix("error: ")
    if isinstance(expected, Match):
        assert re.fullmatch(expected.format(files=re.escape(str(files)), tmp=re.escape(str(tmp_path))), line), line
    else:
        assert line == expected.format(files=files, tmp=tmp_path)
    assert (tree(tmp_path), tree(files)) == before


def test_there_are_forty_bad_inputs_across_every_command():
    commands = {case_id(c).split()[0] for c in CASES}
    assert len(CASES) >= 40
    assert commands >= {"pretrain", "finetune", "fewshot", "shuffle-experiment", "visualize", "export", "data",
                        "benchmark", "recipes"}


def grey_folder(root: Path, per_class: dict[str, int], unreadable: str, *overrides: str) -> DictConfig:
    """PNGs of one grey level each (which tells them apart), an empty file at `unreadable`; the config."""
    level = 0
    for cls, n in per_class.items():
        for i in range(n):
            level += 15
            (root / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((28, 28), level, np.uint8)).save(root / cls / f"{i:02d}.png")  # in index order
    (root / unreadable).write_bytes(b"")
    return compose([*(a.replace("{files}/%s", str(root)) for a in FOLDER), *overrides])


def seeded(dataset, i: int):
    L.seed_everything(0, verbose=False)  # the augmentation's draws
    return dataset[i]


def test_training_puts_the_next_image_in_place_of_an_unreadable_one_and_evaluation_names_it(tmp_path, caplog):
    cfg = grey_folder(tmp_path, {"a": 3, "b": 2}, "a/01.png")  # not the first of its class: not checked up front
    train = build_dataset(cfg.data, cfg.aug, "train")
    with caplog.at_level(logging.WARNING, logger="mixer_cli.data.folder"):
        x, y = seeded(train, 1)
    x2, y2 = seeded(train, 2)
    assert torch.equal(x, x2) and y == y2 == 0
    assert (f"data: skipped unreadable image {tmp_path}/a/01.png (empty: 0 bytes); the next training image takes its "
            "place (1 skipped in this loader worker)") in caplog.messages

    test = build_dataset(cfg.data, cfg.aug, "test")
    line = (f"cannot read image {tmp_path}/a/01.png (empty: 0 bytes); an evaluation reads every image of "
            "data.eval_path: replace or remove it")
    with pytest.raises(UnreadableImage) as e:
        test[1]
    assert str(e.value) == line
    with pytest.raises(UnreadableImage) as e:  # a loader worker's: torch re-raises it with its traceback
        list(DataLoader(test, batch_size=5, **worker_options(1)))
    assert str(e.value) == line


@pytest.mark.slow
def test_the_image_put_in_place_of_an_unreadable_one_is_never_of_the_dev_split(tmp_path):
    kept = Selection("train", dev_fraction=0.5).keeps  # data.subset_seed=0
    bad = next(i for i in range(1, 11) if kept(i) and not kept(i + 1))  # the image after it is a dev image
    cfg = grey_folder(tmp_path, {"a": 12, "b": 1}, f"a/{bad:02d}.png", "data.dev_fraction=0.5")
    train = build_dataset(cfg.data, cfg.aug, "train")
    everything = build_dataset(OmegaConf.merge(cfg.data, {"dev_fraction": 0}), cfg.aug, "train")
    substitute = next(i for i in range(bad + 1, 13) if kept(i))
    assert torch.equal(seeded(train, train.indices.index(bad))[0], seeded(everything, substitute)[0])
    assert not torch.equal(seeded(everything, bad + 1)[0], seeded(everything, substitute)[0])


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ["pretrain", "optim.lr=-0.1"],
    ["finetune", "--from={files}/pickle.ckpt"],  # torch warns before it refuses the file
])
def test_the_installed_command_prints_only_the_error_line(files, tmp_path, args):
    """In a process of its own (warnings reach stderr there, unlike under pytest's capture)."""
    args = [a.format(files=files) for a in args]
    r = subprocess.run([sys.executable, "-m", "mixer_cli.cli", *args, f"run_root={tmp_path}/runs"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_every_bundled_config_passes_the_schema():
    """The schema accepts what the toolkit ships: every recipe of every command composes."""
    from mixer_cli.config.recipes import recipe_command, recipe_names

    required = {"ft_vtab": ["data.task=dtd", "data.num_classes=47"]}
    for name in recipe_names():
        compose([f"recipe={name}", *required.get(name, [])], config_name=recipe_command(name)[0])
    for config in ("fewshot", "benchmark", "eval"):
        compose([], config_name=config)


@pytest.mark.parametrize("config,overrides", [
    ("config", ["trainer.devices='0,1'"]),
    ("config", ["trainer.devices=[0,1]"]),
    ("config", ["trainer.devices=-1"]),
    ("config", ["trainer.devices=2", "trainer.accelerator=cpu"]),
    ("config", ["trainer.precision=16"]),  # Lightning's int and alias forms
    ("config", ["trainer.precision=bf16"]),
    ("config", ["trainer=fsdp"]),  # a strategy given as a _target_ config
    ("config", ["trainer.steps=5", "trainer.grad_clip=null", "optim.lr=1e-3"]),
    ("config", ["model.variant=B/16", "model.patch_size=null", "data.img_size=32"]),
    ("config", ["fewshot.l2=select"]),
    ("finetune", ["model.gelu=null", "optim.momentum=0"]),
])
def test_values_lightning_and_the_commands_accept_pass(config, overrides):
    compose(overrides, config_name=config)


def test_the_interpolation_names_are_timms():
    from timm.data.transforms import str_to_interp_mode

    from mixer_cli.config.schema import INTERPOLATIONS

    for name in INTERPOLATIONS:
        str_to_interp_mode(name)  # a KeyError for a name timm does not know


def test_null_preprocessing_means_the_checkpoints_only_where_no_training_builds_it():
    cfg = compose([], config_name="eval")
    assert OmegaConf.select(cfg, "data.img_size") is None  # eval fills it from the checkpoint
    with pytest.raises(UserError, match=r"^data\.img_size must be a whole number >= 1, got null$"):
        compose(["data.img_size=null"])  # pre-training builds its pipeline from it
