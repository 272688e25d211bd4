"""The one road every training command takes (pretrain, finetune, shuffle-experiment):

    composed config -> datasets, batch plan, loss, optimiser, schedule, LightningModule
    -> run directory, callbacks, loggers, Trainer -> fit -> final evaluation -> results.json

Everything that can be wrong in the config is built (and so checked) before the run directory
exists; the batch split over devices is decided before the Trainer and the DataModule are built.
"""
from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from mixer_cli.config.run_dirs import Run, resume_config
from mixer_cli.core.errors import UserError
from mixer_cli.data import build_dataset
from mixer_cli.data.device_transforms import NormalizeOnDevice, gpu_decode_transform
from mixer_cli.data.transforms import eval_data_config
from mixer_cli.evaluate.fewshot import fewshot_callback
from mixer_cli.evaluate.real_labels import real_labels_for
from mixer_cli.models import load_mixer
from mixer_cli.models.mixer import Mixer
from mixer_cli.reporting.runs import plot_curves, print_summary
from mixer_cli.train.batching import devices_per_node, plan_batches
from mixer_cli.train.datamodule import ImageDataModule, num_samples
from mixer_cli.train.mixup import BatchMixup
from mixer_cli.train.module import Classifier
from mixer_cli.train.trainer import build_callbacks, build_loggers, build_trainer, quiet_lightning


def build_datasets(cfg: DictConfig) -> tuple:
    """(augmented training set, evaluation set) of cfg.data."""
    return build_dataset(cfg.data, cfg.aug, "train", seed=cfg.seed), build_dataset(cfg.data, cfg.aug, "test")


def build_dev_set(cfg: DictConfig):
    """The dev split held out of the train split (data.dev_fraction), or None."""
    return build_dataset(cfg.data, cfg.aug, "dev") if cfg.data.get("dev_fraction") else None


def check_data(cfg: DictConfig, train_set) -> None:
    """Too few shards for ranks x loader workers: say so before anything runs or is written."""
    if hasattr(train_set, "check_split"):
        train_set.check_split(world_size(cfg.trainer), cfg.data.num_workers)


def preprocessing(cfg: DictConfig) -> dict:
    """The evaluation preprocessing of this run in timm's `pretrained_cfg` keys: what a checkpoint's
    user must do to an image before the model sees it."""
    return {**eval_data_config(cfg.data, cfg.aug), "num_classes": cfg.data.num_classes}


def device_preprocessing(cfg: DictConfig) -> dict:
    """The Classifier's share of the input pipeline when the loader hands over uint8 images or encoded
    bytes (data.decode=uint8|gpu): normalisation, and for gpu the decoding, crop and flip."""
    decode = cfg.data.get("decode", "pil")
    if decode == "pil":
        return {}
    pieces = {"normalize": NormalizeOnDevice(list(cfg.data.mean), list(cfg.data.std))}
    if decode == "gpu":
        pieces["device_decode"] = (gpu_decode_transform(cfg.data, cfg.aug, True),
                                   gpu_decode_transform(cfg.data, cfg.aug, False))
    return pieces


def mixer_record(model: nn.Module) -> dict:
    """What our checkpoints store beside the weights so that loading needs no guessing."""
    if not isinstance(model, Mixer):  # e.g. the ResNet of the shuffle experiment: weights only
        return {}
    return {"mixer": {"spec": model.spec.to_dict(), "pretrained_cfg": dict(model.pretrained_cfg)}}


def world_size(t: DictConfig) -> int:
    return devices_per_node(t.accelerator, t.devices) * t.num_nodes


def fit(
    cfg: DictConfig,
    model: nn.Module,
    command: str,
    *,
    run_dir: Path | None = None,
    datasets: tuple | None = None,
    callbacks: list | None = None,
    progress: bool = True,
    extra_results: dict | None = None,
) -> dict:
    """Train `model` as cfg says and evaluate the final weights; returns results.json's content.

    run_dir: None makes a new runs/<command>/<timestamp>-<name>/; a directory with a last.ckpt is a run
    to continue from it (resumed, or a requeued job's). datasets: (train, eval) to use instead of
    cfg.data's (the shuffle experiment permutes pixels). callbacks: more Lightning callbacks (e.g. a few-shot probe)."""
    quiet_lightning()
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the data order; the caller seeded the model
    t = cfg.trainer
    train_set, eval_set = datasets or build_datasets(cfg)
    eval_set, real_top1 = real_labels_for(cfg.data, eval_set)  # data.real_labels: ReaL top-1 as well
    dev_set = build_dev_set(cfg)
    plan = plan_batches(cfg.data.global_batch, world_size(t), t.device_batch)
    steps_per_epoch = max(num_samples(train_set) // cfg.data.global_batch, 1)
    steps = t.steps or steps_per_epoch * t.epochs
    check_data(cfg, train_set)
    datamodule = ImageDataModule(train_set, eval_set, plan.device_batch, cfg.data.num_workers,
                                 micro_batches_per_epoch=steps_per_epoch * plan.accumulate)
    if isinstance(model, Mixer):
        model.pretrained_cfg = preprocessing(cfg)
        model.set_grad_checkpointing(t.grad_checkpointing)
    if t.compile:
        model.compile()  # in place: parameter names (and so checkpoints) stay plain
    module = Classifier(
        model,
        loss=instantiate(cfg.loss),
        optimizer=instantiate(cfg.optim),
        scheduler=partial(instantiate(cfg.sched), total_steps=steps),
        num_classes=cfg.data.num_classes,
        mixup=BatchMixup(cfg.aug.mixup) if cfg.aug.get("mixup") else None,
        checkpoint_extras=partial(mixer_record, model),
        real_top1=real_top1,
        **device_preprocessing(cfg),
    )
    with Run(cfg, command, path=run_dir) as run:
        trainer = build_trainer(
            t, run.path, plan,
            callbacks=[*build_callbacks(cfg.callbacks, run.path), *(callbacks or [])],
            loggers=build_loggers(cfg.logger, run.path, run.continues), progress=progress,
            micro_batches_per_epoch=datamodule.micro_batches_per_epoch,
        )
        if trainer.world_size != plan.world_size:
            raise RuntimeError(f"planned for {plan.world_size} devices, Lightning runs {trainer.world_size}")
        start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule, ckpt_path=run.path / "last.ckpt" if run.continues else None,
                    weights_only=False)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}  # evaluation clears them
        if module.validated_at_step != trainer.global_step:  # every run ends evaluated, whatever its length
            metrics |= evaluate(trainer, module, datamodule.val_dataloader())
        dev = evaluate(trainer, module, datamodule.eval_loader(dev_set), "dev") if dev_set is not None else {}
        seconds = time.perf_counter() - start
        trainer.save_checkpoint(run.path / "last.ckpt", weights_only=False)
        results = {**summarise(cfg, command, trainer, model, plan, steps, steps_per_epoch, seconds, run.path, metrics),
                   **(extra_results or {}),
                   **{f"dev_{k.removeprefix('dev/')}": v for k, v in dev.items() if k != "dev/loss"}}
        if trainer.is_global_zero:
            plot_curves(run.path / "metrics.csv", run.path / "curves.png", title=f"mixer {command} {cfg.name}")
        run.finish(results)
    if trainer.is_global_zero and progress:
        print_summary(results)
    return results


def evaluate(trainer: L.Trainer, module: Classifier, loader, split: str = "val") -> dict:
    """The evaluation metrics of `module` on one pass over `loader`, named `split`/top1 etc."""
    module.eval_split = split
    try:
        (metrics,) = trainer.validate(module, dataloaders=loader, verbose=False, weights_only=False)
    finally:
        module.eval_split = "val"
    return metrics


def describe_model(cfg: DictConfig, model: nn.Module) -> str:
    if not isinstance(model, Mixer):
        return type(model).__name__
    s = model.spec
    return cfg.model.get("variant") or f"custom (patch {s.patch_size}, C {s.hidden_dim}, {s.num_blocks} blocks)"


def summarise(cfg, command, trainer, model, plan, steps, steps_per_epoch, seconds, run_dir, metrics) -> dict:
    return {
        "command": command,
        "name": cfg.name,
        "model": describe_model(cfg, model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "data": cfg.data.source,
        "batch": plan.describe(),
        "devices": plan.world_size,
        "epochs": round(trainer.global_step / steps_per_epoch, 2),
        "steps": trainer.global_step,
        "planned_steps": steps,
        "train_seconds": round(seconds, 1),
        "device_hours": round(seconds * plan.world_size / 3600, 4),
        "train_loss": metrics.get("train/loss"),
        "top1": metrics["val/top1"],
        "top5": metrics["val/top5"],
        "num_samples": int(metrics["val/num_samples"]),  # = the split's size: exact, unpadded
        **({"real_top1": metrics["val/real_top1"], "real_num_samples": int(metrics["val/real_num_samples"])}
           if "val/real_top1" in metrics else {}),
        # the last linear few-shot accuracies, when `fewshot.every_n_steps` logged them (Figure 4)
        **{f"fewshot_{k.removeprefix('fewshot/')}": v for k, v in metrics.items() if k.startswith("fewshot/")},
        "run_dir": str(run_dir),
    }


def resume(run_dir: Path, overrides: list[str], command: str, progress: bool = True) -> dict:
    """Continue a stopped or killed run from its last.ckpt: the model is rebuilt from the spec
    recorded there (a fine-tune's head and resolution included), then Lightning restores weights,
    optimiser, schedule and loop state. `key=value` overrides apply on top (e.g. more epochs)."""
    if not (run_dir / "last.ckpt").is_file():
        raise UserError(f"nothing to resume in {run_dir}: no last.ckpt there")
    cfg = resume_config(run_dir, overrides)
    model = load_mixer(run_dir / "last.ckpt", dropout=cfg.model.dropout, drop_path=cfg.model.drop_path,
                       drop_path_rescale=cfg.model.get("drop_path_rescale", False))
    extra = {"from": str(cfg.checkpoint)} if cfg.get("checkpoint") else None
    return fit(cfg, model, command, run_dir=run_dir, progress=progress, extra_results=extra,
               callbacks=probes(cfg))


def probes(cfg: DictConfig) -> list:
    """The few-shot probe that `fewshot.every_n_steps` asks for (Figure 4's curves), if any."""
    probe = fewshot_callback(cfg) if cfg.get("fewshot") else None
    return [probe] if probe is not None else []
