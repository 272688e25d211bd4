"""Config composition, recipes, overrides, config errors and run directories."""
import os

import pytest
from omegaconf import OmegaConf

from mixer_cli.config.compose import compose
from mixer_cli.config.recipes import recipe_names
from mixer_cli.config.run_dirs import RUN_DIR_ENV, Run, load_run_config, make_run_dir, save_config
from mixer_cli.core.errors import UserError


def test_default_is_the_demo_recipe():
    cfg = compose([])
    assert cfg.name == "demo" and cfg.data.source == "demo"
    assert cfg.optim._target_ == "torch.optim.AdamW" and cfg.optim.betas == [0.9, 0.999]
    assert cfg.trainer.grad_clip == 1.0


def test_overrides_reach_every_group():
    cfg = compose(["optim.lr=0.5", "model.num_blocks=2", "trainer.epochs=3", "data.global_batch=64", "loss=sigmoid"])
    assert (cfg.optim.lr, cfg.model.num_blocks, cfg.trainer.epochs, cfg.data.global_batch) == (0.5, 2, 3, 64)
    assert cfg.loss._target_ == "mixer_cli.train.losses.SigmoidCrossEntropy"


def test_model_sizes_come_from_the_data():
    cfg = compose(["data=cifar10", "data.img_size=32"])
    assert (cfg.model.img_size, cfg.model.in_chans, cfg.model.num_classes) == (32, 3, 10)


def test_unknown_recipe_lists_the_recipes():
    with pytest.raises(UserError) as e:
        compose(["recipe=nope"])
    assert str(e.value) == f"unknown recipe 'nope'; recipes: {', '.join(recipe_names())} (see `mixer recipes`)"


def test_unknown_key_lists_the_keys_a_user_can_set():
    with pytest.raises(UserError) as e:
        compose(["optim.lrr=3"])
    assert str(e.value) == (
        "unknown config key 'optim.lrr'; keys under 'optim': lr, betas, weight_decay (or add one with +optim.lrr=...)"
    )


def test_unknown_group_option_lists_the_options():
    with pytest.raises(UserError) as e:
        compose(["optim=zz"])
    assert str(e.value) == "unknown optim 'zz'; choose one of: adamw, sgd"


def test_unknown_fine_tuning_target_lists_the_targets():
    with pytest.raises(UserError) as e:
        compose(["target=nope"], config_name="finetune")
    assert str(e.value).startswith("unknown fine-tuning target 'nope'; targets: imagenet, cifar10, cifar100, pets, ")


def test_missing_value_names_what_to_set():
    with pytest.raises(UserError, match=r"^config value\(s\) .*data\.num_classes, .*data\.task.* must be set, e\.g\. "):
        compose(["recipe=ft_vtab"], config_name="finetune")
    cfg = compose(["recipe=ft_vtab", "data.task=dtd", "data.num_classes=47"], config_name="finetune")
    assert cfg.data.train_path.endswith("/vtab/dtd/train800val200")


def test_run_directories_never_collide(tmp_path):
    cfg = compose([f"run_root={tmp_path}"])
    dirs = {make_run_dir(cfg, "pretrain") for _ in range(3)}  # same second, same name
    assert len(dirs) == 3 and all(d.parent == tmp_path / "pretrain" for d in dirs)


def test_a_run_saves_its_config_first_and_its_results_last(tmp_path):
    cfg = compose([f"run_root={tmp_path}"])
    with Run(cfg, "eval") as run:
        assert [p.name for p in run.path.iterdir()] == ["config.yaml"]
        run.write("table.csv", "a,b\n")
        assert not (run.path / "results.json").exists()
        run.finish({"top1": 0.5})
    assert sorted(p.name for p in run.path.iterdir()) == ["config.yaml", "results.json", "table.csv"]
    assert load_run_config(run.path).name == "demo" and run.path.parent == tmp_path / "eval"


def test_a_failed_run_leaves_nothing_unless_it_holds_a_checkpoint(tmp_path):
    cfg = compose([f"run_root={tmp_path}"])
    with pytest.raises(KeyboardInterrupt), Run(cfg, "fewshot") as failed:
        failed.write("fewshot.csv", "shots\n")
        raise KeyboardInterrupt
    assert not failed.path.exists()
    with pytest.raises(RuntimeError), Run(cfg, "pretrain") as stopped:
        (stopped.path / "step-100").mkdir()
        (stopped.path / "step-100" / "last.ckpt").write_bytes(b"weights")
        raise RuntimeError("nan loss")
    assert (stopped.path / "config.yaml").is_file()  # kept: it can be continued
    continued = tmp_path / "earlier"
    continued.mkdir()
    with pytest.raises(RuntimeError), Run(cfg, "pretrain", path=continued):
        raise RuntimeError("diverged")
    assert continued.is_dir()  # not made by this run: never removed


def test_ranks_lightning_launches_open_the_run_of_rank_0_and_write_nothing(tmp_path, monkeypatch, no_launcher):
    cfg = compose([f"run_root={tmp_path}"])
    with Run(cfg, "eval") as run:
        assert os.environ[RUN_DIR_ENV] == str(run.path)  # what a launched rank inherits
        monkeypatch.setenv("LOCAL_RANK", "1")
        with pytest.raises(ValueError), Run(cfg, "eval") as rank1:
            assert rank1.path == run.path and not rank1.is_main
            rank1.finish({"top1": 0.0})
            raise ValueError
        assert [p.name for p in run.path.iterdir()] == ["config.yaml"]  # rank 1 neither wrote nor removed
        monkeypatch.setenv("LOCAL_RANK", "0")
    assert RUN_DIR_ENV not in os.environ
    with Run(cfg, "eval") as second:  # a second run of the process: a directory of its own
        assert second.path != run.path


def test_saved_config_round_trips(tmp_path):
    cfg = compose([f"run_root={tmp_path}", "optim.lr=0.25"])
    run = make_run_dir(cfg, "pretrain")
    save_config(cfg, run)
    assert OmegaConf.to_container(load_run_config(run)) == OmegaConf.to_container(cfg)
    assert [p.name for p in run.iterdir()] == ["config.yaml"]


def test_a_folder_without_config_is_not_a_run(tmp_path):
    with pytest.raises(UserError) as e:
        load_run_config(tmp_path)
    assert str(e.value) == f"{tmp_path} is not a run directory (no config.yaml); pass the folder of an earlier run"
