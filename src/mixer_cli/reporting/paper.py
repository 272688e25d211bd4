"""Our runs beside the paper's Tables 2 and 3, and plots in the manner of Figures 2-3 (`mixer report`).

Every command leaves `runs/<command>/<timestamp>-<name>/` with `results.json` (and `config.yaml`).
A fine-tune, evaluation or few-shot probe names the checkpoint it started from (`from`); when that
file lies in a pre-training run's directory, its numbers belong to that run's row, otherwise to the
file's own row (e.g. imported official weights). Per pre-training recipe the report gives:
- ImNet top-1 and ReaL top-1: the ImageNet fine-tune at the row's resolution (ReaL from the
  fine-tune itself or from `mixer eval --from` its checkpoint with `data.real_labels`);
- Avg 5: the mean top-1 of the fine-tunes on ImageNet, CIFAR-10, CIFAR-100, Pets and Flowers-102,
  only when all five were measured;
- VTAB-1k: the 19-task mean of a VTAB-1k suite fine-tuned from the model (`mixer finetune recipe=ft_vtab`:
  its results.json's `vtab1k.mean`);
- throughput: img/s per device of the row's model at its resolution from the latest `mixer benchmark`;
- pre-training cost: the device-hours the pre-training run measured.
Each beside the paper's number (the recipe's `paper:` block) and the difference; a cell we have not
measured is "-". Where one model has several fine-tunes of one target (an lr sweep), the latest counts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from statistics import fmean

from omegaconf import DictConfig, OmegaConf

from mixer_cli.config.compose import load_recipe
from mixer_cli.config.recipes import config_name_of, recipe_names
from mixer_cli.core.console import console
from mixer_cli.core.errors import UserError
from mixer_cli.core.files import package_root
from mixer_cli.core.plots import pyplot
from mixer_cli.models import VARIANTS, variant_key

AVG5_TARGETS = ("imagenet", "cifar10", "cifar100", "pets", "flowers102")
ACCURACIES = ("imagenet_top1", "real_top1", "avg5", "vtab1k")
# Cells of a row: key, column title. Accuracies in %, throughput in img/s per device, cost in hours.
CELLS = (("imagenet_top1", "ImNet top-1"), ("real_top1", "ReaL top-1"), ("avg5", "Avg 5"), ("vtab1k", "VTAB-1k"),
         ("throughput", "img/s per device"), ("cost_hours", "pre-training cost (h)"))


# ---- run directories -----------------------------------------------------------------------------


@dataclass(eq=False)  # identity: a run is one directory
class Run:
    path: Path
    results: dict
    config: DictConfig
    mtime: float

    @property
    def command(self) -> str:
        return self.results.get("command") or self.path.parent.name  # runs/<command>/<run>

    @property
    def name(self) -> str:
        return self.results.get("name") or self.config.get("name") or self.path.name

    @property
    def img_size(self) -> int | None:
        return OmegaConf.select(self.config, "data.img_size") or self.results.get("preprocessing", {}).get("img_size")

    @property
    def checkpoint(self) -> str | None:
        """The file this run started from (fine-tunes, evaluations, few-shot probes)."""
        return self.results.get("from") or self.results.get("checkpoint")


def read_run(run_dir: Path) -> Run | None:
    """The run in `run_dir`, or None (with a warning) when its results.json is unreadable."""
    results_path = run_dir / "results.json"
    try:
        results = json.loads(results_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        console.print(f"[yellow]skipped[/] {results_path}: {str(e).splitlines()[0]}", highlight=False)
        return None
    config_path = run_dir / "config.yaml"
    config = OmegaConf.load(config_path) if config_path.is_file() else OmegaConf.create({})
    return Run(run_dir.resolve(), results, config, results_path.stat().st_mtime)


def find_runs(paths: list[Path]) -> list[Run]:
    """Every run in the given run directories or folders of them."""
    dirs: dict[Path, None] = {}
    for path in map(Path, paths):
        if not path.is_dir():
            raise UserError(f"{path} is not a folder; pass run directories or folders of them (default: runs/)")
        found = [path / "results.json"] if (path / "results.json").is_file() else sorted(path.rglob("results.json"))
        dirs |= {results.parent.resolve(): None for results in found}
    return [run for run in map(read_run, dirs) if run is not None]


class Runs:
    """The runs, and the links from each run to the checkpoint (run or file) it started from."""

    def __init__(self, runs: list[Run]):
        self.runs = runs
        self.by_dir = {r.path: r for r in runs}

    def of(self, command: str) -> list[Run]:
        return [r for r in self.runs if r.command == command]

    def source(self, run: Run) -> Run | str | None:
        """The run whose directory holds the checkpoint `run` started from, else the file's path."""
        if not run.checkpoint:
            return None
        path = Path(run.checkpoint).expanduser().resolve()
        if path.parent not in self.by_dir and (path.parent / "results.json").is_file():  # a run not passed in
            found = read_run(path.parent)
            if found is not None:
                self.runs.append(found)
                self.by_dir[found.path] = found
        return self.by_dir.get(path.parent, str(path))

    def pretrained(self, run: Run) -> Run | str | None:
        """The pre-training run (or external file) at the start of a chain of fine-tunes."""
        source, seen = self.source(run), {run}
        while isinstance(source, Run) and source.command == "finetune" and source not in seen:
            seen.add(source)
            source = self.source(source)
        return source

    def started_from(self, source: Run | str, command: str) -> list[Run]:
        return [r for r in self.of(command) if self.source(r) is source or (isinstance(source, str)
                                                                             and self.source(r) == source)]


def benchmark_results(runs: Path) -> list[dict]:
    """The results of every `mixer benchmark` under the runs folder, newest first."""
    found = [run for run in find_runs([runs / "benchmark"]) if run.command == "benchmark"] \
        if (runs / "benchmark").is_dir() else []
    return [run.results for run in sorted(found, key=lambda r: r.mtime, reverse=True)]


def latest(runs: list[Run]) -> Run | None:
    return max(runs, key=lambda r: r.mtime, default=None)


def percent(fraction: float | None) -> float | None:
    return None if fraction is None else 100 * fraction


# ---- the paper's rows ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PaperRow:
    table: int
    recipe: str
    variant: str | None
    img_size: int
    pretrains: bool  # a pre-training recipe (else a fine-tune recipe at a higher resolution)
    paper: dict = field(hash=False)  # the numbers in the units of CELLS (cost in TPU-v3 core-hours)


def paper_numbers(block: dict) -> dict:
    days = block.get("tpu_core_days")
    return {**{k: block.get(k) for k in ACCURACIES}, "throughput": block.get("throughput"),
            "cost_hours": None if days is None else 24 * days}


@cache
def paper_rows() -> tuple[PaperRow, ...]:
    """Every recipe whose `paper:` block is a row of Table 2 or 3 (a `table2:` block inside a
    Table 3 row is the same model's Table 2 row)."""
    rows = []
    for name in recipe_names():
        raw = OmegaConf.load(Path(recipes_dir(), f"{name}.yaml"))
        if not OmegaConf.select(raw, "paper.table"):
            continue
        cfg = load_recipe(name)
        block = OmegaConf.to_container(cfg.paper)
        variant, img_size = OmegaConf.select(cfg, "model.variant"), cfg.data.img_size
        pretrains = config_name_of(name) == "config"
        rows.append(PaperRow(block["table"], name, variant, img_size, pretrains, paper_numbers(block)))
        if "table2" in block:
            rows.append(PaperRow(2, name, variant, img_size, pretrains, paper_numbers({**block, **block["table2"]})))
    return tuple(rows)


def recipes_dir() -> Path:
    return package_root() / "recipes"


# ---- measurements -------------------------------------------------------------------------------


@dataclass
class Row:
    section: str
    label: str
    model: str
    img_size: int | None
    measured: dict
    paper: dict
    pretrained: str  # the pre-training run directory or file the numbers come from, or "-"
    finetunes: str  # every fine-tune of the model: target@resolution top-1


class Measure:
    """The numbers of one pre-trained model (a pre-training run or an external file)."""

    def __init__(self, runs: Runs):
        self.runs = runs
        self.benchmarks = [r.results for r in sorted(runs.of("benchmark"), key=lambda r: r.mtime, reverse=True)]

    def finetunes(self, source) -> list[Run]:
        return [r for r in self.runs.of("finetune") if self.runs.pretrained(r) is source
                or (isinstance(source, str) and self.runs.pretrained(r) == source)]

    def finetune(self, source, target: str, img_size: int | None) -> Run | None:
        return latest([r for r in self.finetunes(source) if r.config.get("target") == target
                       and r.img_size == img_size])

    def real_top1(self, run: Run) -> float | None:
        """ReaL top-1 of the run, or of the latest `mixer eval` of its checkpoint that measured it."""
        if run.results.get("real_top1") is not None:
            return run.results["real_top1"]
        evals = [e for e in self.runs.started_from(run, "eval") if e.results.get("real_top1") is not None]
        return latest(evals).results["real_top1"] if evals else None

    def imagenet(self, source, img_size: int | None, imagenet_run: Run | None) -> Run | None:
        """The ImageNet measurement: the given or latest ImageNet fine-tune, or, for a file (weights
        fine-tuned elsewhere), its latest evaluation on ImageNet's 1,000 classes."""
        found = imagenet_run or self.finetune(source, "imagenet", img_size)
        if found is None and isinstance(source, str):
            found = latest([e for e in self.runs.started_from(source, "eval")
                            if OmegaConf.select(e.config, "data.num_classes") == 1000 and e.img_size == img_size])
        return found

    def avg5(self, source, img_size: int | None, imagenet: Run | None) -> float | None:
        found = [imagenet] + [self.finetune(source, t, img_size) for t in AVG5_TARGETS[1:]]
        if any(r is None or r.results.get("top1") is None for r in found):
            return None
        return fmean(r.results["top1"] for r in found)

    def vtab1k(self, source) -> float | None:
        suites = [r for r in self.finetunes(source) if (r.results.get("vtab1k") or {}).get("mean") is not None]
        return latest(suites).results["vtab1k"]["mean"] if suites else None

    def throughput(self, variant: str | None, img_size: int | None) -> float | None:
        """img/s per device of the variant at the resolution, from the latest benchmark that timed it."""
        if variant is None:
            return None
        model = f"mixer-{variant_key(variant)}"
        for bench in self.benchmarks:
            for row in bench.get("results", []):
                if (row.get("model"), row.get("res"), row.get("mode")) == (model, img_size, "infer") \
                        and row.get("img_s_per_device") is not None:
                    return row["img_s_per_device"]
        return None

    def row(self, section: str, label: str, variant: str | None, img_size: int | None, source,
            paper: dict, imagenet_run: Run | None = None) -> Row:
        imagenet = self.imagenet(source, img_size, imagenet_run) if source is not None else None
        pretrain = source if isinstance(source, Run) else None
        measured = {
            "pretrain_top1": percent(pretrain.results.get("top1")) if pretrain else None,
            "imagenet_top1": percent(imagenet.results.get("top1")) if imagenet else None,
            "real_top1": percent(self.real_top1(imagenet)) if imagenet else None,
            "avg5": percent(self.avg5(source, img_size, imagenet)) if source is not None else None,
            "vtab1k": percent(self.vtab1k(source)) if source is not None else None,
            "throughput": self.throughput(variant, img_size),
            "cost_hours": pretrain.results.get("device_hours") if pretrain else None,
        }
        where = str(source.path) if isinstance(source, Run) else source or "-"
        return Row(section, label, variant or "custom", img_size, measured, paper, where, self.finetune_list(source))

    def finetune_list(self, source) -> str:
        if source is None:
            return "-"
        shown = {}
        for run in sorted(self.finetunes(source), key=lambda r: r.mtime):  # the latest of each target wins
            if run.results.get("top1") is not None and not vtab_task(run):
                shown[f"{run.config.get('target', run.name)}@{run.img_size}"] = 100 * run.results["top1"]
        return ", ".join(f"{k} {v:.2f}" for k, v in sorted(shown.items())) or "-"


def vtab_task(run: Run) -> bool:
    """One task's run of a VTAB-1k suite: it counts through the suite's score (`vtab1k`), not alone."""
    return OmegaConf.select(run.config, "data.task") is not None


def variant_of(run: Run) -> str | None:
    variant = OmegaConf.select(run.config, "model.variant") or run.results.get("model")
    return variant if variant in VARIANTS else None


def report_rows(runs: Runs) -> list[Row]:
    """The Table 2 and 3 rows (measured where we ran them), then our runs outside the tables."""
    measure = Measure(runs)
    rows, used = [], set()
    for p in sorted(paper_rows(), key=lambda p: (p.table, not p.pretrains)):
        section = f"Table {p.table}"
        if p.pretrains:
            source = latest([r for r in runs.of("pretrain") if r.name == p.recipe])
            rows.append(measure.row(section, p.recipe, p.variant, p.img_size, source, p.paper))
        else:  # a fine-tune recipe (448 rows): its own run gives ImageNet, the others come from its model
            imagenet = latest([r for r in runs.of("finetune") if r.name == p.recipe])
            source = runs.pretrained(imagenet) if imagenet else None
            rows.append(measure.row(section, p.recipe, p.variant, p.img_size, source, p.paper, imagenet))
        used.add(source)
    for source, variant, sizes in other_models(runs, used):
        for img_size in sizes:
            label = source.name if isinstance(source, Run) else Path(source).name
            rows.append(measure.row("Other runs", label, variant, img_size, source, {}))
    return rows


def other_models(runs: Runs, used: set) -> list[tuple]:
    """Pre-training runs outside the paper's rows (the latest of each name; the demo) and files that
    fine-tunes or evaluations started from, each with the resolutions it was measured at."""
    found = []
    names = {r.name for r in runs.of("pretrain")}
    for name in sorted(names):
        run = latest([r for r in runs.of("pretrain") if r.name == name])
        if run not in used and not any(run.name == p.recipe for p in paper_rows()):
            found.append((run, variant_of(run), [run.img_size]))
    files: dict[str, set] = {}
    for run in runs.of("finetune") + runs.of("eval"):
        source = runs.pretrained(run)
        if isinstance(source, str) and source not in used and not vtab_task(run):
            files.setdefault(source, set()).add(run.img_size)
    for source, sizes in sorted(files.items()):
        measured = [r for r in runs.runs if runs.pretrained(r) == source]
        variant = next((v for v in map(variant_of, measured) if v), None)
        found.append((source, variant, sorted(sizes, key=lambda s: s or 0)))
    return found


# ---- output -------------------------------------------------------------------------------------


def difference(key: str, ours: float | None, paper: float | None) -> float | None:
    """Accuracies: ours - paper in points; throughput and cost: ours / paper (different devices)."""
    if ours is None or paper is None:
        return None
    return ours - paper if key in ACCURACIES else ours / paper


def formatted(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    if key in ACCURACIES:
        return f"{value:.2f}"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def cell(key: str, ours: float | None, paper: float | None) -> str:
    text = f"{formatted(key, ours)} / {formatted(key, paper)}"
    diff = difference(key, ours, paper)
    if diff is not None:
        text += f" ({diff:+.2f})" if key in ACCURACIES else f" (x{diff:.2g})"
    return text


def markdown(rows: list[Row], devices: str) -> str:
    head = ["row", "model", "res", "pre-train top-1", *(title for _, title in CELLS), "fine-tunes (top-1 %)",
            "pre-trained model"]
    lines = [
        "# Our runs beside the paper's Tables 2 and 3",
        "",
        "Each cell: ours / paper (difference). Accuracies in %, the difference in points. Throughput: img/s per "
        f"device measured by `mixer benchmark` ({devices}) / img/s per TPU-v3 core, as a ratio. Pre-training cost: "
        "device-hours measured by the run / TPU-v3 core-hours (core-days x 24), as a ratio. "
        '"-": not measured (or not in the paper). Pre-train top-1: the pre-training run on its own held-out split.',
    ]
    for section in dict.fromkeys(r.section for r in rows):
        lines += ["", f"## {section}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in (r for r in rows if r.section == section):
            pretrain = "-" if r.measured["pretrain_top1"] is None else f"{r.measured['pretrain_top1']:.2f}"
            cells = [cell(k, r.measured[k], r.paper.get(k)) for k, _ in CELLS]
            lines.append("| " + " | ".join([r.label, r.model, str(r.img_size or "-"), pretrain, *cells, r.finetunes,
                                            r.pretrained]) + " |")
    lines += ["", "![accuracy vs pre-training cost](accuracy_vs_cost.png)",
              "![accuracy vs throughput](accuracy_vs_throughput.png)"]
    return "\n".join(lines) + "\n"


def csv_rows(rows: list[Row]) -> list[dict]:
    out = []
    for r in rows:
        row = {"section": r.section, "row": r.label, "model": r.model, "img_size": r.img_size,
               "pretrain_top1": r.measured["pretrain_top1"]}
        for key, _ in CELLS:
            row |= {key: r.measured[key], f"{key}_paper": r.paper.get(key),
                    f"{key}_diff": difference(key, r.measured[key], r.paper.get(key))}
        out.append(row | {"finetunes": r.finetunes, "pretrained": r.pretrained})
    return out


def plot_against_paper(rows: list[Row], x_key: str, xlabel: str, title: str):
    """ImageNet top-1 against throughput or cost: ours and the paper's, one point per row."""
    fig, ax = pyplot().subplots(figsize=(6, 4.5))
    for who, marker in (("paper", "s"), ("ours", "o")):
        points = [(r.label, (r.paper if who == "paper" else r.measured).get(x_key),
                   (r.paper if who == "paper" else r.measured).get("imagenet_top1")) for r in rows]
        points = [p for p in points if p[1] is not None and p[2] is not None]
        if points:
            ax.scatter([p[1] for p in points], [p[2] for p in points], marker=marker, label=who)
            for label, x, y in points:
                ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", xlabel=xlabel, ylabel="ImageNet top-1 (%)", title=title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    return fig


def fewshot_points(runs: Runs) -> dict[str, list[tuple[float, float]]]:
    """Section 3.3: (fraction of the pre-training set, linear 5-shot top-1 %) per model, from
    pre-training runs with data.train_fraction and their few-shot probes (the latest counts)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for run in runs.of("pretrain"):
        fraction = OmegaConf.select(run.config, "data.train_fraction")
        if fraction is None:
            continue
        probes = [p for p in runs.started_from(run, "fewshot")
                  if any(s.get("shots") == 5 for s in p.results.get("summary", []))]
        if probes:
            five = next(s["mean"] for s in latest(probes).results["summary"] if s["shots"] == 5)
        else:
            five = run.results.get("fewshot_5shot")
        if five is not None:
            series.setdefault(variant_of(run) or run.name, []).append((fraction, 100 * five))
    return {k: sorted(v) for k, v in sorted(series.items())}


def plot_fewshot(series: dict[str, list[tuple[float, float]]]):
    fig, ax = pyplot().subplots(figsize=(6, 4.5))
    for model, points in series.items():
        ax.plot([100 * f for f, _ in points], [a for _, a in points], marker="o", label=model)
    ax.set(xscale="log", xlabel="pre-training examples (% of the data set)", ylabel="linear 5-shot top-1 (%)",
           title="5-shot accuracy vs pre-training set size")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def benchmark_devices(runs: Runs) -> str:
    names = {r.results.get("device", {}).get("name") for r in runs.of("benchmark")} - {None}
    return ", ".join(sorted(names)) or "no benchmark run found"
