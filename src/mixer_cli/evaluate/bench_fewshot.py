"""Speed of the closed-form few-shot solver against scikit-learn's Ridge on the same problem.

    python -m mixer_cli.evaluate.bench_fewshot [--classes 1000 --shots 25 --dim 1024 --repeats 3]

The ImageNet 25-shot problem of big_vision's protocol: 1,000 classes x 25 shots of 1,024-d features
(Mixer-L's width), the default l2. Both fit the same standardised features with an unregularised bias;
the table gives the fit times, their ratio, and how often their test predictions agree; the
time of the Gram product alone shows how close to its floor the solver runs.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from rich.table import Table

from mixer_cli.core.console import console
from mixer_cli.evaluate.fewshot import DEFAULT_L2, RidgeProblem


def synthetic_features(classes: int, per_class: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy class clusters with a shared offset, as pre-logits look to a linear probe."""
    gen = torch.Generator().manual_seed(0)  # the same classes for train and test
    centres = torch.randn(classes, dim, generator=gen) * 0.2 + torch.randn(dim, generator=gen)
    y = torch.arange(classes).repeat_interleave(per_class)
    noise = torch.randn(len(y), dim, generator=torch.Generator().manual_seed(seed))
    return centres[y] + noise, y


def best_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--shots", type=int, default=25)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--test-per-class", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    from sklearn.linear_model import Ridge

    train_x, train_y = synthetic_features(args.classes, args.shots, args.dim, seed=1)
    test_x, test_y = synthetic_features(args.classes, args.test_per_class, args.dim, seed=2)
    ours_s, probe = best_time(lambda: RidgeProblem(train_x, train_y, args.classes).solve(DEFAULT_L2), args.repeats)
    gram_s, _ = best_time(lambda: train_x.T @ train_x, args.repeats)  # the unavoidable N D^2 product

    def sklearn_fit():
        x = train_x.numpy()
        mean, std = x.mean(0), x.std(0) + 1e-5
        targets = 2 * np.eye(args.classes, dtype=np.float32)[train_y.numpy()] - 1
        return mean, std, Ridge(alpha=DEFAULT_L2, fit_intercept=True).fit((x - mean) / std, targets)

    sk_s, (mean, std, ridge) = best_time(sklearn_fit, args.repeats)
    ours_pred = probe.predict(test_x).numpy()
    sk_pred = ridge.predict((test_x.numpy() - mean) / std).argmax(1)
    results = {
        "problem": f"{args.classes} classes x {args.shots} shots x {args.dim}-d, l2 = 2^{np.log2(DEFAULT_L2):g}",
        "threads": torch.get_num_threads(), "ours_s": ours_s, "sklearn_s": sk_s, "speedup": sk_s / ours_s,
        "gram_s": gram_s,
        "agreement": float((ours_pred == sk_pred).mean()), "test_top1": float((ours_pred == test_y.numpy()).mean()),
    }
    threads = f"{results['threads']} CPU threads, best of {args.repeats}"
    table = Table(title=f"Few-shot solver fit, {results['problem']} ({threads})")
    for column in ("solver", "fit time", "vs scikit-learn"):
        table.add_column(column, justify="right")
    table.add_row("mixer (closed form, primal/dual)", f"{ours_s:.3f} s", f"{sk_s / ours_s:.1f}x faster")
    table.add_row("scikit-learn Ridge", f"{sk_s:.3f} s", "1.0x")
    table.add_row("the float32 Gram product X^T X alone", f"{gram_s:.3f} s", f"{sk_s / gram_s:.1f}x")
    console.print(table)
    console.print(f"same test predictions: {100 * results['agreement']:.2f}% "
                  f"(test top-1 {100 * results['test_top1']:.1f}% on {len(test_y):,} synthetic examples)")
    return results


if __name__ == "__main__":
    main()
