"""`mixer data bench`: ImageNet-like test images, every recipe's pipeline on both paths, cores per device."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from mixer_cli.commands.data_bench import (
    add_cores_needed,
    data_bench,
    run_bench,
    synthetic_jpegs,
    training_rate,
    write_bench,
)
from mixer_cli.core.devices import torch_threads
from mixer_cli.core.errors import UserError


def _neighbour_correlation(y: np.ndarray, shift: int) -> float:
    return float(np.corrcoef(y[:, :-shift].ravel(), y[:, shift:].ravel())[0, 1])


def test_synthetic_jpegs_look_like_imagenet_photos_to_a_decoder():
    """500x375 at quality 90, about 100 KiB; structure at every scale like a photo (neighbouring
    pixels strongly correlated, correlation still there 64 pixels apart), neither flat nor noise."""
    jpegs = synthetic_jpegs(2)
    assert 85 < np.mean([len(j) for j in jpegs]) / 1024 < 115
    for raw in jpegs:
        img = Image.open(io.BytesIO(raw))
        assert img.format == "JPEG" and img.size == (500, 375)
        y = np.asarray(img.convert("L"), dtype=np.float64)
        assert y.std() > 30
        assert _neighbour_correlation(y, 1) > 0.7 and _neighbour_correlation(y, 64) > 0.1
    assert synthetic_jpegs(1) == jpegs[:1]  # seeded: every run times the same images


def test_bench_times_each_recipe_on_both_paths_against_decoding(tmp_path):
    rows = run_bench(synthetic_jpegs(1, size=(200, 150)), seconds=0.01, rounds=1)
    names = [r["pipeline"] for r in rows]
    assert names == [
        "decode only (PIL)", "decode only (torchvision)",
        "JFT: Inception crop + flip, float (data.decode=pil)", "JFT: Inception crop + flip, uint8 (default)",
        "ImageNet: + RandAugment(2, 15), float (data.decode=pil)", "ImageNet: + RandAugment(2, 15), uint8 (default)",
        "eval: resize 256 (area) + centre crop 224, float (data.decode=pil)",
        "eval: resize 256 (area) + centre crop 224, uint8 (default)",
    ]
    rate = {r["pipeline"]: r["img_per_s_per_core"] for r in rows}
    assert rows[0]["vs_decode_only"] == 1.0 and all(v > 0 for v in rate.values())
    for r in rows:
        if r["pipeline"].endswith("uint8 (default)"):
            replaced = r["pipeline"].replace("uint8 (default)", "float (data.decode=pil)")
            assert r["vs_float_path"] == pytest.approx(rate[r["pipeline"]] / rate[replaced], rel=1e-2)
        else:
            assert r["vs_float_path"] is None
    csv_path, png = write_bench(add_cores_needed(rows, 1000.0), tmp_path / "b.csv")
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "pipeline,img_per_s_per_core,vs_decode_only,vs_float_path,cores_per_device"
    assert len(lines) == 9 and png.stat().st_size > 0


def test_bench_times_on_one_thread_and_gives_the_process_its_threads_back(monkeypatch):
    """Per-core figures need one thread; a caller that goes on (the tests) keeps its own: torch's
    float kernels round apart on 1 and 2 threads."""
    import torch

    import mixer_cli.commands.data_bench as bench

    seen = []
    monkeypatch.setattr(bench, "images_per_second", lambda *_: seen.append(torch.get_num_threads()) or 1.0)
    with torch_threads(2):
        run_bench([], seconds=0.0, rounds=2)
        assert torch.get_num_threads() == 2
    assert seen == [1] * 2 * len(bench.pipelines())


def test_the_image_by_image_references_resize_one_image_at_a_time_to_the_batched_pixels(monkeypatch):
    import random

    import torch

    from mixer_cli.commands.data_bench import IMAGE_BY_IMAGE, device_pipelines
    from mixer_cli.data import device_transforms, transforms

    pipelines = device_pipelines()
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((375, 500), (500, 333))]

    def run(name: str) -> torch.Tensor:
        random.seed(0)  # the boxes
        torch.manual_seed(0)  # the flips
        return pipelines[name].on_batch(images)

    for name in ("JFT: Inception crop + flip, data.decode=gpu", "eval: resize 256 (area) + centre crop 224, "
                 "data.decode=gpu"):
        batched = run(name)
        with monkeypatch.context() as m:
            m.setattr(device_transforms, "tf_resize_crops", lambda *_: pytest.fail("batched crop called"))
            m.setattr(transforms, "area_resize_crops", lambda *_: pytest.fail("batched area resize called"))
            one_by_one = run(f"{name}, {IMAGE_BY_IMAGE}")
        assert one_by_one.shape == (2, 3, 224, 224)
        assert (one_by_one.int() - batched.int()).abs().max() <= 1  # tf_resize_crops' bound


def test_bench_on_a_device_adds_the_gpu_pipelines_with_their_host_and_device_rates(tmp_path):
    """data.decode=gpu's pipelines (run here with device=cpu): the host's CPU time per image and the
    device's images per second, and from them the cores and the device share a training rate needs."""
    import torch

    rows = run_bench(synthetic_jpegs(2, size=(200, 150)), seconds=0.02, rounds=1, device=torch.device("cpu"))
    on_device = [r for r in rows if r["device_img_per_s"] is not None]
    assert [r["pipeline"] for r in on_device] == [
        "JFT: Inception crop + flip, data.decode=gpu (cpu)", "ImageNet: + RandAugment(2, 15), data.decode=gpu (cpu)",
        "eval: resize 256 (area) + centre crop 224, data.decode=gpu (cpu)",
        "JFT: Inception crop + flip, data.decode=gpu, image by image (cpu)",
        "eval: resize 256 (area) + centre crop 224, data.decode=gpu, image by image (cpu)"]
    assert all(r["img_per_s_per_core"] > 0 and r["device_img_per_s"] > 0 for r in on_device)
    # on the CPU the "device" work is this process's, in one thread: CPU time at most wall time
    assert all(r["img_per_s_per_core"] >= 0.9 * r["device_img_per_s"] for r in on_device)
    needed = add_cores_needed(rows, 1000.0)
    for r in needed:
        assert r["cores_per_device"] == round(1000.0 / r["img_per_s_per_core"], 2)
        assert r["device_share"] == (round(1000.0 / r["device_img_per_s"], 3) if r["device_img_per_s"] else None)
    csv_path, _ = write_bench(needed, tmp_path / "b.csv")
    assert csv_path.read_text().splitlines()[0] == (
        "pipeline,img_per_s_per_core,vs_decode_only,vs_float_path,device_img_per_s,cores_per_device,device_share")
    with pytest.raises(UserError, match="^--device must be auto, cpu, cuda or cuda:N, got 'tpu'$"):
        data_bench(1, 1.0, device="tpu")


def test_cores_needed_is_training_rate_over_pipeline_rate():
    rows = [{"pipeline": "a", "img_per_s_per_core": 400.0}, {"pipeline": "b", "img_per_s_per_core": 1600.0}]
    assert [r["cores_per_device"] for r in add_cores_needed(rows, 3000.0)] == [7.5, 1.88]


def _results(run_root, name: str, rows: list[dict], mtime: float) -> None:
    path = run_root / "benchmark" / name / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"device": {"name": "NVIDIA H100"}, "precision": "bf16", "results": rows}))
    os.utime(path, (mtime, mtime))


def _row(model: str, mode: str, rate: float) -> dict:
    return {"model": model, "label": model.upper(), "res": 224, "mode": mode, "img_s_per_device": rate}


def test_training_rate_comes_from_the_newest_benchmark_that_timed_training(tmp_path):
    assert training_rate(tmp_path) is None
    _results(tmp_path, "old", [_row("vit-b16", "train", 900.0), _row("mixer-b16", "train", 1500.0)], 1e9)
    _results(tmp_path, "newer-infer-only", [_row("mixer-b16", "infer", 9000.0)], 2e9)
    rate = training_rate(tmp_path)
    assert rate["img_s_per_device"] == 1500.0  # our Mixer first, training rows only
    assert "MIXER-B16 at 224px, bf16, on NVIDIA H100" in rate["about"]
    assert training_rate(tmp_path, "vit-b16")["img_s_per_device"] == 900.0
    _results(tmp_path, "newest", [_row("mixer-l16", "train", 500.0)], 3e9)
    assert training_rate(tmp_path)["img_s_per_device"] == 500.0
    assert training_rate(tmp_path, "mixer-b16")["img_s_per_device"] == 1500.0  # the newest that has it


def test_data_bench_rejects_bad_options_in_one_line(tmp_path):
    with pytest.raises(UserError, match="--images must be at least 1 and --seconds above 0"):
        data_bench(0, 1.0)
    with pytest.raises(UserError, match="--throughput must be above 0"):
        data_bench(1, 1.0, throughput=0)
    with pytest.raises(UserError, match="no `mixer benchmark --train` results for --model mixer-b16"):
        data_bench(1, 1.0, model="mixer-b16", run_root=tmp_path)
