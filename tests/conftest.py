import io
import json
import os
import tarfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mixer_cli.config import run_dirs
from mixer_cli.data.writer import Sample, write_shards
from mixer_cli.models import build_mixer
from mixer_cli.models.contract import checkpoint_record

# Tests must not depend on (or pollute) a user's cache; the demo data is written here once per session.
os.environ.setdefault("MIXER_CACHE", os.path.join(os.path.dirname(__file__), "..", ".venv", "mixer-cache"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def no_open_run(monkeypatch):
    """No run directory handed down from a launching process (ranks Lightning starts get one)."""
    monkeypatch.delenv(run_dirs.RUN_DIR_ENV, raising=False)


@pytest.fixture
def no_launcher(monkeypatch):
    """A plain local start: none of the variables torchrun, SLURM or Lightning set (a test sets its own)."""
    for v in ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK", "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_ID",
              "SLURM_RESTART_COUNT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.setenv(v, "")  # recorded, so what a run sets is undone after the test
        monkeypatch.delenv(v)


# ------------------------------------------------------------------------------------------------
# Shared pieces: a tiny run, tiny models, checkpoints and shards, each a fixture so that no test
# module imports another.

# One tiny Mixer for runs and for the models tests build: seconds to train; the tests look at what
# a run writes and does, not at its accuracy.
TINY_MIXER_SIZES = {"hidden_dim": 16, "num_blocks": 1, "tokens_mlp_dim": 8, "channels_mlp_dim": 16}


@pytest.fixture(scope="session")
def cpu_run() -> tuple[str, ...]:
    """Overrides for a run on one CPU device in 32-bit, whatever the machine has (a fine-tuning run
    takes its model from the checkpoint, so it takes this part alone)."""
    return ("trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true")


@pytest.fixture(scope="session")
def tiny_run(cpu_run) -> tuple[str, ...]:
    """Overrides for a run of seconds: the tiny Mixer (in place of any recipe's variant) as cpu_run
    runs it; a test adds its own data, steps and batch."""
    return ("model.variant=null", *(f"model.{k}={v}" for k, v in TINY_MIXER_SIZES.items()), *cpu_run)


@pytest.fixture(scope="session")
def tiny_mixer():
    """Factory: the tiny Mixer at the sizes a test varies. trained=True draws every weight from
    N(0, 0.3), so a copied or moved weight shows (a fresh model's head is zero)."""

    def build(num_classes=10, img_size=28, in_chans=1, patch_size=4, num_blocks=1, trained=False):
        model = build_mixer(None, num_classes=num_classes, img_size=img_size, in_chans=in_chans,
                            patch_size=patch_size, **{**TINY_MIXER_SIZES, "num_blocks": num_blocks})
        if trained:
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_(0, 0.3)
        return model

    return build


@pytest.fixture(scope="session")
def write_checkpoint(tmp_path_factory):
    """Factory: model -> the path of a new file as a training run leaves it: Lightning's state_dict
    of the module plus our model record."""

    def write(model) -> Path:
        path = tmp_path_factory.mktemp("checkpoint") / "last.ckpt"
        weights = {f"model.{k}": v for k, v in model.state_dict().items()}
        torch.save({"state_dict": weights, **checkpoint_record(model)}, path)
        return path

    return write


@pytest.fixture
def constant_checkpoint(tmp_path):
    """A timm-format state dict of a tiny 6-class Mixer whose logits are the same for every image:
    class 1 at top-1, every class but 0 at top-5."""
    model = build_mixer(None, num_classes=6, img_size=16, in_chans=3, patch_size=8, **TINY_MIXER_SIZES)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([0.0, 5.0, 1.0, 4.0, 2.0, 3.0]))
    torch.save(model.state_dict(), tmp_path / "tiny.pth")
    return tmp_path / "tiny.pth"


@pytest.fixture(scope="session")
def sample_pixels():
    """Sample index -> a distinct RGB image (so samples can be identified after a round trip)."""

    def pixels(i: int, size: int = 16) -> np.ndarray:
        return np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)

    return pixels


@pytest.fixture(scope="session")
def index_shards(sample_pixels):
    """Factory: n PNG samples in shards of shard_size under folder, each labelled with its index and
    drawn by sample_pixels, so every sample can be told apart after batching."""

    def write(folder: Path, n: int, shard_size: int) -> None:
        folder.mkdir(parents=True)
        shards = []
        for k, start in enumerate(range(0, n, shard_size)):
            name = f"shard-{k:06d}.tar"
            with wds.TarWriter(str(folder / name)) as sink:
                for i in range(start, min(start + shard_size, n)):
                    buf = io.BytesIO()
                    Image.fromarray(sample_pixels(i)).save(buf, format="PNG")
                    sink.write({"__key__": f"{i:09d}", "png": buf.getvalue(), "cls": i})
            shards.append({"file": name, "samples": min(shard_size, n - start)})
        (folder / "index.json").write_text(json.dumps({"num_samples": n, "shards": shards}))

    return write


class Shards(NamedTuple):
    """Train and test shards as `mixer data write` writes them, and the numbers a test checks against."""

    root: Path
    classes: int
    train_per_class: int
    test_per_class: int
    img_size: int  # the size runs read them at: 4 x 4 patches of 8 px


def tinted_jpeg(label: int, rng: np.random.Generator) -> bytes:
    """40x40 noise tinted by the class, so the classes differ."""
    pixels = rng.integers(0, 64, (40, 40, 3)) + 60 * np.eye(3, dtype=int)[label % 3] * (1 + label // 3)
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Shards:
    """A few tinted JPEGs per class in train and test shards, written once per session."""
    written = Shards(tmp_path_factory.mktemp("shards"), classes=4, train_per_class=4, test_per_class=2, img_size=32)
    rng = np.random.default_rng(0)
    for split, per_class in (("train", written.train_per_class), ("test", written.test_per_class)):
        samples = [Sample(f"{split}/{i}", i // per_class, lambda b=tinted_jpeg(i // per_class, rng): b)
                   for i in range(written.classes * per_class)]
        write_shards([f"c{c}" for c in range(written.classes)], samples, written.root / split)
    return written


@pytest.fixture(scope="session")
def shard_data(shards) -> tuple[str, ...]:
    """Overrides that point a shards data config (conf/data/) at the shards of the `shards` fixture."""
    return (f"data.train_path={shards.root / 'train'}", f"data.eval_path={shards.root / 'test'}",
            f"data.num_classes={shards.classes}", "data.train_size=null", "data.eval_size=null",
            f"data.shuffle_buffer={shards.classes * shards.train_per_class}", f"data.img_size={shards.img_size}")


@pytest.fixture(scope="session")
def multi_label_shards():
    """Factory: a shard folder (one shard, index.json) of random 20x20 JPEGs whose `.labels` hold the
    given texts ("0,2", "3 4": several classes each), for multi-label data (JFT-300M's kind)."""

    def write(folder: Path, labels: list[str], num_classes: int = 5) -> Path:
        folder.mkdir()
        rng = np.random.default_rng(0)
        with tarfile.open(folder / "shard-000000.tar", "w") as tar:
            for i, text in enumerate(labels):
                jpg = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(jpg, format="JPEG")
                for ext, data in (("jpg", jpg.getvalue()), ("labels", text.encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (folder / "index.json").write_text(json.dumps(
            {"shards": [{"file": "shard-000000.tar", "num_samples": len(labels)}], "num_samples": len(labels),
             "classes": [str(c) for c in range(num_classes)]}))
        return folder

    return write


def smooth_photo(seed: int, size=(40, 32)) -> np.ndarray:
    """A photo-like RGB image (smooth colour gradients), width x height = size."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize(size, Image.BICUBIC))


@pytest.fixture(scope="session")
def jpeg_folders(tmp_path_factory) -> Path:
    """An image-folder data set of JPEGs: train/ (4 per class) and val/ (2 per class), 3 classes."""
    root = tmp_path_factory.mktemp("jpegs")
    for split, n in (("train", 4), ("val", 2)):
        for label in range(3):
            (root / split / f"c{label}").mkdir(parents=True)
            for j in range(n):
                Image.fromarray(smooth_photo(100 * label + j)).save(root / split / f"c{label}" / f"{j}.jpg",
                                                                    quality=95)
    return root
