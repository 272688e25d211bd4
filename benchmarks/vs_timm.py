"""`mixer pretrain` against timm's own train.py, end to end, on the same digits.

One epoch plus evaluation of the demo network on N digits (the demo's 4,000 training digits repeated
to N, 60,000 by default, like MNIST), the 1,000 demo test digits for evaluation: ours reads them as
shards (`mixer data write`), timm's train.py as an image folder of PNGs, as each tool's users hold
their data. Same network (patch 4, C=128, 4 blocks, D_S=64, D_C=512), batch, AdamW, cosine schedule
without warm-up, gradient clipping, no augmentation, the same loader workers. The two run in turn
(A B, B A, A B ...), so a busy machine slows both alike; both run timm's network with the exact
(erf) GELU of the wrapper's MlpMixer, not the paper's tanh approximation the demo recipe uses (PyTorch's
CPU kernel for it takes twice as long). The ratio is timm's wall time / ours (> 1: we are faster), of
the best runs (as `mixer benchmark` keeps each model's best sample: a shared machine only ever slows
a run) and of the medians.

timm's train.py is not in timm's wheel: bring it from the pytorch-image-models repository. The
wrapper registers the demo network under timm as `mixer_demo` (see the team's peers folder).

    python benchmarks/vs_timm.py --timm-train /tmp/timm_train.py --timm-wrapper PATH/timm_train_demo.py

Writes bench.csv (one row per run), results.json and bench.png into --out.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mixer_cli.data.demo import demo_arrays

# The settings both tools run with; each command below spells them in its own tool's words.
BATCH = 128
LR = 0.002
WEIGHT_DECAY = 0.05
CLIP = 1.0
MEAN, STD = 0.1307, 0.3081


def write_folder(root: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """An image folder: root/split/<class>/<n>.png."""
    for c in np.unique(labels):
        (root / split / str(c)).mkdir(parents=True, exist_ok=True)
    for n, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(root / split / str(label) / f"{n:06d}.png")


def prepare(work: Path, num_images: int, mixer: str) -> tuple[Path, Path]:
    """The digits as an image folder (timm) and as shards (ours), written once per size."""
    folder, shards = work / f"folder-{num_images}", work / f"shards-{num_images}"
    if (shards / "test" / "index.json").is_file():
        return folder, shards
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(shards, ignore_errors=True)
    x, y = demo_arrays("train")
    repeat = -(-num_images // len(y))
    write_folder(folder, "train", np.tile(x, (repeat, 1, 1))[:num_images], np.tile(y, repeat)[:num_images])
    write_folder(folder, "test", *demo_arrays("test"))
    for split in ("test", "train"):
        subprocess.run([mixer, "data", "write", "--from", str(folder / split), "--to", str(shards / split)],
                       check=True, stdout=subprocess.DEVNULL)
    return folder, shards


def mixer_command(mixer: str, shards: Path, out: Path, workers: int, gelu: str = "exact") -> list[str]:
    return [mixer, "pretrain", "data.source=shards", f"data.train_path={shards / 'train'}",
            f"data.eval_path={shards / 'test'}", f"data.num_workers={workers}", f"data.global_batch={BATCH}",
            f"optim.lr={LR}", f"optim.weight_decay={WEIGHT_DECAY}", f"trainer.grad_clip={CLIP}",
            "sched.warmup_steps=0", "sched.decay=cosine", "aug.pad_crop=0", "trainer.epochs=1",
            "trainer.accelerator=cpu", f"model.gelu={gelu}", f"run_root={out}"]


def timm_command(wrapper: Path, folder: Path, out: Path, workers: int) -> list[str]:
    return [sys.executable, str(wrapper), str(folder), "--device", "cpu", "--train-split", "train",
            "--val-split", "test", "--model", "mixer_demo", "--in-chans", "1", "--input-size", "1", "28", "28",
            "--num-classes", "10", "-b", str(BATCH), "--epochs", "1", "--opt", "adamw", "--lr", str(LR),
            "--weight-decay", str(WEIGHT_DECAY), "--sched", "cosine", "--warmup-epochs", "0", "--smoothing", "0",
            "--no-aug", "--mean", str(MEAN), "--std", str(STD), "-j", str(workers), "--clip-grad", str(CLIP),
            "--output", str(out)]


def timed(command: list[str], env: dict, log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(command, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{command[1]} failed (exit {done.returncode}); its output is in {log}")
    return seconds


def plot(rows: list[dict], path: Path) -> None:
    from mixer_cli.core.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for tool, colour in (("mixer", "tab:blue"), ("timm", "tab:orange")):
        runs = [r for r in rows if r["tool"] == tool]
        ax.plot([r["repeat"] for r in runs], [r["seconds"] for r in runs], "o-", color=colour, label=tool)
    ax.set_xticks(sorted({r["repeat"] for r in rows}))
    ax.set_xlabel("repeat")
    ax.set_ylabel("one epoch + evaluation (s)")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm-train", type=Path, required=True, help="pytorch-image-models' train.py")
    parser.add_argument("--timm-wrapper", type=Path, required=True, help="timm_train_demo.py (registers mixer_demo)")
    parser.add_argument("--images", type=int, default=60_000, help="training images (the demo digits repeated)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="loader workers of both tools")
    parser.add_argument("--work", type=Path, default=Path("/tmp/mixer-vs-timm"), help="data and run folders")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark-vs-timm"))
    parser.add_argument("--only", choices=("mixer", "timm"), help="run one tool only (profiling)")
    parser.add_argument("--gelu", choices=("exact", "tanh"), default="exact",
                        help="our network's GELU (timm's MlpMixer: exact; the demo recipe: tanh)")
    args = parser.parse_args()
    for path in (args.timm_train, args.timm_wrapper):
        if not path.is_file():
            sys.exit(f"not a file: {path}")
    mixer = shutil.which("mixer") or str(Path(sys.executable).with_name("mixer"))
    folder, shards = prepare(args.work, args.images, mixer)
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TIMM_TRAIN=str(args.timm_train.resolve()))
    commands = {"mixer": mixer_command(mixer, shards, args.work / "runs-mixer", args.workers, args.gelu),
                "timm": timm_command(args.timm_wrapper.resolve(), folder, args.work / "runs-timm", args.workers)}
    tools = [args.only] if args.only else ["mixer", "timm"]
    rows = []
    for repeat in range(args.repeats):
        for tool in tools if repeat % 2 == 0 else tools[::-1]:
            seconds = timed(commands[tool], env, args.out / f"{tool}-{repeat}.log")
            rows.append({"repeat": repeat, "tool": tool, "seconds": round(seconds, 2)})
            print(f"repeat {repeat}: {tool:5s} {seconds:6.1f} s", flush=True)
    with open(args.out / "bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["repeat", "tool", "seconds"])
        writer.writeheader()
        writer.writerows(rows)
    seconds = {t: [r["seconds"] for r in rows if r["tool"] == t] for t in tools}
    best = {t: min(s) for t, s in seconds.items()}
    median = {t: statistics.median(s) for t, s in seconds.items()}
    result = {"images": args.images, "workers": args.workers, "repeats": args.repeats, "gelu": args.gelu,
              "best_s": best, "median_s": median}
    if len(tools) == 2:
        result["timm_over_mixer_best"] = round(best["timm"] / best["mixer"], 3)
        result["timm_over_mixer_median"] = round(median["timm"] / median["mixer"], 3)
        print(f"best: mixer {best['mixer']:.1f} s, timm {best['timm']:.1f} s; median: mixer {median['mixer']:.1f} s, "
              f"timm {median['timm']:.1f} s; speed vs timm's train.py = {result['timm_over_mixer_best']:.2f}x "
              f"(best), {result['timm_over_mixer_median']:.2f}x (median); > 1: mixer is faster")
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.out / "bench.png")


if __name__ == "__main__":
    main()
