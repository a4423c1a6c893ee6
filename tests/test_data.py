import numpy as np
import pytest
import torch
from helpers.fixtures import write_cifar_fixture
from PIL import Image

from cm_lightning.data.cifar10 import CIFAR10DataModule
from cm_lightning.data.digits import DigitsDataModule, digits_tensor
from cm_lightning.data.image_folder import ImageFolderDataModule
from cm_lightning.errors import ConfigError


def test_digits_shape_range_labels():
    x, y = digits_tensor(16)
    assert x.shape == (1797, 1, 16, 16) and y.shape == (1797,)
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1
    assert set(y.tolist()) == set(range(10))
    dm = DigitsDataModule(image_size=16, batch_size=64)
    dm.setup()
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (64, 1, 16, 16) and yb.dtype == torch.long


def test_digits_refuses_colour():
    with pytest.raises(ConfigError, match="data.channels=3"):
        DigitsDataModule(channels=3)


class FakeTrainer:
    world_size, accumulate_grad_batches = 3, 1


def test_global_batch_must_divide():
    dm = DigitsDataModule(batch_size=128)
    dm.trainer = FakeTrainer()
    with pytest.raises(ConfigError, match="data.batch_size=128.*= 3"):
        dm.per_device_batch()
    dm.batch_size = 129
    assert dm.per_device_batch() == 43


def test_cifar10_reads_torchvision_layout(tmp_path, monkeypatch):
    write_cifar_fixture(tmp_path)
    # torchvision checks md5 sums of the real files; the fixture's layout is what is under test.
    monkeypatch.setattr("torchvision.datasets.CIFAR10._check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda path, md5=None: True)
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=10)
    dm.setup()
    x, y = dm.dataset.tensors
    assert x.shape == (100, 3, 32, 32) and x.min() >= -1 and x.max() <= 1 and y.max() < 10


def test_cifar10_missing_names_path_and_flag(tmp_path):
    with pytest.raises(ConfigError, match=r"data.root=.*data.download=true"):
        CIFAR10DataModule(root=str(tmp_path / "nowhere"))


def test_image_folder_with_class_folders(tmp_path):
    for cls, colour in (("cats", 50), ("dogs", 200)):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((20, 30, 3), colour, dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=8, class_folders=True, batch_size=6)
    dm.setup()
    assert dm.num_classes == 2
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (6, 3, 8, 8) and sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    torch.testing.assert_close(x[0].mean(), torch.tensor(50 / 127.5 - 1), atol=1e-2, rtol=0)


def test_image_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="is not a directory"):
        ImageFolderDataModule(root=str(tmp_path / "missing"), image_size=8)
    with pytest.raises(ConfigError, match="holds no images"):
        ImageFolderDataModule(root=str(tmp_path), image_size=8)
