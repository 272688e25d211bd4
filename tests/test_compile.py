"""trainer.compile: the same training through torch.compile (a mode where named), checkpoints with plain names;
optimisers fused on a GPU."""
from functools import partial
from pathlib import Path

import pytest
import torch

from mixer_cli.commands.pretrain import pretrain
from mixer_cli.config.compose import compose
from mixer_cli.models import load_mixer
from mixer_cli.reporting.runs import read_metrics
from mixer_cli.train.module import fused_on_cuda

SHORT = ["model.patch_size=7", "trainer.steps=3", "trainer.log_every_steps=1", "data.global_batch=32"]


@pytest.mark.slow
def test_compiled_training_gives_the_eager_losses_and_a_plain_checkpoint(tmp_path, tiny_run):
    runs = {}
    for compiled in (False, True):
        cfg = compose([*tiny_run, *SHORT, f"trainer.compile={str(compiled).lower()}",
                       f"run_root={tmp_path / str(compiled)}"])
        runs[compiled] = pretrain(cfg, progress=False)
    eager, compiled = (read_metrics(Path(runs[c]["run_dir"]) / "metrics.csv")["train/loss"] for c in (False, True))
    assert [s for s, _ in eager] == [s for s, _ in compiled] and len(eager) == 3
    # Inductor fuses and reorders float32 arithmetic: the losses agree to rounding, not bit for bit.
    assert all(abs(a - b) <= 1e-4 * abs(a) for (_, a), (_, b) in zip(eager, compiled))
    ckpt = torch.load(f"{runs[True]['run_dir']}/last.ckpt", weights_only=False)
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])
    a, b = (load_mixer(f"{runs[c]['run_dir']}/last.ckpt") for c in (False, True))
    assert all(torch.allclose(p, q, atol=1e-5) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.slow
def test_a_compiled_run_resumes_compiled_and_trains_on_as_an_eager_one_does(tmp_path, tiny_run):
    from torch._dynamo.utils import counters

    from mixer_cli.train.fit import resume

    losses, graphs = {}, {}
    for compiled in (False, True):
        cfg = compose([*tiny_run, *SHORT, f"trainer.compile={str(compiled).lower()}",
                       f"run_root={tmp_path / str(compiled)}"])
        run_dir = Path(pretrain(cfg, progress=False)["run_dir"])
        torch._dynamo.reset()  # else the resumed model reuses the first run's compiled code unseen
        counters.clear()
        resume(run_dir, ["trainer.steps=5"], "pretrain", progress=False)
        graphs[compiled] = counters["stats"]["unique_graphs"]
        losses[compiled] = read_metrics(run_dir / "metrics.csv")["train/loss"]
    assert graphs[False] == 0 and graphs[True] >= 1  # the resumed run compiled its model again
    assert [s for s, _ in losses[True]] == [s for s, _ in losses[False]] == [0, 1, 2, 3, 4]  # 3 steps, then 2 resumed
    assert all(abs(a - b) <= 1e-4 * abs(a) for (_, a), (_, b) in zip(losses[False], losses[True]))


def test_a_torch_compile_mode_reaches_torch_compile_and_the_run_summary(tmp_path, tiny_run, monkeypatch):
    """trainer.compile=reduce-overhead (CUDA graphs) compiles the network in that mode; the summary
    says so. torch.compile itself is stubbed: the mode's plumbing is under test, not Inductor."""
    modes = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: modes.append(kw.get("mode")))
    cfg = compose([*tiny_run, *SHORT, "trainer.steps=1", "trainer.compile=reduce-overhead", f"run_root={tmp_path}"])
    results = pretrain(cfg, progress=False)
    assert modes == ["reduce-overhead"] and results["precision"] == "32-true, compiled (reduce-overhead)"


@pytest.mark.parametrize("factory,device,expected", [
    (partial(torch.optim.AdamW, lr=1.0), "cuda", {"fused": True}),
    (partial(torch.optim.SGD, lr=1.0), "cuda:1", {"fused": True}),
    (partial(torch.optim.AdamW, lr=1.0), "cpu", {}),  # CPU runs keep torch's default and their numbers
    (partial(torch.optim.AdamW, lr=1.0, fused=False), "cuda", {}),  # the config's word stands
    (partial(torch.optim.LBFGS, lr=1.0), "cuda", {}),  # no fused kernel
])
def test_optimisers_run_fused_on_a_cuda_device_only(factory, device, expected):
    assert fused_on_cuda(factory, torch.device(device)) == expected
