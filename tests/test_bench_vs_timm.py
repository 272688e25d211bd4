"""benchmarks/vs_timm.py: both tools read the same images, and our command trains the settings it states."""
import importlib.util
import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mixer_cli.config.compose import compose
from mixer_cli.data.demo import demo_arrays

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "vs_timm.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("vs_timm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mixer_cli() -> str:
    return shutil.which("mixer") or str(Path(sys.executable).with_name("mixer"))


@pytest.mark.slow
def test_folder_and_shards_hold_the_same_images(bench, tmp_path):
    folder, shards = bench.prepare(tmp_path, 4010, mixer_cli())  # past the 4,000 demo digits: they repeat
    x, y = demo_arrays("train")
    pngs = sorted((folder / "train").glob("*/*.png"))
    assert len(pngs) == 4010
    last = Image.open(folder / "train" / str(y[9]) / "004009.png")
    assert np.array_equal(np.asarray(last), x[9])
    import webdataset as wds

    tars = sorted(map(str, (shards / "train").glob("*.tar")))
    shard_pixels = sorted(np.asarray(Image.open(io.BytesIO(s["png"]))).tobytes() + s["cls"]
                          for s in wds.WebDataset(tars, shardshuffle=False))
    folder_pixels = sorted(np.asarray(Image.open(p)).tobytes() + p.parent.name.encode() for p in pngs)
    assert shard_pixels == folder_pixels
    assert len(list((shards / "test").glob("*.tar"))) >= 1 and len(list((folder / "test").glob("*/*.png"))) == 1000


def test_our_command_trains_the_stated_settings(bench, tmp_path):
    command = bench.mixer_command("mixer", tmp_path / "shards", tmp_path / "runs", workers=1)
    assert command[:2] == ["mixer", "pretrain"]
    cfg = compose(command[2:])
    assert (cfg.data.source, cfg.data.global_batch, cfg.data.num_workers) == ("shards", bench.BATCH, 1)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.trainer.grad_clip) == (bench.LR, bench.WEIGHT_DECAY, bench.CLIP)
    assert (cfg.sched.warmup_steps, cfg.sched.decay, cfg.trainer.epochs) == (0, "cosine", 1)
    assert (cfg.aug.pad_crop, list(cfg.data.mean), list(cfg.data.std)) == (0, [bench.MEAN], [bench.STD])
    assert (cfg.model.patch_size, cfg.model.hidden_dim, cfg.model.num_blocks) == (4, 128, 4)
    assert (cfg.model.tokens_mlp_dim, cfg.model.channels_mlp_dim, cfg.model.gelu) == (64, 512, "exact")  # nn.GELU
