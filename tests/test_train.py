"""Batch planning, device counting, the learning-rate schedule, optimiser groups and crash-safe checkpoints."""
import pytest
import torch
from fsspec.implementations.local import LocalFileOpener
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from mixer_cli.core.errors import UserError
from mixer_cli.models import build_mixer
from mixer_cli.train.batching import devices_per_node, plan_batches
from mixer_cli.train.optim import lr_factor, param_groups, warmup_schedule


@pytest.mark.parametrize(
    "global_batch,world,cap,expected",
    [
        (4096, 8, None, (512, 1)),  # the paper's pre-training batch on 8 devices
        (4096, 8, 128, (128, 4)),  # 512 per device, at most 128 at once: 4 accumulation steps
        (4096, 64, 256, (64, 1)),
        (512, 1, 96, (64, 8)),  # 512 does not split into micro-batches of 96: the next divisor
    ],
)
def test_global_batch_is_split_over_devices_and_accumulation(global_batch, world, cap, expected):
    plan = plan_batches(global_batch, world, cap)
    assert (plan.device_batch, plan.accumulate) == expected
    assert plan.device_batch * plan.accumulate * world == global_batch


def test_global_batch_that_does_not_split_is_a_clear_error():
    with pytest.raises(UserError, match=r"^global batch 100 does not split over 3 devices; use a multiple of 3"):
        plan_batches(100, 3)


@pytest.mark.parametrize(
    "devices,expected", [(2, 2), ("3", 3), ("0,1", 2), ("1,", 1), ([0, 2, 3], 3), ("auto", 1), (-1, 1)]
)
def test_devices_per_node_reads_lightnings_device_notations(devices, expected):
    # Lightning: an int or "N" is a count, "1," and lists are device ids; auto/-1 all (one CPU device)
    assert devices_per_node("cpu", devices) == expected


def test_linear_warmup_then_linear_decay():
    f = [lr_factor(s, total=100, warmup=10, decay="linear") for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # warmup reaches the peak
    assert f[10] == pytest.approx(1.0) and f[55] == pytest.approx(0.5) and f[99] == pytest.approx(1 / 90)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_cosine_decay_after_warmup():
    assert lr_factor(10, total=110, warmup=10, decay="cosine") == pytest.approx(1.0)
    assert lr_factor(60, total=110, warmup=10, decay="cosine") == pytest.approx(0.5)
    assert lr_factor(110, total=110, warmup=10, decay="cosine") == pytest.approx(0.0, abs=1e-12)


def test_warmup_schedule_steps_the_optimisers_lr_by_lr_factor():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    schedule = warmup_schedule(opt, total_steps=8, warmup_steps=3, decay="cosine")
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert seen == pytest.approx([0.5 * lr_factor(s, 8, 3, "cosine") for s in range(8)])


def test_weight_decay_only_on_kernels():
    model = build_mixer(None, num_classes=3, img_size=16, patch_size=4, hidden_dim=8, num_blocks=1,
                        tokens_mlp_dim=4, channels_mlp_dim=16)
    decay, keep = param_groups(model)
    # the first group takes the optimiser's weight_decay, the second none
    assert "weight_decay" not in decay and keep["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in keep["params"])
    assert len(decay["params"]) + len(keep["params"]) == len(list(model.parameters()))
    opt = torch.optim.AdamW([decay, keep], lr=1e-3, weight_decay=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_interrupted_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    """Lightning writes checkpoints inside an fsspec transaction (temp file, then move); we rely on
    it for "a kill never corrupts a checkpoint", so check it here."""
    io = TorchCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def torn_write(self, data):
        LocalFileOpener_write(self, data[: len(data) // 2])
        raise KeyboardInterrupt  # killed mid-write

    LocalFileOpener_write = LocalFileOpener.write
    monkeypatch.setattr(LocalFileOpener, "write", torn_write)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "weights": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
