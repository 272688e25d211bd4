"""Config composition, recipes, overrides and run directories."""
import pytest
from omegaconf import OmegaConf

from mixer_cli.config import compose, load_run_config, make_run_dir, recipe_names, save_config


def test_default_is_the_demo_recipe():
    cfg = compose([])
    assert cfg.name == "demo" and cfg.data.source == "demo"
    assert cfg.optim.betas == [0.9, 0.999] and cfg.trainer.grad_clip == 1.0


def test_overrides_reach_every_group():
    cfg = compose(["optim.lr=0.5", "model.num_blocks=2", "trainer.epochs=3", "data.global_batch=64"])
    assert (cfg.optim.lr, cfg.model.num_blocks, cfg.trainer.epochs, cfg.data.global_batch) == (0.5, 2, 3, 64)


def test_unknown_recipe_lists_the_recipes():
    with pytest.raises(ValueError) as e:
        compose(["recipe=nope"])
    assert str(e.value) == f"unknown recipe 'nope'; recipes: {', '.join(recipe_names())} (see `mixer recipes`)"


def test_unknown_key_lists_the_keys_that_exist():
    with pytest.raises(ValueError) as e:
        compose(["optim.lrr=3"])
    assert str(e.value) == (
        "unknown config key 'optim.lrr'; keys under 'optim': name, lr, betas, weight_decay "
        "(or add one with +optim.lrr=...)"
    )


def test_unknown_group_option_lists_the_options():
    with pytest.raises(ValueError, match=r"^unknown model 'zz'; choose one of: .*b16.*demo.*s32"):
        compose(["model=zz"])


def test_run_directories_never_collide(tmp_path):
    cfg = compose([f"run_root={tmp_path}"])
    dirs = {make_run_dir(cfg, "pretrain") for _ in range(3)}  # same second, same name
    assert len(dirs) == 3 and all(d.parent == tmp_path / "pretrain" for d in dirs)


def test_saved_config_round_trips(tmp_path):
    cfg = compose([f"run_root={tmp_path}", "optim.lr=0.25"])
    run = make_run_dir(cfg, "pretrain")
    save_config(cfg, run)
    assert OmegaConf.to_container(load_run_config(run)) == OmegaConf.to_container(cfg)
    assert [p.name for p in run.iterdir()] == ["config.yaml"]
