"""The data layer: shard writer round trip, corrupt data, shard streams, transforms, sources."""
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from mixer_cli.core.errors import UserError
from mixer_cli.data import build_dataset
from mixer_cli.data.shards import EvalShards, TrainShards, resolve_shards
from mixer_cli.data.transforms import eval_data_config, eval_transform, train_transform
from mixer_cli.data.writer import demo_samples, folder_samples, read_index, write_shards

CLASSES = ["cat", "dog", "eel"]


@pytest.fixture
def image_folder(sample_pixels):
    """Factory: an image folder of sample_pixels; its (label, pixels) by file name."""

    def write(root: Path, per_class: int = 4, bad: bool = True) -> dict[str, tuple[int, np.ndarray]]:
        return write_image_folder(root, sample_pixels, per_class, bad)

    return write


def write_image_folder(root: Path, pixels, per_class: int, bad: bool) -> dict[str, tuple[int, np.ndarray]]:
    """PNGs (lossless) and one JPEG per class; with `bad`, a corrupt and a truncated JPEG too."""
    expected = {}
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            i = label * 100 + j
            fmt = "JPEG" if j == 0 else "PNG"
            path = root / name / f"{i}.{'jpg' if fmt == 'JPEG' else 'png'}"
            Image.fromarray(pixels(i)).save(path, format=fmt)
            expected[path.name] = (label, pixels(i))
    if bad:
        (root / "dog" / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
        good = io.BytesIO()
        Image.fromarray(pixels(7, size=64)).save(good, format="JPEG")
        (root / "eel" / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    return expected


def read_raw(folder: Path) -> list[dict]:
    urls, _ = resolve_shards(str(folder), None, "train_path")
    return list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))


def test_written_shards_read_back_to_the_same_images_and_labels(tmp_path, image_folder):
    expected = image_folder(tmp_path / "pics")
    classes, samples = folder_samples(tmp_path / "pics")
    report = write_shards(classes, samples, tmp_path / "shards", shard_size=5, source="pics", workers=2)

    index = read_index(tmp_path / "shards")
    assert index["classes"] == CLASSES and index["counts"] == [4, 4, 4] and index["num_samples"] == 12
    assert [s["samples"] for s in index["shards"]] == [5, 5, 2]
    assert sorted(Path(s["file"]).name for s in index["skipped"]) == ["garbage.jpg", "truncated.jpg"]
    assert report.num_samples == 12

    by_key = {s.name: Path(s.name).name for s in samples}
    keys = {f"{i:09d}_{Path(s.name).stem}": by_key[s.name] for i, s in enumerate(samples)}  # number, then stem
    seen = set()
    for raw in read_raw(tmp_path / "shards"):
        name = keys[raw["__key__"]]
        label, want = expected[name]
        assert int(raw["cls"]) == label
        if "png" in raw:
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(raw["png"]))), want)
        else:  # JPEG is stored byte for byte, never re-encoded
            assert raw["jpg"] == (tmp_path / "pics" / CLASSES[label] / name).read_bytes()
        seen.add(name)
    assert seen == set(expected)


def test_demo_writes_as_shards_that_match_demo_arrays(tmp_path):
    from mixer_cli.data import demo_arrays

    classes, samples = demo_samples("test")
    write_shards(classes, samples[:30], tmp_path / "demo", shard_size=7)
    x, y = demo_arrays("test")
    for raw in read_raw(tmp_path / "demo"):
        i = int(raw["__key__"])
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(raw["png"]))), x[i]) and int(raw["cls"]) == y[i]


def test_shards_are_plain_ustar_members_without_pax_headers(tmp_path):
    """webdataset's default float mtime puts a PAX header before every member: twice the headers to
    parse, and the readers read 1.4x as fast without them (digits, one worker)."""
    classes, samples = demo_samples("test")
    write_shards(classes, samples[:6], tmp_path / "demo", shard_size=6)
    with tarfile.open(next((tmp_path / "demo").glob("*.tar"))) as tar:
        members = tar.getmembers()
    assert len(members) == 12 and all(m.pax_headers == {} and isinstance(m.mtime, int) for m in members)


def test_writer_refuses_a_non_empty_output_and_writes_nothing_from_an_unreadable_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="already exists and is not an empty folder"):
        write_shards(CLASSES, [], tmp_path / "out")
    (tmp_path / "bad" / "cat").mkdir(parents=True)
    (tmp_path / "bad" / "cat" / "x.png").write_bytes(b"nope")
    classes, samples = folder_samples(tmp_path / "bad")
    with pytest.raises(UserError, match="no readable images"):
        write_shards(classes, samples, tmp_path / "new")
    assert not (tmp_path / "new").exists()


# --- reading shards ------------------------------------------------------------------------------

DATA = OmegaConf.create(
    {"img_size": 16, "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear", "num_classes": 3}
)
PLAIN = OmegaConf.create(
    {"inception_crop": False, "hflip": False, "randaug_magnitude": 0, "eval_crop_mode": "squash", "eval_crop_pct": 1.0}
)


def label_of(x: torch.Tensor) -> np.ndarray:
    """Back from the normalised tensor to uint8 pixels (the plain transform is exact at 16x16)."""
    return np.round((x.permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255).astype(np.uint8)


def eval_labels(folder: Path, batch_size=4, workers=0) -> list[int]:
    urls, size = resolve_shards(str(folder), None, "eval_path")
    ds = EvalShards(urls, size, eval_transform(DATA, PLAIN), channels=3)
    ds.batch_size = batch_size
    return [int(v) for _, y in DataLoader(ds, batch_size=None, num_workers=workers) for v in y]


def test_eval_reads_every_sample_exactly_once_and_decodes_the_pixels(tmp_path, index_shards, sample_pixels):
    index_shards(tmp_path / "s", n=11, shard_size=3)
    urls, size = resolve_shards(str(tmp_path / "s"), None, "eval_path")
    ds = EvalShards(urls, size, eval_transform(DATA, PLAIN), channels=3)
    ds.batch_size = 4
    for x, y in DataLoader(ds, batch_size=None):
        for img, i in zip(x, y):
            assert np.abs(label_of(img).astype(int) - sample_pixels(int(i))).max() <= 1
    assert sorted(eval_labels(tmp_path / "s", workers=2)) == list(range(11))


def test_training_stream_gives_exactly_the_epoch_length_with_workers_and_keeps_going(tmp_path, index_shards):
    index_shards(tmp_path / "s", n=24, shard_size=4)
    urls, _ = resolve_shards(str(tmp_path / "s"), None, "train_path")
    ds = TrainShards(urls, 24, eval_transform(DATA, PLAIN), channels=3, shuffle_buffer=8, seed=0)
    ds.set_epoch_length(batch_size=5, batches_per_epoch=7)  # more than one pass: resampled, never runs dry
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    assert len(loader) == 7
    for _ in range(2):
        batches = [y for _, y in loader]
        assert len(batches) == 7 and all(len(y) == 5 for y in batches)
    # Worker w reads shards w, w+2, ...: its samples come from those shards only (split by worker).
    # With a single process, one pass over all shards in a shuffled order covers every sample.
    ds1 = TrainShards(urls, 24, eval_transform(DATA, PLAIN), channels=3, shuffle_buffer=1, seed=3)
    ds1.set_epoch_length(batch_size=24, batches_per_epoch=1)
    (_, y), = list(DataLoader(ds1, batch_size=None))
    assert sorted(y.tolist()) == list(range(24)) and y.tolist() != list(range(24))


def test_too_few_shards_for_ranks_times_workers_is_a_clear_error(tmp_path, index_shards):
    index_shards(tmp_path / "s", n=6, shard_size=3)
    urls, _ = resolve_shards(str(tmp_path / "s"), None, "train_path")
    ds = TrainShards(urls, 6, eval_transform(DATA, PLAIN), channels=3, shuffle_buffer=1, seed=0)
    ds.check_split(world_size=2, num_workers=1)
    with pytest.raises(UserError, match=r"2 training shard\(s\) cannot feed 2 rank\(s\) x 2 loader worker\(s\) = 4"):
        ds.check_split(world_size=2, num_workers=2)


def test_bad_jpeg_and_truncated_tar_are_skipped_and_counted(tmp_path, caplog, index_shards, sample_pixels):
    index_shards(tmp_path / "s", n=12, shard_size=4)  # shards of samples 0-3, 4-7, 8-11
    with wds.TarWriter(str(tmp_path / "s" / "shard-000000.tar")) as sink:  # sample 2 becomes a bad JPEG
        for i in range(4):
            buf = io.BytesIO()
            Image.fromarray(sample_pixels(i)).save(buf, format="PNG")
            sink.write({"__key__": f"{i:09d}", "jpg": b"\xff\xd8\xffnot a jpeg", "cls": i} if i == 2 else
                       {"__key__": f"{i:09d}", "png": buf.getvalue(), "cls": i})
    last = tmp_path / "s" / "shard-000002.tar"
    with tarfile.open(last) as t:  # cut inside the third member: samples 8 (complete) survives
        cut = t.getmembers()[2].offset_data + 10
    last.write_bytes(last.read_bytes()[:cut])

    got = eval_labels(tmp_path / "s")
    assert got == [0, 1, 3, 4, 5, 6, 7, 8]
    assert "skipped corrupt sample #1" in caplog.text and "skipped corrupt sample #2" in caplog.text

    urls, _ = resolve_shards(str(tmp_path / "s"), None, "train_path")
    ds = TrainShards(urls, 12, eval_transform(DATA, PLAIN), channels=3, shuffle_buffer=4, seed=0)
    ds.set_epoch_length(batch_size=4, batches_per_epoch=6)  # three passes over the damaged shards
    labels = [int(v) for _, y in DataLoader(ds, batch_size=None) for v in y]
    assert len(labels) == 24 and set(labels) == {0, 1, 3, 4, 5, 6, 7, 8} and ds.corrupt.count >= 6


def test_all_corrupt_shards_stop_training_instead_of_spinning(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "shard-000000.tar").write_bytes(b"not a tar file at all" * 10)
    ds = TrainShards([str(tmp_path / "s" / "shard-000000.tar")], 4, eval_transform(DATA, PLAIN), 3, 1, 0)
    ds.set_epoch_length(1, 1)
    with pytest.raises(UserError, match="no readable sample"):
        next(iter(ds))


def test_missing_shards_name_the_config_key(tmp_path):
    with pytest.raises(UserError, match=r"no shards at data.train_path=.*set data.train_path="):
        resolve_shards(str(tmp_path / "nowhere" / "train-{000..003}.tar"), 100, "train_path")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"data.eval_path=.* has no index.json"):
        resolve_shards(str(tmp_path / "empty"), None, "eval_path")


# --- transforms ----------------------------------------------------------------------------------

BIG = OmegaConf.create(
    {"img_size": 224, "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}
)


def tensor_of(img: Image.Image) -> torch.Tensor:
    return (torch.from_numpy(np.array(img)).permute(2, 0, 1) / 255 - 0.5) / 0.5


def test_eval_crop_modes_squash_and_center():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8))
    squash = OmegaConf.create({"eval_crop_mode": "squash", "eval_crop_pct": 1.0})  # straight to 224x224
    assert torch.allclose(eval_transform(BIG, squash)(img), tensor_of(img.resize((224, 224), Image.BICUBIC)), atol=1e-5)
    center = OmegaConf.create({"eval_crop_mode": "center", "eval_crop_pct": 0.875})
    # shorter side (300) to 224 / 0.875 = 256, so 500 -> 426; then the centre 224x224
    ref = img.resize((426, 256), Image.BICUBIC).crop((101, 16, 325, 240))
    assert torch.allclose(eval_transform(BIG, center)(img), tensor_of(ref), atol=1e-5)
    at_448 = eval_transform(OmegaConf.merge(BIG, {"img_size": 448}), center)
    assert at_448.transforms[0].size == 512 and at_448(img).shape == (3, 448, 448)


def test_area_resize_weights_each_pixel_by_the_share_it_covers():
    from mixer_cli.data.transforms import area_resize

    rows = torch.tensor([[0, 90, 30], [10, 20, 31]], dtype=torch.uint8)[None]  # 3 -> 2: (a + b/2, b/2 + c) / 1.5
    assert area_resize(rows, 2, 2).tolist() == [[[30, 50], [13, 27]]]  # 13.3 and 27.3 truncated, as tf.cast
    flat = torch.full((3, 375, 500), 77, dtype=torch.uint8)
    assert (area_resize(flat, 256, 341) == 77).all()  # no float error below a whole level
    pixels = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    img = torch.from_numpy(pixels).permute(2, 0, 1)
    blocks = torch.from_numpy(pixels.reshape(16, 4, 24, 4, 3).mean((1, 3))).permute(2, 0, 1)
    assert area_resize(img, 16, 24).tolist() == blocks.floor().to(torch.uint8).tolist()  # whole factors: block means
    def means(n_in: int, n_out: int) -> np.ndarray:  # (n_out, n_in): input pixel i's weight in output pixel j
        edges = np.linspace(0, n_in, n_out + 1)
        covered = [[max(0.0, min(b, i + 1) - max(a, i)) for i in range(n_in)] for a, b in zip(edges, edges[1:])]
        return np.array(covered) * n_out / n_in

    reference = np.einsum("yh,hwc,xw->cyx", means(64, 23), pixels.astype(float), means(96, 35))
    assert area_resize(img, 23, 35).tolist() == np.floor(reference + 1e-9).astype(np.uint8).tolist()
    pil_box = torch.from_numpy(np.array(Image.fromarray(pixels).resize((35, 23), Image.BOX))).permute(2, 0, 1)
    assert (area_resize(img, 23, 35).int() - pil_box.int()).abs().float().mean() > 2  # PIL's BOX is not area


@pytest.mark.parametrize(("mode", "pct", "size", "channels"), [
    ("center", 0.875, 224, 3),  # pre-training's evaluation: resize_small(256, "area")|central_crop(224)
    ("squash", 1.0, 24, 3),  # both sides to the resolution: scales apart along the two axes
    ("center", 0.875, 16, 1)])
def test_batched_area_resize_gives_each_images_pixels(mode, pct, size, channels):
    """Images of mixed sizes in one batch: shrunk up to 50x, enlarged, flat, square, as big as the crop."""
    from mixer_cli.data.transforms import AreaResizeCrop, area_resize_crops

    rng = np.random.default_rng(0)
    shapes = [(375, 500), (500, 333), (1200, 900), (60, 80), (19, 300), (size, size), (13, 17)]
    images = [torch.from_numpy(rng.integers(0, 256, (channels, h, w), dtype=np.uint8)) for h, w in shapes]
    images.append(torch.full((channels, 375, 500), 77, dtype=torch.uint8))  # no float error below a whole level
    crop = AreaResizeCrop(size, pct, mode)
    batched = area_resize_crops(images, [crop.resized_size(*img.shape[-2:]) for img in images], size)
    assert batched.dtype == torch.uint8 and batched.tolist() == torch.stack([crop(img) for img in images]).tolist()


def test_pretraining_evaluation_is_resize_small_by_area_then_central_crop():
    """big_vision's resize_small(256, "area")|central_crop(224) on a 375x500 photo: 256x341 (TF rounds
    341.33), then rows 16-240 and columns 58-282 (floor of the margins)."""
    from mixer_cli.data.transforms import area_resize

    pixels = np.random.default_rng(1).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    aug = OmegaConf.create({"eval_crop_mode": "center", "eval_crop_pct": 0.875, "eval_interpolation": "box"})
    expected = area_resize(torch.from_numpy(pixels).permute(2, 0, 1), 256, 341)[:, 16:240, 58:282]
    out = eval_transform(BIG, aug)(Image.fromarray(pixels))
    assert torch.allclose(out, (expected / 255 - 0.5) / 0.5, atol=1e-6)


@pytest.mark.parametrize("name, mode, pct", [
    ("inception_flip", "center", 0.875),  # pre-training: big_vision's resize_small(256)|central_crop(224)
    ("randaug_mixup", "center", 0.875),
    ("finetune", "squash", 1.0),  # fine-tuning: vit_jax resizes straight to the resolution
    ("demo", "squash", 1.0),  # 28x28 digits
])
def test_aug_configs_evaluate_as_the_papers_code(name, mode, pct):
    aug = OmegaConf.load(Path(__file__).parents[1] / "conf" / "aug" / f"{name}.yaml")
    assert (aug.eval_crop_mode, aug.eval_crop_pct) == (mode, pct)
    assert "eval_crop" not in aug and "eval_resize" not in aug
    # big_vision's resize_small resizes by "area" (timm's name: box); vit_jax's fine-tuning bilinearly
    assert eval_data_config(BIG, aug)["interpolation"] == ("box" if mode == "center" else BIG.interpolation)


def test_train_transform_is_inception_crop_flip_then_the_papers_randaugment():
    from mixer_cli.data.randaugment import RandAugment

    aug = OmegaConf.create(
        {"inception_crop": True, "crop_area_min": 0.05, "hflip": True, "randaug_layers": 2, "randaug_magnitude": 0}
    )
    names = [type(t).__name__ for t in train_transform(BIG, aug).transforms]
    assert names == ["InceptionCrop", "RandomHorizontalFlip", "MaybeToTensor", "Normalize"]
    crop = train_transform(BIG, aug).transforms[0]  # TF's box sampler and resize by default: big_vision's
    assert (crop.area_min, crop.size, crop.sampler, crop.antialias) == (0.05, 224, "tf", False)
    aug.randaug_magnitude = 15  # big_vision's order: inception_crop|flip_lr|randaug(2,15)|value_range
    tf = train_transform(BIG, aug)
    ra = tf.transforms[2]
    assert isinstance(ra, RandAugment) and (ra.num_layers, ra.magnitude) == (2, 15)  # not clipped to 10
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 140, 3), dtype=np.uint8))
    assert tf(img).shape == (3, 224, 224)
    aug.inception_crop = False
    with pytest.raises(UserError, match="RandAugment runs after the Inception crop"):
        train_transform(BIG, aug)


def test_mixup_mixes_each_image_with_its_neighbour_in_a_roll_with_the_larger_beta_p_p_weight():
    from scipy import stats

    from mixer_cli.train.mixup import BatchMixup

    x, targets = torch.randn(6, 3, 4, 4), torch.eye(10)[:6]  # sample i is class i
    mixed, soft = BatchMixup(0.5)(x, targets, step=0)
    lam = soft[0, 0].item()  # big_vision: sample 0 keeps lam on its own class, 1 - lam goes to sample 5's
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[[5, 0, 1, 2, 3, 4]], atol=1e-6)
    assert soft[0, 5].item() == pytest.approx(1 - lam, abs=1e-6) and torch.allclose(soft.sum(1), torch.ones(6))
    for p, other in ((0.2, 0.5), (0.5, 0.2)):
        mix = BatchMixup(p, seed=1)
        lams = [mix(x[:2], targets[:2], step)[1][0, 0].item() for step in range(800)]
        assert min(lams) >= 0.5  # the larger Dirichlet weight stays on the original image
        folded = lambda q: lambda m: 2 * stats.beta.cdf(m, q, q) - 1  # noqa: E731  max(L, 1-L), L ~ Beta(q, q)
        assert stats.kstest(lams, folded(p)).pvalue > 1e-3
        assert stats.kstest(lams, folded(other)).pvalue < 1e-4  # the check tells p's apart


def test_mixup_at_weight_one_half_makes_no_duplicate_pairs(monkeypatch):
    from mixer_cli.train.mixup import BatchMixup

    monkeypatch.setattr(BatchMixup, "sample_weight", lambda self, step: 0.5)
    x = torch.eye(8).view(8, 8, 1, 1)  # sample i is the i-th unit vector, so a mix shows its pair
    mixed, _ = BatchMixup(0.5)(x, torch.eye(8), step=0)
    pairs = {frozenset(row.flatten().nonzero().flatten().tolist()) for row in mixed}
    assert len(pairs) == 8 and all(len(p) == 2 for p in pairs)  # timm's mirror gives 4 pairs, each twice


# --- sources -------------------------------------------------------------------------------------

def test_image_folder_is_a_source_and_a_wrong_class_count_is_a_user_error(tmp_path, image_folder):
    image_folder(tmp_path / "train", bad=False)
    image_folder(tmp_path / "val", per_class=2, bad=False)
    paths = {"train_path": str(tmp_path / "train"), "eval_path": str(tmp_path / "val")}
    data = OmegaConf.merge(DATA, {"source": "folder", **paths})
    train, test = build_dataset(data, PLAIN, "train"), build_dataset(data, PLAIN, "test")
    assert len(train) == 12 and len(test) == 6 and train.classes == CLASSES
    x, y = test[0]
    assert x.shape == (3, 16, 16) and y == 0
    data.num_classes = 5
    with pytest.raises(UserError, match="has 3 classes, data.num_classes=5; set data.num_classes=3"):
        build_dataset(data, PLAIN, "train")
    data.train_path = str(tmp_path / "missing")
    with pytest.raises(UserError, match=r"no image folder at data.train_path=.*missing; set data.train_path="):
        build_dataset(data, PLAIN, "train")


# --- command line --------------------------------------------------------------------------------

def test_data_write_reports_skipped_files_and_refuses_to_overwrite(tmp_path, image_folder):
    from typer.testing import CliRunner

    from mixer_cli.cli import app

    image_folder(tmp_path / "pics")
    runner = CliRunner()
    args = ["data", "write", "--from", str(tmp_path / "pics"), "--to", str(tmp_path / "out"), "--shard-size", "5"]
    r = runner.invoke(app, args, env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    assert "wrote 12 images of 3 classes in 3 shard(s)" in r.output and "(2 skipped)" in r.output
    assert "skipped" in r.output and "garbage.jpg" in r.output
    r = runner.invoke(app, args, env={"COLUMNS": "300"})
    assert r.exit_code == 2 and "already exists and is not an empty folder" in r.output
    r = runner.invoke(app, ["data", "write", "--from", str(tmp_path / "nope"), "--to", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "no such folder" in r.output and not (tmp_path / "o2").exists()


def test_pretrain_on_an_image_folder_with_randaugment_and_mixup(tmp_path, image_folder, tiny_run):
    from mixer_cli.commands.pretrain import pretrain
    from mixer_cli.config.compose import compose

    image_folder(tmp_path / "train", per_class=8, bad=False)
    image_folder(tmp_path / "val", per_class=3, bad=False)
    cfg = compose([
        "data=folder", f"data.train_path={tmp_path / 'train'}", f"data.eval_path={tmp_path / 'val'}",
        "data.num_classes=3", "data.img_size=16", "data.global_batch=8", "data.num_workers=0",
        "aug=randaug_mixup", "aug.randaug_magnitude=10", "aug.mixup=0.2", "aug.eval_crop_pct=0.8",
        *tiny_run, "trainer.epochs=1", f"run_root={tmp_path / 'runs'}",
    ])
    results = pretrain(cfg, progress=False)
    assert results["steps"] == 24 // 8 and results["num_samples"] == 9
    ckpt = torch.load(next((tmp_path / "runs").rglob("last.ckpt")), weights_only=False)
    pre = ckpt["mixer"]["pretrained_cfg"]  # recorded from the config, so the checkpoint's user needs no guessing;
    # "box": the area resize of the pre-training evaluation, timm's nearest name (aug.eval_interpolation)
    assert {k: pre[k] for k in ("mean", "std", "interpolation", "crop_mode", "crop_pct")} == {
        "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "box", "crop_mode": "center", "crop_pct": 0.8}
    assert tuple(pre["input_size"]) == (3, 16, 16)
    # the classes are named as the folders are, in label order; the loss says how logits become probabilities
    assert (pre["label_names"], pre["head_activation"]) == (tuple(sorted(CLASSES)), "softmax")


def test_shards_of_undecodable_images_stop_training_instead_of_spinning(tmp_path):
    (tmp_path / "s").mkdir()
    with wds.TarWriter(str(tmp_path / "s" / "shard-000000.tar")) as sink:  # a sound tar of bad JPEGs
        for i in range(4):
            sink.write({"__key__": f"{i:09d}", "jpg": b"\xff\xd8\xffnot a jpeg", "cls": i})
    ds = TrainShards([str(tmp_path / "s" / "shard-000000.tar")], 4, eval_transform(DATA, PLAIN), 3, 2, 0)
    ds.set_epoch_length(1, 1)
    with pytest.raises(UserError, match="1000 corrupt samples in a row"):
        next(iter(ds))


def test_digits_is_a_source_split_half_and_half():
    from mixer_cli.config.compose import compose

    cfg = compose(["data=digits"])
    train, test = build_dataset(cfg.data, cfg.aug, "train"), build_dataset(cfg.data, cfg.aug, "test")
    assert (len(train), len(test)) == (896, 901)  # 1,797 images, each class halved (odd ones round down)
    assert train[0][0].shape == (1, 28, 28)


def test_unaugmented_train_split_is_deterministic():
    from mixer_cli.config.compose import compose

    cfg = compose([])  # the demo: random 2-pixel shifts on train
    augmented = build_dataset(cfg.data, cfg.aug, "train")
    plain = build_dataset(cfg.data, cfg.aug, "train", augment=False)
    assert any(not torch.equal(augmented[0][0], augmented[0][0]) for _ in range(10))
    assert torch.equal(plain[0][0], plain[0][0])
