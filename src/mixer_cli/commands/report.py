"""`mixer report`: read the runs, and write our numbers beside the paper's Tables 2 and 3 (report.md,
report.csv) with plots of accuracy against pre-training cost, throughput and pre-training set size;
reporting/paper.py says which run fills which cell."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from mixer_cli.config.run_dirs import Run
from mixer_cli.core.console import console
from mixer_cli.core.files import csv_text
from mixer_cli.core.plots import save_figure
from mixer_cli.reporting.paper import (
    Runs,
    benchmark_devices,
    csv_rows,
    fewshot_points,
    find_runs,
    markdown,
    plot_against_paper,
    plot_fewshot,
    report_rows,
)


def build_report(run_dirs: list[Path], out_root: Path) -> Path:
    """Read the runs, write <out_root>/report/<timestamp>-report/{report.md, report.csv, *.png};
    returns that directory."""
    runs = Runs(find_runs(run_dirs))
    rows = report_rows(runs)
    series = fewshot_points(runs)
    text = markdown(rows, benchmark_devices(runs))
    if series:
        text += "![5-shot accuracy vs pre-training set size](fewshot_vs_data_size.png)\n"
    figures = {
        "accuracy_vs_cost.png": plot_against_paper(
            rows, "cost_hours", "pre-training cost (ours: device-hours; paper: TPU-v3 core-hours)",
            "ImageNet top-1 vs pre-training cost"),
        "accuracy_vs_throughput.png": plot_against_paper(
            rows, "throughput", "throughput (ours: img/s per device; paper: img/s per TPU-v3 core)",
            "ImageNet top-1 vs throughput"),
        **({"fewshot_vs_data_size.png": plot_fewshot(series)} if series else {}),
    }
    with Run(OmegaConf.create({"run_root": str(out_root), "name": "report"}), "report", record=False) as report:
        for name, fig in figures.items():
            save_figure(fig, report.path / name)
        report.write("report.csv", csv_text(csv_rows(rows)))
        report.write("report.md", text)  # last: its presence means complete
    out = report.path
    measured = sum(any(v is not None for v in r.measured.values()) for r in rows)
    console.print(f"{len(runs.runs)} runs read; {measured} of {len(rows)} rows measured; wrote {out}/report.md",
                  highlight=False, soft_wrap=True)
    return out
