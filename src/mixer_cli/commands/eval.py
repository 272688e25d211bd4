"""`mixer eval --from CKPT`: top-1, top-5 and ReaL top-1 of a checkpoint on a data set's evaluation split,
and per-class accuracy, precision, recall and F1 with their macro averages and the confusion matrix.

Any file `load_mixer` reads is evaluated with the preprocessing it records (resolution, mean/std,
interpolation, crop); conf/eval.yaml leaves those values null so that the checkpoint's fill them,
and a value the user sets wins. The pass is the training's final evaluation (the Evaluator's metrics
in Lightning's test loop over the DataModule's evaluation split): every image of the split is counted
exactly once however many devices share it, no padding, no dropped last batch. With
`data.real_labels=real.json` the ImageNet validation images are scored against the reassessed
labels as well (evaluate/real_labels.py). The per-class metrics (train/module.py's ClassMetrics) are
counted in the same pass and written as per_class.csv, confusion_matrix.csv and confusion_matrix.png,
with the class names the model carries.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from omegaconf import DictConfig, OmegaConf

from mixer_cli.config.run_dirs import Run
from mixer_cli.core.console import console
from mixer_cli.core.errors import UserError
from mixer_cli.core.files import csv_table
from mixer_cli.data import build_dataset
from mixer_cli.data import class_names as data_class_names
from mixer_cli.evaluate.real_labels import real_labels_for
from mixer_cli.models import load_mixer
from mixer_cli.models.contract import class_names, describe, naming_classes
from mixer_cli.reporting.confusion import plot_confusion_matrix
from mixer_cli.reporting.runs import print_summary
from mixer_cli.train.datamodule import ImageDataModule
from mixer_cli.train.fit import device_preprocessing
from mixer_cli.train.launch import check_launch
from mixer_cli.train.module import CONFUSION_MATRIX_MAX_CLASSES, Evaluator
from mixer_cli.train.trainer import quiet_lightning


def with_checkpoint_preprocessing(cfg: DictConfig, data_config: dict) -> DictConfig:
    """A copy of cfg whose null preprocessing values are the checkpoint's, given as timm's data
    config of the model (`timm.data.resolve_data_config({}, model=model)`)."""
    channels, height, _ = data_config["input_size"]
    from_checkpoint = {
        "data.channels": channels,
        "data.img_size": height,
        "data.mean": list(data_config["mean"]),
        "data.std": list(data_config["std"]),
        "data.interpolation": data_config["interpolation"],
        "aug.eval_crop_mode": data_config["crop_mode"],
        "aug.eval_crop_pct": data_config["crop_pct"],
    }
    cfg = copy.deepcopy(cfg)
    for key, value in from_checkpoint.items():
        if OmegaConf.select(cfg, key) is None:
            OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def check_fits(pretrained_cfg: dict, data: DictConfig, checkpoint: Path) -> None:
    """The data must have the checkpoint's classes and input shape; say so before reading any image."""
    channels, size, _ = pretrained_cfg["input_size"]
    if pretrained_cfg["num_classes"] != data.num_classes:
        raise UserError(f"{checkpoint} predicts {pretrained_cfg['num_classes']} classes, the data has "
                        f"data.num_classes={data.num_classes}; evaluate it on its own label space, or fine-tune it "
                        "first (mixer finetune --from ...)")
    if (data.channels, data.img_size) != (channels, size):
        raise UserError(f"{checkpoint} takes {channels}-channel {size}x{size} images, the config asks for "
                        f"{data.channels}-channel {data.img_size}x{data.img_size}; leave data.img_size unset to use "
                        "the checkpoint's, or grow the model first (mixer finetune --res)")


def default_name(checkpoint: Path) -> str:
    """The checkpoint's name; a run's last.ckpt or best.ckpt is named after its run (demo-last)."""
    run_config = checkpoint.parent / "config.yaml"
    run_name = OmegaConf.load(run_config).get("name") if run_config.is_file() else None
    return f"{run_name}-{checkpoint.stem}" if run_name else checkpoint.stem


class PassingBar(RichProgressBar):
    """Lightning's bar, gone once the pass ends: the table follows."""

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_test_epoch_end(trainer, pl_module)
        if self.progress is not None and self.test_progress_bar_id is not None:
            self.progress.update(self.test_progress_bar_id, visible=False)


def eval_trainer(e: DictConfig) -> L.Trainer:
    """A Trainer that only evaluates, on `eval.devices` devices (several: one process each, DDP)."""
    return L.Trainer(accelerator=e.accelerator, devices=e.devices, num_nodes=e.num_nodes, precision=e.precision,
                     logger=False, enable_checkpointing=False, enable_model_summary=False, callbacks=[PassingBar()])


def measure(trainer: L.Trainer, module, dataset, batch_size: int, num_workers: int) -> dict:
    """top1, top5 and num_samples (and real_top1, real_num_samples when the module has the ReaL metric)
    of one exact pass over `dataset`, `batch_size` images per device; the same on every rank."""
    (metrics,) = trainer.test(module, datamodule=ImageDataModule(dataset, batch_size, num_workers), verbose=False)
    if not metrics["test/num_samples"]:
        raise UserError("the evaluation split holds no images; check data.eval_path")
    measured = {"top1": metrics["test/top1"], "top5": metrics["test/top5"],
                "num_samples": int(metrics["test/num_samples"])}
    if "test/real_top1" in metrics:
        counted = int(metrics["test/real_num_samples"])
        measured |= {"real_top1": metrics["test/real_top1"] if counted else None, "real_num_samples": counted}
    return measured


def evaluate_checkpoint(cfg: DictConfig, checkpoint: Path) -> dict:
    """Evaluate the checkpoint on cfg.data's evaluation split; print a table and write
    runs/eval/<timestamp>-<name>/{config.yaml, results.json}. Returns the results."""
    from timm.data import resolve_data_config

    checkpoint = Path(checkpoint).resolve()
    quiet_lightning()
    check_launch(cfg.eval, "eval")  # e.g. nodes that no launcher starts: Lightning would wait for them
    model = load_mixer(checkpoint)
    cfg = with_checkpoint_preprocessing(cfg, resolve_data_config({}, model=model))
    cfg.name = cfg.name or default_name(checkpoint)
    check_fits(model.pretrained_cfg, cfg.data, checkpoint)
    model.pretrained_cfg = naming_classes(model.pretrained_cfg, cfg.eval.get("class_map"), data_class_names(cfg.data))
    dataset, real = real_labels_for(cfg.data, build_dataset(cfg.data, cfg.aug, "test"))
    # The training's module, for its evaluation: metrics, and device-side decoding (data.decode).
    module = Evaluator(model, cfg.data.num_classes, real_top1=real, per_class=True, **device_preprocessing(cfg))
    trainer = eval_trainer(cfg.eval)
    with Run(cfg, "eval") as run:  # open before other ranks launch: they find it through the environment
        start = time.perf_counter()
        measured = measure(trainer, module, dataset, cfg.eval.batch_size, cfg.data.get("num_workers", 0))
        per_class = module.class_results
        title = f"{cfg.name} ({describe(model)}, {cfg.data.source})"
        results = {
            "command": "eval", "name": cfg.name, "from": str(checkpoint),
            "model": describe(model), "parameters": sum(p.numel() for p in model.parameters()),
            "data": cfg.data.source, "eval_path": cfg.data.get("eval_path"), "num_classes": cfg.data.num_classes,
            "preprocessing": {"img_size": cfg.data.img_size, "mean": list(cfg.data.mean), "std": list(cfg.data.std),
                              "interpolation": cfg.data.interpolation, "crop_mode": cfg.aug.eval_crop_mode,
                              "crop_pct": cfg.aug.eval_crop_pct},
            **measured,
            **macro_averages(per_class),
            "per_class": write_class_reports(run, per_class, class_names(model.pretrained_cfg), title),
            "devices": trainer.world_size,
            "eval_seconds": round(time.perf_counter() - start, 1),
            "run_dir": str(run.path),
        }
        run.finish(results)
    if trainer.is_global_zero:
        print_eval(results)
    return results


MACRO_SCORES = ("accuracy", "precision", "recall", "f1")


def macro_averages(per_class: dict) -> dict:
    """The mean of each per-class score over the classes the split has images of or the model predicted
    (scikit-learn's macro average): a class with neither has nothing but 0/0 to add."""
    scored = measured_classes(per_class)
    return {f"macro_{name}": per_class[name][scored].double().mean().item() for name in MACRO_SCORES}


def measured_classes(per_class: dict):
    return (per_class["support"] + per_class["predicted"]) > 0


def write_class_reports(run: Run, per_class: dict, names: list[str], title: str) -> dict:
    """per_class.csv, and confusion_matrix.csv and .png where there is one; what results.json says of them."""
    run.write("per_class.csv", per_class_csv(per_class, names))
    matrix = per_class["confusion_matrix"]
    if matrix is not None:
        run.write("confusion_matrix.csv", confusion_csv(matrix, names))
        if run.is_main:
            plot_confusion_matrix(matrix.numpy(), names, run.path / "confusion_matrix.png", title)
    multi_label = per_class["multi_label"]
    return {
        "file": "per_class.csv",
        "targets": "multi-label" if multi_label else "single-label",
        "accuracy": ("(tp + tn) / images: each class's yes/no decision, sigmoid(logit) > 0.5" if multi_label else
                     "recall: the share of the class's images predicted as it (one label per image)"),
        "zero_division": 0,
        "macro_classes": int(measured_classes(per_class).sum()),
        "confusion_matrix": (["confusion_matrix.csv", "confusion_matrix.png"] if matrix is not None
                             else skipped_matrix(multi_label, len(names))),
    }


def skipped_matrix(multi_label: bool, num_classes: int) -> str:
    if multi_label:
        return "skipped: multi-label targets give an image no single true class (its row)"
    return (f"skipped: {num_classes:,} classes, above the {CONFUSION_MATRIX_MAX_CLASSES:,} a confusion matrix is "
            "kept for (it is classes x classes counts)")


def per_class_csv(per_class: dict, names: list[str]) -> str:
    rows = [[i, name, per_class["support"][i].item(), per_class["predicted"][i].item(),
             *(f"{per_class[score][i].item():.6f}" for score in MACRO_SCORES)] for i, name in enumerate(names)]
    return csv_table(["class", "name", "support", "predicted", *MACRO_SCORES], rows)


def confusion_csv(matrix, names: list[str]) -> str:
    """Rows: true class, columns: predicted class, each named."""
    return csv_table(["true \\ predicted", *names], [[name, *row] for name, row in zip(names, matrix.tolist())])


def print_eval(results: dict) -> None:
    p = results["preprocessing"]
    shown = {k: results[k] for k in ("top1", "top5", "real_top1", "num_samples", "real_num_samples") if k in results}
    shown |= {f"macro {name}": f"{100 * results[f'macro_{name}']:.2f}%" for name in MACRO_SCORES}
    if results["per_class"]["targets"] == "single-label":
        shown["macro accuracy"] += " (= macro recall: one label per image)"
    shown["preprocessing"] = (f"{p['img_size']}px, {p['interpolation']}, {p['crop_mode']} crop {p['crop_pct']:g}, "
                              f"mean {p['mean']}, std {p['std']}")
    print_summary(shown, title=f"mixer eval {results['name']} ({results['model']}, {results['data']})")
    console.print(f"results: {results['run_dir']}/results.json", highlight=False)
    matrix = results["per_class"]["confusion_matrix"]
    console.print(f"per class: {results['run_dir']}/per_class.csv; confusion matrix: "
                  + (f"{results['run_dir']}/confusion_matrix.png" if isinstance(matrix, list) else matrix),
                  highlight=False)
