"""Class names and the head's activation travel with the model: from the data into every checkpoint and
export, back out of them, and away with a replaced head."""
import pytest
import torch

from mixer_cli.config.compose import compose
from mixer_cli.core.errors import UserError
from mixer_cli.data import class_names as data_class_names
from mixer_cli.models import load_mixer
from mixer_cli.models.checkpoints import export_safetensors
from mixer_cli.models.contract import class_names, read_class_map, with_class_names

NAMES = ("ant", "bee", "cow", "dog")


@pytest.fixture
def named(tiny_mixer):
    model = tiny_mixer(num_classes=4, trained=True)
    model.pretrained_cfg = {**with_class_names(model.pretrained_cfg, NAMES), "head_activation": "sigmoid"}
    return model


def test_names_and_activation_survive_our_checkpoint_and_the_safetensors_export(named, write_checkpoint, tmp_path):
    from_checkpoint = load_mixer(write_checkpoint(named))
    exported = load_mixer(export_safetensors(from_checkpoint, tmp_path / "m.safetensors"))
    for loaded in (from_checkpoint, exported):
        assert loaded.pretrained_cfg["label_names"] == NAMES
        assert loaded.pretrained_cfg["head_activation"] == "sigmoid"
        assert class_names(loaded.pretrained_cfg) == list(NAMES)


def test_a_new_head_forgets_the_old_classes_names(named):
    named.reset_classifier(3)
    assert "label_names" not in named.pretrained_cfg and class_names(named.pretrained_cfg) == ["0", "1", "2"]


@pytest.mark.parametrize("num_classes, first, description", [
    (1000, "n01440764", "tench, Tinca tinca"),  # ImageNet-1k's first synset, as timm ships it
    (21843, "n00004475", "organism, being"),  # the paper's ImageNet-21k head (21,843 classes)
    (7, None, "0"),  # no ImageNet size: the class index
])
def test_unnamed_weights_of_imagenet_size_get_imagenets_names(tmp_path, tiny_mixer, num_classes, first, description):
    torch.save(tiny_mixer(num_classes=num_classes).state_dict(), tmp_path / "timm.pth")  # timm names no classes
    cfg = load_mixer(tmp_path / "timm.pth").pretrained_cfg
    assert cfg.get("label_names", (None,))[0] == first and class_names(cfg)[0] == description
    assert cfg["head_activation"] == "softmax"  # timm's and the paper's released heads are softmax-trained


def test_the_demo_and_digits_name_their_digits_shards_without_an_index_name_none(tmp_path):
    for data in ("demo", "digits"):
        assert data_class_names(compose([f"data={data}"]).data) == tuple("0123456789")
    shards = compose(["data=imagenet", f"data.train_path='{tmp_path}/train-{{000000..000003}}.tar'"]).data
    assert data_class_names(shards) is None


def test_a_folder_naming_another_number_of_classes_names_none(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
    named = compose(["data=folder", f"data.train_path={tmp_path}", "data.num_classes=2"]).data
    assert data_class_names(named) == ("cat", "dog")
    # a split that lacks some of the classes: its names would sit at the wrong indices
    assert data_class_names(compose(["data=folder", f"data.train_path={tmp_path}", "data.num_classes=3"]).data) is None


@pytest.mark.slow
def test_a_pretraining_run_records_its_datas_names(tmp_path, tiny_run):
    from mixer_cli.commands.pretrain import pretrain

    pretrain(compose([*tiny_run, "trainer.steps=1", "data.global_batch=8", "fewshot.every_n_steps=0",
                      f"run_root={tmp_path}"]), progress=False)
    loaded = load_mixer(next(tmp_path.rglob("last.ckpt")))
    assert loaded.pretrained_cfg["label_names"] == tuple("0123456789")
    assert loaded.pretrained_cfg["head_activation"] == "softmax"  # the demo's loss


def test_wrong_counts_of_names_are_one_line(tmp_path, named):
    with pytest.raises(UserError, match="^3 class names for a model of 4 classes$"):
        with_class_names(named.pretrained_cfg, ["a", "b", "c"])
    (tmp_path / "map.txt").write_text("a\n\nb\n")  # blank lines do not count
    with pytest.raises(UserError, match="names 2 classes, the model has 4: one name per line, in class order"):
        read_class_map(tmp_path / "map.txt", 4)
    with pytest.raises(UserError, match=r"--class-map .*nope.txt: cannot read it \(No such file or directory\)"):
        read_class_map(tmp_path / "nope.txt", 4)
    assert read_class_map(tmp_path / "map.txt", 2) == ("a", "b")
