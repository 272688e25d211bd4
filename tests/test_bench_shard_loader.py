"""benchmarks/shard_loader.py times loaders that read the same pixels: ours (torchvision's PNG decoder,
our tar reader) against webdataset's reader and PIL."""
import importlib.util
import itertools
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "shard_loader.py"


def load_script():
    spec = importlib.util.spec_from_file_location("shard_loader", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_our_stream_gives_webdatasets_pixels_and_labels(tmp_path):
    bench = load_script()
    mixer = str(Path(sys.executable).with_name("mixer"))
    subprocess.run([mixer, "data", "write", "--from", "demo", "--to", str(tmp_path / "d")], check=True,
                   stdout=subprocess.DEVNULL)
    shards = tmp_path / "d" / "train"

    def first(n):
        return lambda batches: list(itertools.islice(batches, n))

    reference = bench.webdataset_reference(shards, first(-(-4000 // bench.BATCH)))  # a whole pass and a bit
    labels = {x.numpy().tobytes(): int(y) for xs, ys in reference for x, y in zip(xs, ys)}
    assert len(labels) > 3900  # nearly all of the 4,000 demo digits are distinct images
    disk, parquet = bench.write_hf_digits(tmp_path / "hf")
    loaders = [bench.ours(shards, "uint8", first(3), streamed=streamed) for streamed in (False, True)]
    for batches in [*loaders, bench.hf(disk, first(3)), bench.hf(parquet, first(3))]:
        for xs, ys in batches:
            assert xs.dtype == torch.uint8 and xs.shape == (bench.BATCH, 1, 28, 28)
            found = [labels.get(x.numpy().tobytes()) for x in xs]
            assert found == ys.tolist()
