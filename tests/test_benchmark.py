"""`mixer benchmark` and the speed-oriented Mixer internals: same numbers as timm's MlpMixer,
FLOPs against the paper's formula, memory, the claims' ratios, and the command end to end."""
import json
from dataclasses import replace

import pytest
import timm.models.mlp_mixer as timm_mixer
import torch
from torch.nn import functional as F

from mixer_cli.commands.benchmark import (
    CONTENDERS,
    Contender,
    best_rows,
    claims,
    flops_per_image,
    list_overrides,
    plan_from_config,
    train_memory,
)
from mixer_cli.config.compose import compose
from mixer_cli.core.devices import torch_threads
from mixer_cli.core.errors import UserError
from mixer_cli.models import build_mixer

TINY = dict(patch_size=8, hidden_dim=32, num_blocks=3, tokens_mlp_dim=8, channels_mlp_dim=64)


def _plan(*overrides):
    return plan_from_config(compose(list_overrides(list(overrides)), config_name="benchmark"))


# --- the model: same function as timm's, in fp32 and in CPU bf16 training ---------------------------

def _pair(drop_path=0.0):
    # timm's DropPath rescales kept samples by 1/keep: our option for it (the default is the paper's code's)
    ours = build_mixer(None, num_classes=5, img_size=32, gelu="exact", drop_path=drop_path, drop_path_rescale=True,
                       **TINY)
    ref = timm_mixer.MlpMixer(num_classes=5, img_size=32, patch_size=8, num_blocks=3, embed_dim=32,
                              mlp_ratio=(0.25, 2.0), drop_path_rate=drop_path)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def test_logits_and_gradients_equal_timms_mixer():
    ours, ref = _pair()
    x = torch.randn(3, 3, 32, 32)
    y = torch.tensor([0, 4, 2])
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    F.cross_entropy(ours(x), y).backward()
    F.cross_entropy(ref(x), y).backward()
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def _bf16_step(model, x, y):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss


def test_bf16_training_step_matches_timms():
    """The loss and every gradient of a bf16 autocast step are timm's, to bf16 rounding."""
    ours, ref = _pair()
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 4, 2, 1])
    torch.testing.assert_close(_bf16_step(ours, x, y), _bf16_step(ref, x, y), atol=0, rtol=0)
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad.dtype == torch.float32, name
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=2e-2, rtol=2e-2, msg=name)


def test_stochastic_depth_drops_whole_samples_like_timm():
    ours, ref = _pair(drop_path=0.5)
    ours_block, ref_block = ours.blocks[2], ref.blocks[2]  # ours: rate 0.5 at the last block, as timm's
    ours_block.train(), ref_block.train()
    x = torch.randn(16, 16, 32)
    torch.manual_seed(1)
    out = ours_block(x)
    torch.manual_seed(1)
    torch.testing.assert_close(out, ref_block(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, ours_block.eval()(x))  # some samples were dropped


# --- FLOPs, memory ---------------------------------------------------------------------------------

def _mixer_flops(res, patch, c, blocks, ds, dc, classes=1000):
    """Multiply-adds x 2 of Eq. (1): stem, token mixing (D_S), channel mixing (D_C), head."""
    s = (res // patch) ** 2
    return 2 * s * c * 3 * patch**2 + blocks * (4 * s * c * ds + 4 * s * c * dc) + 2 * c * classes


@pytest.mark.parametrize("res", [224, 448])
def test_mixer_flops_follow_the_formula_and_are_linear_in_patches(res):
    assert flops_per_image(CONTENDERS["mixer-s32"], res, "infer") == _mixer_flops(res, 32, 512, 8, 256, 2048)
    train = flops_per_image(CONTENDERS["mixer-s32"], res, "train")
    assert 2.9 < train / _mixer_flops(res, 32, 512, 8, 256, 2048) <= 3.0  # backward: twice the forward


def test_vit_flops_grow_faster_than_the_number_of_patches():
    vit = [flops_per_image(CONTENDERS["vit-b16"], r, "infer") for r in (224, 448)]
    mixer = [flops_per_image(CONTENDERS["mixer-b16"], r, "infer") for r in (224, 448)]
    assert mixer[1] / mixer[0] == pytest.approx(4.0, rel=1e-3)
    assert vit[1] / vit[0] > 4.2


def test_checkpointing_cuts_training_memory_per_image():
    tiny = Contender("tiny", "tiny", 8, lambda res: build_mixer(None, img_size=res, **TINY))
    plain = train_memory(tiny, 32, _plan("memory_batches=[64,128]"))
    checkpointed = train_memory(tiny, 32, _plan("memory_batches=[64,128]", "grad_checkpointing=true"))
    assert plain["at_batch"] == 128 and plain["peak_mib"] > 0
    assert 0 < checkpointed["mib_per_image"] < 0.6 * plain["mib_per_image"]


def test_memory_false_skips_the_memory_count():
    tiny = Contender("tiny", "tiny", 8, lambda res: build_mixer(None, img_size=res, **TINY))
    plan = replace(_plan("memory=false", "device=cpu"), contenders=[tiny])
    (row,) = best_rows(plan, 32, "train", {("tiny", 2): 10.0}, peak=1e12)
    assert "memory" not in row and row["img_s"] == 10.0 and row["batch"] == 2
    (row,) = best_rows(replace(plan, memory=True, memory_batches=(64, 128)), 32, "train", {("tiny", 2): 10.0}, 1e12)
    assert row["memory"]["at_batch"] == 128 and row["memory"]["mib_per_image"] > 0


# --- claims and validation ------------------------------------------------------------------------

def _row(model, res, mode, img_s):
    return {"model": model, "res": res, "mode": mode, "img_s": img_s}


def test_claims_are_ratios_beside_the_papers():
    rows = [_row("mixer-b16", 224, "infer", 30.0), _row("vit-b16", 224, "infer", 20.0),
            _row("mixer-b16", 448, "infer", 7.0), _row("vit-b16", 448, "infer", 4.0),
            _row("mixer-b16", 224, "train", 9.0), _row("timm-mixer-b16", 224, "train", 8.0)]
    found = {c["claim"]: c for c in claims(rows)}
    vs_vit = found["Mixer vs ViT: mixer-b16 / vit-b16 img/s (infer, 224px)"]
    assert vs_vit["measured"] == 1.5 and vs_vit["paper"] == pytest.approx(1384 / 861)
    assert found["ours vs timm: mixer-b16 / timm-mixer-b16 img/s (train, 224px)"]["measured"] == 9 / 8
    scaling = found["time 448px / 224px: mixer-b16 (infer)"]
    assert scaling["measured"] == 30 / 7 and scaling["expected"] == "4 (linear)" and scaling["paper"] is None
    assert found["time 448px / 224px: vit-b16 (infer)"]["expected"] == "> 4 (quadratic)"
    assert found["Mixer vs ViT: mixer-b16 / vit-b16 img/s (infer, 448px)"]["paper"] is None  # no B/16 at 448
    assert len(found) == 5


def test_token_mixing_layouts_are_timed_as_their_own_models_and_compared_with_transpose():
    assert CONTENDERS["mixer-b16-matmul"].build(32).blocks[0].mlp_tokens.token_mixing == "matmul"
    assert CONTENDERS["mixer-l16-einsum"].label == "Mixer-L/16 (einsum)"
    rows = [_row("mixer-b16", 224, "train", 10.0), _row("mixer-b16-matmul", 224, "train", 12.0),
            _row("mixer-b16-einsum", 224, "train", 9.0)]
    found = {c["claim"]: c["measured"] for c in claims(rows)}
    assert found == {"token mixing matmul vs transpose: mixer-b16-matmul / mixer-b16 img/s (train, 224px)": 1.2,
                     "token mixing einsum vs transpose: mixer-b16-einsum / mixer-b16 img/s (train, 224px)": 0.9}


@pytest.mark.parametrize("value,mode", [("false", None), ("true", "default"), ("reduce-overhead", "reduce-overhead")])
def test_compile_names_a_torch_compile_mode(value, mode):
    assert _plan(f"compile={value}").compile == mode


def test_bare_comma_lists_become_hydra_lists():
    assert list_overrides(["models=mixer-b16,vit-b16", "res=[224]", "precision=bf16"]) == [
        "models=[mixer-b16,vit-b16]", "res=[224]", "precision=bf16"]


@pytest.mark.parametrize("overrides,message", [
    (["models=mixer-b8"], r"^unknown model\(s\) mixer-b8; choose from mixer-s32, timm-mixer-s32, "),
    (["res=[224,200]"], r"^resolution 200 does not suit Mixer-B/16 \(patch 16\); use a multiple of 16$"),
    (["precision=fp16"], r"^precision must be one of fp32, bf16, not 'fp16'$"),
    (["memory_batches=[8,4]"], r"^memory_batches must be two increasing batch sizes"),
    (["device=tpu"], r"^device must be auto, cpu, cuda or cuda:N, got 'tpu'$"),
    (["compile=fast"], r"^compile must be true, false or a torch.compile mode \(default, reduce-overhead, "
                       r"max-autotune, max-autotune-no-cudagraphs\), got 'fast'$"),
    pytest.param(["device=cuda:0"], r"^device 'cuda:0' asked for, but torch sees no CUDA GPU here; use device=cpu$",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")),
])
def test_user_mistakes_are_one_clear_line(overrides, message):
    with pytest.raises(UserError, match=message):
        _plan(*overrides)


# --- the command -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_benchmark_command_writes_tables_and_json(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mixer_cli.cli import app

    # Tiny stand-ins under the S/32 names: the command's logic, not S/32's speed, is under test.
    def tiny_timm(res):
        return timm_mixer.MlpMixer(img_size=res, patch_size=8, num_blocks=3, embed_dim=32, mlp_ratio=(0.25, 2.0))

    monkeypatch.setitem(CONTENDERS, "mixer-s32", Contender("mixer-s32", "Mixer-S/32", 8,
                                                           lambda res: build_mixer(None, img_size=res, **TINY)))
    monkeypatch.setitem(CONTENDERS, "timm-mixer-s32", Contender("timm-mixer-s32", "timm Mixer-S/32", 8, tiny_timm))

    args = ["benchmark", "--res", "32", "--train", "models=mixer-s32,timm-mixer-s32", "batch_sizes=1,2", "iters=1",
            "repeats=2", "warmup=0", "memory_batches=1,2", "threads=1", f"run_root={tmp_path}"]
    with torch_threads(2):
        r = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
        assert torch.get_num_threads() == 2  # threads=1 held for the measurement alone
    assert r.exit_code == 0, r.output
    assert "Mixer-S/32" in r.output and "timm Mixer-S/32" in r.output and "ours vs timm" in r.output
    (path,) = (tmp_path / "benchmark").glob("*/results.json")
    report = json.loads(path.read_text())
    assert report["device"]["name"].endswith("CPU, 1 threads")
    assert [(row["model"], row["mode"]) for row in report["results"]] == [
        ("mixer-s32", "infer"), ("timm-mixer-s32", "infer"), ("mixer-s32", "train"), ("timm-mixer-s32", "train")]
    for row in report["results"]:
        by_batch = row["img_s_by_batch"]
        assert set(by_batch) == {"1", "2"} and row["img_s"] == max(by_batch.values())
        assert row["batch"] == int(max(by_batch, key=by_batch.get))
        assert row["achieved_tflop_s"] == pytest.approx(row["gflop_per_image"] * row["img_s"] / 1e3)
        assert row["fraction_of_matmul_peak"] == pytest.approx(row["achieved_tflop_s"] / report["matmul_peak_tflop_s"])
    assert {c["claim"] for c in report["claims"]} == {
        "ours vs timm: mixer-s32 / timm-mixer-s32 img/s (infer, 32px)",
        "ours vs timm: mixer-s32 / timm-mixer-s32 img/s (train, 32px)"}

    r = CliRunner().invoke(app, ["benchmark", "models=vit-b99", f"run_root={tmp_path / 'new'}"])
    assert r.exit_code == 2 and r.output.startswith("error: unknown model(s) vit-b99")
    assert not (tmp_path / "new").exists()
