"""benchmarks/gpu_check.py (`make gpu-check`): one line and exit status 2 without CUDA, the goals and
ratios from hand-made figures, and a rehearsal of its jobs on the CPU end to end."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run(*args: str, out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "GPU_CHECK_DIR": str(out), **env})


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_without_cuda_it_ends_at_once_with_one_line_and_status_2(tmp_path):
    done = run(out=tmp_path / "report", CUDA_VISIBLE_DEVICES="")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "gpu-check needs a CUDA GPU and torch sees none here; nothing was run\n"
    assert not (tmp_path / "report").exists()


def _row(model, mode, compile, img_s, mfu=0.3):
    return {"model": model, "label": model, "mode": mode, "compile": compile, "img_s": img_s,
            "fraction_of_matmul_peak": mfu}


def test_goals_take_the_best_compiled_layout_and_the_fewest_cores(gpu_check):
    rows = [_row("mixer-b16", "train", "eager", 3000, 0.40), _row("mixer-b16", "train", "default", 3500, 0.42),
            _row("mixer-b16-matmul", "train", "reduce-overhead", 4000, 0.48),
            _row("mixer-b16", "infer", "default", 13000), _row("mixer-b16-einsum", "infer", "default", 12000),
            _row("vit-b16", "infer", "default", 10000), _row("vit-b16", "infer", "eager", 20000)]
    pipeline = [{"pipeline": "JFT: crop, uint8", "cores_per_device": 3.0},
                {"pipeline": "JFT: crop, data.decode=gpu (cuda)", "cores_per_device": 0.5},
                {"pipeline": "ImageNet: + RandAugment, uint8", "cores_per_device": 9.0},
                {"pipeline": "decode only (PIL)", "cores_per_device": 0.1}]
    mfu, vs_vit, jft, imagenet = gpu_check.goals(rows, pipeline)
    assert mfu["met"] is True and mfu["measured"].startswith("48.0% (mixer-b16-matmul, reduce-overhead, 4000 img/s)")
    assert vs_vit["met"] is True and vs_vit["measured"].startswith("1.30 (mixer-b16 13000 / vit-b16 10000")
    assert jft["met"] is True and jft["measured"] == "0.50 (JFT: crop, data.decode=gpu (cuda))"
    assert imagenet["met"] is False and imagenet["measured"].startswith("9.00")
    unmeasured = gpu_check.goals([r for r in rows if r["compile"] == "eager"], [])
    assert all(g["met"] is None and g["measured"] is None for g in unmeasured)


def test_ratios_set_each_layout_against_transpose_and_each_compile_against_eager(gpu_check):
    rows = [_row("mixer-b16", "train", "eager", 3000), _row("mixer-b16-matmul", "train", "eager", 3300),
            _row("mixer-b16", "train", "default", 4500), _row("vit-b16", "infer", "eager", 2000),
            _row("vit-b16", "infer", "reduce-overhead", 3000), _row("timm-mixer-b16", "train", "eager", 2900)]
    found = {r["what"]: round(r["ratio"], 3) for r in gpu_check.ratios(rows)}
    assert found == {"mixer-b16-matmul / mixer-b16 (train, eager)": 1.1, "mixer-b16 default / eager (train)": 1.5,
                     "vit-b16 reduce-overhead / eager (infer)": 1.5}


@pytest.mark.slow
def test_a_rehearsal_runs_the_jobs_on_the_cpu_and_writes_the_report(tmp_path):
    """The jobs the GPU runs, shrunk (Mixer-S/32 at 32 pixels, no compile): the benchmark's figures and
    the data bench, fed the benchmark's training speed, reach report.md and gpu-check.json."""
    done = run("--rehearse", "--only", "eager", "data-bench", out=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "gpu-check.json").read_text())
    assert [(j["name"], j["status"]) for j in summary["jobs"]] == [("eager", "ok"), ("data-bench", "ok")]
    assert {(r["model"], r["mode"]) for r in summary["benchmark"]} == {
        (m, mode) for m in ("mixer-s32", "mixer-s32-matmul", "mixer-s32-einsum", "timm-mixer-s32")
        for mode in ("infer", "train")}
    layouts = {r["what"] for r in summary["ratios"]}
    assert layouts == {f"mixer-s32-{layout} / mixer-s32 ({mode}, eager)" for layout in ("matmul", "einsum")
                       for mode in ("infer", "train")}
    # the fastest of our Mixer-S/32 layouts in training
    speed = max(r["img_s"] for r in summary["benchmark"] if r["model"].startswith("mixer-s32") and r["mode"] == "train")
    gpu_rows = [r for r in summary["data_bench"] if "data.decode=gpu" in r["pipeline"]]
    assert len(gpu_rows) == 5 and all(r["device_img_per_s"] > 0 for r in gpu_rows)
    assert sum("image by image" in r["pipeline"] for r in gpu_rows) == 2  # the references of the batched resizes
    for r in summary["data_bench"]:  # cores per device at the benchmark's Mixer training speed
        assert r["cores_per_device"] == pytest.approx(speed / r["img_per_s_per_core"], abs=0.01, rel=0.02)
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# GPU check: CPU (rehearsal)\n\n**Rehearsal on the CPU at toy sizes")
    assert "| CPU cores per GPU, JFT pipeline at Mixer training speed | <= 2 |" in report
    assert "| Mixer-S/32 (matmul) | train | eager | 2 |" in report
