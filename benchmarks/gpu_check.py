"""`make gpu-check`: every check that needs a CUDA GPU, in one command, within 8 minutes on one GPU.

CI has no GPU, so what runs only there is gathered here and run whenever one is at hand:
- the GPU tests (`pytest -m cuda`: tests/test_gpu.py): nvJPEG and the device transforms against the
  CPU path, compiled against eager losses, a bf16 fit, 1-GPU DDP and FSDP fits, stop and resume;
- `mixer benchmark` in bf16: ours, timm's MlpMixer and ViT, B/16 and L/16, eager and compiled, the
  token-mixing layouts, CUDA graphs (compile mode reduce-overhead), with MFU (% of the matmul peak);
- `mixer data bench --device cuda`: the input pipelines, and the CPU cores each needs per GPU at
  Mixer-B/16's training speed.
Each job runs in its own process with its own time limit, in order of what the goals need most, so
that a slow compile or a crash costs that job only; a job that no longer fits in the time left is
skipped and says so. report.md (the goals, then every figure) and gpu-check.json go to the folder
$GPU_CHECK_DIR names (default runs/gpu-check/<time>), with each job's log and results beside them.

The machine runs this on its own python3 and torch: the packages its image lacks are installed from
.whl/ (`make gpu-wheels` fills it on a machine with a registry) into .gpu-site/ first.
Without CUDA it ends at once with one line and exit status 2. `--rehearse` runs the same jobs on
the CPU at toy sizes (tests/test_gpu_check.py), so the script is known to work before a GPU is lent.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUDGET_S = 450  # of the 8 minutes: the rest for start-up, installing the wheels and the report
MIN_JOB_S = 20  # a job is not started with less time than this left
GOALS = {"mfu": 0.45, "mixer_vs_vit_infer": 1.3, "cores_per_gpu": 2.0}


@dataclass
class Job:
    name: str
    args: list[str]  # after `python -m`
    cap_s: float
    about: str
    status: str = "not run"
    seconds: float = 0.0
    outputs: dict = field(default_factory=dict)


def bench(name: str, models: list[str], about: str, cap_s: float, *extra: str) -> Job:
    return Job(name, ["mixer_cli", "benchmark", "precision=bf16", f"models=[{','.join(models)}]",
                      "modes=[infer,train]", *extra], cap_s, about)


def plan_jobs(rehearse: bool) -> list[Job]:
    """The jobs in the order the goals need them. A rehearsal keeps the jobs and shrinks them: Mixer-S/32
    for B/16 (at 32 pixels, one token), no ViT or L/16, one step, no compile (CPU compiles take minutes)."""
    mixer = f"mixer-{family(rehearse)}"
    vit, large = ([], []) if rehearse else (["vit-b16"], ["mixer-l16", "timm-mixer-l16", "vit-l16"])
    layouts = [mixer, f"{mixer}-matmul", f"{mixer}-einsum", f"timm-{mixer}", *vit]
    sizes = ["res=[224]", "batch_sizes=[256]", "warmup=3", "iters=10", "repeats=2", "memory_batches=[64,128]"]
    compiled, graphs = ["compile=default", "memory=false"], ["compile=reduce-overhead", "memory=false"]
    if rehearse:
        sizes = ["res=[32]", "batch_sizes=[2]", "warmup=0", "iters=1", "repeats=1", "memory_batches=[2,4]",
                 "device=cpu"]
        compiled = graphs = ["compile=false", "memory=false"]
    jobs = [
        Job("tests", ["pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"], 200,
            "the GPU tests (pytest -m cuda)"),
        bench("eager", layouts + large, "bf16, eager: ours in each layout, timm's MlpMixer, ViT", 100, *sizes),
    ]
    jobs += [bench(f"compiled-{m}", [m], f"bf16, compiled (default mode): {m}", 100, *sizes, *compiled)
             for m in (mixer, *vit, f"{mixer}-matmul")]
    jobs.append(Job("data-bench", ["mixer_cli", "data", "bench", "--seconds", "0.2" if rehearse else "4",
                                   "--images", "2" if rehearse else "32", "--device", "cpu" if rehearse else "cuda"],
                    60, f"input pipelines: CPU cores per GPU at {mixer}'s training speed"))
    jobs += [bench(f"cudagraphs-{m}", [m], f"bf16, compiled with CUDA graphs (reduce-overhead): {m}", 100,
                   *sizes, *graphs) for m in (mixer, *vit)]
    jobs += [bench(f"compiled-{m}", [m], f"bf16, compiled (default mode): {m}", 120, *sizes, *compiled)
             for m in (f"{mixer}-einsum", f"timm-{mixer}", *large)]
    return jobs


def family(rehearse: bool) -> str:
    """The Mixer the goals are about: B/16; S/32 stands in for it in a rehearsal."""
    return "s32" if rehearse else "b16"


# ---------------------------------------------------------------- running
def child_env(site: Path) -> dict[str, str]:
    paths = [str(site), str(REPO / "src"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "PYTHONUNBUFFERED": "1",
            "COLUMNS": "160"}


def install_wheels(site: Path) -> str:
    """The packages the machine's image lacks, from .whl/ into `site` (once per set of wheels)."""
    wheels = sorted((REPO / ".whl").glob("*.whl"))
    if not wheels:
        return "no .whl/ folder: the machine's own packages"
    stamp = site / ".installed"
    names = "\n".join(w.name for w in wheels)
    if not (stamp.is_file() and stamp.read_text() == names):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)], check=True)
        stamp.write_text(names)
    return f"{len(wheels)} wheels from .whl/"


def run_job(job: Job, out: Path, env: dict[str, str], time_left: float) -> None:
    folder = out / job.name
    folder.mkdir(parents=True, exist_ok=True)
    args = [*job.args]
    if job.args[0] == "pytest":
        args += [f"--junitxml={folder / 'junit.xml'}"]
    elif job.args[1] == "benchmark":
        args += [f"run_root={folder}"]
    else:
        args += ["--out", str(folder / "data-bench.csv")]
    limit = min(job.cap_s, time_left)
    start = time.perf_counter()
    with open(folder / "log.txt", "w") as log:
        try:
            rc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, timeout=limit).returncode
            job.status = "ok" if rc == 0 else f"failed (exit status {rc})"
        except subprocess.TimeoutExpired:
            job.status = f"stopped at its limit ({limit:.0f} s)"
    job.seconds = time.perf_counter() - start
    job.outputs = read_outputs(job, folder)


def read_outputs(job: Job, folder: Path) -> dict:
    if (folder / "junit.xml").is_file():
        return {"tests": read_junit(folder / "junit.xml")}
    results = sorted(folder.glob("benchmark/*/results.json"))
    if results:
        report = json.loads(results[-1].read_text())
        return {"benchmark": {k: report[k] for k in ("device", "precision", "compile", "matmul_peak_tflop_s",
                                                     "results", "torch")}}
    if (folder / "data-bench.csv").is_file():
        with open(folder / "data-bench.csv", newline="") as f:
            return {"data_bench": [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]}
    return {}


def _number(value: str):
    try:
        return float(value)
    except ValueError:
        return value or None


def read_junit(path: Path) -> list[dict]:
    tests = []
    for case in ET.parse(path).iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (found.get("message") or "").splitlines()[0][:200] if found.get("message") else ""
        tests.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)),
                      "message": message})
    return tests


# ---------------------------------------------------------------- the figures
def benchmark_rows(jobs: list[Job]) -> list[dict]:
    """Every benchmark row with the job's compile mode and the device's matmul peak."""
    rows = []
    for job in jobs:
        report = job.outputs.get("benchmark")
        for r in (report or {}).get("results", []):
            if "img_s" in r:
                rows.append({**r, "job": job.name, "compile": report["compile"] or "eager",
                             "matmul_peak_tflop_s": report["matmul_peak_tflop_s"]})
    return rows


def best(rows: list[dict], mode: str, prefix: str, compiled: bool) -> dict | None:
    """The fastest row of a model family (our Mixer in any layout, or ViT) in a mode."""
    found = [r for r in rows if r["mode"] == mode and r["model"].startswith(prefix)
             and (r["compile"] != "eager") == compiled]
    return max(found, key=lambda r: r["img_s"], default=None)


def goals(rows: list[dict], pipeline: list[dict], size: str = "b16") -> list[dict]:
    """The issue's goals against what was measured (compiled, bf16, the best layout and mode)."""
    out = []
    train = best(rows, "train", f"mixer-{size}", compiled=True)
    out.append({"goal": f"Mixer-{size.upper()[0]}/{size[1:]} training, compiled bf16: % of the matmul peak",
                "target": f">= {GOALS['mfu']:.0%}",
                "measured": None if train is None else f"{train['fraction_of_matmul_peak']:.1%} ({train['model']}, "
                f"{train['compile']}, {train['img_s']:.0f} img/s)",
                "met": None if train is None else train["fraction_of_matmul_peak"] >= GOALS["mfu"]})
    mixer, vit = best(rows, "infer", f"mixer-{size}", True), best(rows, "infer", f"vit-{size}", True)
    ratio = mixer["img_s"] / vit["img_s"] if mixer and vit else None
    out.append({"goal": "Mixer / ViT inference throughput, compiled bf16, best of each",
                "target": f">= {GOALS['mixer_vs_vit_infer']}",
                "measured": None if ratio is None else f"{ratio:.2f} ({mixer['model']} {mixer['img_s']:.0f} / "
                f"{vit['model']} {vit['img_s']:.0f} img/s)",
                "met": None if ratio is None else ratio >= GOALS["mixer_vs_vit_infer"]})
    for recipe in ("JFT", "ImageNet"):
        rows_of = [r for r in pipeline if str(r["pipeline"]).startswith(recipe)
                   and r.get("cores_per_device") is not None]
        fewest = min(rows_of, key=lambda r: r["cores_per_device"], default=None)
        out.append({"goal": f"CPU cores per GPU, {recipe} pipeline at Mixer training speed",
                    "target": f"<= {GOALS['cores_per_gpu']:g}",
                    "measured": None if fewest is None else f"{fewest['cores_per_device']:.2f} ({fewest['pipeline']})",
                    "met": None if fewest is None else fewest["cores_per_device"] <= GOALS["cores_per_gpu"]})
    return out


def ratios(rows: list[dict]) -> list[dict]:
    """Each token-mixing layout against transpose (mixer-b16-matmul / mixer-b16), and each compiled
    row against the same model eager, in the same mode."""
    def find(model: str, mode: str, compile: str) -> dict | None:
        return next((x for x in rows if (x["model"], x["mode"], x["compile"]) == (model, mode, compile)), None)

    out = []
    for r in rows:
        layout_of = r["model"].rsplit("-", 1)[0] if r["model"].startswith("mixer-") and r["model"].count("-") == 2 \
            else None
        pairs = [(layout_of, r["compile"], f"{r['model']} / {layout_of} ({r['mode']}, {r['compile']})")] \
            if layout_of else []
        if r["compile"] != "eager":
            pairs.append((r["model"], "eager", f"{r['model']} {r['compile']} / eager ({r['mode']})"))
        for model, compile, what in pairs:
            base = find(model, r["mode"], compile)
            if base:
                out.append({"what": what, "ratio": r["img_s"] / base["img_s"]})
    return out


# ---------------------------------------------------------------- the report
def markdown(summary: dict) -> str:
    lines = [f"# GPU check: {summary['device']}", ""]
    if summary["rehearsal"]:
        lines += ["**Rehearsal on the CPU at toy sizes: these figures say nothing about a GPU.**", ""]
    lines += [f"{summary['started']}, torch {summary['torch']}, Python {summary['python']}, "
              f"{summary['packages']}; {summary['seconds']:.0f} s of a {summary['budget_s']:.0f} s budget.", "",
              "## Goals", "", "| goal | target | measured | met |", "|---|---|---|---|"]
    for g in summary["goals"]:
        met = "-" if g["met"] is None else ("yes" if g["met"] else "**no**")
        lines.append(f"| {g['goal']} | {g['target']} | {g['measured'] or 'not measured'} | {met} |")
    lines += ["", "## Jobs", "", "| job | what | status | seconds |", "|---|---|---|---:|"]
    lines += [f"| {j['name']} | {j['about']} | {j['status']} | {j['seconds']:.0f} |" for j in summary["jobs"]]
    tests = summary["tests"]
    if tests:
        counts = {o: sum(t["outcome"] == o for t in tests) for o in ("passed", "failed", "error", "skipped")}
        lines += ["", "## Tests", "", ", ".join(f"{n} {o}" for o, n in counts.items() if n), ""]
        lines += [f"- {t['outcome']}: `{t['test']}` {t['message']}" for t in tests
                  if t["outcome"] in ("failed", "error")]
    if summary["benchmark"]:
        lines += ["", "## Throughput (bf16)", "",
                  "| model | mode | compile | batch | img/s | TFLOP/s | % of matmul peak |",
                  "|---|---|---|---:|---:|---:|---:|"]
        lines += [f"| {r['label']} | {r['mode']} | {r['compile']} | {r['batch']} | {r['img_s']:.0f} | "
                  f"{r['achieved_tflop_s']:.1f} | {r['fraction_of_matmul_peak']:.1%} |" for r in summary["benchmark"]]
        peaks = sorted({round(r["matmul_peak_tflop_s"], 1) for r in summary["benchmark"]})
        lines += ["", f"Matmul peak measured by each job: {', '.join(map(str, peaks))} TFLOP/s."]
    if summary["ratios"]:
        lines += ["", "## Layouts and compile modes", "", "| ratio of img/s | value |", "|---|---:|"]
        lines += [f"| {r['what']} | {r['ratio']:.2f} |" for r in summary["ratios"]]
    if summary["data_bench"]:
        lines += ["", "## Input pipelines", "", "| pipeline | img/s per core | device img/s | cores per GPU | "
                  "device share |", "|---|---:|---:|---:|---:|"]
        for r in summary["data_bench"]:
            lines.append(f"| {r['pipeline']} | {r['img_per_s_per_core']} | {r.get('device_img_per_s') or ''} | "
                         f"{r.get('cores_per_device') or ''} | {r.get('device_share') or ''} |")
    return "\n".join(lines) + "\n"


def summarise(jobs: list[Job], started: str, seconds: float, packages: str, rehearse: bool, budget: float) -> dict:
    import torch

    rows = benchmark_rows(jobs)
    pipeline = next((j.outputs["data_bench"] for j in jobs if "data_bench" in j.outputs), [])
    device = "CPU (rehearsal)" if rehearse else torch.cuda.get_device_name(0)
    return {
        "device": device, "rehearsal": rehearse, "started": started, "seconds": seconds, "budget_s": budget,
        "torch": torch.__version__, "python": sys.version.split()[0], "packages": packages,
        "goals": goals(rows, pipeline, family(rehearse)),
        "jobs": [{"name": j.name, "about": j.about, "status": j.status, "seconds": j.seconds} for j in jobs],
        "tests": next((j.outputs["tests"] for j in jobs if "tests" in j.outputs), []),
        "benchmark": rows, "ratios": ratios(rows), "data_bench": pipeline,
    }


def training_speed(jobs: list[Job], size: str) -> list[str]:
    """`--throughput` for the data bench: the fastest Mixer-B/16 training so far, compiled if it ran."""
    rows = benchmark_rows(jobs)
    mixer = f"mixer-{size}"
    fastest = best(rows, "train", mixer, compiled=True) or best(rows, "train", mixer, compiled=False)
    return ["--throughput", f"{fastest['img_s']:.1f}"] if fastest else []


def out_folder() -> Path:
    named = os.environ.get("GPU_CHECK_DIR")
    return Path(named) if named else REPO / "runs" / "gpu-check" / dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rehearse", action="store_true", help="the same jobs on the CPU at toy sizes")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all jobs together")
    parser.add_argument("--only", nargs="*", help="run only the jobs with these names")
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("gpu-check: torch is not installed for this python", file=sys.stderr)
        return 2
    if not args.rehearse and not torch.cuda.is_available():
        print("gpu-check needs a CUDA GPU and torch sees none here; nothing was run", file=sys.stderr)
        return 2
    start, started = time.perf_counter(), dt.datetime.now().isoformat(timespec="seconds")
    out = out_folder()
    out.mkdir(parents=True, exist_ok=True)
    site = REPO / ".gpu-site"
    site.mkdir(exist_ok=True)
    packages = install_wheels(site)
    env = child_env(site)
    jobs = [j for j in plan_jobs(args.rehearse) if not args.only or j.name in args.only]
    for job in jobs:
        left = args.budget - (time.perf_counter() - start)
        if left < MIN_JOB_S:
            job.status = f"skipped: {left:.0f} s of the budget left"
            continue
        if job.name == "data-bench":
            job.args += training_speed(jobs, family(args.rehearse))
        print(f"gpu-check: {job.name} ({job.about}), at most {min(job.cap_s, left):.0f} s", flush=True)
        run_job(job, out, env, left)
        print(f"gpu-check: {job.name}: {job.status} in {job.seconds:.0f} s", flush=True)
    summary = summarise(jobs, started, time.perf_counter() - start, packages, args.rehearse, args.budget)
    (out / "gpu-check.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(markdown(summary))
    print(f"gpu-check: report in {out / 'report.md'}", flush=True)
    ok = all(j.status == "ok" for j in jobs if not j.status.startswith("skipped"))
    return 0 if ok and not any(t["outcome"] in ("failed", "error") for t in summary["tests"]) else 1


if __name__ == "__main__":
    sys.exit(main())
