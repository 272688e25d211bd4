"""`mixer report` on run directories the tests write: rows beside the paper, links, plots, "-" cells."""
import csv
import json
import os
from statistics import fmean

import pytest
import yaml

from mixer_cli.commands.report import build_report
from mixer_cli.core.errors import UserError

_clock = iter(range(1_000_000_000, 2_000_000_000, 60))  # run i finishes a minute after run i - 1


def write_run(root, command, name, results, config=None):
    run = root / command / f"2026{len(list((root / command).glob('*'))) if (root / command).is_dir() else 0:04d}-{name}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"name": name, **(config or {})}))
    (run / "results.json").write_text(json.dumps({"command": command, "name": name, **results}))
    mtime = next(_clock)
    os.utime(run / "results.json", (mtime, mtime))
    return run


def finetune(root, name, source, target, top1, img_size=224, **results):
    return write_run(root, "finetune", name, {"from": str(source), "top1": top1, "top5": 1.0, **results},
                     {"target": target, "data": {"img_size": img_size}})


def read_report(out):
    rows = list(csv.DictReader((out / "report.csv").open()))
    return {(r["section"], r["row"], r["img_size"]): r for r in rows}, (out / "report.md").read_text()


def number(text):
    return float(text) if text else None


@pytest.fixture()
def demo_runs(tmp_path):
    runs = tmp_path / "runs"
    demo = write_run(runs, "pretrain", "demo", {"top1": 0.95, "device_hours": 0.02, "model": "custom (patch 4)"},
                     {"model": {"variant": None}, "data": {"img_size": 28}})
    finetune(runs, "ft_demo", demo / "last.ckpt", "demo", 0.97, img_size=28)
    return runs


def test_the_demo_reports_its_own_row_and_leaves_the_paper_rows_unmeasured(demo_runs, tmp_path):
    out = build_report([demo_runs], tmp_path / "out")
    rows, md = read_report(out)
    demo = rows[("Other runs", "demo", "28")]
    assert number(demo["pretrain_top1"]) == pytest.approx(95.0)
    assert number(demo["cost_hours"]) == pytest.approx(0.02) and demo["cost_hours_paper"] == ""
    assert demo["imagenet_top1"] == demo["imagenet_top1_paper"] == ""  # the demo is not an ImageNet model
    assert demo["finetunes"] == "demo@28 97.00"
    paper_rows = [r for r in rows.values() if r["section"] != "Other runs"]
    assert len(paper_rows) >= 14  # Table 3's Mixer rows (12 at 224, 2 at 448) and Table 2's
    for row in paper_rows:  # nothing measured, every paper number shown
        assert all(row[k] == "" for k in ("imagenet_top1", "real_top1", "avg5", "vtab1k", "throughput",
                                          "cost_hours", "pretrain_top1"))
        assert row["imagenet_top1_paper"] != "" and row["imagenet_top1_diff"] == ""
    i1k = rows[("Table 3", "i1k_b16", "224")]
    assert (number(i1k["imagenet_top1_paper"]), number(i1k["cost_hours_paper"])) == (76.44, 240)  # 0.01k core-days
    assert "| i1k_b16 | B/16 | 224 | - | - / 76.44 | - / 82.36 | - / 88.33 | - / - | - / 1,384 | - / 240 |" in md
    assert "| demo | custom | 28 | 95.00 | - / - |" in md
    assert (out / "accuracy_vs_cost.png").stat().st_size > 0 and (out / "accuracy_vs_throughput.png").is_file()
    assert not (out / "fewshot_vs_data_size.png").exists()  # no Section 3.3 runs
    assert out.parent == tmp_path / "out" / "report"


def test_a_paper_row_measured_end_to_end(demo_runs, tmp_path):
    runs = demo_runs
    jft = write_run(runs, "pretrain", "jft_b16", {"top1": 0.41, "device_hours": 960.0, "model": "B/16"},
                    {"model": {"variant": "B/16"}, "data": {"img_size": 224}})
    ckpt = jft / "last.ckpt"
    finetune(runs, "ft_imagenet", ckpt, "imagenet", 0.70)  # an earlier lr of the sweep: the latest counts
    imagenet = finetune(runs, "ft_imagenet", ckpt, "imagenet", 0.79)
    write_run(runs, "eval", "ft_imagenet-last", {"from": str(imagenet / "last.ckpt"), "top1": 0.79, "real_top1": 0.85},
              {"data": {"img_size": 224, "num_classes": 1000}})
    others = {"cifar10": 0.99, "cifar100": 0.90, "pets": 0.95, "flowers102": 0.985}
    for target, top1 in others.items():
        finetune(runs, f"ft_{target}", ckpt, target, top1)
    finetune(runs, "ft_cifar10", ckpt, "cifar10", 0.5, img_size=448)  # another resolution: not in the 224 row
    finetune(runs, "ft_vtab", ckpt, "vtab", 0.6, vtab1k={"mean": 0.70, "natural": 0.8})
    write_run(runs, "benchmark", "benchmark", {"device": {"name": "Test GPU"}, "results": [
        {"model": "mixer-b16", "res": 224, "mode": "infer", "img_s_per_device": 692.0}]})
    out = build_report([runs], tmp_path / "out")
    rows, md = read_report(out)
    row = rows[("Table 3", "jft_b16", "224")]
    avg5 = 100 * fmean([0.79, *others.values()])
    expected = {"imagenet_top1": (79.0, 80.0, -1.0), "real_top1": (85.0, 85.56, -0.56),
                "avg5": (avg5, 92.6, avg5 - 92.6), "vtab1k": (70.0, None, None),
                "throughput": (692.0, 1384, 0.5), "cost_hours": (960.0, 1920, 0.5)}  # 0.08k core-days = 1,920 h
    for key, (ours, paper, diff) in expected.items():
        measured = (number(row[key]), number(row[f"{key}_paper"]), number(row[f"{key}_diff"]))
        assert measured == pytest.approx((ours, paper, diff), abs=1e-9), key
    assert number(row["pretrain_top1"]) == pytest.approx(41.0)
    assert row["pretrained"] == str(jft)
    assert "cifar10@448 50.00" in row["finetunes"] and "imagenet@224 79.00" in row["finetunes"]
    assert "| 79.00 / 80.00 (-1.00) | 85.00 / 85.56 (-0.56) |" in md and "(Test GPU)" in md
    assert rows[("Table 3", "jft_s32", "224")]["imagenet_top1"] == ""  # rows we did not run stay empty


def test_a_448_row_takes_imagenet_from_its_recipe_and_the_rest_from_its_model(tmp_path):
    runs = tmp_path / "runs"
    i21k = write_run(runs, "pretrain", "i21k_l16", {"top1": 0.5, "device_hours": 100.0},
                     {"model": {"variant": "L/16"}, "data": {"img_size": 224}})
    finetune(runs, "ft_i21k_l16_448", i21k / "last.ckpt", "imagenet", 0.84, img_size=448, real_top1=0.88)
    out = build_report([runs], tmp_path / "out")
    rows, _ = read_report(out)
    for table, paper in (("Table 3", 83.91), ("Table 2", 84.15)):  # one model, two rows of the paper
        row = rows[(table, "ft_i21k_l16_448", "448")]
        assert (number(row["imagenet_top1"]), number(row["imagenet_top1_paper"])) == pytest.approx((84.0, paper))
        assert number(row["real_top1"]) == pytest.approx(88.0) and number(row["cost_hours"]) == 100.0
        assert row["avg5"] == ""  # four of the five targets not fine-tuned at 448
    assert rows[("Table 3", "i21k_l16", "224")]["imagenet_top1"] == ""  # no ImageNet fine-tune at 224


def test_weights_from_a_file_get_their_own_row(tmp_path):
    runs = tmp_path / "runs"
    npz = tmp_path / "Mixer-B_16.npz"
    write_run(runs, "eval", "Mixer-B_16", {"from": str(npz), "top1": 0.77, "real_top1": 0.83, "model": "B/16"},
              {"data": {"img_size": 224, "num_classes": 1000}})
    finetune(runs, "ft_cifar10", npz, "cifar10", 0.98)
    rows, _ = read_report(build_report([runs], tmp_path / "out"))
    row = rows[("Other runs", "Mixer-B_16.npz", "224")]
    assert (number(row["imagenet_top1"]), number(row["real_top1"])) == pytest.approx((77.0, 83.0))
    assert row["pretrained"] == str(npz) and row["finetunes"] == "cifar10@224 98.00" and row["cost_hours"] == ""


def test_fewshot_accuracy_against_data_set_size(tmp_path):
    runs = tmp_path / "runs"
    for fraction, five in ((0.1, 0.30), (1.0, 0.45)):
        write_run(runs, "pretrain", "jft_b32_subset", {"top1": 0.2, "fewshot_5shot": five},
                  {"model": {"variant": "B/32"}, "data": {"img_size": 224, "train_fraction": fraction}})
    probed = write_run(runs, "pretrain", "jft_b32_subset", {"top1": 0.1},
                       {"model": {"variant": "B/32"}, "data": {"img_size": 224, "train_fraction": 0.03}})
    write_run(runs, "fewshot", "fewshot", {"checkpoint": str(probed / "last.ckpt"),
                                           "summary": [{"shots": 5, "mean": 0.2}, {"shots": 10, "mean": 0.3}]})
    from mixer_cli.reporting.paper import Runs, fewshot_points, find_runs

    assert fewshot_points(Runs(find_runs([runs]))) == {"B/32": [(0.03, 20.0), (0.1, 30.0), (1.0, 45.0)]}
    out = build_report([runs], tmp_path / "out")
    assert (out / "fewshot_vs_data_size.png").stat().st_size > 0
    assert "fewshot_vs_data_size.png" in (out / "report.md").read_text()


def test_a_missing_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="is not a folder; pass run directories or folders of them"):
        build_report([tmp_path / "nope"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_unreadable_results_file_is_skipped_with_a_warning(demo_runs, tmp_path, capsys):
    broken = write_run(demo_runs, "eval", "broken", {})
    (broken / "results.json").write_text('{"top1": 0.')
    rows, _ = read_report(build_report([demo_runs], tmp_path / "out"))
    assert "skipped" in capsys.readouterr().out
    assert ("Other runs", "demo", "28") in rows
