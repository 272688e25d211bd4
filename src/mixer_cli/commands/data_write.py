"""`mixer data write`: an image folder, a Hugging Face data set, or the bundled demo, as webdataset
shards plus index.json."""
from __future__ import annotations

import tempfile
from pathlib import Path

from mixer_cli.core.console import console, counting_progress, err_console
from mixer_cli.core.errors import UserError
from mixer_cli.data.writer import check_output, demo_samples, folder_samples, write_shards


def data_write(source: str, out: Path, shard_size: int, seed: int, workers: int, image_key: str = "image",
               label_key: str = "label") -> None:
    """Write `source` (a folder with a sub-folder per class; 'hf:PATH', a Hugging Face data set's split;
    or 'demo': its train/ and test/ splits) under `out`; unreadable or corrupt images are reported and skipped."""
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {shard_size}")
    if source.startswith("hf:"):
        check_output(out)
        with tempfile.TemporaryDirectory(prefix="mixer-hf-") as cache:  # parquet gathered there, then removed
            from mixer_cli.data.hf import hf_samples

            write([(out, *hf_samples(source[3:], image_key, label_key, Path(cache)), source)], shard_size, seed,
                  workers)
        return
    if source == "demo":
        jobs = [(out / split, *demo_samples(split), f"demo:{split}") for split in ("train", "test")]
    else:
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise UserError(f"--from {source}: no such folder; give an image folder (a sub-folder per class), "
                            "hf:PATH (a Hugging Face data set) or 'demo'")
        jobs = [(out, *folder_samples(folder), str(folder))]
    for target, *_ in jobs:
        check_output(target)
    write(jobs, shard_size, seed, workers)


def write(jobs: list[tuple], shard_size: int, seed: int, workers: int) -> None:
    def skipped(name, reason):
        err_console.print(f"[yellow]skipped[/] {name}: {reason}", highlight=False, soft_wrap=True)

    for target, classes, samples, name in jobs:
        with counting_progress(console) as bar:
            task = bar.add_task(f"writing {name}", total=len(samples))
            report = write_shards(classes, samples, target, shard_size, seed, source=name, on_skip=skipped,
                                  workers=workers, on_shard=lambda n, task=task: bar.advance(task, n))
        console.print(
            f"wrote {report.num_samples} images of {len(classes)} classes in {len(report.shards)} shard(s) to "
            f"{target} ({len(report.skipped)} skipped)"
        )
