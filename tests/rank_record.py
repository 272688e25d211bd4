"""A training run that records, per rank, the labels it trained and validated on (the index shards
label each sample with its index): `python rank_record.py OUT key=value ...`, under Lightning's DDP or
torchrun, writes OUT/rank<R>.json with them and the run's results (none when a signal stopped the
run, which then exits as the run does). With MARK_AT_STEP=N in the environment, rank 0 writes
OUT/at_step once training has passed step N, for a test to signal the run in mid-training."""
import json
import os
import sys
from pathlib import Path

import lightning as L

from mixer_cli.commands.pretrain import build_model
from mixer_cli.config.compose import compose
from mixer_cli.train.fit import build, build_datasets


class Record(L.Callback):
    def __init__(self, out: Path, mark_at_step: int | None):
        self.out, self.mark_at_step = out, mark_at_step
        self.train, self.val = [], []

    def on_fit_start(self, trainer, module):
        self.rank = trainer.global_rank

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.train += batch[1].tolist()

    def on_train_batch_end(self, trainer, *args):
        if trainer.is_global_zero and trainer.global_step == self.mark_at_step:
            (self.out / "at_step").write_text(str(trainer.global_step))

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.val += batch[1].tolist()


out = Path(sys.argv[1])
cfg = compose(sys.argv[2:])
record = Record(out, int(os.environ["MARK_AT_STEP"]) if "MARK_AT_STEP" in os.environ else None)
job = build(cfg, build_model(cfg), build_datasets(cfg))
job.callbacks.append(record)
results, stop = None, None
try:
    results = job.run("pretrain", progress=False)
except SystemExit as e:  # stopped by a signal, with a checkpoint
    stop = e
(out / f"rank{record.rank}.json").write_text(json.dumps({"train": record.train, "val": record.val, "results": results}))
if stop is not None:
    raise stop
