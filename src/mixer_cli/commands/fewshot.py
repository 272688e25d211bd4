"""`mixer fewshot`: the linear few-shot probe (FewShotEvaluator) of a frozen checkpoint, as a run.

The data is read with the checkpoint's evaluation preprocessing (timm's data config of the model:
resolution, mean/std, interpolation, crop), as `mixer eval` reads it: conf/fewshot.yaml leaves
those values null, the checkpoint fills them, and a value the user sets wins. Every shot count and
seed comes from one feature pass. The run directory gets config.yaml, fewshot.csv,
fewshot_per_class.csv (each class of the probe data by name, its accuracy at each shot count),
fewshot.png and, last, results.json; on any error the directory is removed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from rich.markup import escape
from rich.table import Table
from timm.data import resolve_data_config

from mixer_cli.commands.eval import with_checkpoint_preprocessing
from mixer_cli.config.run_dirs import Run
from mixer_cli.core.console import console
from mixer_cli.core.devices import pick_device
from mixer_cli.core.errors import UserError
from mixer_cli.core.files import csv_text
from mixer_cli.core.plots import pyplot, save_figure
from mixer_cli.evaluate.fewshot import fewshot_evaluator
from mixer_cli.models import load_mixer


def parse_shots(text: str) -> list[int]:
    """'5' or '1,5,10,25' -> sorted distinct shot counts."""
    try:
        shots = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise UserError(f"--shots takes whole numbers separated by commas, e.g. --shots 1,5,10,25; got {text!r}") \
            from None
    if not shots or shots[0] < 1:
        raise UserError(f"--shots must be at least 1, e.g. --shots 1,5,10,25; got {text!r}")
    return shots


def fewshot_command(cfg: DictConfig, checkpoint: Path, shots: list[int]) -> dict:
    """Few-shot top-1 of the frozen checkpoint on cfg.data for every shot count and seed
    0..fewshot.seeds-1; every user mistake that can be seen before reading data is raised before
    the run directory exists."""
    f = cfg.fewshot
    model = load_mixer(checkpoint)
    cfg = with_checkpoint_preprocessing(cfg, resolve_data_config({}, model=model))
    evaluator = fewshot_evaluator(cfg, shots, seeds=range(f.seeds))
    model.to(pick_device(f.device))
    with Run(cfg, "fewshot") as run:  # a stream (shards) shows a class with too few examples only when read
        result = evaluator.run(model)
        summary = summarise(result["runs"])
        results = {
            "command": "fewshot", "name": cfg.name, "checkpoint": str(checkpoint), "data": cfg.data.source,
            "num_classes": cfg.data.num_classes, "feature_dim": result["feature_dim"],
            "num_samples": result["num_samples"], "l2": "select" if evaluator.l2 is None else evaluator.l2,
            **{f"fewshot_{k}shot": acc for k, acc in result["accuracy"].items()},  # as training runs name them
            "summary": summary, "runs": result["runs"], "run_dir": str(run.path),
        }
        run.write("fewshot.csv", csv_text(result["runs"], ["shots", "seed", "l2", "accuracy"]))
        names = list(evaluator.class_names or map(str, range(cfg.data.num_classes)))
        per_class = per_class_rows(result["per_class"], names)
        run.write("fewshot_per_class.csv", csv_text(per_class))
        results["hardest_classes"] = hardest(per_class, max(shots))
        plot_fewshot(summary, run.path / "fewshot.png", title=f"linear few-shot, {cfg.data.source}")
        run.finish(results)
    print_fewshot(results)
    return results


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and spread over seeds for every shot count."""
    summary = []
    for k in sorted({r["shots"] for r in rows}):
        acc = np.array([r["accuracy"] for r in rows if r["shots"] == k])
        l2s = sorted({r["l2"] for r in rows if r["shots"] == k})
        summary.append({
            "shots": k, "mean": float(acc.mean()), "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "min": float(acc.min()), "max": float(acc.max()), "seeds": len(acc), "l2": l2s,
        })
    return summary


def per_class_rows(per_class: dict[int, np.ndarray], names: list[str]) -> list[dict]:
    """One row per class of the probe data: its name and its accuracy at each shot count (mean over
    seeds; empty where the test split has no example of it)."""
    return [{"class": c, "name": name, **{f"{k}shot": "" if np.isnan(acc[c]) else round(float(acc[c]), 6)
                                           for k, acc in per_class.items()}}
            for c, name in enumerate(names)]


def hardest(rows: list[dict], shots: int, count: int = 5) -> list[dict]:
    """The classes the frozen features separate worst at `shots` shots."""
    scored = [r for r in rows if r[f"{shots}shot"] != ""]
    return [{"class": r["class"], "name": r["name"], "accuracy": r[f"{shots}shot"]}
            for r in sorted(scored, key=lambda r: r[f"{shots}shot"])[:count]]


def print_fewshot(results: dict) -> None:
    table = Table(title=f"Linear few-shot top-1 ({results['data']}, {results['num_classes']} classes, "
                        f"{results['num_samples']:,} test images)", title_style="bold")
    for column in ("shots", "mean", "± std", "min", "max", "seeds", "l2"):
        table.add_column(column, justify="right")
    for s in results["summary"]:
        table.add_row(str(s["shots"]), f"{100 * s['mean']:.2f}%", f"{100 * s['std']:.2f}", f"{100 * s['min']:.2f}%",
                      f"{100 * s['max']:.2f}%", str(s["seeds"]), ", ".join(f"2^{np.log2(v):g}" for v in s["l2"]))
    console.print(table)
    worst = ", ".join(f"{escape(h['name'])} {100 * h['accuracy']:.1f}%" for h in results["hardest_classes"])
    console.print(f"hardest classes at {results['summary'][-1]['shots']} shots: {worst} "
                  f"(every class: fewshot_per_class.csv)", highlight=False)
    console.print(f"results: {results['run_dir']}/results.json")


def plot_fewshot(summary: list[dict], out: Path, title: str) -> None:
    """Accuracy against shots (log scale), mean and min-max over seeds."""
    shots = [s["shots"] for s in summary]
    mean = np.array([s["mean"] for s in summary])
    fig, ax = pyplot().subplots(figsize=(5, 4))
    ax.errorbar(shots, mean, yerr=[mean - [s["min"] for s in summary], [s["max"] for s in summary] - mean],
                marker="o", capsize=3)
    ax.set(xscale="log", xlabel="shots per class", ylabel="top-1 accuracy", title=title)
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out)
