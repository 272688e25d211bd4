"""ReaL top-1: the reassessed labels file, image numbers from names, and the metric on hand-computed cases."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from mixer_cli.errors import UserError
from mixer_cli.evaluate.real_labels import (
    FolderWithImageNumbers,
    RealTop1,
    image_number,
    image_numbers,
    read_real_labels,
    with_image_numbers,
)

# Images 1..5: image 2 has no correct label (left out), image 3 has two.
LABELS = [[3], [], [1, 3], [0], [2]]


def one_hot_logits(classes, num_classes=4):
    return torch.nn.functional.one_hot(torch.tensor(classes), num_classes).float()


def test_real_top1_by_hand():
    metric = RealTop1(LABELS)
    # predictions 3, 0, 1, 2 for images 1-4: right, left out, right (1 is in [1, 3]), wrong (2 not in [0])
    metric.update(one_hot_logits([3, 0, 1, 2]), torch.tensor([1, 2, 3, 4]))
    assert metric.compute().item() == pytest.approx(2 / 3)
    metric.update(one_hot_logits([2]), torch.tensor([5]))  # right
    assert metric.compute().item() == pytest.approx(3 / 4)
    assert (int(metric.correct), int(metric.total)) == (3, 4)


def test_real_top1_counts_add_up_over_shards_of_the_data():
    """Under DDP each rank counts its images and the counts are summed: the same as one pass."""
    whole, first, second = RealTop1(LABELS), RealTop1(LABELS), RealTop1(LABELS)
    logits, numbers = one_hot_logits([3, 0, 1, 2, 1]), torch.tensor([1, 2, 3, 4, 5])
    whole.update(logits, numbers)
    first.update(logits[:2], numbers[:2])
    second.update(logits[2:], numbers[2:])
    assert int(first.correct + second.correct) == int(whole.correct) == 2
    assert int(first.total + second.total) == int(whole.total) == 4


def test_an_image_without_labels_only_is_nan_not_zero():
    metric = RealTop1(LABELS)
    metric.update(one_hot_logits([0]), torch.tensor([2]))
    assert torch.isnan(metric.compute())


def test_an_image_number_beyond_the_file_is_a_one_line_error():
    metric = RealTop1(LABELS)
    with pytest.raises(UserError, match=r"^validation image number 6 is beyond the ReaL labels file, which has 5 "
                                        r"entries; the full real.json has 50,000$"):
        metric.update(one_hot_logits([0, 1]), torch.tensor([1, 6]))


@pytest.mark.parametrize("name,number", [
    ("ILSVRC2012_val_00000042.JPEG", 42),
    ("/data/imagenet/val/n01440764/ILSVRC2012_val_00000293.JPEG", 293),
    ("ILSVRC2012_val_00050000", 50000),  # a shard key that keeps the file's stem
])
def test_image_number_from_file_names_and_keys(name, number):
    assert image_number(name) == number


def test_a_name_without_an_image_number_is_a_one_line_error():
    with pytest.raises(UserError, match=r"^'cat.jpg' names no ImageNet validation image"):
        image_numbers(["ILSVRC2012_val_00000001", "cat.jpg"])


def test_reads_real_json(tmp_path):
    path = tmp_path / "real.json"
    path.write_text(json.dumps(LABELS))
    assert read_real_labels(path) == LABELS


@pytest.mark.parametrize("text,reason", [
    ("[[1], [2, 3], [", "Expecting value"),  # truncated
    ("", "Expecting value"),  # empty
    ("[]", "expected a non-empty JSON list of lists"),
    ('{"1": [2]}', "expected a non-empty JSON list of lists"),
    ("[[1], 2]", "entry 1 is 2, not a list of class numbers"),
    ('[[1], ["n01440764"]]', "entry 1 is \\['n01440764'\\], not a list of class numbers"),
])
def test_a_bad_labels_file_is_a_one_line_error_naming_it(tmp_path, text, reason):
    path = tmp_path / "real.json"
    path.write_text(text)
    with pytest.raises(UserError, match=rf"^{path} is not a ReaL labels file \(real.json\): .*{reason}") as e:
        read_real_labels(path)
    assert "\n" not in str(e.value)


def test_a_missing_labels_file_says_which_key_to_set(tmp_path):
    with pytest.raises(UserError, match="ReaL labels file .*nope.json does not exist; set data.real_labels="):
        read_real_labels(tmp_path / "nope.json")


def test_an_image_folder_yields_each_image_number(tmp_path):
    for cls, number in (("n01", 7), ("n01", 3), ("n02", 12)):
        (tmp_path / cls).mkdir(exist_ok=True)
        Image.fromarray(np.full((4, 4, 3), number, np.uint8)).save(tmp_path / cls / f"ILSVRC2012_val_{number:08d}.png")
    dataset = with_image_numbers(ImageFolder(str(tmp_path), transform=lambda im: np.asarray(im)[0, 0, 0]))
    assert isinstance(dataset, FolderWithImageNumbers)
    # the pixel value was set to the image's number: each sample carries its own number
    assert sorted((int(x), y, n) for x, y, n in (dataset[i] for i in range(len(dataset)))) == [
        (3, 0, 3), (7, 0, 7), (12, 1, 12)]


def test_a_source_without_file_names_cannot_give_real_labels():
    with pytest.raises(UserError, match="ReaL labels need ImageNet's validation file names"):
        with_image_numbers(torch.utils.data.TensorDataset(torch.zeros(2, 1)))
