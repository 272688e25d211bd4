"""Linear few-shot evaluation (Sec. 3, Figures 2 and 4): l2-regularised least squares from frozen
pre-logit features to {-1, 1} one-hot targets, solved in closed form.

The protocol is big_vision's `fewshot_lsr` evaluator, which the paper used: per seed, a random
class-balanced sample of k shots per class (the k-shot sample is the first k of one random order
per class, so samples of different k are nested); features standardised on that sample
(std + 1e-5); l2 = 2^10. big_vision appends a constant feature of 100 for the bias, which leaves
it regularised by l2 / 100^2; we centre features and targets instead, which leaves it exactly
unregularised (as scikit-learn's Ridge(fit_intercept=True)).
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset

from mixer_cli.errors import UserError

DEFAULT_L2 = 2.0**10
L2_GRID = tuple(2.0**i for i in range(-10, 20))  # big_vision's grid for choosing l2
STD_EPS = 1e-5


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


def pre_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The representation the probe reads: our Mixer's `forward_features` (already pooled); for timm
    models (e.g. the ResNet of the shuffle experiment) their pooled pre-logits."""
    features = model.forward_features(x)
    if hasattr(model, "forward_head"):
        features = model.forward_head(features, pre_logits=True)
    return features


def extract_features(model: nn.Module, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-logits (`model.forward_features`, see `pre_logits`) and labels of every batch, on the
    model's device. The model runs in eval mode and is left in the mode it was in."""
    features, labels = [], []
    with frozen(model) as device:
        for x, y in loader:
            features.append(pre_logits(model, x.to(device, non_blocking=True)).float())
            labels.append(torch.as_tensor(y).to(device))
    if not features:
        raise UserError("the few-shot data set is empty; check the data config (data=...)")
    return torch.cat(features), torch.cat(labels).long()


def class_ranks(labels: np.ndarray, seed: int) -> np.ndarray:
    """Each example's position in one random order of its class, drawn from `seed`."""
    labels = np.asarray(labels)
    keys = np.random.default_rng(seed).random(len(labels))
    order = np.lexsort((keys, labels))  # by class, then randomly within a class
    sorted_labels = labels[order]
    class_start = np.searchsorted(sorted_labels, sorted_labels, side="left")
    ranks = np.empty(len(labels), dtype=np.int64)
    ranks[order] = np.arange(len(labels)) - class_start
    return ranks


def check_counts(labels: np.ndarray, shots: int, num_classes: int | None = None, held_out: int = 0) -> None:
    """Every class must have `shots` (+ `held_out`) examples; a clear error names the class that has fewer."""
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=num_classes or 0)
    if len(counts) and counts.min() < shots + held_out:
        c, most = int(counts.argmin()), max(int(counts.min()) - held_out, 1)
        asked = f"{shots} shots" + (f" plus {held_out} held out for choosing l2" if held_out else "")
        raise UserError(f"class {c} has only {counts[c]} training example(s), fewer than the {asked} asked for; "
                        f"ask for at most {most} (e.g. --shots {most})")


def sample_shots(labels, shots: int, seed: int, num_classes: int | None = None) -> np.ndarray:
    """Indices (ascending) of `shots` random examples of every class; nested across `shots` for one seed."""
    if shots < 1:
        raise UserError(f"shots must be at least 1, got {shots}")
    labels = np.asarray(labels)
    check_counts(labels, shots, num_classes)
    return np.flatnonzero(class_ranks(labels, seed) < shots)


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
        y = torch.as_tensor(y, device=self.mean.device)
        return (self.predict(x) == y).float().mean().item()


class RidgeProblem:
    """The few-shot train set, standardised and reduced to the normal equations, so that it can be
    solved for any l2. With N examples and D features it keeps the smaller system: the primal
    (X^T X + l2 I) W = X^T Y when N >= D, else the dual W = X^T (X X^T + l2 I)^-1 Y."""

    def __init__(self, x, y, num_classes: int):
        x = torch.as_tensor(x)
        x = x.float() if not x.is_floating_point() else x
        y = torch.as_tensor(y, device=x.device).long()
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise UserError(f"labels must lie in 0..{num_classes - 1}; got {int(y.min())}..{int(y.max())}")
        n, d = x.shape
        self.mean = x.mean(dim=0)
        xc = x - self.mean
        # Targets 2 * onehot - 1, centred: their mean is the exactly unregularised bias.
        self.bias = 2 * torch.bincount(y, minlength=num_classes).to(x.dtype) / n - 1
        self.primal = n >= d
        # The products in the features' precision (the cost: N D^2 or N^2 D); the small
        # D x D or N x N factorisation in float64, so a tiny l2 from the grid stays accurate.
        if self.primal:
            # Standardising X = Xc / std scales the Gram matrix and the class sums of Xc by 1 / std:
            # D x D and C x D work instead of another pass over the N x D features; and the variance
            # is the Gram matrix's diagonal / N.
            gram = (xc.T @ xc).double()
            std = (gram.diagonal() / n).sqrt() + STD_EPS
            self.std = std.to(x.dtype)
            self.gram = gram / std[:, None] / std[None, :]
            # X is centred, so X^T Y = X^T (2 onehot - 1) = 2 * (per-class sums of X): no N x C matrix.
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
        """The probes for many l2 from one eigendecomposition G = Q diag(e) Q^T, as big_vision does:
        (G + l2 I)^-1 rhs = Q diag(1 / (e + l2)) Q^T rhs costs a matrix product per l2."""
        for l2 in l2s:
            check_l2(l2)
        eigenvalues, q = torch.linalg.eigh(self.gram)
        rotated = q.T @ self.rhs
        return [self._probe(q @ (rotated / (eigenvalues + l2)[:, None]), l2) for l2 in l2s]

    def _probe(self, solution: torch.Tensor, l2: float) -> RidgeProbe:
        weight = solution if self.primal else self.xs.T.double() @ solution
        return RidgeProbe(self.mean, self.std, weight.to(self.mean.dtype), self.bias, float(l2))

    def select(self, val_x, val_y, l2s: Sequence[float] = L2_GRID) -> RidgeProbe:
        """The probe whose l2 (from `l2s`) scores best on held-out examples; ties go to the larger l2."""
        probes = self.solve_many(sorted(l2s))
        accuracies = [p.accuracy(val_x, val_y) for p in probes]
        best = max(range(len(probes)), key=lambda i: (accuracies[i], i))
        return probes[best]


def check_l2(l2: float) -> None:
    if not l2 > 0:
        raise UserError(f"l2 must be positive, got {l2}")


def fit_ridge(train_x, train_y, num_classes: int, l2: float = DEFAULT_L2) -> RidgeProbe:
    """The closed-form l2-regularised least-squares probe on a few-shot train set."""
    return RidgeProblem(train_x, train_y, num_classes).solve(l2)


def ridge_fewshot_accuracy(train_x, train_y, test_x, test_y, num_classes: int, l2: float = DEFAULT_L2) -> float:
    """Top-1 accuracy on (test_x, test_y) of the ridge probe fitted to (train_x, train_y)."""
    return fit_ridge(train_x, train_y, num_classes, l2).accuracy(test_x, test_y)


def labels_of(dataset) -> np.ndarray | None:
    """The labels of a map-style dataset without decoding an image (our demo tensors, torchvision's
    ImageFolder), or None when only streaming through it tells them (webdataset shards)."""
    for attr in ("labels", "targets"):
        if hasattr(dataset, attr):
            return np.asarray(getattr(dataset, attr))
    return None


def make_loader(dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    if hasattr(dataset, "batch_size"):  # our shard datasets batch themselves
        dataset.batch_size = batch_size
        return DataLoader(dataset, batch_size=None, num_workers=num_workers)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


@dataclass(frozen=True)
class TrainPool:
    """Features of the train examples that some (shots, seed) sample needs, and each example's rank
    in every seed's random order of its class: the k-shot sample of a seed is `ranks[seed] < k`."""

    x: torch.Tensor
    y: torch.Tensor
    ranks: dict[int, torch.Tensor]


def extract_train_pool(
    model: nn.Module, dataset, shots: int, seeds: Sequence[int], num_classes: int,
    batch_size: int = 256, num_workers: int = 0, *, held_out: int = 0,
) -> TrainPool:
    """One feature pass over just the examples that some seed's first `shots` (+ `held_out`, for
    choosing l2) of every class takes.

    A dataset that knows its labels is sampled from the whole split; a stream (shards) from its
    first `(shots + held_out) * len(seeds)` examples of every class, as big_vision reads a split's prefix."""
    needed = shots + held_out
    labels = labels_of(dataset)
    if labels is None:
        loader = make_loader(dataset, batch_size, num_workers)
        x, y = extract_class_prefix(model, loader, needed * len(seeds), num_classes)
        labels = y.cpu().numpy()
        check_counts(labels, shots, num_classes, held_out)
        ranks = {s: class_ranks(labels, s) for s in seeds}
    else:
        check_counts(labels, shots, num_classes, held_out)
        full = {s: class_ranks(labels, s) for s in seeds}
        keep = np.flatnonzero(np.any([r < needed for r in full.values()], axis=0))
        x, y = extract_features(model, make_loader(Subset(dataset, keep.tolist()), batch_size, num_workers))
        ranks = {s: r[keep] for s, r in full.items()}
    return TrainPool(x, y, {s: torch.from_numpy(r).to(x.device) for s, r in ranks.items()})


def extract_class_prefix(model: nn.Module, loader: DataLoader, per_class: int, num_classes: int):
    """Features and labels of the first `per_class` examples of every class in a stream; stops
    reading as soon as every class has them."""
    counts = torch.zeros(num_classes, dtype=torch.long)
    features, labels = [], []
    with frozen(model) as device:
        for x, y in loader:
            y = torch.as_tensor(y).long()
            # position of each example among the examples of its class seen so far
            seen = counts[y] + (F.one_hot(y, num_classes).cumsum(0) - 1).gather(1, y[:, None]).squeeze(1)
            take = seen < per_class
            counts += torch.bincount(y[take], minlength=num_classes)
            if take.any():
                features.append(pre_logits(model, x[take].to(device)).float())
                labels.append(y[take].to(device))
            if bool((counts >= per_class).all()):
                break
    if not features:
        raise UserError("the few-shot train split is empty; check the data config (data=...)")
    return torch.cat(features), torch.cat(labels)


def fewshot_accuracies(
    pool: TrainPool, test_x, test_y, num_classes: int, shots: Sequence[int],
    l2: float | None = DEFAULT_L2, held_out: int = 0,
) -> list[dict]:
    """Test accuracy of the probe for every (shots, seed). With l2=None each probe picks its l2 from
    L2_GRID on `held_out` examples per class that none of that seed's samples contain."""
    if l2 is None and held_out < 1:
        raise UserError("choosing l2 needs held-out examples: held_out >= 1 per class (fewshot.held_out)")
    rows = []
    top = max(shots)
    for seed, ranks in pool.ranks.items():
        val = (ranks >= top) & (ranks < top + held_out)
        for k in sorted(shots):
            take = ranks < k
            problem = RidgeProblem(pool.x[take], pool.y[take], num_classes)
            probe = problem.solve(l2) if l2 is not None else problem.select(pool.x[val], pool.y[val])
            rows.append({"shots": k, "seed": seed, "l2": probe.l2, "accuracy": probe.accuracy(test_x, test_y)})
    return rows


class FewShotCallback(L.Callback):
    """Logs the linear few-shot accuracy `fewshot/{k}shot` of the model under training every
    `every_n_steps` optimiser steps, at the start and at the end: the curves of Figure 4.

    The train sample (seed `seed`) is the same at every evaluation, so a curve moves with the model
    alone. Every rank computes (a sharded model needs all ranks in its forward); rank zero logs."""

    def __init__(
        self, train_dataset, test_dataset, shots: int | Sequence[int] = 5, every_n_steps: int = 500,
        l2: float = DEFAULT_L2, seed: int = 0, batch_size: int = 256, num_workers: int = 0,
        num_classes: int | None = None,
    ):
        if every_n_steps < 1:
            raise UserError(f"fewshot.every_n_steps must be at least 1, got {every_n_steps}")
        self.shots = sorted({shots} if isinstance(shots, int) else set(shots))
        self.train_dataset, self.test_dataset = train_dataset, test_dataset
        self.every_n_steps, self.l2, self.seed = every_n_steps, l2, seed
        self.batch_size, self.num_workers = batch_size, num_workers
        labels = labels_of(train_dataset)
        self.num_classes = num_classes or (int(labels.max()) + 1 if labels is not None else None)
        if self.num_classes is None:
            raise UserError("FewShotCallback on a stream needs num_classes=...")
        if labels is not None:  # fail before training starts, not at the first evaluation
            check_counts(labels, max(self.shots), self.num_classes)
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
        if step == self._last_step:  # several micro-batches (accumulation) share one step
            return
        self._last_step = step
        model = getattr(pl_module, "model", pl_module)
        plugin = getattr(trainer, "precision_plugin", None)
        with plugin.forward_context() if plugin is not None else nullcontext():
            pool = extract_train_pool(model, self.train_dataset, max(self.shots), [self.seed], self.num_classes,
                                      self.batch_size, self.num_workers)
            test_x, test_y = extract_features(model, make_loader(self.test_dataset, self.batch_size, self.num_workers))
        rows = fewshot_accuracies(pool, test_x, test_y, self.num_classes, self.shots, self.l2)
        metrics = {f"fewshot/{r['shots']}shot": r["accuracy"] for r in rows}
        for name, value in metrics.items():
            trainer.callback_metrics[name] = torch.tensor(value)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
