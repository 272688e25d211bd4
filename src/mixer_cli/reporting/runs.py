"""What a person reads at the end of a run: a summary table, and PNG plots of its curves."""
from __future__ import annotations

import csv
from pathlib import Path

from rich.table import Table

from mixer_cli.core.console import console
from mixer_cli.core.plots import pyplot, save_figure


def print_summary(results: dict, title: str = "Run summary") -> None:
    table = Table(title=title, show_header=False, title_style="bold")
    table.add_column(style="cyan")
    table.add_column()
    for key, value in results.items():
        if isinstance(value, float) and key.endswith(("top1", "top5")):
            value = f"{100 * value:.2f}%"
        elif isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, int):
            value = f"{value:,}"
        table.add_row(key.replace("_", " "), str(value))
    console.print(table)


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv (Lightning's CSVLogger) as {metric: [(step, value), ...]}."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    series.setdefault(key, []).append((step, float(value)))
    return series


def plot_curves(metrics_csv: Path, out: Path, title: str) -> None:
    """Training loss and held-out accuracy against steps, next to the CSV."""
    if not metrics_csv.is_file():
        return
    series = read_metrics(metrics_csv)
    fig, (ax_loss, ax_acc) = pyplot().subplots(1, 2, figsize=(10, 4))
    fewshot = [(key, ax_acc) for key in sorted(series, key=lambda k: (len(k), k)) if key.startswith("fewshot/")]
    panels = [("train/loss", ax_loss), ("val/loss", ax_loss), ("val/top1", ax_acc), ("val/top5", ax_acc), *fewshot]
    colours = {}
    for key, ax in panels:
        if key in series:
            steps, values = zip(*series[key])
            (line,) = ax.plot(steps, values, label=key, marker="o" if key != "train/loss" else None, markersize=3)
            colours[key] = line.get_color()
    for key, ax in (("test/loss", ax_loss), ("test/top1", ax_acc), ("test/top5", ax_acc)):  # the final evaluation
        if key in series:
            steps, values = zip(*series[key])
            ax.plot(steps, values, label=f"{key} (final)", marker="*", markersize=10, linestyle="none",
                    color=colours.get(key.replace("test/", "val/")))
    ax_loss.set(xlabel="step", ylabel="loss", yscale="log")
    ax_acc.set(xlabel="step", ylabel="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, out)
