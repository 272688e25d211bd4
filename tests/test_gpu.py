"""What only a CUDA GPU can run (`make gpu-check` runs these there; elsewhere they skip): nvJPEG and
the device transforms against the CPU path, torch.compile and bf16 on the GPU, 1-GPU DDP and FSDP
fits, stop and resume. Differences are in grey levels (0-255) or relative to the loss."""
import random
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torchvision.io import ImageReadMode, decode_jpeg

from mixer_cli.commands.data_bench import synthetic_jpegs
from mixer_cli.commands.pretrain import pretrain
from mixer_cli.config.compose import compose
from mixer_cli.data.device_randaugment import OPS, apply_layers, draw_layers
from mixer_cli.data.device_transforms import collate_encoded, decode_on_device, gpu_decode_transform
from mixer_cli.data.inception_crop import tf_crop_box, tf_resize_crops
from mixer_cli.data.randaugment import RandAugment
from mixer_cli.data.transforms import AreaResizeCrop
from mixer_cli.models import load_mixer
from mixer_cli.reporting.runs import read_metrics
from mixer_cli.train.fit import resume

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

JPEGS = synthetic_jpegs(8, size=(200, 150), seed=5)
SHORT = ["model.patch_size=7", "trainer.log_every_steps=1", "data.global_batch=32"]


@pytest.fixture(scope="module")
def gpu_run(tiny_run) -> list[str]:
    """The tiny Mixer on the demo digits, on one GPU."""
    model = [o for o in tiny_run if o.startswith("model.")]
    return [*model, *SHORT, "trainer.accelerator=gpu", "trainer.devices=1"]


def fit(tmp_path: Path, name: str, gpu_run: list[str], *overrides: str) -> dict:
    return pretrain(compose([*gpu_run, f"run_root={tmp_path / name}", *overrides]), progress=False)


def losses(results: dict) -> list[tuple[int, float]]:
    return read_metrics(Path(results["run_dir"]) / "metrics.csv")["train/loss"]


def assert_same_losses(a: list[tuple[int, float]], b: list[tuple[int, float]], rel: float) -> None:
    assert [s for s, _ in a] == [s for s, _ in b] and a
    worst = max(abs(x - y) / abs(x) for (_, x), (_, y) in zip(a, b))
    assert worst <= rel, f"losses differ by {worst:.2e} of the loss (bound {rel:g}): {a} vs {b}"


# --- decoding and augmentation on the device ----------------------------------------------------

def test_nvjpeg_decodes_as_the_cpu_decoder_does():
    """nvJPEG and libjpeg-turbo use different IDCTs and chroma upsampling: close, not equal."""
    images, _ = collate_encoded([(raw, 0) for raw in JPEGS])
    gpu = decode_jpeg(images, mode=ImageReadMode.RGB, device="cuda")
    for on_gpu, raw in zip(gpu, images):
        cpu = decode_jpeg(raw, mode=ImageReadMode.RGB)
        diff = (on_gpu.cpu().int() - cpu.int()).abs().float()
        assert on_gpu.shape == cpu.shape == (3, 150, 200)
        assert diff.mean() <= 1.0 and diff.quantile(0.999) <= 8, (diff.mean(), diff.max())


def test_batched_crops_on_the_gpu_give_the_cpus_pixels():
    """TF's resize of each box, batched, on CUDA against the CPU: the same taps, float roundings apart."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 150 + 7 * i, 200 - 5 * i), dtype=torch.uint8, generator=generator)
              for i in range(16)]
    rng = random.Random(0)
    boxes = [tf_crop_box(*x.shape[1:], 0.05, rng) for x in images]
    flips = [i % 2 == 0 for i in range(16)]
    cpu = tf_resize_crops(images, boxes, flips, 224)
    gpu = tf_resize_crops([x.cuda() for x in images], boxes, flips, 224)
    diff = (gpu.cpu().int() - cpu.int()).abs()
    assert gpu.device.type == "cuda" and diff.max() <= 1 and (diff > 0).float().mean() <= 0.01


def test_batched_area_resize_on_the_gpu_gives_the_cpus_pixels():
    """The evaluation's area resize and centre crop, batched on CUDA, against area_resize image by image
    on the CPU: integer running sums and float64 taps, so the same pixels."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 150 + 37 * i, 500 - 23 * i), dtype=torch.uint8, generator=generator)
              for i in range(16)]
    crop = AreaResizeCrop(224, 0.875, "center")
    gpu = crop.on_batch([x.cuda() for x in images])
    assert gpu.device.type == "cuda" and gpu.cpu().tolist() == torch.stack([crop(x) for x in images]).tolist()


@pytest.mark.parametrize("name", list(OPS))
def test_each_randaugment_op_on_the_gpu_gives_the_cpus_pixels(name):
    """The same op and arguments on CUDA and CPU tensors: the integer ops exactly, the float blends and
    lookup tables within a grey level (CUDA may fuse a multiply-add where the CPU rounds twice)."""
    torch.manual_seed(0)
    images = decode_jpeg(collate_encoded([(raw, 0) for raw in JPEGS])[0], mode=ImageReadMode.RGB)
    batch = torch.stack([img[:, :64, :64] for img in images])
    augment = RandAugment(num_layers=1, magnitude=15)
    draws = []
    while len(draws) < len(batch):  # each image its own arguments for this op
        (drawn,) = draw_layers(augment, 64, 64)
        draws += [[drawn]] if drawn[0] == name else []
    cpu, gpu = apply_layers(batch, draws), apply_layers(batch.cuda(), draws).cpu()
    diff = (gpu.int() - cpu.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01, (name, diff.max(), (diff > 0).float().mean())


def test_gpu_decode_and_randaugment_give_the_cpu_paths_batch():
    """data.decode=gpu end to end on the device (nvJPEG, crops, RandAugment m=15) against the CPU path
    with the same seed: the same boxes, flips and ops; pixels apart by the decoders' differences."""
    data, aug = gpu_decode_config()
    transform = gpu_decode_transform(data, aug, train=True)
    images, _ = collate_encoded([(raw, 0) for raw in JPEGS])
    random.seed(0), torch.manual_seed(0)
    gpu = decode_on_device(images, transform, "cuda")
    random.seed(0), torch.manual_seed(0)
    cpu = torch.stack([transform(raw) for raw in JPEGS])
    assert gpu.device.type == "cuda" and gpu.shape == cpu.shape == (8, 3, 64, 64)
    diff = (gpu.cpu().int() - cpu.int()).abs().float()
    assert diff.mean() <= 2.0, (diff.mean(), diff.max())


def gpu_decode_config():
    data = OmegaConf.create({"img_size": 64, "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3,
                             "interpolation": "bilinear"})
    aug = OmegaConf.create({"inception_crop": True, "crop_area_min": 0.05, "crop_sampler": "tf",
                            "crop_antialias": False, "hflip": True, "randaug_layers": 2, "randaug_magnitude": 15})
    return data, aug


def test_gpu_decode_trains_with_loader_workers(tmp_path, jpeg_folders, gpu_run):
    """Forked loader workers hand over bytes and never touch CUDA; the GPU decodes and augments."""
    data = ["data=folder", f"data.train_path={jpeg_folders / 'train'}", f"data.eval_path={jpeg_folders / 'val'}",
            "data.num_classes=3", "data.img_size=16", "data.global_batch=4", "data.num_workers=2", "aug=finetune",
            "model.patch_size=4", "data.decode=gpu", "aug.randaug_magnitude=15", "trainer.steps=3"]
    results = fit(tmp_path, "gpu-decode", [o for o in gpu_run if o not in SHORT], *data)
    assert results["steps"] == 3 and 0 <= results["top1"] <= 1


# --- training on the GPU --------------------------------------------------------------------------

def test_auto_precision_and_compile_train_in_bf16_compiled_and_learn(tmp_path, gpu_run):
    results = fit(tmp_path, "auto", gpu_run, "trainer.steps=40", "sched.warmup_steps=5", "optim.lr=0.01")
    assert results["precision"] == "bf16-mixed, compiled"
    loss = [v for _, v in losses(results)]
    assert sum(loss[-5:]) / 5 < sum(loss[:5]) / 5 - 0.1, loss  # from chance (2.30) towards learning


def test_compiled_training_gives_the_eager_losses_on_the_gpu(tmp_path, gpu_run):
    runs = {c: fit(tmp_path, f"compile-{c}", gpu_run, "trainer.steps=5", "trainer.precision=32-true",
                   f"trainer.compile={c}") for c in ("false", "true")}
    assert_same_losses(losses(runs["false"]), losses(runs["true"]), rel=1e-3)
    ckpt = torch.load(Path(runs["true"]["run_dir"]) / "last.ckpt", weights_only=False, map_location="cpu")
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])


@pytest.mark.parametrize("trainer", ["ddp", "fsdp"])
def test_one_gpu_ddp_and_fsdp_fit_as_a_plain_run_does(tmp_path, gpu_run, trainer):
    plain = fit(tmp_path, "plain", gpu_run, "trainer.steps=5", "trainer.precision=32-true", "trainer.compile=false")
    sharded = fit(tmp_path, trainer, [f"trainer={trainer}", *gpu_run], "trainer.steps=5",
                  "trainer.precision=32-true", "trainer.compile=false")
    assert_same_losses(losses(plain), losses(sharded), rel=1e-4)
    assert load_mixer(Path(sharded["run_dir"]) / "last.ckpt").spec == load_mixer(
        Path(plain["run_dir"]) / "last.ckpt").spec


def test_a_stopped_gpu_run_resumes_and_trains_on_as_an_uninterrupted_one(tmp_path, gpu_run):
    whole = fit(tmp_path, "whole", gpu_run, "trainer.steps=6")
    stopped = fit(tmp_path, "stopped", gpu_run, "trainer.steps=3")
    torch._dynamo.reset()  # the resumed run compiles again, as a new process would
    resume(Path(stopped["run_dir"]), ["trainer.steps=6"], "pretrain", progress=False)
    assert_same_losses(losses(whole), losses(stopped), rel=1e-3)
