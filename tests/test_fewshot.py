"""The linear few-shot probe (evaluate/fewshot.py) against scikit-learn and the protocol; its wrappers,
`mixer fewshot` (evaluate/fewshot_command.py) and FewShotCallback."""
import csv
import json

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from torch.nn import functional as F
from torch.utils.data import DataLoader

from mixer_cli.commands.fewshot import fewshot_command, parse_shots
from mixer_cli.config.compose import compose
from mixer_cli.core.errors import UserError
from mixer_cli.data.tensor import TensorImages
from mixer_cli.evaluate.fewshot import (
    L2_GRID,
    FewShotCallback,
    FewShotEvaluator,
    RidgeProblem,
    TrainPool,
    check_counts,
    class_prefix,
    class_ranks,
    extract_features,
    fewshot_accuracies,
    fewshot_callback,
    per_class_accuracy,
    probe_data,
)
from mixer_cli.models import build_mixer
from mixer_cli.models.checkpoints import export_safetensors


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
    problem = RidgeProblem(train_x, train_y, 20)
    assert problem.primal == (len(train_y) >= dim)
    probe = problem.solve(l2)
    reference = _sklearn_scores(train_x, train_y, test_x, 20, l2)
    np.testing.assert_allclose(probe.scores(test_x).numpy(), reference, rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(probe.predict(test_x).numpy(), reference.argmax(1))
    (from_eigh,) = problem.solve_many([l2])  # the path l2=select takes
    np.testing.assert_allclose(from_eigh.scores(test_x).numpy(), reference, rtol=1e-3, atol=1e-4)
    accuracy = probe.accuracy(test_x, test_y)
    assert accuracy == pytest.approx((reference.argmax(1) == test_y.numpy()).mean())
    assert 0.1 < accuracy < 1.0  # a problem where the probe can be right and wrong


def test_probe_is_invariant_to_feature_scale_and_shift():
    train_x, train_y = _clusters(5, 10, 32)
    test_x, _ = _clusters(10, 10, 32, seed=3)
    a = RidgeProblem(train_x, train_y, 10).solve().scores(test_x)
    scale, shift = torch.rand(32) * 10 + 0.1, torch.randn(32) * 100  # standardisation removes both
    b = RidgeProblem(train_x * scale + shift, train_y, 10).solve().scores(test_x * scale + shift)
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_default_l2_is_the_papers_two_to_the_ten():
    train_x, train_y = _clusters(5, 4, 64)
    probe = RidgeProblem(train_x, train_y, 4).solve()
    assert probe.l2 == 1024
    reference = _sklearn_scores(train_x, train_y, train_x, 4, 1024.0)
    np.testing.assert_allclose(probe.scores(train_x).numpy(), reference, rtol=1e-3, atol=1e-4)


def test_huge_l2_leaves_only_the_unregularised_bias():
    """With every weight shrunk to zero, scores are the mean targets 2 n_c / n - 1, for all inputs."""
    train_x, train_y = _clusters(3, 4, 8)
    train_x, train_y = train_x[:10], train_y[:10]  # class counts 3, 3, 3, 1
    probe = RidgeProblem(train_x, train_y, 4).solve(1e12)
    expected = torch.tensor([2 * 3 / 10 - 1] * 3 + [2 * 1 / 10 - 1]).expand(5, 4)
    torch.testing.assert_close(probe.scores(torch.randn(5, 8) * 100), expected, rtol=0, atol=1e-6)


def test_shots_are_class_balanced_reproducible_and_differ_by_seed():
    labels = np.random.default_rng(0).integers(0, 7, size=500)
    ranks = class_ranks(labels, seed=3)
    assert np.bincount(labels[ranks < 5], minlength=7).tolist() == [5] * 7
    np.testing.assert_array_equal(ranks, class_ranks(labels, seed=3))
    assert not np.array_equal(ranks < 5, class_ranks(labels, seed=4) < 5)
    for c in range(7):  # each class's ranks are a permutation of 0..count-1
        assert sorted(ranks[labels == c]) == list(range((labels == c).sum()))


def test_per_class_accuracy_is_sklearns_per_class_recall():
    y = torch.tensor([0, 0, 1, 1, 1, 3, 3, 0])
    predicted = torch.tensor([0, 1, 1, 1, 0, 3, 0, 0])
    ours = per_class_accuracy(predicted, y, 4)
    from sklearn.metrics import recall_score

    expected = recall_score(y, predicted, labels=[0, 1, 3], average=None)
    np.testing.assert_allclose(ours[[0, 1, 3]], expected)
    assert np.isnan(ours[2])  # class 2 has no test example: no accuracy, not 0


def test_a_class_too_small_is_named_when_the_data_names_it():
    with pytest.raises(UserError, match=r"^class 1 \(dog\) has only 2 training example"):
        check_counts(np.array([0] * 5 + [1] * 2), 5, 2, names=["cat", "dog"])


def test_more_shots_than_a_class_has_is_a_clear_error():
    labels = np.array([0] * 30 + [1] * 4 + [2] * 30)
    with pytest.raises(UserError, match=r"^class 1 has only 4 training example\(s\), fewer than the 5 shots asked "
                                        r"for; ask for at most 4 \(e\.g\. --shots 4\)$"):
        check_counts(labels, 5)
    with pytest.raises(UserError, match=r"^class 3 has only 0 training example"):
        check_counts(labels, 1, num_classes=4)
    with pytest.raises(UserError, match=r"^class 0 has only 3 training example\(s\), fewer than the 5 shots"):
        FewShotEvaluator(_images(3), _images(3), 3, [1, 5])  # before any feature is computed


def _tiny_mixer(num_classes=3, img=8):  # kept: 8 px images of 4 px patches, 2 x 2 tokens, as _images draws
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


def _stack(data, indices):
    return torch.stack([data[i][0] for i in indices])


def test_features_are_the_pooled_tokens_and_the_mode_is_restored():
    model, data = _tiny_mixer().train(), _images(4)
    x, y = extract_features(model, DataLoader(data, batch_size=5))
    assert model.training
    with torch.no_grad():
        tokens = model.eval().forward_features(_stack(data, range(12)))  # (B, S, C) after the last LayerNorm
    torch.testing.assert_close(x, tokens.mean(dim=1))
    torch.testing.assert_close(y, data.labels)


def test_a_stream_gives_the_first_examples_of_each_class_and_stops_early():
    data = _images(6)
    order = [0, 1, 2, 6, 3, 7, 12, 13, 8, 4, 5, 9, 10, 11, 14, 15, 16, 17]  # classes 0-5, 6-11, 12-17
    batches = [(_stack(data, order[s:s + 4]), data.labels[order[s:s + 4]]) for s in range(0, 18, 4)]
    read = []
    taken = list(class_prefix((read.append(b) or b for b in batches), per_class=2, num_classes=3))
    assert len(read) == 2  # 0, 1, 6, 7, 12, 13 all lie in the first 8: stopped after the second batch of 4
    x, y = torch.cat([x for x, _ in taken]), torch.cat([y for _, y in taken])
    torch.testing.assert_close(x, _stack(data, [0, 1, 6, 7, 12, 13]))
    assert y.tolist() == [0, 0, 1, 1, 2, 2]


class _CountImages(torch.nn.Module):
    """Counts the images the model is run on."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, 0

    def forward_features(self, x):
        self.seen += len(x)
        return self.model.forward_features(x)

    def forward_head(self, x, pre_logits=False):
        return self.model.forward_head(x, pre_logits=pre_logits)


def test_one_feature_pass_serves_every_shot_count_and_seed():
    model, train, test = _tiny_mixer(), _images(20), _images(10, seed=1)
    counted = _CountImages(model)
    result = FewShotEvaluator(train, test, 3, [5, 1], seeds=[0, 1], batch_size=16).run(counted)
    labels = train.labels.numpy()
    needed = (class_ranks(labels, 0) < 5) | (class_ranks(labels, 1) < 5)
    assert counted.seen == needed.sum() + len(test.labels) < len(labels) + len(test.labels)
    assert [(r["shots"], r["seed"]) for r in result["runs"]] == [(1, 0), (5, 0), (1, 1), (5, 1)]
    # each row equals the probe on exactly that seed's sample, computed on its own
    full_x, full_y = extract_features(model, DataLoader(train, batch_size=16))
    test_x, test_y = extract_features(model, DataLoader(test, batch_size=16))
    for r in result["runs"]:
        take = torch.from_numpy(class_ranks(labels, r["seed"]) < r["shots"])
        expected = RidgeProblem(full_x[take], full_y[take], 3).solve(1024).accuracy(test_x, test_y)
        assert r["accuracy"] == pytest.approx(expected)
    for k in (1, 5):
        per_seed = [r["accuracy"] for r in result["runs"] if r["shots"] == k]
        assert result["accuracy"][k] == pytest.approx(np.mean(per_seed))
    assert (result["feature_dim"], result["num_samples"]) == (16, 30)


def test_the_transform_reaches_every_image_before_the_model():
    """A transform that blanks the images leaves every feature equal: the probe scores chance."""
    model, train, test = _tiny_mixer(), _images(10), _images(10, seed=1)
    blank = FewShotEvaluator(train, test, 3, [5], transform=torch.zeros_like).run(model)["accuracy"][5]
    plain = FewShotEvaluator(train, test, 3, [5]).run(model)["accuracy"][5]
    assert blank == pytest.approx(1 / 3) and plain > 0.5


def test_selected_l2_is_the_best_on_held_out_examples_none_of_the_samples_contain():
    train_x, train_y = _clusters(30, 5, 40, spread=3.0)
    ranks = torch.from_numpy(class_ranks(train_y.numpy(), seed=0))
    test_x, test_y = _clusters(20, 5, 40, seed=5, spread=3.0)
    (row,) = fewshot_accuracies(TrainPool(train_x, train_y, {0: ranks}), test_x, test_y, 5, [5], l2=None, held_out=10)
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


def test_callback_logs_the_evaluators_accuracy_every_n_steps(tmp_path):
    train, test = _images(10), _images(5, seed=1)
    evaluator = FewShotEvaluator(train, test, 3, [1, 5], batch_size=32)
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="", version="")
    trainer = L.Trainer(max_steps=5, logger=logger, callbacks=[FewShotCallback(evaluator, every_n_steps=2)],
                        enable_progress_bar=False, log_every_n_steps=1, enable_model_summary=False,
                        enable_checkpointing=False, accelerator="cpu")
    trainer.fit(_Classifier(), DataLoader(train, batch_size=6, shuffle=True))
    with open(tmp_path / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["fewshot/5shot"]]
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 5]  # start, every 2 steps, end
    assert len({r["fewshot/5shot"] for r in rows}) > 1  # the model under training, not a copy of the first
    final = evaluator.run(trainer.lightning_module.model)["accuracy"]
    assert float(rows[-1]["fewshot/5shot"]) == pytest.approx(final[5])
    assert float(rows[-1]["fewshot/1shot"]) == pytest.approx(final[1])
    assert trainer.callback_metrics["fewshot/5shot"].item() == pytest.approx(final[5])


def test_callback_is_built_only_when_asked_for():
    assert fewshot_callback(compose(["fewshot.every_n_steps=0"])) is None
    with pytest.raises(UserError, match=r"^fewshot.l2=select is for `mixer fewshot`; during training give a number "
                                        r"\(default 1024\)$"):
        compose(["fewshot.every_n_steps=5", "fewshot.l2=select"])  # the schema's check, not the callback's


def test_fewshot_data_is_a_data_set_apart_drawn_as_the_training_data():
    """Pre-training on the MNIST demo at 16 px with other normalisation, probing scikit-learn's digits."""
    cfg = compose(["fewshot.every_n_steps=5", "fewshot.data=digits", "fewshot.shots=[1,5]", "data.img_size=16",
                   "data.mean=[0.5]", "data.std=[0.5]"])
    callback = fewshot_callback(cfg)
    evaluator = callback.evaluator
    assert callback.every_n_steps == 5 and evaluator.shots == [1, 5] and evaluator.l2 == 1024
    assert (len(evaluator.train_dataset), len(evaluator.test_dataset)) == (896, 901)  # the digits, not the demo's
    image, _ = evaluator.train_dataset[0]
    assert image.shape == (1, 16, 16)
    assert image.min().item() == pytest.approx(-1.0)  # black background at mean 0.5, std 0.5 (MNIST's: -0.42)
    without = compose(["fewshot.every_n_steps=5"])
    assert len(fewshot_callback(without).evaluator.train_dataset) == 4000  # default: the training data's own
    # a data config with interpolations resolves as in a composed config
    imagenet = probe_data(compose(["fewshot.data=imagenet", "data.img_size=64"], config_name="config"))
    assert imagenet.train_path.endswith("/imagenet/train") and imagenet.img_size == 64
    with pytest.raises(UserError, match=r"^fewshot.data must be one of .*digits.* or null, got 'nope'$"):
        probe_data(compose(["fewshot.data=nope"]))


def _checkpoint(model, path):
    """The tiny Mixer on grey images with MNIST's normalisation, as `mixer export` writes it."""
    img_size = model.spec.img_size
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (1, img_size, img_size), "mean": (0.1307,),
                            "std": (0.3081,), "interpolation": "bilinear", "crop_mode": "squash", "crop_pct": 1.0}
    return export_safetensors(model, path)


def _run_fewshot(tmp_path, checkpoint, shots="1,5", *overrides):
    cfg = compose([f"run_root={tmp_path / 'runs'}", *overrides], config_name="fewshot")
    return fewshot_command(cfg, checkpoint, parse_shots(shots))


@pytest.mark.parametrize("shots,overrides,message", [
    ("100", [], "class 8 has only 87 training example(s), fewer than the 100 shots asked for; "
                "ask for at most 87 (e.g. --shots 87)"),
    ("85", ["fewshot.l2=select"], "class 8 has only 87 training example(s), fewer than the 85 shots plus 10 held "
                                  "out for choosing l2 asked for; ask for at most 77 (e.g. --shots 77)"),
    ("5", ["fewshot.l2=-1"], "fewshot.l2 must be a number > 0 or 'select', got -1"),
    ("5", ["fewshot.seeds=0"], "fewshot.seeds must be a whole number >= 1, got 0"),
])
def test_user_mistakes_are_one_line_and_write_nothing(tmp_path, shots, overrides, message, tiny_mixer):
    with pytest.raises(UserError) as e:
        _run_fewshot(tmp_path, _checkpoint(tiny_mixer(), tmp_path / "a.safetensors"), shots, *overrides)
    assert str(e.value) == message
    assert not (tmp_path / "runs").exists()


def test_shots_are_parsed_or_refused_in_one_line():
    assert parse_shots("25, 5,1,5") == [1, 5, 25]
    with pytest.raises(UserError, match=r"^--shots takes whole numbers separated by commas, e\.g\. --shots "
                                        r"1,5,10,25; got '5,x'$"):
        parse_shots("5,x")
    with pytest.raises(UserError, match=r"^--shots must be at least 1, e\.g\. --shots 1,5,10,25; got '0,5'$"):
        parse_shots("0,5")


def test_command_probes_the_digits_with_the_checkpoints_preprocessing(tmp_path, tiny_mixer):
    """The checkpoint takes 16 x 16 images; the digits (28 x 28 in their data config) are drawn at 16."""
    checkpoint = _checkpoint(tiny_mixer(img_size=16), tmp_path / "a.safetensors")
    results = _run_fewshot(tmp_path, checkpoint, "1,5", "fewshot.seeds=2")
    (run_dir,) = (tmp_path / "runs" / "fewshot").iterdir()
    assert {p.name for p in run_dir.iterdir()} == {"config.yaml", "results.json", "fewshot.csv", "fewshot.png",
                                                   "fewshot_per_class.csv"}
    assert json.loads((run_dir / "results.json").read_text()) == results
    assert (results["command"], results["feature_dim"], results["num_samples"], results["l2"]) == ("fewshot", 16, 901,
                                                                                                     1024)
    assert [(s["shots"], s["seeds"]) for s in results["summary"]] == [(1, 2), (5, 2)]
    five = [row["accuracy"] for row in results["runs"] if row["shots"] == 5]
    assert results["summary"][1]["mean"] == pytest.approx(np.mean(five)) == pytest.approx(results["fewshot_5shot"])
    assert results["fewshot_5shot"] > 0.3  # random features of a tiny Mixer still beat chance (10%) on digits
    with open(run_dir / "fewshot.csv") as f:
        assert [(int(r["shots"]), int(r["seed"])) for r in csv.DictReader(f)] == [(1, 0), (5, 0), (1, 1), (5, 1)]
    assert "img_size: 16" in (run_dir / "config.yaml").read_text()
    # per class, by the digits' names: weighted by each class's test images, the rows give the accuracy back
    from mixer_cli.data.digits import digits_arrays

    with open(run_dir / "fewshot_per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [str(d) for d in range(10)]
    counts = np.bincount(digits_arrays("test")[1], minlength=10)
    assert np.dot(counts, [float(r["5shot"]) for r in rows]) / counts.sum() == pytest.approx(results["fewshot_5shot"])
    worst = min(rows, key=lambda r: float(r["5shot"]))
    assert results["hardest_classes"][0] == {"class": int(worst["class"]), "name": worst["name"],
                                             "accuracy": float(worst["5shot"])}


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


def test_image_folders_and_shards_give_the_same_probe(tmp_path, tiny_mixer):
    """With exactly `shots` train images per class both sources hold the same sample: the folder is
    sampled by its labels, the shards by streaming, and the test split must be read exactly once."""
    from mixer_cli.data.writer import folder_samples, write_shards

    ckpt = _checkpoint(tiny_mixer(), tmp_path / "a.safetensors")
    folders = {"train": _write_folder(tmp_path / "train", 3, 0), "val": _write_folder(tmp_path / "val", 5, 1)}
    for split, folder in folders.items():
        write_shards(*folder_samples(folder), tmp_path / "shards" / split, shard_size=4)
    runs = {}
    for source, root in (("folder", tmp_path), ("shards", tmp_path / "shards")):
        runs[source] = _run_fewshot(tmp_path / source, ckpt, "1,3", "data=folder", f"data.source={source}",
                                    f"data.train_path={root / 'train'}", f"data.eval_path={root / 'val'}",
                                    "data.num_classes=3", "data.num_workers=0", "fewshot.seeds=1")
    assert runs["folder"]["num_samples"] == runs["shards"]["num_samples"] == 15
    three = [[row["accuracy"] for row in runs[s]["runs"] if row["shots"] == 3] for s in runs]
    assert three[0] == pytest.approx(three[1])
