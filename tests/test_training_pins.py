"""Pins of the training behaviour that a silent change would otherwise alter: gradient clipping,
the optimiser's groups, gradient accumulation, the per-step schedule, the final evaluation's
numbers, the losses and mixup. Each runs a tiny Mixer through `fit` on the demo data (or drives
a piece directly) and compares with an independent computation."""
import csv
import json
import math

import pytest
import torch
from lightning.pytorch import Callback
from omegaconf import OmegaConf
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset

from mixer_cli.commands.pretrain import build_model
from mixer_cli.config.compose import compose
from mixer_cli.data import build_dataset
from mixer_cli.models import load_mixer
from mixer_cli.train.fit import build, build_datasets
from mixer_cli.train.losses import SigmoidCrossEntropy, SoftmaxCrossEntropy
from mixer_cli.train.mixup import BatchMixup
from mixer_cli.train.module import Classifier, Evaluator, top_k_hits
from mixer_cli.train.optim import lr_factor


@pytest.fixture(scope="module")
def pin_run(tiny_run) -> list[str]:
    """The tiny run on the demo digits, its loss logged at every step."""
    return [*tiny_run, "trainer.log_every_steps=1"]


class KeepOptimizer(Callback):
    """Holds the optimiser Lightning trains with, the names of the parameters in each group, and the
    weights training ended with."""

    def on_train_start(self, trainer, module):
        self.optimizer = trainer.optimizers[0]
        names = {id(p): name for name, p in module.model.named_parameters()}
        self.groups = [{names[id(p)] for p in g["params"]} for g in self.optimizer.param_groups]
        self.ndim = {name: p.ndim for name, p in module.model.named_parameters()}

    def on_train_end(self, trainer, module):
        self.trained = {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def train(pin_run, root, *overrides, callbacks=()):
    """(config, results.json, run directory, initial weights) of a tiny demo run under `root`."""
    cfg = compose([*pin_run, f"run_root={root}", *overrides])
    initial = {k: v.clone() for k, v in build_model(cfg).state_dict().items()}
    job = build(cfg, build_model(cfg), build_datasets(cfg))
    job.callbacks += callbacks
    results = job.run("pretrain", progress=False)
    run_dir = next((root / "pretrain").iterdir())
    assert json.loads((run_dir / "results.json").read_text()) == results
    return cfg, results, run_dir, initial


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "last.ckpt", weights_only=True)["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items()}


def update(run_dir, initial) -> torch.Tensor:
    """All parameters' change over the run, as one vector."""
    after = final_weights(run_dir)
    return torch.cat([(after[k] - v).flatten() for k, v in initial.items()])


# --- one AdamW run of 6 steps (shorter than the demo's 31-step epoch), shared by several pins ---------

ADAMW_STEPS, ADAMW_WARMUP = 6, 2


@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory, pin_run):
    keep = KeepOptimizer()
    cfg, results, run_dir, _ = train(
        pin_run, tmp_path_factory.mktemp("adamw"), f"trainer.steps={ADAMW_STEPS}", f"sched.warmup_steps={ADAMW_WARMUP}",
        callbacks=[keep],
    )
    return cfg, results, run_dir, keep


def test_adamw_decays_kernels_only_with_the_configs_betas_lr_and_weight_decay(adamw_run):
    cfg, _, _, keep = adamw_run
    assert type(keep.optimizer) is torch.optim.AdamW  # not Adam: weight decay decoupled from the gradient
    kernels = {name for name, ndim in keep.ndim.items() if ndim >= 2}
    by_decay = {g["weight_decay"]: names for g, names in zip(keep.optimizer.param_groups, keep.groups)}
    assert by_decay == {cfg.optim.weight_decay: kernels, 0.0: set(keep.ndim) - kernels} and cfg.optim.weight_decay > 0
    assert {"stem.proj.weight", "head.weight"} <= kernels and not {"head.bias", "norm.weight"} & kernels
    decay, no_decay = sorted(keep.optimizer.param_groups, key=lambda g: -g["weight_decay"])
    assert list(cfg.optim.betas) == [0.9, 0.999]  # Appendix B
    for group in (decay, no_decay):
        assert group["betas"] == (0.9, 0.999) and group["initial_lr"] == cfg.optim.lr


def test_logged_lr_follows_the_schedule_at_every_step(adamw_run):
    cfg, _, run_dir, _ = adamw_run
    with open(run_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lr-AdamW/pg1")]
    assert (cfg.optim.lr, cfg.sched.decay) == (2e-3, "linear")
    assert [int(r["step"]) for r in rows] == list(range(ADAMW_STEPS))
    for group in ("lr-AdamW/pg1", "lr-AdamW/pg2"):  # 2 warmup steps from lr / 2, then linear to 0 at step 6
        assert [float(r[group]) for r in rows] == pytest.approx([1e-3, 2e-3, 2e-3, 1.5e-3, 1e-3, 5e-4], rel=1e-9)


def test_a_run_shorter_than_an_epoch_still_ends_evaluated(adamw_run):
    _, results, run_dir, _ = adamw_run
    assert results["steps"] == ADAMW_STEPS and isinstance(results["top1"], float)
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert not [r for r in rows if r.get("val/top1")]  # no evaluation during training: the epoch never ended
    (tested,) = [r for r in rows if r.get("test/top1")]
    assert float(tested["test/top1"]) == pytest.approx(results["top1"]) and int(tested["step"]) == ADAMW_STEPS
    last_loss = [float(r["train/loss"]) for r in rows if r.get("train/loss")][-1]
    assert results["train_loss"] == pytest.approx(last_loss)  # the training's, not the evaluation's


class CountTestPasses(Callback):
    passes = 0

    def on_test_start(self, trainer, module):
        self.passes += 1


@pytest.fixture(scope="module")
def epoch_run(tmp_path_factory, pin_run):
    """One whole epoch (31 steps): the run ends on the validation of the final weights."""
    keep, count = KeepOptimizer(), CountTestPasses()
    cfg, results, run_dir, _ = train(pin_run, tmp_path_factory.mktemp("epoch"), "trainer.epochs=1",
                                     callbacks=[keep, count])
    return cfg, results, run_dir, keep, count.passes


@pytest.mark.parametrize("run", ["adamw_run", "epoch_run"])
def test_reported_top1_and_top5_are_those_of_the_final_checkpoint_on_the_test_split(request, run):
    """Mid-epoch (adamw_run: 6 steps) a test pass scores the final weights; a whole epoch ends on the
    validation that already did, and no test pass runs (epoch_run): the same numbers either way."""
    cfg, results, run_dir, keep, *test_passes = request.getfixturevalue(run)
    assert test_passes == ([0] if run == "epoch_run" else [])
    for name, weights in final_weights(run_dir).items():  # last.ckpt: the weights training ended with
        torch.testing.assert_close(weights, keep.trained[name], rtol=0, atol=0, msg=name)
    with open(run_dir / "metrics.csv") as f:
        final = [r for r in csv.DictReader(f) if r.get("test/top1")]
    assert len(final) == 1 and float(final[0]["test/top1"]) == pytest.approx(results["top1"])
    model = load_mixer(run_dir / "last.ckpt").eval()
    test_set = build_dataset(OmegaConf.merge(cfg.data, {"decode": "pil"}), cfg.aug, "test")  # floats
    with torch.no_grad():
        logits, labels = zip(*((model(x), y) for x, y in DataLoader(test_set, batch_size=500)))
    logits, labels = torch.cat(logits), torch.cat(labels)
    top5 = logits.topk(5, dim=1).indices
    assert results["num_samples"] == len(test_set) == 1000
    assert results["top1"] == pytest.approx((top5[:, 0] == labels).float().mean().item(), abs=1e-6)
    assert results["top5"] == pytest.approx((top5 == labels[:, None]).any(dim=1).float().mean().item(), abs=1e-6)
    assert 0 < results["top1"] < results["top5"] < 1


def test_val_metrics_average_over_samples_not_batches_or_classes(monkeypatch):
    # class 0: three right; class 1: ranked last; class 2: ranked third (a top-5 hit only). Over samples
    # top-1 is 3/5 and top-5 4/5; a mean over batches (1/2, 3/4) or over classes (1/3, 2/3) differs.
    module = Evaluator(torch.nn.Identity(), num_classes=6, loss=SoftmaxCrossEntropy())
    logged = {}

    def log(name, metric, **kwargs):  # what Lightning does with a torchmetrics object at an epoch's end
        logged[name] = float(metric.compute())
        metric.reset()

    monkeypatch.setattr(module, "log", log)
    right = torch.tensor([[5.0, 4, 3, 2, 1, 0]] * 3)
    wrong = torch.tensor([[5.0, 0, 4, 3, 2, 1], [5.0, 4, 3, 2, 1, 0]])
    labels = torch.tensor([0, 0, 0]), torch.tensor([1, 2])
    loss = F.cross_entropy(torch.cat([right, wrong]), torch.cat(labels)).item()
    for _epoch in range(2):  # the second epoch counts its own samples only
        module.validation_step((right, labels[0]), 0)
        module.validation_step((wrong, labels[1]), 1)
        module.on_validation_epoch_end()
        assert logged == pytest.approx({"val/top1": 0.6, "val/top5": 0.8, "val/num_samples": 5, "val/loss": loss})


def test_a_multi_label_hit_is_any_true_class_among_the_top_k():
    logits = torch.tensor([[3.0, 2, 1], [3.0, 2, 1], [1.0, 2, 3]])
    rows = torch.tensor([[0.0, 1, 1], [1.0, 0, 1], [0.0, 1, 1]])  # the last: its second true class ranks first
    assert top_k_hits(logits, rows, 1).tolist() == [0.0, 1.0, 1.0]
    assert top_k_hits(logits, rows, 2).tolist() == [1.0, 1.0, 1.0]


# --- gradient clipping and accumulation: plain SGD, so an update is lr x gradient --------------------

SGD = ["optim=sgd", "optim.momentum=0", "optim.weight_decay=0"]


def one_step(pin_run, root, clip: float):
    cfg, _, run_dir, initial = train(pin_run, root, *SGD, "optim.lr=10", f"trainer.grad_clip={clip}", "trainer.steps=1")
    lr = cfg.optim.lr * lr_factor(0, 1, cfg.sched.warmup_steps, cfg.sched.decay)
    return update(run_dir, initial), lr


def test_gradients_are_clipped_to_the_global_norm(tmp_path, pin_run):
    clipped, lr = one_step(pin_run, tmp_path / "small", clip=1e-3)
    free, _ = one_step(pin_run, tmp_path / "huge", clip=1e6)
    # lr 10 makes the update large against float32 rounding of the weights
    assert clipped.norm().item() == pytest.approx(lr * 1e-3, rel=1e-5)
    assert free.norm().item() > 10 * lr * 1e-3
    # one factor for all parameters (not per tensor or per value): the same direction as unclipped
    torch.testing.assert_close(clipped / clipped.norm(), free / free.norm(), atol=1e-5, rtol=0)


def test_device_batch_accumulation_gives_the_weights_of_the_full_batch(tmp_path, pin_run):
    common = ["optim=sgd", "optim.lr=0.5", "data.global_batch=64", "trainer.steps=3", "sched.warmup_steps=2"]
    _, full, full_dir, initial = train(pin_run, tmp_path / "full", *common)
    _, split, split_dir, _ = train(pin_run, tmp_path / "split", *common, "trainer.device_batch=16")
    assert split["batch"] == "global batch 64 = 1 device(s) x 16 x 4 accumulation step(s)"
    a, b = final_weights(full_dir), final_weights(split_dir)
    assert (a["head.weight"] - initial["head.weight"]).abs().max() > 1e-2  # the runs did train
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-5, msg=name)


def test_an_epoch_has_the_same_optimiser_steps_whatever_the_device_batch(tmp_path, pin_run):
    # 1,000 images at global batch 300: 3 steps an epoch. In micro-batches of 100 that is 9 of the 10
    # the loader holds; a 4th step from the 10th alone would overrun the schedule on a third of a batch.
    cfg = compose([*pin_run, f"run_root={tmp_path}", "data.global_batch=300", "trainer.device_batch=100",
                   "trainer.epochs=1"])
    splits = build_datasets(cfg)
    results = build(cfg, build_model(cfg), splits._replace(train=Subset(splits.train, range(1000)))).run(
        "pretrain", progress=False)
    assert results["batch"].endswith("x 100 x 3 accumulation step(s)")
    assert results["steps"] == results["planned_steps"] == 3


# --- losses ------------------------------------------------------------------------------------------


def test_softmax_loss_is_cross_entropy_against_labels_probabilities_and_normalised_multi_hot_rows():
    logits, labels = torch.randn(4, 5), torch.tensor([0, 3, 4, 1])
    probs = torch.softmax(torch.randn(4, 5), dim=1)
    loss = SoftmaxCrossEntropy()
    torch.testing.assert_close(loss(logits, labels), F.cross_entropy(logits, labels))
    torch.testing.assert_close(loss(logits, probs), F.cross_entropy(logits, probs))
    multi_hot = torch.tensor([[1.0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 0, 0, 1]])
    torch.testing.assert_close(loss(logits, multi_hot), F.cross_entropy(logits, multi_hot / multi_hot.sum(1, True)))


def test_sigmoid_loss_sums_binary_cross_entropy_over_classes_and_averages_over_the_batch():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    p = torch.sigmoid(logits.double())
    by_hand = -(targets * p.log() + (1 - targets) * (1 - p).log()).sum(dim=1).mean()
    loss = SigmoidCrossEntropy()
    assert loss(logits, targets).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert loss(logits, torch.tensor([0, 1])).item() == pytest.approx(  # labels are one-hot rows
        -(p[0, 0].log() + (1 - p[0, 1:]).log().sum() + p[1, 1].log() + (1 - p[1, ::2]).log().sum()).item() / 2,
        rel=1e-6)


@pytest.mark.parametrize("loss,bias", [("sigmoid", -math.log(10)), ("softmax", 0.0)])
def test_the_loss_chooses_the_initial_head_bias(loss, bias, pin_run):
    model = build_model(compose([*pin_run, f"loss={loss}"]))
    torch.testing.assert_close(model.head.bias, torch.full((10,), bias))
    assert not model.head.weight.any()


# --- mixup -------------------------------------------------------------------------------------------


def test_mixup_mixes_multi_hot_targets_with_the_images_weight():
    x = torch.arange(3.0)[:, None, None, None].expand(3, 1, 2, 2) + 1  # sample i is all i + 1
    targets = torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 0], [0, 1, 0, 1]])
    mixed, rows = BatchMixup(0.5)(x, targets, step=0)
    lam = (mixed[0, 0, 0, 0] - 3) / (1 - 3)  # sample 0 mixed with the one before it in the roll, sample 2
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[[2, 0, 1]])
    torch.testing.assert_close(rows, lam * targets + (1 - lam) * targets[[2, 0, 1]])


def test_mixup_draws_one_weight_per_step_from_the_seed_alone():
    """Every rank and accumulation slot of a step mixes with the same weight (its law: tests/test_data.py)."""
    weights = [BatchMixup(0.2, seed=5).sample_weight(step) for step in range(100)]
    assert weights[:3] == [BatchMixup(0.2, seed=5).sample_weight(step) for step in range(3)]
    assert weights[:3] != [BatchMixup(0.2, seed=6).sample_weight(step) for step in range(3)]
    assert len(set(weights)) == 100


def test_training_step_mixes_images_and_one_hot_labels_with_one_weight(monkeypatch, pin_run):
    model = build_model(compose(pin_run))
    with torch.no_grad():
        model.head.weight.normal_()  # a zero head would give the same loss for any targets
    module = Classifier(model, SoftmaxCrossEntropy(), optimizer=None, scheduler=None, num_classes=10,
                        mixup=BatchMixup(0.5))
    monkeypatch.setattr(BatchMixup, "sample_weight", lambda self, step: 0.3)
    monkeypatch.setattr(module, "log", lambda *a, **k: None)  # no Trainer to log to
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([1, 7, 7, 2])
    onehot = F.one_hot(y, 10).float()
    expected = F.cross_entropy(model(0.3 * x + 0.7 * x.roll(1, 0)), 0.3 * onehot + 0.7 * onehot.roll(1, 0))
    torch.testing.assert_close(module.training_step((x, y), 0), expected)
