"""Shards under DDP: 2 CPU processes (gloo) through the real DataModule, module and Trainer."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

RECORD = Path(__file__).parent / "rank_record.py"  # the run, recording what each rank read


@pytest.mark.slow
def test_two_ranks_see_disjoint_training_data_right_steps_and_exact_evaluation(tmp_path, index_shards, tiny_run):
    index_shards(tmp_path / "train", n=40, shard_size=10)  # 4 shards: 1 per (rank, loader worker)
    index_shards(tmp_path / "eval", n=21, shard_size=21)  # 1 shard: rank 1 evaluates nothing
    overrides = [
        "data.source=shards", f"data.train_path={tmp_path / 'train'}", f"data.eval_path={tmp_path / 'eval'}",
        "data.num_classes=40", "data.img_size=16", "data.channels=3", "data.mean=[0.5,0.5,0.5]",
        "data.std=[0.5,0.5,0.5]", "data.global_batch=8", "data.num_workers=2", "data.shuffle_buffer=5",
        "aug.pad_crop=0", *tiny_run, "trainer.devices=2", "trainer.strategy=ddp", "trainer.epochs=2",
        f"run_root={tmp_path}",
    ]
    proc = subprocess.run([sys.executable, str(RECORD), str(tmp_path), *overrides],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))

    res0, res1 = r0["results"], r1["results"]
    assert res0["steps"] == res1["steps"] == res0["planned_steps"] == 2 * (40 // 8)  # 2 epochs of 40 / batch 8
    assert len(r0["train"]) == len(r1["train"]) == 2 * 5 * 4  # steps x device batch 4
    for epoch in (0, 1):  # each epoch's 40 samples split over the ranks, reshuffled the next epoch
        mine, theirs = (set(r["train"][epoch * 20:(epoch + 1) * 20]) for r in (r0, r1))
        assert not mine & theirs and mine | theirs == set(range(40))
    assert r0["train"][:20] != r0["train"][20:]

    # Exact, unpadded evaluation: 21 samples once each over both ranks, twice (one per epoch; the run
    # ends on an epoch's evaluation, so none more).
    assert sorted(r0["val"] + r1["val"]) == sorted(list(range(21)) * 2)
    assert res0["num_samples"] == res1["num_samples"] == 21 and res0["run_dir"] == res1["run_dir"]
    assert res0["top1"] == res1["top1"]  # every rank reports the metric over the whole split
    assert json.loads(Path(res0["run_dir"]).joinpath("results.json").read_text())["num_samples"] == 21
