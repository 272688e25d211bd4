"""`mixer recipes` planning: training FLOPs counted from the model, and device-hours from throughput."""
import json
import os

import pytest
import torch
from rich.console import Console
from torch.utils.flop_counter import FlopCounterMode

from mixer_cli.commands.recipes import forward_flops, images_seen, plan_row, print_plan, spec_of, train_rates
from mixer_cli.config.compose import load_recipe
from mixer_cli.models import VARIANTS, MixerSpec, build_mixer


def table1(variant: str, num_classes: int = 1000) -> MixerSpec:
    return MixerSpec(**VARIANTS[variant], img_size=224, in_chans=3, num_classes=num_classes)


def test_forward_flops_of_mixer_b16_by_hand():
    # B/16 at 224: S = (224/16)^2 = 196 patches, C = 768, D_S = 384, D_C = 3072, 12 blocks; a
    # multiply-add is 2 FLOPs.
    stem = 2 * 196 * (16 * 16 * 3) * 768  # 231,211,008: each patch (768 values) -> 768 channels
    token_mixing = 2 * (768 * 196 * 384 + 768 * 384 * 196)  # 231,211,008: per channel, 196 -> 384 -> 196
    channel_mixing = 2 * (196 * 768 * 3072 + 196 * 3072 * 768)  # 1,849,688,064: per token, 768 -> 3072 -> 768
    head = 2 * 768 * 1000  # 1,536,000
    assert stem + 12 * (token_mixing + channel_mixing) + head == 25_203_535_872
    assert forward_flops(table1("B/16")) == 25_203_535_872  # about 12.6 G multiply-adds, as timm lists


def test_forward_flops_of_mixer_s32_by_hand():
    # S/32 at 224: S = 7^2 = 49 patches, C = 512, D_S = 256, D_C = 2048, 8 blocks.
    stem = 2 * 49 * (32 * 32 * 3) * 512  # 154,140,672
    token_mixing = 2 * 2 * 512 * 49 * 256  # 25,690,112
    channel_mixing = 2 * 2 * 49 * 512 * 2048  # 205,520,896
    head = 2 * 512 * 1000  # 1,024,000
    assert stem + 8 * (token_mixing + channel_mixing) + head == 2_004_852_736
    assert forward_flops(table1("S/32")) == 2_004_852_736


def test_forward_flops_equal_torch_flop_counter():
    """The count is every matmul of the model: torch's counter on a small Mixer agrees exactly."""
    # kept: every size distinct (16 tokens, width 8, ...), so a formula swapping two of them fails
    model = build_mixer(None, num_classes=7, img_size=16, in_chans=3, patch_size=4, hidden_dim=8, num_blocks=2,
                        tokens_mlp_dim=6, channels_mlp_dim=12)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, 16, 16))
    assert forward_flops(model.spec) == counter.get_total_flops()


def test_training_flops_of_a_recipe_are_epochs_times_images_times_three_forwards():
    cfg = load_recipe("jft_b16")
    spec = spec_of(cfg)
    assert (spec.num_tokens, spec.hidden_dim, spec.num_blocks, spec.num_classes) == (196, 768, 12, 18291)
    assert images_seen("jft_b16", cfg) == 7 * 303_000_000  # 7 epochs of JFT-300M
    row = plan_row("jft_b16", cfg, throughput=100.0, rates={})
    train_flops = 3 * forward_flops(spec) * 7 * 303_000_000
    assert row[4] == f"{train_flops:.2e}"
    assert float(row[5].replace(",", "")) == pytest.approx(train_flops / 100e12 / 3600, rel=1e-3)
    assert row[6] == "--throughput 100 TFLOP/s" and row[7] == "80"  # beside the paper's 0.08k core-days


def write_benchmark(root, name, rows, mtime):
    run = root / "benchmark" / name
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"results": rows}))
    os.utime(run / "results.json", (mtime, mtime))


def test_device_hours_from_the_latest_benchmark(tmp_path):
    write_benchmark(tmp_path, "20260101-000000-benchmark",
                    [{"model": "mixer-b16", "res": 224, "mode": "infer", "img_s_per_device": 300.0}], mtime=1e9)
    rates = train_rates(tmp_path)
    assert rates[("mixer-b16", 224)] == (100.0, "benchmark, infer / 3")  # backward costs two forwards
    write_benchmark(tmp_path, "20260102-000000-benchmark",
                    [{"model": "mixer-b16", "res": 224, "mode": "infer", "img_s_per_device": 900.0},
                     {"model": "mixer-b16", "res": 224, "mode": "train", "img_s_per_device": 250.0}], mtime=2e9)
    rates = train_rates(tmp_path)
    assert rates[("mixer-b16", 224)] == (250.0, "benchmark, train")
    cfg = load_recipe("jft_b16")
    row = plan_row("jft_b16", cfg, throughput=None, rates=rates)
    assert row[5] == f"{7 * 303_000_000 / 250 / 3600:,.0f}"  # 2,357 device-hours
    assert row[6] == "benchmark, train (250 img/s)"


def test_the_plan_lists_pre_training_recipes_only_and_says_how_to_measure(tmp_path):
    console = Console(record=True, width=200)
    print_plan({"jft_b16": load_recipe("jft_b16"), "ft_imagenet": load_recipe("ft_imagenet")}, console, runs=tmp_path)
    text = console.export_text()
    assert "jft_b16" in text and "ft_imagenet" not in text
    assert "No `mixer benchmark` result under" in text
