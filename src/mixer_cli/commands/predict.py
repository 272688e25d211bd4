"""`mixer predict --from CKPT PATH...`: a checkpoint's top-k classes for each of a user's images.

The images are read and prepared as `mixer eval` prepares its evaluation split: the checkpoint's
resolution, mean/std, interpolation and crop (conf/predict.yaml leaves them null, the checkpoint
fills them). Probabilities follow the head's training: a softmax over the classes, or one sigmoid per
class for a sigmoid-trained head (they need not sum to 1). Class names are the checkpoint's, or
predict.class_map's (one per line); where there are none, the class index.

The run directory gets config.yaml, predictions.csv (path, then name, index and probability of each of
the top k), skipped.csv for inputs that gave no prediction (missing, not images, undecodable; never
fatal), and, last, results.json.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from rich.markup import escape
from rich.table import Table
from timm.data import resolve_data_config
from torch.utils.data import DataLoader

from mixer_cli.commands.eval import default_name, with_checkpoint_preprocessing
from mixer_cli.config.run_dirs import Run
from mixer_cli.core.console import console, counting_progress, err_console
from mixer_cli.core.devices import pick_device
from mixer_cli.core.errors import UserError
from mixer_cli.core.files import csv_text
from mixer_cli.data.image_files import ImageFiles, collate_readable, expand
from mixer_cli.data.transforms import eval_transform
from mixer_cli.models import load_mixer
from mixer_cli.models.contract import (
    ACTIVATION_KEY,
    class_names,
    class_probabilities,
    describe,
    has_class_names,
    naming_classes,
)


def predict_command(cfg: DictConfig, checkpoint: Path, inputs: list[str]) -> dict:
    """Predict every image the inputs name; everything checkable before reading an image is checked
    before the run directory exists."""
    p = cfg.predict
    checkpoint = Path(checkpoint).resolve()
    model = load_mixer(checkpoint)
    if model.spec.num_classes == 0:
        raise UserError(f"{checkpoint} has no classification head (num_classes 0): nothing to predict; "
                        "fine-tune it first (mixer finetune --from ...)")
    model.pretrained_cfg = naming_classes(model.pretrained_cfg, p.class_map)
    cfg = with_checkpoint_preprocessing(cfg, resolve_data_config({}, model=model))
    cfg.name = cfg.name or default_name(checkpoint)
    paths, skipped = expand(inputs)
    if not paths:
        first = skipped[0]
        raise UserError(f"no image to predict: {first['path']}: {first['reason']}"
                        + (f" (and {len(skipped) - 1} more like it)" if len(skipped) > 1 else ""))
    topk = min(p.topk, model.spec.num_classes)
    device = pick_device(p.device)
    with Run(cfg, "predict") as run:
        start = time.perf_counter()
        rows, unreadable = run_model(model.to(device).eval(), ImageFiles(paths, eval_transform(cfg.data, cfg.aug),
                                                                         cfg.data.channels), p, topk, device)
        skipped += [{"path": str(paths[i]), "reason": reason} for i, reason in unreadable]
        if not rows:
            raise UserError(f"none of the {len(paths)} images could be read, e.g. {skipped[-1]['path']}: "
                            f"{skipped[-1]['reason']}")
        run.write("predictions.csv", csv_text(rows, prediction_columns(topk)))
        if skipped:
            run.write("skipped.csv", csv_text(skipped, ["path", "reason"]))
        results = {
            "command": "predict", "name": cfg.name, "from": str(checkpoint), "model": describe(model),
            "num_classes": model.spec.num_classes,
            "class_names": "names" if has_class_names(model.pretrained_cfg) else "indices",
            "activation": model.pretrained_cfg[ACTIVATION_KEY], "topk": topk,
            "num_predicted": len(rows), "num_skipped": len(skipped), "device": str(device),
            "predict_seconds": round(seconds := time.perf_counter() - start, 1),
            "images_per_second": round(len(rows) / seconds, 1), "run_dir": str(run.path),
        }
        run.finish(results)
    print_predictions(rows[: p.show], results, skipped)
    return results


def prediction_columns(topk: int) -> list[str]:
    return ["path", *(f"{field}_{rank}" for rank in range(1, topk + 1) for field in ("class", "index", "prob"))]


def run_model(model, images: ImageFiles, p: DictConfig, topk: int, device: torch.device):
    """(one row per readable image in input order, [(index, reason)] of the unreadable ones)."""
    names = class_names(model.pretrained_cfg)
    loader = DataLoader(images, batch_size=p.batch_size, num_workers=p.num_workers, collate_fn=collate_readable,
                        pin_memory=device.type == "cuda")
    rows, unreadable = [], []
    with counting_progress(err_console) as bar:
        task = bar.add_task("predicting", total=len(images))
        for pixels, indices, failed in loader:
            unreadable += failed
            if pixels is not None:
                with torch.inference_mode():
                    probs = class_probabilities(model(pixels.to(device, non_blocking=True)), model.pretrained_cfg)
                top = probs.topk(topk, dim=1)
                rows += [prediction_row(images.paths[i], names, top.indices[j].tolist(), top.values[j].tolist())
                         for j, i in enumerate(indices)]
            bar.advance(task, len(indices) + len(failed))
    return rows, unreadable


def prediction_row(path: Path, names: list[str], classes: list[int], probs: list[float]) -> dict:
    row = {"path": str(path)}
    for rank, (c, prob) in enumerate(zip(classes, probs), start=1):
        row |= {f"class_{rank}": names[c], f"index_{rank}": c, f"prob_{rank}": round(prob, 6)}
    return row


def print_predictions(rows: list[dict], results: dict, skipped: list[dict]) -> None:
    table = Table(title=f"mixer predict {results['name']}", title_style="bold")
    table.add_column("image", overflow="fold")
    shown = min(results["topk"], 3)
    for rank in range(1, shown + 1):
        table.add_column(f"#{rank}", overflow="fold")
    for row in rows:
        table.add_row(escape(Path(row["path"]).name),
                      *(f"{escape(row[f'class_{r}'])} {100 * row[f'prob_{r}']:.1f}%" for r in range(1, shown + 1)))
    console.print(table)
    more, count = results["num_predicted"] - len(rows), results["num_predicted"]
    hidden = [f"{more} not shown"] if more > 0 else []
    hidden += [f"the table shows the top {shown} of {results['topk']}"] if results["topk"] > shown else []
    console.print(f"{count} image{'s' * (count != 1)} predicted by {results['model']}, {results['activation']} "
                  f"probabilities" + (f" ({'; '.join(hidden)})" if hidden else "")
                  + f": {results['run_dir']}/predictions.csv", highlight=False)
    if skipped:
        err_console.print(f"[yellow]skipped {len(skipped)}[/] (listed in {results['run_dir']}/skipped.csv), e.g. "
                          f"{escape(skipped[0]['path'])}: {escape(skipped[0]['reason'])}", highlight=False)
