"""`mixer finetune`: the paper's fine-tuning protocol, a new zero head, Appendix C growth, sweeps."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mixer_cli.cli import app
from mixer_cli.config import compose, expand_sweep
from mixer_cli.models import build_mixer, load_mixer
from mixer_cli.train.finetune import finetune_model, new_head
from mixer_cli.train.optim import build_optimizer, build_scheduler


def _pretrained(classes=7):
    model = build_mixer(None, num_classes=classes, img_size=28, in_chans=1, patch_size=4, hidden_dim=16,
                        num_blocks=1, tokens_mlp_dim=8, channels_mlp_dim=32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.preprocess = {"img_size": 28}
    return model


def _save(model, path):
    """As our Lightning checkpoints store it (spec and preprocessing beside the weights)."""
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "mixer": {"spec": model.spec.to_dict(), "preprocess": {"img_size": 28, "mean": [0.13], "std": [0.31]}}},
               path)
    return path


def test_new_head_is_zero_for_the_target_classes_and_keeps_the_body():
    model = _pretrained()
    tuned = new_head(model, 37)
    assert tuned.head.weight.shape == (37, 16) and tuned.spec.num_classes == 37
    assert torch.count_nonzero(tuned.head.weight) == 0 and torch.count_nonzero(tuned.head.bias) == 0
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(tuned.forward_features(x), model.forward_features(x))


def test_paper_fine_tuning_protocol(tmp_path):
    cfg = compose(["recipe=ft_cifar10"], config_name="finetune")
    assert (cfg.optim.name, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.9, 0.0)
    assert (cfg.sched.name, cfg.trainer.grad_clip, cfg.data.global_batch, cfg.trainer.steps) == (
        "warmup_cosine", 1.0, 512, 10000)
    model = _pretrained()
    opt = build_optimizer(cfg.optim, model)
    assert isinstance(opt, torch.optim.SGD)
    assert all(g["momentum"] == 0.9 and g["weight_decay"] == 0.0 and not g["nesterov"] for g in opt.param_groups)
    sched = build_scheduler(cfg.sched, opt, total_steps=10000)
    lrs = []
    for _ in range(10000):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    peak = cfg.optim.lr
    assert lrs[0] == pytest.approx(peak / 500) and lrs[499] == pytest.approx(peak)  # linear warmup
    assert lrs[500 + 9500 // 2] == pytest.approx(peak / 2, rel=1e-3)  # cosine: half-way down at mid-decay
    assert lrs[-1] < 1e-6 * peak + 1e-9


def test_checkpoint_is_grown_to_the_target_resolution(tmp_path):
    path = _save(_pretrained(), tmp_path / "last.ckpt")
    cfg = compose(["data.img_size=56", "model.drop_path=0.1", f"checkpoint={path}"], config_name="finetune")
    model = finetune_model(cfg, path)
    assert (model.spec.img_size, model.spec.num_tokens, model.spec.tokens_mlp_dim) == (56, 196, 32)
    assert model.spec.num_classes == 10 and model.spec.drop_path == 0.1
    assert model(torch.zeros(1, 1, 56, 56)).abs().sum() == 0  # zero head


def test_recipe_names_the_variant_it_fine_tunes(tmp_path):
    path = _save(_pretrained(), tmp_path / "last.ckpt")
    cfg = compose(["recipe=ft_i21k_l16_448", f"checkpoint={path}"], config_name="finetune")
    with pytest.raises(ValueError, match=r"^this recipe fine-tunes a Mixer-L/16, but .*last\.ckpt holds patch 4, "
                                         r"width 16, 1 blocks; pass a L/16 checkpoint or override model.variant=null$"):
        finetune_model(cfg, path)


def test_sweep_expansion_is_hydras_cartesian_product():
    points = expand_sweep(["recipe=ft_pets", "optim.lr=0.003,0.01", "seed=range(2)"])
    assert points == [["recipe=ft_pets", "optim.lr=0.003", "seed=0"], ["recipe=ft_pets", "optim.lr=0.003", "seed=1"],
                      ["recipe=ft_pets", "optim.lr=0.01", "seed=0"], ["recipe=ft_pets", "optim.lr=0.01", "seed=1"]]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--res", "42", "--from", "CKPT"],
         "error: cannot grow a Mixer trained at 28px to 42px: Appendix C needs K^2 x "
         "its 49 tokens, i.e. a resolution of K x 28; allowed: 28, 56, 84, 112, ..."),
        ([], "error: fine-tuning needs a pre-trained model: --from CKPT"),
        (["--from", "CKPT", "optim.lr=0.01,0.03"],
         "error: these overrides list several values (a sweep): add --multirun"),
        (["--from", "CKPT", "recipe=i21k_b16"],
         "error: i21k_b16 is a recipe for `mixer pretrain recipe=i21k_b16`; recipes of this command: ft_cifar10,"),
    ],
)
def test_user_mistakes_end_in_one_line_and_exit_2(tmp_path, args, message):
    path = _save(_pretrained(), tmp_path / "last.ckpt")
    args = [str(path) if a == "CKPT" else a for a in args]
    r = CliRunner().invoke(app, ["finetune", *args, f"run_root={tmp_path}"])
    assert r.exit_code == 2, r.output
    assert r.output.startswith(message) and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "finetune").exists()  # nothing written


def test_pretrain_refuses_a_fine_tuning_recipe():
    with pytest.raises(ValueError, match=r"^ft_cifar10 is a recipe for `mixer finetune --from CKPT "
                                         r"recipe=ft_cifar10`; recipes of this command: demo, i1k_b16,"):
        compose(["recipe=ft_cifar10"])


def test_pretrain_refuses_a_shuffle_experiment_recipe():
    with pytest.raises(ValueError, match=r"^shuffle_b16_r50 is a recipe for `mixer shuffle-experiment "
                                         r"recipe=shuffle_b16_r50`; recipes of this command: demo, "):
        compose(["recipe=shuffle_b16_r50"])


@pytest.mark.slow
def test_lr_sweep_from_an_official_npz_ends_with_one_table(tmp_path):
    from test_checkpoints import _flax_params

    pre = _pretrained(classes=7)
    np.savez(tmp_path / "Mixer-tiny.npz", **_flax_params(pre))
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("MIXER_RUN_SESSION", None)
    r = subprocess.run([sys.executable, "-m", "mixer_cli.cli", "finetune", "--from", "Mixer-tiny.npz",
                        "recipe=ft_demo", "optim.lr=0.01,0.03", "--multirun", "trainer.steps=4",
                        "data.global_batch=1000", "sched.warmup_steps=1", f"run_root={tmp_path}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Sweep: 2 runs" in r.stdout
    runs = sorted((tmp_path / "finetune").iterdir())
    assert len(runs) == 3  # the sweep's table and one directory per run
    sweep_dir = next(d for d in runs if d.name.endswith("ft_demo-sweep"))
    with open(sweep_dir / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["optim.lr"] for row in rows] == ["0.01", "0.03"]
    for row in rows:
        run = tmp_path / "finetune" / os.path.basename(row["run_dir"])
        assert json.loads((run / "results.json").read_text())["steps"] == 4  # one epoch
        assert f"lr: {row['optim.lr']}" in (run / "config.yaml").read_text()
        tuned = load_mixer(run / "last.ckpt")
        assert tuned.spec.num_classes == 10 and tuned.spec.gelu == "tanh"  # the demo's classes; the npz's GELU
        assert tuned.preprocess["mean"] == [0.1307]  # the target's preprocessing is recorded
        # the body moved from the pre-trained weights, but started there
        moved = (tuned.blocks[0].mlp_channels.fc1.weight - pre.blocks[0].mlp_channels.fc1.weight).abs().max()
        assert 0 < moved < 0.5

    # --resume continues a fine-tune where it stopped, with the recorded head and spec
    from mixer_cli.train.finetune import resume_finetune

    run = tmp_path / "finetune" / os.path.basename(rows[0]["run_dir"])
    assert resume_finetune(run, ["trainer.steps=8"], progress=False)["steps"] == 8
    assert load_mixer(run / "last.ckpt").spec.num_classes == 10
