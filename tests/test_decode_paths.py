"""data.decode: the loader hands over floats (pil), uint8 crops the Classifier normalises on the
device (uint8), or encoded bytes the Classifier decodes on the device (gpu; here on the CPU)."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import IterableDataset, default_collate

from mixer_cli.commands.pretrain import build_model, pretrain
from mixer_cli.config.compose import compose
from mixer_cli.data import build_dataset, demo_arrays
from mixer_cli.data.device_transforms import NormalizeOnDevice
from mixer_cli.train.fit import device_preprocessing
from mixer_cli.train.module import Evaluator


@pytest.fixture(scope="module")
def folder_run(jpeg_folders, tiny_run) -> list[str]:
    """Two steps of the tiny Mixer on the folders."""
    return ["data=folder", f"data.train_path={jpeg_folders / 'train'}", f"data.eval_path={jpeg_folders / 'val'}",
            "data.num_classes=3", "data.img_size=16", "data.global_batch=4", "data.num_workers=0", "aug=finetune",
            *tiny_run, "model.patch_size=4", "trainer.steps=2"]


def config(folder_run, decode: str, *extra):
    return compose([*folder_run, f"data.decode={decode}", *extra])


def classifier(cfg) -> Evaluator:
    module = Evaluator(build_model(cfg), num_classes=3, **device_preprocessing(cfg))
    module.trainer = SimpleNamespace(training=False)
    return module


def model_input(module: Evaluator, dataset) -> torch.Tensor:
    """The evaluation batch of the whole split as the network receives it after the Evaluator's hooks."""
    items = [dataset[i] for i in range(len(dataset))]
    x = [x for x, _ in items]
    batch = (x if isinstance(x[0], bytes) else torch.stack(x), torch.tensor([y for _, y in items]))
    batch = module.on_before_batch_transfer(batch, 0)
    return module.on_after_batch_transfer(batch, 0)[0]


def test_every_decode_path_feeds_the_network_the_same_normalised_images(folder_run):
    inputs = {}
    for decode in ("pil", "uint8", "gpu"):
        cfg = config(folder_run, decode)
        inputs[decode] = model_input(classifier(cfg), build_dataset(cfg.data, cfg.aug, "test"))
    level = 1 / 255 / 0.5  # one grey level after normalisation with std 0.5
    assert inputs["pil"].dtype == inputs["uint8"].dtype == inputs["gpu"].dtype == torch.float32
    assert inputs["pil"].shape == inputs["uint8"].shape == inputs["gpu"].shape == (6, 3, 16, 16)
    # the resamplers agree within a grey level or so (PIL's float path vs torchvision's uint8 resize)
    assert (inputs["uint8"] - inputs["pil"]).abs().max() <= 2 * level + 1e-6
    assert (inputs["gpu"] - inputs["uint8"]).abs().max() <= 1 * level + 1e-6


@pytest.mark.parametrize("decode, randaug_magnitude", [("uint8", 0), ("gpu", 0), ("gpu", 15)])
def test_training_runs_on_the_device_side_paths(folder_run, tmp_path, decode, randaug_magnitude):
    overrides = (f"run_root={tmp_path}", f"aug.randaug_magnitude={randaug_magnitude}")
    results = pretrain(config(folder_run, decode, *overrides), progress=False)
    assert results["steps"] == 2 and results["num_samples"] == 6 and 0 <= results["top1"] <= 1


def test_normalising_on_the_device_equals_to_tensor_and_normalize():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    expected = (x.float() / 255 - 0.5) / 0.25
    assert torch.allclose(NormalizeOnDevice([0.5] * 3, [0.25] * 3)(x), expected, atol=1e-6)


def test_an_unknown_decode_is_one_line():
    from mixer_cli.core.errors import UserError

    with pytest.raises(UserError, match=r"^data.decode must be one of pil, uint8, gpu, got 'jpeg'$"):
        compose(["data.decode=jpeg"])


@pytest.fixture(scope="module")
def digit_sources(tmp_path_factory) -> dict[str, list[str]]:
    """40 demo digits of each split, 4 of each class, as a PNG folder and as shards."""
    from mixer_cli.data.writer import demo_samples, write_shards

    root = tmp_path_factory.mktemp("digits")
    for split in ("train", "test"):
        classes, samples = demo_samples(split)
        x, y = demo_arrays(split)
        chosen = [i for c in range(10) for i in np.flatnonzero(y == c)[:4]]
        write_shards(classes, [samples[i] for i in chosen], root / "shards" / split, shard_size=16)
        for i in chosen:
            (root / "folder" / split / str(y[i])).mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i]).save(root / "folder" / split / str(y[i]) / f"{i}.png")
    read = {source: [f"data.source={source}", f"data.train_path={root / source / 'train'}",
                     f"data.eval_path={root / source / 'test'}", "data.shuffle_buffer=40"]
            for source in ("folder", "shards")}
    return {"demo": [], **read}


def first_samples(cfg, split: str, n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n samples of the split as the network receives them, the random draws seeded."""
    torch.manual_seed(0)
    dataset = build_dataset(cfg.data, cfg.aug, split, seed=0)
    if isinstance(dataset, IterableDataset):  # shards: they batch themselves
        if hasattr(dataset, "set_epoch_length"):
            dataset.set_epoch_length(batch_size=n, batches_per_epoch=1)
        dataset.batch_size = n
        x, y = next(iter(dataset))
    else:
        x, y = default_collate([dataset[i] for i in range(n)])
    normalize = device_preprocessing(cfg).get("normalize")
    return (normalize(x) if x.dtype == torch.uint8 else x), torch.as_tensor(y)


@pytest.mark.parametrize("source", ["demo", "folder", "shards"])
def test_the_default_uint8_path_gives_the_float_paths_digits_bit_for_bit(digit_sources, source):
    """The default (uint8) hands over the same pixels as the float path after the same random
    shifts (the demo's pad-and-crop), and the device's normalisation is ToTensor + Normalize's."""
    overrides = [*digit_sources[source], "aug.pad_crop=2"]
    default, floats = compose(overrides), compose([*overrides, "data.decode=pil"])
    assert default.data.decode == "uint8"
    for split in ("train", "test"):
        x, y = first_samples(default, split)
        expected_x, expected_y = first_samples(floats, split)
        assert x.dtype == torch.float32 and x.shape == (24, 1, 28, 28)
        assert torch.equal(y, expected_y) and torch.equal(x, expected_x)


def test_gpu_decode_trains_on_the_uint8_paths_randaugmented_images(folder_run):
    """The ImageNet recipes' RandAugment under data.decode=gpu: the training batch the network gets, decoded,
    cropped and RandAugmented by the Classifier's hook (here on the CPU), is the uint8 loader's, with the
    same seed."""
    inputs = {}
    for decode in ("uint8", "gpu"):
        cfg = config(folder_run, decode, "aug.randaug_magnitude=15")
        module = classifier(cfg)
        module.trainer = SimpleNamespace(training=True)
        dataset = build_dataset(cfg.data, cfg.aug, "train")
        torch.manual_seed(0)
        inputs[decode] = model_input(module, dataset)
    assert inputs["gpu"].shape == (12, 3, 16, 16) and torch.equal(inputs["gpu"], inputs["uint8"])
