"""Linear few-shot evaluation (Sec. 3, Figures 2 and 4): how well frozen pre-logit features transfer.

The protocol is big_vision's `fewshot_lsr` evaluator, which the paper used. For a seed s, every
class's train examples are put in one random order; the k-shot sample is the first k of every
class, so the samples of one seed are nested across k. On a sample of N examples:

    X = (F - mean) / (std + 1e-5)        F: (N, D) pre-logits; mean and std over the sample
    Y = 2 onehot(y) - 1                  (N, C) targets in {-1, 1}
    W, b = argmin |X W + 1 b^T - Y|^2 + l2 |W|^2,   l2 = 2^10

and the score is the top-1 accuracy of argmax_c (X_test W + b)_c on the test split. Centred X makes
the bias free of the penalty: b is the mean target, 2 n_c / N - 1, and W solves the ridge problem on
centred Y by whichever normal equations are smaller,

    primal, N >= D:   (X^T X + l2 I) W = X^T Y          a D x D system
    dual,   N <  D:   W = X^T (X X^T + l2 I)^-1 Y       an N x N system

(with X centred, X^T Y = 2 X^T onehot(y): twice the per-class sums of X, no N x C product).
big_vision appends a constant feature of 100 instead, which penalises the bias by l2 / 100^2; centring
leaves it exactly unpenalised, as scikit-learn's Ridge(fit_intercept=True) does. To choose l2 from
L2_GRID on held-out train examples, one eigendecomposition G = Q diag(e) Q^T of the system's matrix
gives every (G + l2 I)^-1 = Q diag(1 / (e + l2)) Q^T, as big_vision does.

The features are timm's pre-logits, `model.forward_head(model.forward_features(x), pre_logits=True)`:
for our Mixer the mean over tokens after the pre-head LayerNorm, and the same call reads timm models
(the ResNet of the shuffle experiment). `FewShotEvaluator.run(model)` extracts them once per call
(only the train examples some sample needs, and the test split) and returns the accuracy per shot
count. `mixer fewshot` (commands/fewshot.py) and `FewShotCallback` (Figure 4's curves during
pre-training) are thin wrappers around it; `fewshot_callback(cfg)` builds the callback from a config.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset

from mixer_cli.config.compose import compose
from mixer_cli.config.schema import DEFAULT_L2
from mixer_cli.core.errors import UserError
from mixer_cli.data import build_dataset, class_names
from mixer_cli.data.workers import worker_options

L2_GRID = tuple(2.0**i for i in range(-10, 20))  # big_vision's grid for choosing l2
STD_EPS = 1e-5

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]

# ---------------------------------------------------------------------------------------------
# The k-shot samples


def class_ranks(labels: np.ndarray, seed: int) -> np.ndarray:
    """Each example's position in one random order of its class, drawn from `seed`: the k-shot
    sample of that seed is `class_ranks(labels, seed) < k`."""
    labels = np.asarray(labels)
    keys = np.random.default_rng(seed).random(len(labels))
    order = np.lexsort((keys, labels))  # by class, then randomly within a class
    sorted_labels = labels[order]
    class_start = np.searchsorted(sorted_labels, sorted_labels, side="left")
    ranks = np.empty(len(labels), dtype=np.int64)
    ranks[order] = np.arange(len(labels)) - class_start
    return ranks


def check_counts(labels: np.ndarray, shots: int, num_classes: int | None = None, held_out: int = 0,
                 names: Sequence[str] | None = None) -> None:
    """Every class must have `shots` (+ `held_out`) examples; a clear error names the class that has fewer."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes or 0)
    if len(counts) and counts.min() < shots + held_out:
        c, most = int(counts.argmin()), max(int(counts.min()) - held_out, 1)
        asked = f"{shots} shots" + (f" plus {held_out} held out for choosing l2" if held_out else "")
        named = f" ({names[c]})" if names and names[c] != str(c) else ""
        raise UserError(f"class {c}{named} has only {counts[c]} training example(s), fewer than the {asked} asked "
                        f"for; ask for at most {most} (e.g. --shots {most})")


def per_class_accuracy(predicted: torch.Tensor, y: torch.Tensor, num_classes: int) -> np.ndarray:
    """The share of each class's test examples predicted right (NaN for a class with none)."""
    y = y.long().cpu()
    hits = torch.bincount(y, weights=(predicted.cpu() == y).double(), minlength=num_classes)
    counts = torch.bincount(y, minlength=num_classes).double()
    return (hits / counts).numpy()  # 0/0 is NaN: no example, no accuracy


# ---------------------------------------------------------------------------------------------
# The closed-form ridge solver


@dataclass(frozen=True)
class RidgeProbe:
    """A linear classifier on standardised features: scores = ((x - mean) / std) @ weight + bias."""

    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)
    weight: torch.Tensor  # (D, C)
    bias: torch.Tensor  # (C,)
    l2: float

    def scores(self, x) -> torch.Tensor:
        x = torch.as_tensor(x, device=self.mean.device)
        return ((x - self.mean) / self.std).to(self.weight.dtype) @ self.weight + self.bias

    def predict(self, x) -> torch.Tensor:
        return self.scores(x).argmax(dim=1)

    def accuracy(self, x, y) -> float:
        return hit_rate(self.predict(x), y)


def hit_rate(predicted: torch.Tensor, y) -> float:
    """The share of examples whose predicted class is their label."""
    return (predicted == torch.as_tensor(y, device=predicted.device)).float().mean().item()


class RidgeProblem:
    """A few-shot sample, standardised and reduced to the normal equations of the module docstring
    (primal when N >= D, else dual), so that it can be solved for any l2."""

    def __init__(self, x, y, num_classes: int):
        x = torch.as_tensor(x)
        x = x.float() if not x.is_floating_point() else x
        y = torch.as_tensor(y, device=x.device).long()
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise UserError(f"labels must lie in 0..{num_classes - 1}; got {int(y.min())}..{int(y.max())}")
        n, d = x.shape
        self.mean = x.mean(dim=0)
        xc = x - self.mean
        self.bias = 2 * torch.bincount(y, minlength=num_classes).to(x.dtype) / n - 1  # the mean target
        self.primal = n >= d
        # The products in the features' precision (the cost: N D^2 or N^2 D); the small
        # D x D or N x N factorisation in float64, so a tiny l2 from the grid stays accurate.
        if self.primal:
            # Standardising scales the Gram matrix and the class sums of Xc by 1 / std: D x D and
            # C x D work instead of another pass over the N x D features; the variance is diag(G) / N.
            gram = (xc.T @ xc).double()
            std = (gram.diagonal() / n).sqrt() + STD_EPS
            self.std = std.to(x.dtype)
            self.gram = gram / std[:, None] / std[None, :]
            class_sums = torch.zeros(num_classes, d, dtype=x.dtype, device=x.device).index_add_(0, y, xc)
            self.rhs = 2 * class_sums.T.double() / std[:, None]
        else:
            self.std = xc.std(dim=0, correction=0) + STD_EPS
            self.xs = xc / self.std
            self.gram = (self.xs @ self.xs.T).double()
            self.rhs = (2 * F.one_hot(y, num_classes).to(x.dtype) - 1 - self.bias).double()

    def solve(self, l2: float = DEFAULT_L2) -> RidgeProbe:
        """The probe for one l2, by a Cholesky factorisation."""
        check_l2(l2)
        eye = torch.eye(len(self.gram), dtype=self.gram.dtype, device=self.gram.device)
        chol = torch.linalg.cholesky(self.gram + l2 * eye)
        return self._probe(torch.cholesky_solve(self.rhs, chol), l2)

    def solve_many(self, l2s: Sequence[float]) -> list[RidgeProbe]:
        """The probes for many l2 from one eigendecomposition: a matrix product per l2."""
        for l2 in l2s:
            check_l2(l2)
        eigenvalues, q = torch.linalg.eigh(self.gram)
        rotated = q.T @ self.rhs
        return [self._probe(q @ (rotated / (eigenvalues + l2)[:, None]), l2) for l2 in l2s]

    def select(self, val_x, val_y, l2s: Sequence[float] = L2_GRID) -> RidgeProbe:
        """The probe whose l2 (from `l2s`) scores best on held-out examples; ties go to the larger l2."""
        probes = self.solve_many(sorted(l2s))
        accuracies = [p.accuracy(val_x, val_y) for p in probes]
        best = max(range(len(probes)), key=lambda i: (accuracies[i], i))
        return probes[best]

    def _probe(self, solution: torch.Tensor, l2: float) -> RidgeProbe:
        weight = solution if self.primal else self.xs.T.double() @ solution
        return RidgeProbe(self.mean, self.std, weight.to(self.mean.dtype), self.bias, float(l2))


def check_l2(l2: float) -> None:
    if not l2 > 0:
        raise UserError(f"l2 must be positive, got {l2}")


@dataclass(frozen=True)
class TrainPool:
    """Features of the train examples that some (shots, seed) sample needs, and each example's rank
    in every seed's random order of its class: the k-shot sample of a seed is `ranks[seed] < k`."""

    x: torch.Tensor
    y: torch.Tensor
    ranks: dict[int, torch.Tensor]


def fewshot_accuracies(
    pool: TrainPool, test_x, test_y, num_classes: int, shots: Sequence[int],
    l2: float | None = DEFAULT_L2, held_out: int = 0,
) -> list[dict]:
    """Test accuracy of the probe for every (shots, seed). With l2=None each probe picks its l2 from
    L2_GRID on `held_out` examples per class that none of that seed's samples contain."""
    rows = []
    top = max(shots)
    for seed, ranks in pool.ranks.items():
        val = (ranks >= top) & (ranks < top + held_out)
        for k in sorted(shots):
            take = ranks < k
            problem = RidgeProblem(pool.x[take], pool.y[take], num_classes)
            probe = problem.solve(l2) if l2 is not None else problem.select(pool.x[val], pool.y[val])
            predicted = probe.predict(test_x)  # once: the test features times the weights, for both scores
            rows.append({"shots": k, "seed": seed, "l2": probe.l2, "accuracy": hit_rate(predicted, test_y),
                         "per_class": per_class_accuracy(predicted, test_y, num_classes)})
    return rows


# ---------------------------------------------------------------------------------------------
# Frozen features


@contextmanager
def frozen(model: nn.Module):
    """Eval mode without gradients inside (yields the model's device); the mode is restored after,
    so a callback can probe a model in the middle of training."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def extract_features(model: nn.Module, batches: Batches) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-logits and labels of every batch, on the model's device."""
    features, labels = [], []
    with frozen(model) as device:
        for x, y in batches:
            tokens = model.forward_features(x.to(device, non_blocking=True))
            features.append(model.forward_head(tokens, pre_logits=True).float())
            labels.append(torch.as_tensor(y).to(device))
    if not features:
        raise UserError("the few-shot data set is empty; check the data config (data=... or fewshot.data=...)")
    return torch.cat(features), torch.cat(labels).long()


def class_prefix(batches: Batches, per_class: int, num_classes: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first `per_class` examples of every class in a stream of batches, in stream order; stops
    reading as soon as every class has them."""
    counts = torch.zeros(num_classes, dtype=torch.long)
    for x, y in batches:
        y = torch.as_tensor(y).long()
        # each example's position among the examples of its class seen so far
        seen = counts[y] + (F.one_hot(y, num_classes).cumsum(0) - 1).gather(1, y[:, None]).squeeze(1)
        take = seen < per_class
        counts += torch.bincount(y[take], minlength=num_classes)
        if take.any():
            yield x[take], y[take]
        if bool((counts >= per_class).all()):
            return


def labels_of(dataset) -> np.ndarray | None:
    """The labels of a map-style dataset without decoding an image (our demo tensors, torchvision's
    ImageFolder), or None when only streaming through it tells them (webdataset shards)."""
    for attr in ("labels", "targets"):
        if hasattr(dataset, attr):
            return np.asarray(getattr(dataset, attr))
    return None


def make_loader(dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    workers = worker_options(num_workers)
    if hasattr(dataset, "batch_size"):  # our shard datasets batch themselves
        dataset.batch_size = batch_size
        return DataLoader(dataset, batch_size=None, **workers)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **workers)


# ---------------------------------------------------------------------------------------------
# The evaluator


class FewShotEvaluator:
    """The linear few-shot accuracy of a model on one data set, for several shot counts and seeds.

    `train_dataset` and `test_dataset` yield (image, label) with evaluation preprocessing: map-style
    (sampled by their labels from the whole split) or a stream such as our shards (sampled from the
    first examples of every class in stream order, as big_vision reads a split's prefix). `l2=None`
    chooses l2 per probe on `held_out` more train examples per class. `transform`, when given, is
    applied to every batch of images (B, C, H, W) before the model: the shuffle experiment's pixel
    permutation. A class with too few train examples is an error here when the labels are known,
    before any feature is computed; a stream shows it when read."""

    def __init__(
        self, train_dataset, test_dataset, num_classes: int, shots: Sequence[int] = (5,), *,
        l2: float | None = DEFAULT_L2, seeds: Sequence[int] = (0,), held_out: int = 0,
        batch_size: int = 256, num_workers: int = 0,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None, class_names: Sequence[str] | None = None,
    ):
        self.shots = sorted(set(shots))
        if not self.shots or self.shots[0] < 1:
            raise UserError(f"shots must be at least 1, got {list(shots)}")
        self.seeds = list(seeds)
        if not self.seeds:
            raise UserError("the few-shot evaluation needs at least one seed")
        if l2 is None and held_out < 1:
            raise UserError("choosing l2 needs held-out examples: held_out >= 1 per class (fewshot.held_out)")
        if l2 is not None:
            check_l2(l2)
        self.train_dataset, self.test_dataset, self.num_classes = train_dataset, test_dataset, num_classes
        self.l2, self.held_out, self.transform = l2, held_out, transform
        self.batch_size, self.num_workers = batch_size, num_workers
        self.class_names = class_names  # the probe data's, for messages
        labels = labels_of(train_dataset)
        if labels is not None:
            check_counts(labels, max(self.shots), num_classes, held_out, class_names)

    def run(self, model: nn.Module, forward_context: Callable[[], AbstractContextManager] = nullcontext) -> dict:
        """{"accuracy": {shots: mean test top-1 over the seeds}, "per_class": {shots: (num_classes,) mean
        accuracy of each class over the seeds}, "runs": [{"shots", "seed", "l2",
        "accuracy"} per probe], "feature_dim": D, "num_samples": test examples}.

        The forward passes run inside `forward_context()` (e.g. Lightning's precision context), the
        solver never does: its products stay float32 and its factorisation float64."""
        with forward_context():
            pool = self._train_pool(model)
            test_x, test_y = extract_features(model, self._batches(self.test_dataset))
        rows = fewshot_accuracies(pool, test_x, test_y, self.num_classes, self.shots, self.l2, self.held_out)
        accuracy = {k: float(np.mean([r["accuracy"] for r in rows if r["shots"] == k])) for k in self.shots}
        per_class = {k: np.mean([r.pop("per_class") for r in rows if r["shots"] == k], axis=0) for k in self.shots}
        return {"accuracy": accuracy, "per_class": per_class, "runs": rows, "feature_dim": int(test_x.shape[1]),
                "num_samples": len(test_y)}

    def _train_pool(self, model: nn.Module) -> TrainPool:
        """One feature pass over just the train examples that some seed's first max(shots) (+ held_out)
        of every class takes."""
        top = max(self.shots)
        needed = top + self.held_out
        labels = labels_of(self.train_dataset)
        if labels is None:
            prefix = class_prefix(self._batches(self.train_dataset), needed * len(self.seeds), self.num_classes)
            x, y = extract_features(model, prefix)
            labels = y.cpu().numpy()
            check_counts(labels, top, self.num_classes, self.held_out, self.class_names)
            ranks = {s: class_ranks(labels, s) for s in self.seeds}
        else:
            full = {s: class_ranks(labels, s) for s in self.seeds}
            keep = np.flatnonzero(np.any([r < needed for r in full.values()], axis=0))
            x, y = extract_features(model, self._batches(Subset(self.train_dataset, keep.tolist())))
            ranks = {s: r[keep] for s, r in full.items()}
        return TrainPool(x, y, {s: torch.from_numpy(r).to(x.device) for s, r in ranks.items()})

    def _batches(self, dataset) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in make_loader(dataset, self.batch_size, self.num_workers):
            yield (self.transform(x) if self.transform is not None else x), y


# ---------------------------------------------------------------------------------------------
# During training: Figure 4's curves


class FewShotCallback(L.Callback):
    """Logs the evaluator's accuracies as `fewshot/{k}shot` for the model under training: at the
    start, every `every_n_steps` optimiser steps and at the end (the curves of Figure 4).

    The evaluator's samples are the same at every evaluation, so a curve moves with the model alone.
    Every rank computes (a sharded model needs all ranks in its forward); rank zero logs."""

    def __init__(self, evaluator: FewShotEvaluator, every_n_steps: int):
        self.evaluator, self.every_n_steps = evaluator, every_n_steps
        self._last_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._evaluate(trainer, pl_module)

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step:  # the micro-batches of one step (gradient accumulation)
            return
        self._last_step = step
        model = getattr(pl_module, "model", pl_module)
        result = self.evaluator.run(model, trainer.precision_plugin.forward_context)
        metrics = {f"fewshot/{k}shot": v for k, v in result["accuracy"].items()}
        for name, value in metrics.items():
            trainer.callback_metrics[name] = torch.tensor(value)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)


# ---------------------------------------------------------------------------------------------
# From a config: `fewshot.*` with `data` and `aug`


def l2_of(value: float | str) -> float | None:
    """fewshot.l2 as the evaluator takes it: the number, or None for 'select' (chosen on held-out
    train examples)."""
    return None if value == "select" else float(value)


def probe_data(cfg: DictConfig) -> DictConfig:
    """The data config the probe reads: `cfg.data`, or the conf/data file that `fewshot.data` names
    (a data set apart from the training one: Figure 4 probes ImageNet while pre-training on JFT),
    drawn at cfg.data's resolution, channels, normalisation and interpolation, decoded to floats by
    the loader (the probe feeds the network directly, without the Classifier's device-side steps)."""
    name = cfg.fewshot.get("data")
    if not name:
        return OmegaConf.merge(cfg.data, {"decode": "pil"})
    try:  # Hydra composes the group file, so its interpolations (${data.root}, ${oc.env:...}) resolve
        data = compose([f"data={name}"], config_name="fewshot").data
    except UserError as e:
        raise UserError(f"fewshot.data: {e}") from None
    drawn_as_trained = {k: cfg.data[k] for k in ("img_size", "channels", "mean", "std", "interpolation")}
    drawn_as_trained["decode"] = "pil"
    return OmegaConf.merge(data, drawn_as_trained)


def fewshot_evaluator(
    cfg: DictConfig, shots: Sequence[int] | None = None, seeds: Sequence[int] | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> FewShotEvaluator:
    """The evaluator that `fewshot.*` describes on `probe_data(cfg)`, both splits with evaluation
    preprocessing (the few-shot samples are never augmented). shots: default fewshot.shots; seeds:
    default [fewshot.seed] (one sample, as the training curves use)."""
    f, data = cfg.fewshot, probe_data(cfg)
    l2 = l2_of(f.l2)
    if shots is None:
        shots = [f.shots] if isinstance(f.shots, int) else list(f.shots)
    return FewShotEvaluator(
        build_dataset(data, cfg.aug, "train", augment=False), build_dataset(data, cfg.aug, "test"),
        data.num_classes, shots, l2=l2, seeds=[f.get("seed", 0)] if seeds is None else seeds,
        held_out=f.held_out if l2 is None else 0, batch_size=f.batch_size,
        num_workers=f.get("num_workers", data.get("num_workers", 0)), transform=transform,
        class_names=class_names(data),
    )


def fewshot_callback(
    cfg: DictConfig, transform: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> FewShotCallback | None:
    """The FewShotCallback that `fewshot.every_n_steps=N` asks for (None when it is 0 or unset)."""
    every = cfg.get("fewshot", {}).get("every_n_steps")
    if not every:
        return None
    return FewShotCallback(fewshot_evaluator(cfg, transform=transform), every)
