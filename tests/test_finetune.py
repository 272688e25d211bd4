"""`mixer finetune`: the paper's fine-tuning protocol, a new zero head, Appendix C growth, resume."""
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from typer.testing import CliRunner

from mixer_cli.cli import app
from mixer_cli.commands.finetune import finetune, finetune_model
from mixer_cli.config.compose import compose
from mixer_cli.core.errors import UserError
from mixer_cli.models import load_mixer
from mixer_cli.train.fit import resume


@pytest.fixture
def ckpt(tiny_mixer, write_checkpoint):
    """A tiny 7-class Mixer on the demo's digits, trained-looking so a copied or moved body shows."""
    model = tiny_mixer(num_classes=7, trained=True)
    return model, write_checkpoint(model)


def test_new_head_is_zero_for_the_target_classes_and_keeps_the_body(ckpt):
    pre, path = ckpt
    tuned = finetune_model(compose([f"checkpoint={path}"], config_name="finetune"))
    assert tuned.head.weight.shape == (10, 16) and tuned.spec.num_classes == 10  # the demo's 10 digits, not 7
    assert torch.count_nonzero(tuned.head.weight) == 0 and torch.count_nonzero(tuned.head.bias) == 0
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(tuned.forward_features(x), pre.forward_features(x))
        assert tuned(x).abs().sum() == 0


def test_paper_fine_tuning_protocol(tiny_mixer):
    cfg = compose(["recipe=ft_cifar10"], config_name="finetune")
    assert (cfg.trainer.steps, cfg.sched.warmup_steps, cfg.trainer.grad_clip, cfg.data.global_batch) == (
        10000, 500, 1.0, 512)
    opt = instantiate(cfg.optim)(tiny_mixer(num_classes=7, trained=True).parameters())
    assert isinstance(opt, torch.optim.SGD)
    assert all(g["momentum"] == 0.9 and g["weight_decay"] == 0.0 and not g["nesterov"] for g in opt.param_groups)
    sched = instantiate(cfg.sched)(opt, total_steps=cfg.trainer.steps)
    lrs = []
    for _ in range(cfg.trainer.steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    peak = cfg.optim.lr
    assert lrs[0] == pytest.approx(peak / 500) and lrs[499] == pytest.approx(peak)  # linear warmup
    assert lrs[500 + 9500 // 2] == pytest.approx(peak / 2, rel=1e-3)  # cosine: half-way down at mid-decay
    assert lrs[-1] < 1e-6 * peak + 1e-9


def test_checkpoint_is_grown_to_the_target_resolution(ckpt):
    pre, path = ckpt
    cfg = compose(["data.img_size=56", "model.drop_path=0.1", f"checkpoint={path}"], config_name="finetune")
    model = finetune_model(cfg)
    assert (model.spec.img_size, model.spec.num_tokens, model.spec.tokens_mlp_dim) == (56, 196, 32)
    assert model.spec.num_classes == 10 and model.spec.drop_path == 0.1
    # Appendix C: an image of 2 x 2 copies of x gives, token block by token block, the tokens of x;
    # the pooled pre-logits therefore equal the pre-trained model's on x.
    x = torch.randn(3, 1, 28, 28)
    tiled = x.repeat(1, 1, 2, 2)
    model.eval()
    with torch.no_grad():
        grown = model.forward_head(model.forward_features(tiled), pre_logits=True)
        torch.testing.assert_close(grown, pre.forward_head(pre.forward_features(x), pre_logits=True))
        assert model(tiled).abs().sum() == 0  # zero head


def test_recipe_names_the_variant_it_fine_tunes(ckpt):
    _, path = ckpt
    cfg = compose(["recipe=ft_i21k_l16_448", f"checkpoint={path}"], config_name="finetune")
    with pytest.raises(UserError) as e:
        finetune_model(cfg)
    assert str(e.value) == (f"this recipe fine-tunes a Mixer-L/16, but {path} holds patch 4, width 16, 1 blocks; "
                            "pass a L/16 checkpoint or override model.variant=null")
    cfg = compose(["recipe=ft_i21k_l16_448", "model.variant=null", f"checkpoint={path}"], config_name="finetune")
    with pytest.raises(UserError) as e:  # past the variant check, the next mismatch: grey digits vs RGB ImageNet
        finetune_model(cfg)
    assert str(e.value) == f"{path} takes 1-channel images, the data has 3"


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
        (["--from", "CKPT", "target=nope"], "error: unknown fine-tuning target 'nope'"),
    ],
)
def test_user_mistakes_end_in_one_line_and_exit_2(tmp_path, ckpt, args, message):
    _, path = ckpt
    args = [str(path) if a == "CKPT" else a for a in args]
    r = CliRunner().invoke(app, ["finetune", *args, f"run_root={tmp_path}"])
    assert r.exit_code == 2, r.output
    assert r.output.startswith(message) and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "finetune").exists()  # nothing written


def test_pretrain_refuses_a_fine_tuning_recipe():
    with pytest.raises(UserError, match=r"^ft_cifar10 is a recipe for `mixer finetune --from CKPT "
                                        r"recipe=ft_cifar10`; recipes of this command: demo, i1k_b16,"):
        compose(["recipe=ft_cifar10"])


def test_pretrain_refuses_a_shuffle_experiment_recipe():
    with pytest.raises(UserError, match=r"^shuffle_b16_r50 is a recipe for `mixer shuffle-experiment "
                                        r"recipe=shuffle_b16_r50`; recipes of this command: demo, "):
        compose(["recipe=shuffle_b16_r50"])


def test_fine_tune_records_the_target_and_resumes(tmp_path, ckpt):
    pre, path = ckpt
    # 3 steps of 1,000 of the ~3,920 digits left beside the dev split: the last step ends an epoch,
    # so the epoch's own validation is the final one and the dev pass comes after it.
    cfg = compose([f"checkpoint={path}", "trainer.steps=3", "data.global_batch=1000", "sched.warmup_steps=1",
                   f"run_root={tmp_path}"], config_name="finetune")
    results = finetune(cfg, progress=False)
    assert (results["command"], results["name"], results["from"], results["steps"]) == (
        "finetune", "ft_demo", str(path), 3)
    assert results["num_samples"] == 1000 and 0 <= results["top1"] <= results["top5"] <= 1
    assert 0 < results["dev_num_samples"] < 200 and 0 <= results["dev_top1"] <= 1  # 2% of the 4,000 train digits
    assert results["train_loss"] > 0
    run = Path(results["run_dir"])
    assert run.parent == tmp_path / "finetune"
    tuned = load_mixer(run / "last.ckpt")
    assert tuned.spec.num_classes == 10 and tuned.pretrained_cfg["num_classes"] == 10
    assert tuned.pretrained_cfg["mean"] == (0.1307,) and tuned.pretrained_cfg["input_size"] == (1, 28, 28)
    # the body moved from the pre-trained weights, but started there
    moved = (tuned.blocks[0].mlp_channels.fc1.weight - pre.blocks[0].mlp_channels.fc1.weight).abs().max()
    assert 0 < moved < 0.5

    # --resume continues the fine-tune with the recorded head and spec, and still names its start
    again = resume(run, ["trainer.steps=4"], "finetune", progress=False)
    assert again["steps"] == 4 and again["from"] == str(path) and again["run_dir"] == results["run_dir"]
    assert load_mixer(run / "last.ckpt").spec.num_classes == 10
