"""The linear few-shot probe (`mixer fewshot`, FewShotCallback) against scikit-learn and the protocol."""
import csv
import json
import os
import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from torch.nn import functional as F
from typer.testing import CliRunner

from mixer_cli.cli import app
from mixer_cli.data.tensor import TensorImages
from mixer_cli.evaluate.fewshot import (
    L2_GRID,
    FewShotCallback,
    RidgeProblem,
    class_ranks,
    extract_class_prefix,
    extract_features,
    extract_train_pool,
    fewshot_accuracies,
    fit_ridge,
    make_loader,
    ridge_fewshot_accuracy,
    sample_shots,
)
from mixer_cli.models import build_mixer


def _clusters(n_per_class, num_classes, dim, seed=0, spread=1.0):
    """Gaussian clusters around fixed class centres (the same for every seed), shifted off the
    origin: features (N, dim) float32 and labels (N,)."""
    centres = np.random.default_rng(dim).normal(size=(num_classes, dim)) * 0.5 + 3
    y = np.repeat(np.arange(num_classes), n_per_class)
    x = centres[y] + spread * np.random.default_rng(seed).normal(size=(len(y), dim))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def _sklearn_scores(train_x, train_y, test_x, num_classes, l2):
    """Ridge(fit_intercept=True) on features standardised on the train set, targets 2 onehot - 1."""
    x, t = train_x.double().numpy(), test_x.double().numpy()
    mean, std = x.mean(0), x.std(0) + 1e-5
    targets = 2 * np.eye(num_classes)[train_y.numpy()] - 1
    ridge = Ridge(alpha=l2, fit_intercept=True).fit((x - mean) / std, targets)
    return ridge.predict((t - mean) / std)


@pytest.mark.parametrize("n_per_class,dim", [(25, 64), (2, 256)], ids=["primal N>D", "dual N<D"])
@pytest.mark.parametrize("l2", [2.0**10, 2.0**-3])
def test_probe_equals_sklearn_ridge(n_per_class, dim, l2):
    train_x, train_y = _clusters(n_per_class, 20, dim, seed=1)
    test_x, test_y = _clusters(30, 20, dim, seed=2)
    probe = fit_ridge(train_x, train_y, 20, l2=l2)
    assert RidgeProblem(train_x, train_y, 20).primal == (len(train_y) >= dim)
    reference = _sklearn_scores(train_x, train_y, test_x, 20, l2)
    np.testing.assert_allclose(probe.scores(test_x).numpy(), reference, rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(probe.predict(test_x).numpy(), reference.argmax(1))
    (from_eigh,) = RidgeProblem(train_x, train_y, 20).solve_many([l2])  # the path l2=select takes
    np.testing.assert_allclose(from_eigh.scores(test_x).numpy(), reference, rtol=1e-3, atol=1e-4)
    accuracy = ridge_fewshot_accuracy(train_x, train_y, test_x, test_y, 20, l2=l2)
    assert accuracy == pytest.approx((reference.argmax(1) == test_y.numpy()).mean())
    assert 0.1 < accuracy < 1.0  # a problem where the probe can be right and wrong


def test_probe_is_invariant_to_feature_scale_and_shift():
    train_x, train_y = _clusters(5, 10, 32)
    test_x, _ = _clusters(10, 10, 32, seed=3)
    a = fit_ridge(train_x, train_y, 10).scores(test_x)
    scale, shift = torch.rand(32) * 10 + 0.1, torch.randn(32) * 100  # standardisation removes both
    b = fit_ridge(train_x * scale + shift, train_y, 10).scores(test_x * scale + shift)
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_huge_l2_leaves_only_the_unregularised_bias():
    """With every weight shrunk to zero, scores are the mean targets 2 n_c / n - 1, for all inputs."""
    train_x, train_y = _clusters(3, 4, 8)
    train_x, train_y = train_x[:10], train_y[:10]  # class counts 3, 3, 3, 1
    probe = fit_ridge(train_x, train_y, 4, l2=1e12)
    expected = torch.tensor([2 * 3 / 10 - 1] * 3 + [2 * 1 / 10 - 1]).expand(5, 4)
    torch.testing.assert_close(probe.scores(torch.randn(5, 8) * 100), expected, rtol=0, atol=1e-6)


def test_shots_are_class_balanced_nested_and_reproducible():
    labels = np.random.default_rng(0).integers(0, 7, size=500)
    five = sample_shots(labels, 5, seed=3)
    assert np.bincount(labels[five], minlength=7).tolist() == [5] * 7
    assert set(sample_shots(labels, 1, seed=3)) < set(five) < set(sample_shots(labels, 10, seed=3))
    np.testing.assert_array_equal(five, sample_shots(labels, 5, seed=3))
    assert not np.array_equal(five, sample_shots(labels, 5, seed=4))
    ranks = class_ranks(labels, seed=3)  # each class's ranks are a permutation of 0..count-1
    for c in range(7):
        assert sorted(ranks[labels == c]) == list(range((labels == c).sum()))


def test_more_shots_than_a_class_has_is_a_clear_error():
    labels = np.array([0] * 30 + [1] * 4 + [2] * 30)
    with pytest.raises(ValueError, match=r"^class 1 has only 4 training example\(s\), fewer than the 5 shots asked "
                                         r"for; ask for at most 4 \(e\.g\. --shots 4\)$"):
        sample_shots(labels, 5, seed=0)
    with pytest.raises(ValueError, match=r"^class 3 has only 0 training example"):
        sample_shots(labels, 1, seed=0, num_classes=4)


def _tiny_mixer(num_classes=3, img=8):
    return build_mixer(None, num_classes=num_classes, img_size=img, in_chans=1, patch_size=4, hidden_dim=16,
                       num_blocks=1, tokens_mlp_dim=4, channels_mlp_dim=32)


def _images(n_per_class, num_classes=3, img=8, seed=0):
    """Class c is a bright horizontal band at row 2c plus noise: easy, but not trivial, to separate."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(num_classes), n_per_class)
    x = rng.integers(0, 120, size=(len(y), img, img))
    for i, c in enumerate(y):
        x[i, 2 * c] = 255
    return TensorImages(x.astype(np.uint8), y, transform=lambda t: t.float() / 255)


def test_features_are_the_pre_logits_and_the_mode_is_restored():
    model, data = _tiny_mixer().train(), _images(4)
    x, y = extract_features(model, make_loader(data, batch_size=5))
    assert model.training
    with torch.no_grad():
        torch.testing.assert_close(x, model.eval().forward_features(torch.stack([data[i][0] for i in range(12)])))
    torch.testing.assert_close(y, data.labels)


def test_a_stream_gives_the_first_examples_of_each_class_and_stops_early():
    model, data = _tiny_mixer(), _images(6)
    order = [0, 1, 2, 6, 3, 7, 12, 13, 8, 4, 5, 9, 10, 11, 14, 15, 16, 17]  # classes 0-5, 6-11, 12-17
    batches = [(torch.stack([data[i][0] for i in order[s:s + 4]]), data.labels[order[s:s + 4]])
               for s in range(0, 18, 4)]
    read = []
    x, y = extract_class_prefix(model, (read.append(b) or b for b in batches), per_class=2, num_classes=3)
    first_two = [0, 1, 6, 7, 12, 13]  # in stream order: 0, 1, 6, 7, 12, 13 all lie in the first 8
    assert len(read) == 2  # stopped after the second batch of 4
    assert torch.bincount(y).tolist() == [2, 2, 2]
    with torch.no_grad():
        reference = model.forward_features(torch.stack([data[i][0] for i in first_two]))
    torch.testing.assert_close(x[torch.argsort(y, stable=True)], reference)


def test_one_feature_pass_serves_every_shot_count_and_seed():
    model, data = _tiny_mixer(), _images(20)
    pool = extract_train_pool(model, data, shots=5, seeds=[0, 1], num_classes=3, batch_size=16)
    assert len(pool.y) <= 2 * 5 * 3  # only the examples some sample needs
    test_x, test_y = extract_features(model, make_loader(_images(10, seed=1), batch_size=16))
    rows = fewshot_accuracies(pool, test_x, test_y, 3, shots=[1, 5], l2=2.0**10)
    assert [(r["shots"], r["seed"]) for r in rows] == [(1, 0), (5, 0), (1, 1), (5, 1)]
    # each row equals the probe on exactly sample_shots' sample, computed on its own
    full_x, full_y = extract_features(model, make_loader(data, batch_size=16))
    for r in rows:
        idx = sample_shots(data.labels.numpy(), r["shots"], r["seed"])
        assert r["accuracy"] == pytest.approx(ridge_fewshot_accuracy(full_x[idx], full_y[idx], test_x, test_y, 3))


def test_selected_l2_is_the_best_on_held_out_examples_none_of_the_samples_contain():
    train_x, train_y = _clusters(30, 5, 40, spread=3.0)
    ranks = torch.from_numpy(class_ranks(train_y.numpy(), seed=0))
    pool = type("Pool", (), {"x": train_x, "y": train_y, "ranks": {0: ranks}})
    test_x, test_y = _clusters(20, 5, 40, seed=5, spread=3.0)
    (row,) = fewshot_accuracies(pool, test_x, test_y, 5, shots=[5], l2=None, held_out=10)
    held = (ranks >= 5) & (ranks < 15)
    problem = RidgeProblem(train_x[ranks < 5], train_y[ranks < 5], 5)
    val = [problem.solve(l2).accuracy(train_x[held], train_y[held]) for l2 in L2_GRID]
    assert row["l2"] in L2_GRID and val[L2_GRID.index(row["l2"])] == max(val)
    assert row["l2"] == max(l2 for l2, v in zip(L2_GRID, val) if v == max(val))


class _Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = _tiny_mixer()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_callback_logs_fewshot_accuracy_every_n_steps(tmp_path):
    train, test = _images(10), _images(5, seed=1)
    callback = FewShotCallback(train, test, shots=[1, 5], every_n_steps=2, batch_size=32)
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="", version="")
    trainer = L.Trainer(max_steps=5, logger=logger, callbacks=[callback], enable_progress_bar=False,
                        log_every_n_steps=1, enable_model_summary=False, enable_checkpointing=False, accelerator="cpu")
    trainer.fit(_Classifier(), torch.utils.data.DataLoader(train, batch_size=6, shuffle=True))
    with open(tmp_path / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["fewshot/5shot"]]
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 5]  # start, every 2 steps, end
    # the last value is the probe of the trained model, recomputed independently
    model = trainer.lightning_module.model
    idx = sample_shots(train.labels.numpy(), 5, seed=0)
    x, y = extract_features(model, make_loader(torch.utils.data.Subset(train, idx.tolist()), 32))
    tx, ty = extract_features(model, make_loader(test, 32))
    assert float(rows[-1]["fewshot/5shot"]) == pytest.approx(ridge_fewshot_accuracy(x, y, tx, ty, 3))


def test_callback_refuses_more_shots_than_a_class_has():
    with pytest.raises(ValueError, match=r"^class 0 has only 3 training example\(s\), fewer than the 5 shots"):
        FewShotCallback(_images(3), _images(3), shots=5, every_n_steps=10)


def _checkpoint(path):
    """A file as `mixer pretrain` writes it, for a tiny Mixer on 28x28 grey images."""
    model = build_mixer(None, num_classes=10, img_size=28, in_chans=1, patch_size=7, hidden_dim=16,
                        num_blocks=1, tokens_mlp_dim=8, channels_mlp_dim=32)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    preprocess = {"img_size": 28, "channels": 1, "mean": [0.1307], "std": [0.3081], "interpolation": "bilinear",
                  "eval_crop": "none"}
    torch.save({"state_dict": state, "mixer": {"spec": model.spec.to_dict(), "preprocess": preprocess}}, path)
    return path


@pytest.mark.parametrize("args,message", [
    (["--shots", "100"], "error: class 8 has only 87 training example(s), fewer than the 100 shots asked for; "
                         "ask for at most 87 (e.g. --shots 87)"),
    (["--shots", "85", "fewshot.l2=select"],
     "error: class 8 has only 87 training example(s), fewer than the 85 shots plus 10 held out for choosing l2 "
     "asked for; ask for at most 77 (e.g. --shots 77)"),
    (["--shots", "5,x"], "error: --shots takes whole numbers separated by commas, e.g. --shots 1,5,10,25; got '5,x'"),
    (["fewshot.l2=-1"], "error: fewshot.l2 must be positive (default 1024) or 'select', not -1"),
])
def test_user_mistakes_end_in_one_line_and_write_nothing(tmp_path, args, message):
    r = CliRunner().invoke(app, ["fewshot", "--from", str(_checkpoint(tmp_path / "a.ckpt")), *args,
                                 f"run_root={tmp_path / 'runs'}"])
    assert r.exit_code == 2 and r.output.strip() == message
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_cli_transfers_a_checkpoint_to_the_digits(tmp_path):
    ckpt = _checkpoint(tmp_path / "last.ckpt")
    r = subprocess.run([sys.executable, "-m", "mixer_cli.cli", "fewshot", "--from", str(ckpt), "--shots", "1,5",
                        "fewshot.seeds=2", f"run_root={tmp_path}"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr[-2000:]
    (run_dir,) = (tmp_path / "fewshot").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert {p.name for p in run_dir.iterdir()} == {"config.yaml", "results.json", "fewshot.csv", "fewshot.png"}
    assert [(s["shots"], s["seeds"]) for s in results["summary"]] == [(1, 2), (5, 2)]
    assert results["feature_dim"] == 16 and results["test_examples"] == 901 and results["l2"] == 1024
    five = [row["accuracy"] for row in results["runs"] if row["shots"] == 5]
    assert results["summary"][1]["mean"] == pytest.approx(np.mean(five))
    assert results["summary"][1]["mean"] > 0.3  # random features of a tiny Mixer still beat chance (10%) on digits
    assert "Linear few-shot top-1" in r.stdout


def _write_folder(root, per_class, seed):
    """Three classes of 28x28 grey PNGs (a bright band at a class-specific row) in ImageFolder layout."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(3):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 100, size=(28, 28), dtype=np.uint8)
            pixels[8 * c: 8 * c + 4] = 255
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def test_image_folders_and_shards_give_the_same_probe(tmp_path):
    """With exactly `shots` train images per class both sources hold the same sample: the folder is
    sampled by its labels, the shards by streaming, and the test split must be read exactly once."""
    from mixer_cli.data.writer import folder_samples, write_shards

    ckpt = _checkpoint(tmp_path / "a.ckpt")
    folders = {"train": _write_folder(tmp_path / "train", 3, 0), "val": _write_folder(tmp_path / "val", 5, 1)}
    for split, folder in folders.items():
        write_shards(*folder_samples(folder), tmp_path / "shards" / split, shard_size=4)
    runs = {}
    for source, root in (("folder", tmp_path), ("shards", tmp_path / "shards")):
        r = CliRunner().invoke(app, ["fewshot", "--from", str(ckpt), "--shots", "1,3", "data=folder",
                                     f"data.source={source}", f"data.train_path={root / 'train'}",
                                     f"data.eval_path={root / 'val'}", "data.num_classes=3", "data.num_workers=0",
                                     "fewshot.seeds=1", f"run_root={tmp_path / source}"])
        assert r.exit_code == 0, r.output
        (run_dir,) = (tmp_path / source / "fewshot").iterdir()
        runs[source] = json.loads((run_dir / "results.json").read_text())
    assert runs["folder"]["test_examples"] == runs["shards"]["test_examples"] == 15
    three = [[row["accuracy"] for row in runs[s]["runs"] if row["shots"] == 3] for s in runs]
    assert three[0] == pytest.approx(three[1])
