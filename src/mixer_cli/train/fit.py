"""The engine every training command takes (pretrain, finetune, shuffle-experiment, resume, sweeps):

    job = build(cfg, model, build_datasets(cfg))  # batch plan, DataModule, loss, optimiser, schedule,
                                                  # Classifier, the probe the config asks for: all
                                                  # checked, nothing written, nothing started
    job.record["from"] = ...                      # callers compose: callbacks, results to add
    results = job.run("finetune")                 # a run directory (config/run_dirs.Run), Trainer,
                                                  # fit, test, last.ckpt, results.json

The batch split over devices is decided before the Trainer and the DataModule are built. The final
evaluation is Lightning's test loop over the evaluation split (and the dev split, if held out), on
the final weights, whatever the run's length.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset

from mixer_cli.config.run_dirs import Run, resume_config
from mixer_cli.core.compiling import compile_mode, compiled_as
from mixer_cli.core.errors import UserError
from mixer_cli.data import build_dataset, class_names
from mixer_cli.data.device_transforms import NormalizeOnDevice, gpu_decode_transform
from mixer_cli.data.transforms import eval_data_config, hands_over_uint8
from mixer_cli.evaluate.fewshot import fewshot_callback
from mixer_cli.evaluate.real_labels import real_labels_for
from mixer_cli.models import load_mixer
from mixer_cli.models.contract import ACTIVATION_KEY, describe, with_class_names
from mixer_cli.reporting.runs import plot_curves, print_summary
from mixer_cli.train.batching import BatchPlan, plan_batches
from mixer_cli.train.datamodule import ImageDataModule, num_samples
from mixer_cli.train.draws import SeededMicroBatches
from mixer_cli.train.launch import check_launch
from mixer_cli.train.mixup import BatchMixup
from mixer_cli.train.module import Classifier
from mixer_cli.train.trainer import build_callbacks, build_loggers, build_trainer, quiet_lightning


class Splits(NamedTuple):
    train: Dataset  # augmented
    test: Dataset  # the evaluation split
    dev: Dataset | None  # held out of the train split (data.dev_fraction), or None

    def map(self, f) -> Splits:
        return Splits(*(f(d) if d is not None else None for d in self))


def build_datasets(cfg: DictConfig) -> Splits:
    dev = build_dataset(cfg.data, cfg.aug, "dev") if cfg.data.get("dev_fraction") else None
    return Splits(build_dataset(cfg.data, cfg.aug, "train", seed=cfg.seed), build_dataset(cfg.data, cfg.aug, "test"),
                  dev)


def check_data(cfg: DictConfig, train_set, world_size: int) -> None:
    """A training set that cannot give a global batch, or too few streamed shards for ranks x loader
    workers: say so before anything runs or is written."""
    if hasattr(train_set, "check_split"):  # a stream resamples its shards: its epoch is data.train_size
        train_set.check_split(world_size, cfg.data.num_workers)
    elif len(train_set) < cfg.data.global_batch:
        raise UserError(f"data.global_batch={cfg.data.global_batch} is more than the {len(train_set)} training "
                        "samples; lower data.global_batch")


def preprocessing(cfg: DictConfig) -> dict:
    """The evaluation preprocessing of this run in timm's `pretrained_cfg` keys: what a checkpoint's
    user must do to an image before the model sees it, and the names of the classes it predicts."""
    return with_class_names({**eval_data_config(cfg.data, cfg.aug), "num_classes": cfg.data.num_classes},
                            class_names(cfg.data))


def device_preprocessing(cfg: DictConfig) -> dict:
    """The Evaluator's share of the input pipeline when the loader hands over uint8 images or encoded
    bytes (data.decode=uint8|gpu): normalisation, and for gpu the decoding, crop, flip and RandAugment."""
    if not hands_over_uint8(cfg.data):
        return {}
    pieces = {"normalize": NormalizeOnDevice(list(cfg.data.mean), list(cfg.data.std))}
    if cfg.data.decode == "gpu":
        pieces["device_decode"] = (gpu_decode_transform(cfg.data, cfg.aug, True),
                                   gpu_decode_transform(cfg.data, cfg.aug, False))
    return pieces


class LastValidation(Callback):
    """Remembers the optimiser step the latest validation scored (the sanity check's aside)."""

    step: int | None = None

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.step = trainer.global_step


@dataclass
class Job:
    """A training run built from a config and a network: checked, not started. `callbacks` (Lightning's;
    the few-shot probe the config asks for) and `record` (added to results.json) are the callers' to change."""

    cfg: DictConfig
    model: nn.Module
    module: Classifier
    datamodule: ImageDataModule
    plan: BatchPlan
    steps: int
    steps_per_epoch: int
    callbacks: list[Callback] = field(default_factory=list)
    record: dict = field(default_factory=dict)

    def run(self, command: str, run_dir: Path | None = None, progress: bool = True) -> dict:
        """Train in a new runs/<command>/<timestamp>-<name>/, or in `run_dir` (continuing the run its
        last.ckpt holds, if any); returns results.json's content."""
        with Run(self.cfg, command, path=run_dir) as run:
            return self.train(run, progress)

    def train(self, run: Run, progress: bool) -> dict:
        """Fit, evaluate the final weights, save last.ckpt, finish the run with results.json."""
        trainer = self.trainer(run, progress)
        start = time.perf_counter()
        trainer.fit(self.module, datamodule=self.datamodule,
                    ckpt_path=run.path / "last.ckpt" if run.continues else None, weights_only=False)
        trained = {k: float(v) for k, v in trainer.callback_metrics.items()}  # the test loop replaces them
        tested = self.final_scores(trainer, trained)
        seconds = time.perf_counter() - start
        trainer.save_checkpoint(run.path / "last.ckpt", weights_only=False)
        results = {**self.summary(run, trainer, seconds, trained, tested), **self.record}
        if trainer.is_global_zero:
            plot_curves(run.path / "metrics.csv", run.path / "curves.png", title=f"mixer {run.command} {self.cfg.name}")
        run.finish(results)
        if trainer.is_global_zero and progress:
            print_summary(results)
        return results

    def final_scores(self, trainer: L.Trainer, trained: dict) -> dict:
        """The final weights' test/* (and dev/*) scores. A run that ended on a validation of the
        evaluation split has them already: that pass scored these weights on these images (a second
        pass cost a second as long as the validation on the demo). Else, and for a dev split, a test pass."""
        validated = next(c.step for c in trainer.callbacks if isinstance(c, LastValidation))
        if validated == trainer.global_step and self.datamodule.dev_set is None:
            tested = {f"test/{k.removeprefix('val/')}": v for k, v in trained.items() if k.startswith("val/")}
            for logger in trainer.loggers:  # metrics.csv and the curves show the final evaluation as a test pass would
                logger.log_metrics(tested, step=trainer.global_step)
                logger.save()
            return tested
        trainer.test(self.module, datamodule=self.datamodule, verbose=False)
        return {k: float(v) for k, v in trainer.callback_metrics.items()}

    def trainer(self, run: Run, progress: bool) -> L.Trainer:
        trainer = build_trainer(
            self.cfg.trainer, run.path, self.plan,
            callbacks=[*build_callbacks(self.cfg.callbacks, run.path), *self.callbacks,
                       SeededMicroBatches(self.cfg.seed), LastValidation()],
            loggers=build_loggers(self.cfg.logger, run.path, run.continues), progress=progress,
            micro_batches_per_epoch=self.datamodule.micro_batches_per_epoch,
        )
        return trainer

    def summary(self, run: Run, trainer: L.Trainer, seconds: float, trained: dict, tested: dict) -> dict:
        plan = self.plan
        return {
            "command": run.command,
            "name": self.cfg.name,
            "model": describe(self.model),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "data": self.cfg.data.source,
            "batch": plan.describe(),
            "devices": plan.world_size,
            # what trainer.precision/compile=auto chose for this device
            "precision": f"{self.cfg.trainer.precision}" + compiled_as(self.cfg.trainer.compile),
            "epochs": round(trainer.global_step / self.steps_per_epoch, 2),
            "steps": trainer.global_step,
            "planned_steps": self.steps,
            "train_seconds": round(seconds, 1),
            "device_hours": round(seconds * plan.world_size / 3600, 4),
            "train_loss": trained.get("train/loss"),
            "top1": tested["test/top1"],
            "top5": tested["test/top5"],
            "num_samples": int(tested["test/num_samples"]),  # = the split's size: exact, unpadded
            **({"real_top1": tested["test/real_top1"], "real_num_samples": int(tested["test/real_num_samples"])}
               if "test/real_top1" in tested else {}),
            # the last linear few-shot accuracies, when `fewshot.every_n_steps` logged them (Figure 4)
            **{f"fewshot_{k.removeprefix('fewshot/')}": v for k, v in trained.items() if k.startswith("fewshot/")},
            "run_dir": str(run.path),
            **{f"dev_{k.removeprefix('dev/')}": v for k, v in tested.items()
               if k.startswith("dev/") and k != "dev/loss"},
        }


def build(cfg: DictConfig, model: nn.Module, splits: Splits, probe_transform: Callable | None = None) -> Job:
    """The Job that trains `model` on `splits` as cfg says. Everything that can be wrong in the config
    is built, and so checked, here: before any run directory exists. probe_transform: what the
    few-shot probe applies to its images too (the shuffle experiment's permutation)."""
    quiet_lightning()
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the data order; the caller seeded the model
    t = cfg.trainer
    test_set, real_top1 = real_labels_for(cfg.data, splits.test)  # data.real_labels: ReaL top-1 as well
    world_size = check_launch(t)  # a launch that cannot run ends here
    plan = plan_batches(cfg.data.global_batch, world_size, t.device_batch)
    steps_per_epoch = max(num_samples(splits.train) // cfg.data.global_batch, 1)
    steps = t.steps or steps_per_epoch * t.epochs
    check_data(cfg, splits.train, world_size)
    datamodule = ImageDataModule(test_set, plan.device_batch, cfg.data.num_workers, train_set=splits.train,
                                 dev_set=splits.dev, micro_batches_per_epoch=steps_per_epoch * plan.accumulate,
                                 accumulate=plan.accumulate, seed=cfg.seed)
    loss = instantiate(cfg.loss)
    # timm's contract: what a checkpoint's user feeds the model, and how its logits become probabilities
    model.pretrained_cfg = {**preprocessing(cfg), ACTIVATION_KEY: loss.activation}
    model.set_grad_checkpointing(t.grad_checkpointing)
    if t.compile:
        model.compile(mode=compile_mode(t.compile))  # in place: parameter names (and so checkpoints) stay plain
    module = Classifier(
        model,
        loss=loss,
        optimizer=instantiate(cfg.optim),
        scheduler=partial(instantiate(cfg.sched), total_steps=steps),
        num_classes=cfg.data.num_classes,
        mixup=BatchMixup(cfg.aug.mixup, cfg.seed) if cfg.aug.get("mixup") else None,
        real_top1=real_top1,
        test_splits=("test", "dev") if splits.dev is not None else ("test",),
        **device_preprocessing(cfg),
    )
    probe = fewshot_callback(cfg, transform=probe_transform)
    return Job(cfg, model, module, datamodule, plan, steps, steps_per_epoch, callbacks=[probe] if probe else [])


def spec_changes(m: DictConfig) -> dict:
    """The spec fields a run sets on a loaded Mixer without changing its weights: regularisation,
    and the GELU and token-mixing layout where the config names them (null: as the checkpoint says)."""
    return {"dropout": m.dropout, "drop_path": m.drop_path, "drop_path_rescale": m.get("drop_path_rescale", False),
            **{k: m[k] for k in ("gelu", "token_mixing") if m.get(k)}}


def resume(run_dir: Path, overrides: list[str], command: str, progress: bool = True) -> dict:
    """Continue a stopped or killed run from its last.ckpt: the model is rebuilt from the spec
    recorded there (a fine-tune's head and resolution included), then Lightning restores weights,
    optimiser, schedule and loop state. `key=value` overrides apply on top (e.g. more epochs)."""
    if not (run_dir / "last.ckpt").is_file():
        raise UserError(f"nothing to resume in {run_dir}: no last.ckpt there")
    cfg = resume_config(run_dir, overrides)
    model = load_mixer(run_dir / "last.ckpt", **spec_changes(cfg.model))
    job = build(cfg, model, build_datasets(cfg))
    if cfg.get("checkpoint"):
        job.record["from"] = str(cfg.checkpoint)
    return job.run(command, run_dir, progress)
