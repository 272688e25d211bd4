"""The `mixer` command line: Typer parses the options; everything after them is Hydra override
syntax (`recipe=NAME key=value ...`), so every config value is reachable from the command line."""
from __future__ import annotations

import functools
import gc
import os
import sys
from pathlib import Path

import typer
from rich.markup import escape

from mixer_cli.core.console import err_console as err
from mixer_cli.core.errors import UserError

app = typer.Typer(
    name="mixer",
    help="Pre-train, fine-tune and evaluate MLP-Mixer models; reproduce Tolstikhin et al. (2021).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

OVERRIDES = typer.Argument(
    None, metavar="[OVERRIDES]...", help="Hydra overrides: recipe=NAME key=value ...", show_default=False
)


def _version(value: bool) -> None:
    if value:
        from mixer_cli import __version__

        typer.echo(f"mixer {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Pre-train, fine-tune and evaluate MLP-Mixer models; reproduce Tolstikhin et al. (2021)."""


def user_errors(fn):
    """A user's mistake ends in one readable line and exit status 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from hydra.errors import InstantiationException
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        from mixer_cli.core.peers import tell_peers, watch_peers

        resume_collection()
        watch_peers(end_with_peers)
        try:
            return fn(*args, **kwargs)
        except (UserError, MisconfigurationException, InstantiationException) as e:
            # A config's _target_ raised: the cause is what the user must read.
            cause = e.__cause__ if isinstance(e, InstantiationException) and e.__cause__ else e
            line = str(cause).strip().splitlines()[0]
            # escaped: a message may hold brackets (data.tasks=[dtd,svhn]) that rich would read as markup
            err.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
            tell_peers(line, 2)
            raise typer.Exit(2) from None
        except typer.Exit:
            raise
        except Exception as e:
            tell_peers(f"{type(e).__name__}: {e}".splitlines()[0], 1)
            raise
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]: the last complete checkpoint is kept; continue with --resume RUN_DIR")
            raise typer.Exit(130) from None

    return wrapper


def resume_collection() -> None:
    """Collect garbage again once the heavy imports are in, if main() paused it for them.

    torch, Lightning and timm leave some 900,000 objects that live as long as the process; collected
    as they load, they are traversed again at every full collection: a second of a pretrain's
    start-up here. Frozen, later collections look only at the run's own objects."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def end_with_peers(reason: str, status: int) -> None:
    """Another rank of this torchrun launch has failed (core/peers.py): end this one too, now, from the
    watching thread, as the failure would have ended it: one line, its open run discarded."""
    from mixer_cli.config.run_dirs import discard_open_runs

    err.print(f"[bold red]error:[/] {escape(reason)}; this rank ends too", highlight=False, soft_wrap=True)
    discard_open_runs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


CHECKPOINT = typer.Option(..., "--from", help="A Mixer checkpoint (ours, or any format `load_mixer` reads).",
                          dir_okay=False, show_default=False)

CLASS_MAP = typer.Option(None, "--class-map", help="Class names, one per line in class order, for weights that "
                         "carry none.", dir_okay=False, show_default=False)

MULTIRUN = typer.Option(
    False, "--multirun", "-m",
    help="Sweep with Hydra: one run per value of a=1,2,3 overrides (hydra/launcher=submitit_slurm: as SLURM jobs).",
)


RESUME = typer.Option(
    None, "--resume", help="Continue the run in this directory from its last.ckpt (overrides apply on top).",
    file_okay=False,
)


@app.command(
    short_help="Pre-train a Mixer as a recipe says (no recipe: the bundled demo).",
    epilog="Examples: [bold]mixer pretrain[/] (the bundled demo) · "
    "[bold]mixer pretrain recipe=i21k_b16 trainer.devices=8[/] · "
    "[bold]mixer pretrain --resume runs/pretrain/20261125-101500-demo[/] · "
    "[bold]mixer pretrain optim.lr=0.001,0.003 --multirun[/]"
)
@user_errors
def pretrain(
    overrides: list[str] | None = OVERRIDES,
    resume: Path | None = RESUME,
    multirun: bool = MULTIRUN,
):
    """Pre-train a Mixer as a recipe says (no recipe: the bundled demo, minutes on a CPU)."""
    from mixer_cli.commands.pretrain import run_pretrain

    run_pretrain(overrides or [], resume, multirun)


@app.command(
    short_help="Fine-tune a pre-trained Mixer on a target, at a higher resolution too.",
    epilog="Examples: [bold]mixer finetune --from runs/pretrain/20261125-101500-demo/last.ckpt[/] (the demo) · "
    "[bold]mixer finetune --from Mixer-L_16.npz --res 448 recipe=ft_imagenet[/] · "
    "[bold]mixer finetune --from CKPT recipe=ft_cifar10 --multirun[/] (the target's lr grid) · "
    "[bold]mixer finetune --from CKPT recipe=ft_vtab[/] (the 19 VTAB-1k tasks; data.tasks=\\[dtd,svhn] for some)"
)
@user_errors
def finetune(
    overrides: list[str] | None = OVERRIDES,
    checkpoint: Path | None = typer.Option(
        None, "--from", help="Pre-trained model: our .ckpt/.safetensors, the paper's .npz, timm .pth/.safetensors.",
        dir_okay=False, show_default=False,
    ),
    res: int | None = typer.Option(
        None, "--res", help="Fine-tune at this resolution, K x the model's (Appendix C grows the token-mixing MLPs).",
        show_default=False,
    ),
    multirun: bool = typer.Option(
        False, "--multirun", "-m",
        help="Sweep with Hydra: the target's lr grid, or one run per value of a=1,2,3 overrides.",
    ),
    resume: Path | None = typer.Option(
        None, "--resume", file_okay=False,
        help="Continue the run in this directory from its last.ckpt, or a stopped VTAB-1k suite (overrides apply "
             "on top).",
    ),
):
    """Fine-tune a pre-trained Mixer on a target as a recipe says (no recipe: ft_demo, the bundled
    demo's checkpoint): momentum SGD, warmup + cosine, no weight decay, clip 1, a new zero head."""
    from mixer_cli.commands.finetune import run_finetune

    run_finetune(overrides or [], checkpoint, res, multirun, resume)


@app.command(
    "eval",
    short_help="Top-1/5, ReaL and per-class metrics of a checkpoint on a data set.",
    epilog="Examples: [bold]mixer eval --from runs/pretrain/20261125-101500-demo/last.ckpt[/] · "
    "[bold]mixer eval --from Mixer-B_16.npz data=folder data.eval_path=~/imagenet/val data.num_classes=1000 "
    "data.real_labels=real.json[/] · [bold]mixer eval --from CKPT data=cifar10 aug.eval_crop_pct=0.875[/]",
)
@user_errors
def eval_(
    checkpoint: Path = CHECKPOINT,
    class_map: Path | None = CLASS_MAP,
    overrides: list[str] | None = OVERRIDES,
):
    """Top-1 and top-5 (and ReaL top-1 with data.real_labels) of a checkpoint on a data set's evaluation
    split, every image once, with the checkpoint's preprocessing unless overridden; per-class accuracy,
    precision, recall and F1 and the confusion matrix, by class name."""
    from mixer_cli.commands.eval import evaluate_checkpoint

    evaluate_checkpoint(compose_with_paths(overrides or [], "eval", {"eval.class_map": class_map}), checkpoint)


@app.command(
    short_help="A checkpoint's top-k classes for your images (files, folders, globs).",
    epilog="Examples: [bold]mixer predict --from runs/pretrain/20261125-101500-demo/last.ckpt ~/digits/[/] · "
    "[bold]mixer predict --from Mixer-B_16.npz 'photos/*.jpg' --topk 3[/] (ImageNet's class names) · "
    "[bold]mixer predict --from model.safetensors cat.png --class-map classes.txt predict.device=cpu[/]",
)
@user_errors
def predict(
    checkpoint: Path = CHECKPOINT,
    inputs: list[str] = typer.Argument(..., metavar="PATH... [OVERRIDES]...", show_default=False,
                                       help="Image files, folders (every image in them) and globs; then any "
                                       "key=value overrides of conf/predict.yaml."),
    topk: int | None = typer.Option(None, "--topk", help="Classes per image (default: predict.topk = 5).",
                                    show_default=False),
    class_map: Path | None = CLASS_MAP,
):
    """Top-k classes and probabilities of a checkpoint for each image, with the checkpoint's own
    preprocessing; predictions.csv in runs/predict/, a short table here. Unreadable images are listed
    and skipped."""
    from mixer_cli.commands.predict import predict_command

    paths, overrides = split_overrides(inputs)
    overrides += [f"predict.topk={topk}"] if topk is not None else []
    predict_command(compose_with_paths(overrides, "predict", {"predict.class_map": class_map}), checkpoint, paths)


def compose_with_paths(overrides: list[str], config_name: str, paths: dict[str, Path | None]):
    """The config, with the paths that options gave set after composing: a path needs no quoting for
    Hydra's parser that way (Typer has checked it is not a folder)."""
    from omegaconf import OmegaConf

    from mixer_cli.config.compose import compose

    cfg = compose(overrides, config_name=config_name)
    for key, path in paths.items():
        if path is not None:
            OmegaConf.update(cfg, key, str(path))
    return cfg


def split_overrides(args: list[str]) -> tuple[list[str], list[str]]:
    """(paths, Hydra overrides): an argument is an override when it reads key=value and names no file."""
    overrides = [a for a in args if "=" in a.split("/")[0] and not Path(a).exists()]
    return [a for a in args if a not in overrides], overrides


@app.command(
    short_help="Linear few-shot accuracy on a checkpoint's frozen features.",
    epilog="Examples: [bold]mixer fewshot --from runs/pretrain/20261125-101500-demo/last.ckpt[/] (transfer to "
    "scikit-learn's digits) · [bold]mixer fewshot --from CKPT --shots 5 data=imagenet fewshot.seeds=5[/] · "
    "[bold]mixer fewshot --from CKPT data=folder data.train_path=~/pics/train data.eval_path=~/pics/val "
    "data.num_classes=5 fewshot.l2=select[/]"
)
@user_errors
def fewshot(
    checkpoint: Path = typer.Option(..., "--from", help="A Mixer checkpoint (ours, or any format `load_mixer` reads).",
                                    dir_okay=False),
    shots: str | None = typer.Option(
        None, "--shots", help="Shots per class, e.g. 5 or 1,5,10,25 (default: fewshot.shots = 1,5,10,25)."
    ),
    overrides: list[str] | None = OVERRIDES,
):
    """Linear few-shot accuracy on frozen pre-logits (Figures 2 and 4): a closed-form ridge probe to
    {-1, 1} targets (l2 = 2^10) per shot count and seed, one feature pass; a table and results.json."""
    from mixer_cli.commands.fewshot import fewshot_command, parse_shots
    from mixer_cli.config.compose import compose

    cfg = compose(overrides or [], config_name="fewshot")
    fewshot_command(cfg, checkpoint, parse_shots(shots) if shots else list(cfg.fewshot.shots))


@app.command(
    short_help="Our runs beside the paper's Tables 2-3, with plots.",
    epilog="Examples: [bold]mixer report[/] · "
    "[bold]mixer report runs/pretrain runs/finetune runs/benchmark[/] · "
    "[bold]mixer report ~/cluster-runs --out /tmp[/]",
)
@user_errors
def report(
    run_dirs: list[Path] | None = typer.Argument(None, metavar="[RUN_DIR]...", show_default=False,
                                                 help="Run directories or folders of them [default: runs/]."),
    out: Path = typer.Option(Path("runs"), "--out", file_okay=False, help="Write into OUT/report/<timestamp>-report/."),
):
    """Our runs beside the paper's Tables 2 and 3 (report.md, report.csv) and plots of accuracy against
    pre-training cost, throughput and pre-training set size."""
    from mixer_cli.commands.report import build_report

    build_report(run_dirs or [Path("runs")], out)


@app.command(
    short_help="Every recipe beside the paper's numbers and its cost, or one resolved.",
    epilog="Examples: [bold]mixer recipes[/] · [bold]mixer recipes i21k_b16[/] · [bold]mixer recipes ft_cifar10[/]"
)
@user_errors
def recipes(
    name: str | None = typer.Argument(None, help="Show this recipe's whole config, resolved."),
    throughput: float | None = typer.Option(
        None, "--throughput", help="Sustained training TFLOP/s per device for the cost plan (default: the latest "
        "`mixer benchmark` under runs/).", show_default=False,
    ),
):
    """List every recipe beside the paper's numbers (Tables 2-3) with its training FLOPs and predicted
    device-hours, or show one recipe resolved."""
    from mixer_cli.commands.recipes import print_recipe, print_recipes

    if name is None:
        print_recipes(throughput=throughput)
    else:
        print_recipe(name)


@app.command(
    "shuffle-experiment",
    short_help="Figure 4: Mixer vs ResNet under patch and pixel shuffles.",
    epilog="Examples: [bold]mixer shuffle-experiment[/] (the bundled demo, minutes on a CPU) · "
    "[bold]mixer shuffle-experiment shuffle.models=\\[mixer] trainer.epochs=10[/] · "
    "[bold]mixer shuffle-experiment recipe=shuffle_b16_r50[/] (the paper's setting)",
)
@user_errors
def shuffle_experiment(overrides: list[str] | None = OVERRIDES):
    """Figure 4: train a Mixer and a ResNet on original, patch + pixel shuffled and globally
    shuffled inputs; plot linear 5-shot accuracy over training and tabulate each model's drop."""
    from mixer_cli.commands.shuffle import run_experiment
    from mixer_cli.config.compose import compose

    run_experiment(compose(overrides or [], config_name="shuffle"))


@app.command(
    short_help="Figure 5: the token-mixing units as images; the stem's filters.",
    epilog="Examples: [bold]mixer visualize --from runs/pretrain/20261125-101500-demo/last.ckpt[/] · "
    "[bold]mixer visualize --from last.ckpt --blocks 1 --out /tmp/units[/]"
)
@user_errors
def visualize(
    checkpoint: Path = typer.Option(..., "--from", help="A Mixer checkpoint (ours, or any format `load_mixer` reads).",
                                    dir_okay=False),
    blocks: int = typer.Option(3, "--blocks", help="How many of the first blocks' token-mixing MLPs to draw."),
    out: Path | None = typer.Option(None, "--out", file_okay=False,
                                       help="Folder for the PNGs and CSV "
                                       "\\[default: <CKPT's folder>/<CKPT name>-units]"),
):
    """Figure 5: the hidden units of the first token-mixing MLPs as grid-shaped images, each paired
    with its closest opposite-phase unit and sorted by frequency, and the stem's filters."""
    from mixer_cli.commands.visualize import visualize as draw
    from mixer_cli.core.console import console

    for path in draw(checkpoint, out, blocks=blocks):
        console.print(f"wrote {path}")


@app.command(
    short_help="Throughput, FLOP/s and memory: Mixer vs ViT, ResNet and timm.",
    epilog="Examples: [bold]mixer benchmark[/] (Mixer-B/16, timm's MlpMixer, ViT-B/16, BiT-R50x1; about a minute on "
    "a CPU) · [bold]mixer benchmark --train --precision bf16[/] · "
    "[bold]mixer benchmark --res 224,448 models=mixer-l16,vit-l16 batch_sizes=64,128,256[/] · "
    "[bold]mixer benchmark --compile --grad-checkpointing --train models=mixer-h14[/]"
)
@user_errors
def benchmark(
    overrides: list[str] | None = OVERRIDES,
    res: str | None = typer.Option(None, "--res", help="Resolutions, comma-separated, e.g. 224,448 (default 224)."),
    train: bool = typer.Option(
        False, "--train", help="Also time a training step (forward, backward, AdamW) and its memory."
    ),
    precision: str | None = typer.Option(None, "--precision", help="fp32 or bf16 (autocast); default fp32."),
    compile: bool = typer.Option(
        False, "--compile", help="torch.compile every model (compiled in the untimed warm-up)."
    ),
    grad_checkpointing: bool = typer.Option(
        False, "--grad-checkpointing", help="Recompute activations in backward (L, H)."
    ),
):
    """Throughput as in Tables 2-3: img/s and img/s per device (per core on a CPU), best over a
    batch sweep, our Mixers against timm's MlpMixer, ViT and BiT; FLOP/s against the measured
    matmul peak, training memory per image, and the paper's claims as ratios from the same run."""
    from mixer_cli.commands.benchmark import list_overrides, run_benchmark
    from mixer_cli.config.compose import compose

    options = [f"res=[{res}]"] if res else []
    options += ["modes=[infer,train]"] if train else []
    options += [f"precision={precision}"] if precision else []
    options += ["compile=true"] if compile else []
    options += ["grad_checkpointing=true"] if grad_checkpointing else []
    run_benchmark(compose(list_overrides([*(overrides or []), *options]), config_name="benchmark"))


@app.command(
    short_help="A model as safetensors or ONNX, with its spec and preprocessing.",
    epilog="Examples: [bold]mixer export --from runs/finetune/20261125-101500-ft_demo/best.ckpt "
    "--to ft.safetensors[/] · "
    "[bold]mixer export --from Mixer-B_16.npz --to b16.safetensors[/] · "
    "[bold]mixer export --from best.ckpt --to model.onnx[/] (checked with onnxruntime)"
)
@user_errors
def export(
    checkpoint: Path = typer.Option(..., "--from", help="Any file `--from` accepts (.ckpt, .npz, .pth, .safetensors).",
                                    dir_okay=False, show_default=False),
    out: Path = typer.Option(..., "--to", help="The .safetensors or .onnx file to write.", dir_okay=False,
                             show_default=False),
    fmt: str | None = typer.Option(None, "--format", help="safetensors or onnx; default: --to's suffix.",
                                   show_default=False),
):
    """Export a model to safetensors (weights with timm's names, so `load_mixer` and timm load it without
    pickles) or to ONNX (a dynamic batch; onnxruntime's logits checked against PyTorch's before the file
    is kept). Either way the spec, the preprocessing and the class names are in the file's metadata."""
    from mixer_cli.commands.export import export as run_export

    run_export(checkpoint, out, fmt)


data_app = typer.Typer(help="Write webdataset shards; benchmark the input pipeline.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command(
    "write",
    short_help="An image folder, a Hugging Face data set or the demo as webdataset shards and index.json.",
    epilog="Examples: [bold]mixer data write --from ~/pics/train --to /data/pics/train[/] · "
    "[bold]mixer data write --from 'hf:/data/imagenet-1k/data/validation-*.parquet' --to /data/in1k/val[/] · "
    "[bold]mixer data write --from demo --to /tmp/demo-shards --shard-size 500[/] (writes train/ and test/), then "
    "[bold]mixer pretrain data.source=shards data.train_path=/tmp/demo-shards/train "
    "data.eval_path=/tmp/demo-shards/test[/]",
)
@user_errors
def data_write(
    source: str = typer.Option(..., "--from", help="An image folder (one sub-folder per class), hf:PATH (a Hugging "
                               "Face data set's split: a save_to_disk folder or parquet files), or 'demo'."),
    out: Path = typer.Option(..., "--to", help="A new or empty folder for the shards and index.json.", file_okay=False),
    shard_size: int = typer.Option(10_000, "--shard-size", help="Samples per shard (need >= ranks x workers shards)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample order (shards mix the classes)."),
    workers: int = typer.Option(1, "--workers", help="Processes that decode-check the images (CPU cores to use)."),
    image_key: str = typer.Option("image", "--image-key", help="hf:PATH: the column of the images."),
    label_key: str = typer.Option("label", "--label-key", help="hf:PATH: the column of the class numbers."),
):
    """Write an image folder, a Hugging Face data set or the bundled demo as webdataset shards plus
    index.json (classes, counts, shards). Unreadable or corrupt images are reported and skipped."""
    from mixer_cli.commands.data_write import data_write as write

    write(source, out, shard_size, seed, workers, image_key, label_key)


@data_app.command(
    "bench",
    short_help="Input pipeline img/s per CPU core, and the cores a device needs.",
    epilog="Examples: [bold]mixer data bench[/] · "
    "[bold]mixer data bench --seconds 20 --out /tmp/data-bench/bench.csv[/] · "
    "[bold]mixer data bench --throughput 5900[/] (cores per device at 5,900 training img/s per device) · "
    "[bold]mixer data bench --device cuda[/] (and the GPU input pipeline, data.decode=gpu)",
)
@user_errors
def data_bench(
    images: int = typer.Option(32, "--images", help="Distinct synthetic 500x375 JPEGs (~100 KiB) to cycle through."),
    seconds: float = typer.Option(5.0, "--seconds", help="CPU seconds per pipeline, over 5 rounds (the best counts)."),
    out: Path | None = typer.Option(
        None, "--out", help="Also write the table as CSV (and a PNG bar chart beside it).", dir_okay=False
    ),
    throughput: float | None = typer.Option(
        None, "--throughput", help="Training img/s per device for 'cores per device' (default: the newest "
        "`mixer benchmark --train` results).", show_default=False,
    ),
    model: str | None = typer.Option(
        None, "--model", help="The model whose training rate those results give, e.g. mixer-b16 (default: our "
        "first Mixer in them).", show_default=False,
    ),
    runs: Path = typer.Option(Path("runs"), "--runs", help="The run_root `mixer benchmark` wrote to.", file_okay=False),
    device: str | None = typer.Option(
        None, "--device", help="Also time the GPU input pipeline (data.decode=gpu: nvJPEG, crops and RandAugment "
        "on the device) there, e.g. cuda.", show_default=False,
    ),
):
    """Input pipeline img/s per CPU core on ImageNet-like 500x375 JPEGs: each recipe's training
    pipeline (JFT: Inception crop + flip; ImageNet: + RandAugment) and the evaluation, on the float
    path and the uint8 path, beside JPEG decoding alone; and the cores one device needs."""
    from mixer_cli.commands.data_bench import data_bench as run_data_bench

    run_data_bench(images, seconds, out, throughput, model, runs, device)


def main() -> None:
    gc.disable()  # for the imports only: user_errors resumes collection before a command runs
    app(prog_name="mixer")


if __name__ == "__main__":
    sys.exit(main())
