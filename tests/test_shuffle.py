"""The permutation experiment (Sec. 3.4, Figure 4): the shuffles, and why the Mixer is immune to one."""
import copy
import csv
import gzip
import json
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from mixer_cli.cli import app
from mixer_cli.commands.shuffle import (
    ShufflePixels,
    draw_permutations,
    patch_pixel_permutation,
    relative_drops,
    verdict,
    with_shuffle,
)
from mixer_cli.config.compose import compose
from mixer_cli.data import demo_arrays
from mixer_cli.evaluate.fewshot import fewshot_callback
from mixer_cli.train.fit import build_datasets, device_preprocessing

IMG, PATCH = 12, 4  # a 3 x 3 grid of 4 x 4 patches


@pytest.fixture
def perms():
    return draw_permutations(IMG, PATCH, seed=3)


def _patches(x, p=PATCH):
    """(B, C, H, W) -> (B, C, S, P*P): patches row-major, pixels row-major inside a patch."""
    b, c, h, w = x.shape
    return x.view(b, c, h // p, p, w // p, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, -1, p * p)


def test_pipelines_are_true_permutations(perms):
    assert list(perms) == ["original", "patch_pixel", "global_pixel"]
    for perm in perms.values():
        assert torch.equal(perm.sort().values, torch.arange(IMG * IMG))
    assert torch.equal(perms["original"], torch.arange(IMG * IMG))
    assert not torch.equal(perms["patch_pixel"], perms["original"])
    assert not torch.equal(perms["global_pixel"], perms["original"])


def test_shuffles_are_invertible(perms):
    x = torch.randn(2, 3, IMG, IMG)
    for perm in perms.values():
        shuffle = ShufflePixels(perm)
        y = shuffle(x)
        assert torch.equal(shuffle.inverse()(y), x)
        # every channel of every image moved the same way
        assert torch.equal(y[1, 2], ShufflePixels(perm)(x[1, 2]))


def test_permutations_are_seeded(perms):
    again = draw_permutations(IMG, PATCH, seed=3)
    other = draw_permutations(IMG, PATCH, seed=4)
    assert all(torch.equal(perms[k], again[k]) for k in perms)
    assert not torch.equal(perms["global_pixel"], other["global_pixel"])


def test_patch_pixel_moves_whole_patches_with_one_shared_pixel_order(perms):
    x = torch.arange(IMG * IMG).view(1, 1, IMG, IMG)  # each pixel holds its own index
    src = _patches(ShufflePixels(perms["patch_pixel"])(x))[0, 0]  # (S, P*P): where each pixel came from
    row, col = src // IMG, src % IMG
    from_patch = (row // PATCH) * (IMG // PATCH) + col // PATCH
    from_position = (row % PATCH) * PATCH + col % PATCH
    assert (from_patch == from_patch[:, :1]).all()  # each patch comes whole from one input patch
    assert torch.equal(from_patch[:, 0].sort().values, torch.arange(9))  # ... a permutation of them
    assert (from_position == from_position[:1]).all()  # one pixel order shared by all patches
    assert torch.equal(from_position[0].sort().values, torch.arange(PATCH * PATCH))
    assert not torch.equal(from_position[0], torch.arange(PATCH * PATCH))


def test_global_shuffle_breaks_patches(perms):
    x = torch.arange(IMG * IMG, dtype=torch.float32).view(1, 1, IMG, IMG)
    src = {frozenset(p.tolist()) for p in _patches(x)[0, 0]}
    out = {frozenset(p.tolist()) for p in _patches(ShufflePixels(perms["global_pixel"])(x))[0, 0]}
    assert not out & src


def _mixer_for_shuffled_inputs(model, patch_order, pixel_order):
    """Permute the stem kernels like the pixels inside a patch, and the token-mixing weights like
    the patches: token s of the shuffled image is then token patch_order[s] of the original."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        w = out.stem.proj.weight
        w.copy_(w.flatten(-2)[..., pixel_order].view(w.shape))
        for block in out.blocks:
            block.mlp_tokens.fc1.weight.copy_(block.mlp_tokens.fc1.weight[:, patch_order])
            block.mlp_tokens.fc2.weight.copy_(block.mlp_tokens.fc2.weight[patch_order])
            block.mlp_tokens.fc2.bias.copy_(block.mlp_tokens.fc2.bias[patch_order])
    return out


@pytest.mark.slow
def test_mixer_with_permuted_weights_is_exactly_invariant_to_patch_pixel_shuffle(tiny_mixer):
    patch_order, pixel_order = torch.randperm(9), torch.randperm(PATCH * PATCH)
    shuffle = ShufflePixels(patch_pixel_permutation(IMG, PATCH, patch_order, pixel_order))
    # two blocks: every block's token mixing is permuted; float64 for an exact comparison
    model = tiny_mixer(num_classes=5, img_size=IMG, in_chans=3, patch_size=PATCH, num_blocks=2, trained=True)
    model = model.double().eval()
    twin = _mixer_for_shuffled_inputs(model, patch_order, pixel_order)
    x = torch.randn(4, 3, IMG, IMG, dtype=torch.float64)
    with torch.no_grad():
        reference, shuffled = model(x), twin(shuffle(x))
        torch.testing.assert_close(shuffled, reference, rtol=1e-12, atol=1e-12)
        # the same weights without the permutation see a different image: the check has teeth
        assert (model(shuffle(x)) - reference).abs().max() > 1e-2


def test_cnn_is_not_rescued_by_the_same_weight_permutation():
    """A CNN with the Mixer's patch stem, then a 3x3 convolution over the patch grid: permuting the
    stem like the pixels makes the tokens match, but the convolution ties neighbouring patches."""
    patch_order, pixel_order = torch.randperm(9), torch.randperm(PATCH * PATCH)
    shuffle = ShufflePixels(patch_pixel_permutation(IMG, PATCH, patch_order, pixel_order))
    cnn = nn.Sequential(
        nn.Conv2d(3, 16, PATCH, stride=PATCH), nn.GELU(), nn.Conv2d(16, 16, 3, padding=1), nn.GELU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    ).double()
    twin = nn.Sequential(*cnn)  # shares the later layers' weights; gets its own stem below
    twin[0] = nn.Conv2d(3, 16, PATCH, stride=PATCH).double()
    with torch.no_grad():
        twin[0].weight.copy_(cnn[0].weight.flatten(-2)[..., pixel_order].view(cnn[0].weight.shape))
        twin[0].bias.copy_(cnn[0].bias)
        x = torch.randn(4, 3, IMG, IMG, dtype=torch.float64)
        tokens, twin_tokens = cnn[0](x).flatten(2), twin[0](shuffle(x)).flatten(2)
        torch.testing.assert_close(twin_tokens, tokens[..., patch_order], rtol=1e-12, atol=1e-12)
        reference = cnn(x)
        assert (twin(shuffle(x)) - reference).abs().max() > 0.05 * reference.abs().max()


# ------------------------------------------------------------------------------------------------
# The experiment: data pipeline, drops, verdict, and the command end to end.

SHORT = ["data.global_batch=64", "sched.warmup_steps=1", "trainer.steps=2", "fewshot.every_n_steps=1",
         "fewshot.seeds=1", "shuffle.progress=false"]
SMALL_RESNET = ["resnet.channels=[8,16,16,16]", "resnet.stem_width=8"]  # the small ResNet of the demo


@pytest.fixture
def short_run(tiny_run) -> list[str]:
    """Two steps of the tiny Mixer, probed after each, with the ResNet the config picks."""
    return [*tiny_run, *SHORT]


@pytest.fixture
def tiny_experiment(short_run) -> list[str]:
    """Two steps of the tiny Mixer and of the demo's small ResNet."""
    return [*short_run, *SMALL_RESNET]


class PixelFeatures(nn.Module):
    """timm's feature contract on raw pixels: the probe's features are the images it was given."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # where the probe finds the device
        self.seen = []

    def forward_features(self, x):
        self.seen.append(x)
        return x.flatten(1)[:, None, :]

    def forward_head(self, x, pre_logits=False):
        return x.mean(1)


def test_every_split_is_shuffled_after_its_own_preprocessing(tiny_experiment):
    cfg = compose(tiny_experiment, config_name="shuffle")
    shuffle = ShufflePixels(draw_permutations(28, 4, seed=0)["patch_pixel"])
    (plain_train, plain_eval, _), (train, eval_set, _) = build_datasets(cfg), build_datasets(cfg)
    with_shuffle(train, shuffle)
    with_shuffle(eval_set, shuffle)
    x, y = eval_set[7]
    assert torch.equal(x, shuffle(plain_eval[7][0])) and y == plain_eval[7][1]
    assert train.transform.transforms[-1] is shuffle  # after the random shift, not before
    assert len(train) == len(plain_train)

    # The probe reads the training digits unaugmented and sees them through the same permutation.
    probe = fewshot_callback(cfg, transform=shuffle)
    digits, _ = demo_arrays("train")
    expected = (torch.from_numpy(digits[3]).float() / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(probe.evaluator.train_dataset[3][0][0], expected)
    model = PixelFeatures()
    probe.evaluator.run(model)
    test_images = torch.stack([plain_eval[i][0] for i in range(len(plain_eval))])  # uint8: the device normalises
    normalize = device_preprocessing(cfg)["normalize"]
    torch.testing.assert_close(torch.cat(model.seen)[-len(plain_eval):], normalize(shuffle(test_images)))


def test_relative_drops_and_the_verdict():
    results = [
        {"model": m, "pipeline": p, "fewshot": f, "top1": t}
        for m, p, f, t in [("mixer", "original", 0.80, 0.90), ("mixer", "patch_pixel", 0.79, 0.90),
                           ("mixer", "global_pixel", 0.40, 0.45), ("resnet", "original", 0.90, 0.95),
                           ("resnet", "patch_pixel", 0.45, 0.60), ("resnet", "global_pixel", 0.30, 0.40)]
    ]
    relative_drops(results)
    drops = {(r["model"], r["pipeline"]): round(r["fewshot_drop"], 4) for r in results}
    assert drops == {
        ("mixer", "original"): 0, ("mixer", "patch_pixel"): 0.0125, ("mixer", "global_pixel"): 0.5,
        ("resnet", "original"): 0, ("resnet", "patch_pixel"): 0.5, ("resnet", "global_pixel"): 0.6667,
    }
    assert round(results[2]["top1_drop"], 4) == 0.5 and round(results[4]["top1_drop"], 4) == 0.3684
    assert results[2]["paper"] == "~45%" and results[5]["paper"] == "~75%"
    assert verdict(results, tolerance=0.02, shots=5).startswith(
        "holds: under patch + pixel shuffling the Mixer's 5-shot drop is +1.2%")
    assert verdict(results, tolerance=0.01, shots=5).startswith("does NOT hold")
    assert verdict([r for r in results if r["model"] == "mixer"], tolerance=0.02, shots=5) is None
    results[3]["fewshot"] = 0.0  # an original pipeline that learnt nothing (a two-step run) has no drop
    relative_drops(results)
    assert results[4]["fewshot_drop"] is None and verdict(results, tolerance=0.02, shots=5) is None


@pytest.mark.parametrize("args,message", [
    (["shuffle.models=[mixer,vit]"], "error: shuffle.models must list some of mixer, resnet, got ['mixer', 'vit']"),
    (["shuffle.pipelines=[patch_pixel]"],
     "error: shuffle.pipelines must include original: the drops are measured against it"),
    (["resnet=bit_r50x1", "resnet.model_name=resnet5000"], "error: Unknown model (resnet5000)"),  # timm's words
    (["fewshot.every_n_steps=0"], "error: fewshot.every_n_steps must be at least 1 (the curves), got 0"),
    (["data.global_batch=4096"], "error: data.global_batch=4096 is more than the 4000 training samples; lower "),
    (["fewshot.shots=500"], "error: class 0 has only 400 training example(s), fewer than the 500 shots asked for;"),
])
def test_user_errors_are_one_line_and_write_nothing(tmp_path, args, message, short_run, tiny_experiment):
    tiny = short_run if "resnet=bit_r50x1" in args else tiny_experiment
    r = CliRunner().invoke(app, ["shuffle-experiment", *tiny, *args, f"run_root={tmp_path}"])
    assert r.exit_code == 2, r.output
    assert r.output.startswith(message) and len(r.output.strip().splitlines()) == 1, r.output
    assert not any(tmp_path.iterdir())


def test_too_few_streamed_shards_fail_before_anything_is_written(tmp_path, shards, shard_data, tiny_experiment):
    # compressed shards cannot be read sample by sample: each loader worker streams shards of its own
    streamed = tmp_path / "streamed"
    shutil.copytree(shards.root / "train", streamed)
    for tar in streamed.glob("*.tar"):
        tar.write_bytes(gzip.compress(tar.read_bytes()))
    runs = tmp_path / "runs"
    r = CliRunner().invoke(app, ["shuffle-experiment", *tiny_experiment, "data=imagenet", *shard_data,
                                 f"data.train_path={streamed}", "data.num_workers=2", "model.patch_size=8",
                                 f"run_root={runs}"])
    assert r.exit_code == 2, r.output
    assert r.output == ("error: 1 training shard(s) cannot feed 1 rank(s) x 2 loader worker(s) = 2; write smaller "
                        "shards (mixer data write --shard-size) or lower data.num_workers\n")
    assert not runs.exists()


def test_command_writes_curves_table_and_permutations(tmp_path, shard_data, tiny_experiment):
    tiny_data = ["data=imagenet", *shard_data, "data.num_workers=0", "model.patch_size=8", "fewshot.shots=2",
                 "data.global_batch=8"]  # of 16 training images
    r = CliRunner().invoke(app, ["shuffle-experiment", *tiny_experiment, *tiny_data,
                                 "shuffle.pipelines=[original,patch_pixel]", f"run_root={tmp_path}"],
                           env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    (run,) = (tmp_path / "shuffle-experiment").iterdir()
    assert {"config.yaml", "permutations.safetensors", "fewshot_curves.csv", "fewshot_curves.png", "results.csv",
            "results.json", "mixer-original", "mixer-patch_pixel", "resnet-original", "resnet-patch_pixel"} == {
        p.name for p in run.iterdir()}
    saved, drawn = load_file(run / "permutations.safetensors"), draw_permutations(32, 8, seed=0)
    assert saved.keys() == drawn.keys() and all(torch.equal(saved[k], drawn[k]) for k in drawn)
    rows = list(csv.DictReader(open(run / "fewshot_curves.csv")))
    steps = sorted({int(r["step"]) for r in rows if r["model"] == "mixer" and r["pipeline"] == "original"})
    assert steps == [0, 1, 2]  # at the start and after every step
    table = json.loads((run / "results.json").read_text())
    assert [(t["model"], t["pipeline"], t["steps"]) for t in table] == [
        ("mixer", "original", 2), ("mixer", "patch_pixel", 2), ("resnet", "original", 2), ("resnet", "patch_pixel", 2)]
    assert all(t["fewshot_drop"] == 0 for t in table if t["pipeline"] == "original")
    assert json.loads((run / "resnet-patch_pixel" / "results.json").read_text())["top1"] == table[3]["top1"]
    assert "Sec. 3.4 finding" in r.output and "patch + pixel shuffling" in r.output
    assert OmegaConf.load(run / "config.yaml").shuffle.pipelines == ["original", "patch_pixel"]
