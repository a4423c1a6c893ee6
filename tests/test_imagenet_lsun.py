"""ImageNet 64 (downsampled-ImageNet .npz batches, class folders) and LSUN (LMDB, exported folder): the
on-disk formats, the authors' crop, labels, and the messages for files that are not what they should be."""

import io
from types import SimpleNamespace

import lmdb
import numpy as np
import pytest
import torch
from helpers.fixtures import random_image, write_imagenet_batches, write_lsun_lmdb
from helpers.launch import run_script
from PIL import Image

from cm_lightning.data.imagenet64 import ImageNet64DataModule, batch_files
from cm_lightning.data.lsun import LSUNDataModule
from cm_lightning.data.transforms import adm_center_crop
from cm_lightning.errors import ConfigError
from cm_lightning.training import check_data_matches_net


def test_npz_batches_are_channel_major_and_one_based(tmp_path):
    size, n = 4, 3
    pixels = np.arange(3 * size * size, dtype=np.uint8)[None].repeat(n, 0) + np.arange(n, dtype=np.uint8)[:, None]
    np.savez(tmp_path / "train_data_batch_1.npz", data=pixels, labels=[1, 1000, 7])
    dm = ImageNet64DataModule(root=str(tmp_path), image_size=size, batch_size=3)
    dm.setup()
    x, y = dm.dataset[2]
    assert y.item() == 6  # label 7 of the file is class 6
    assert dm.labels.tolist() == [0, 999, 6]
    # Channel-major: value k of a row is channel k // 16, row (k % 16) // 4, column k % 4.
    assert x[1, 2, 3].item() == pytest.approx((16 + 2 * 4 + 3 + 2) / 127.5 - 1)
    assert x.shape == (3, size, size)


def test_batches_in_numeric_order(tmp_path):
    for b in (10, 2, 1):
        (tmp_path / f"train_data_batch_{b}.npz").touch()
    assert [p.name for p in batch_files(tmp_path)] == [f"train_data_batch_{b}.npz" for b in (1, 2, 10)]


def test_npz_with_the_wrong_shape(tmp_path):
    write_imagenet_batches(tmp_path, size=8)
    with pytest.raises(
        ConfigError,
        match=r"'data' is uint8 of shape \(6, 192\).*data.image_size=16.*"
        r"\(N, 768\).*set data.image_size=8",
    ):
        ImageNet64DataModule(root=str(tmp_path), image_size=16)


def test_npz_without_data_or_not_an_archive(tmp_path):
    np.savez(tmp_path / "train_data_batch_1.npz", images=np.zeros((2, 12), np.uint8))
    with pytest.raises(ConfigError, match=r"arrays \['images'\].*'data'.*'labels'"):
        ImageNet64DataModule(root=str(tmp_path), image_size=2)
    (tmp_path / "train_data_batch_1.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="not an .npz archive"):
        ImageNet64DataModule(root=str(tmp_path), image_size=2)


def test_labels_that_do_not_fit_num_classes(tmp_path):
    write_imagenet_batches(tmp_path, first_label=0)  # a 0-based file read with the official offset of 1
    with pytest.raises(ConfigError, match=r"labels run from 0 to .*label_offset=1.*num_classes=1000"):
        ImageNet64DataModule(root=str(tmp_path), image_size=16)
    dm = ImageNet64DataModule(root=str(tmp_path), image_size=16, label_offset=0)
    assert dm.labels.min() >= 0 and dm.labels.max() < 1000
    with pytest.raises(ConfigError, match="num_classes=10"):
        ImageNet64DataModule(root=str(tmp_path), image_size=16, label_offset=0, num_classes=10)


def test_class_map_renumbers_in_sorted_synset_order(tmp_path):
    np.savez(tmp_path / "train_data_batch_1.npz", data=np.zeros((3, 12), np.uint8), labels=[1, 2, 3])
    (tmp_path / "map_clsloc.txt").write_text("n0300 1 c\nn0100 2 a\nn0200 3 b\n")
    dm = ImageNet64DataModule(
        root=str(tmp_path), image_size=2, num_classes=3, class_map=str(tmp_path / "map_clsloc.txt")
    )
    assert dm.labels.tolist() == [2, 0, 1]


def test_net_num_classes_must_match_the_data(tmp_path):
    dm = ImageNet64DataModule(root=str(write_imagenet_batches(tmp_path)), image_size=16)
    with pytest.raises(ConfigError, match="net.num_classes=10 but the data has 1000 classes"):
        check_data_matches_net(dm, SimpleNamespace(image_size=16, in_channels=3, num_classes=10))
    check_data_matches_net(dm, SimpleNamespace(image_size=16, in_channels=3, num_classes=1000))


def test_imagenet_as_class_folders(tmp_path):
    rng = np.random.default_rng(0)
    for wnid in ("n02", "n01"):
        (tmp_path / wnid).mkdir()
        for i in range(2):
            random_image(rng, 20, 12).save(tmp_path / wnid / f"{wnid}_{i}.JPEG", format="jpeg")
    dm = ImageNet64DataModule(root=str(tmp_path), image_size=8, num_classes=2, batch_size=4)
    dm.setup()
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 3, 8, 8) and y.tolist() == [0, 0, 1, 1]  # sorted folder order
    with pytest.raises(ConfigError, match="has 2 class folders but data.num_classes=1000"):
        ImageNet64DataModule(root=str(tmp_path), image_size=8)
    with pytest.raises(ConfigError, match="neither downsampled-ImageNet batches"):
        ImageNet64DataModule(root=str(tmp_path / "n01"), image_size=8)  # images, but no class sub-folders


def test_adm_center_crop_by_hand():
    img = Image.fromarray(np.arange(60 * 100 * 3, dtype=np.uint32).reshape(60, 100, 3).astype(np.uint8))
    got = adm_center_crop(img, 16)
    halved = img.resize((50, 30), resample=Image.BOX)  # 60 >= 32: one BOX halving; 30 < 32 stops
    resized = halved.resize((27, 16), resample=Image.BICUBIC)  # short side to 16: 50 * 16/30 = 26.7 -> 27
    expected = resized.crop((5, 0, 21, 16))  # (27 - 16) // 2 = 5
    assert got.size == (16, 16)
    assert np.array_equal(np.asarray(got), np.asarray(expected))


def test_image_folder_crops_as_adm_when_asked(tmp_path):
    """data.crop=adm (the ImageNet latent configs) gives ADM's center_crop_arr; the default a plain resize."""
    from cm_lightning.data.image_folder import ImageFolderDataModule

    img = Image.fromarray(np.arange(60 * 100 * 3, dtype=np.uint32).reshape(60, 100, 3).astype(np.uint8))
    img.save(tmp_path / "a.png")
    adm = ImageFolderDataModule(root=str(tmp_path), image_size=16, crop="adm", val_size=0).build_dataset()[0][0]
    plain = ImageFolderDataModule(root=str(tmp_path), image_size=16, val_size=0).build_dataset()[0][0]
    expected = np.asarray(adm_center_crop(img, 16), dtype=np.float32) / 127.5 - 1
    assert np.allclose(adm.permute(1, 2, 0).numpy(), expected, atol=1e-6)
    assert not torch.equal(adm, plain)
    with pytest.raises(ConfigError, match="data.crop='box' is unknown"):
        ImageFolderDataModule(root=str(tmp_path), image_size=16, crop="box")


def test_lsun_lmdb_decodes_webp_and_jpeg_in_workers(tmp_path):
    root = write_lsun_lmdb(tmp_path / "bedroom_train_lmdb", n=6)
    dm = LSUNDataModule(root=str(root), image_size=16, batch_size=3, num_workers=2, val_size=6)
    dm.setup()
    assert len(dm.dataset) == 6 and dm.num_classes == 0
    first = dm.dataset[0][0]  # read in the main process, which must not keep the database open for the workers
    batches = list(dm.val_dataloader())  # two worker processes, each with its own environment
    x = torch.cat([b[0] for b in batches])
    assert x.shape == (6, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    with lmdb.open(str(root), readonly=True, lock=False) as env, env.begin() as txn:  # the main process holds none
        value = txn.get(bytes(dm.dataset.keys[4]))
    with Image.open(io.BytesIO(value)) as img:
        expected = np.asarray(adm_center_crop(img.convert("RGB"), 16), dtype=np.float32) / 127.5 - 1
    assert torch.allclose(x[4], torch.from_numpy(expected).permute(2, 0, 1), atol=1e-6)
    assert torch.equal(x[0], first)


def test_lsun_exported_folder_uses_the_same_crop(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "sub").mkdir()
    random_image(rng, 40, 24).save(tmp_path / "sub" / "a.png")
    dm = LSUNDataModule(root=str(tmp_path), image_size=8, batch_size=1)
    dm.setup()
    with Image.open(tmp_path / "sub" / "a.png") as img:
        expected = np.asarray(adm_center_crop(img.convert("RGB"), 8), dtype=np.float32) / 127.5 - 1
    assert torch.allclose(dm.dataset[0][0], torch.from_numpy(expected).permute(2, 0, 1), atol=1e-6)


def test_lmdb_that_is_not_lsun(tmp_path):
    env = lmdb.open(str(tmp_path / "other"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"row-0", np.arange(4, dtype=np.float32).tobytes())
    env.close()
    with pytest.raises(ConfigError, match=r"is an LMDB but not LSUN.*b'row-0'.*not an image.*WebP or JPEG"):
        LSUNDataModule(root=str(tmp_path / "other"), image_size=16)
    lmdb.open(str(tmp_path / "empty"), map_size=1 << 20).close()
    with pytest.raises(ConfigError, match="empty LMDB"):
        LSUNDataModule(root=str(tmp_path / "empty"), image_size=16)
    with pytest.raises(ConfigError, match="unzip it"):
        LSUNDataModule(root=str(tmp_path / "bedroom_train_lmdb.zip"), image_size=16)


def fails(*overrides) -> str:
    proc = run_script("train.py", *overrides, "logger=none", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr


def test_user_path_bad_data(tmp_path):
    shrink = [
        "data.image_size=16",
        "net.image_size=16",
        "net.model_channels=16",
        "net.channel_mult=[1,2]",
        "net.attention_resolutions=[8]",
        "net.num_head_channels=16",
        "model/objective/distance=l2",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    write_imagenet_batches(tmp_path / "in8", size=8)
    err = fails("experiment=imagenet64_ct", f"data.root={tmp_path / 'in8'}", *shrink)
    assert "train_data_batch_1.npz" in err and "set data.image_size=8" in err

    env = lmdb.open(str(tmp_path / "not_lsun"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"k", b"plain text")
    env.close()
    err = fails("experiment=lsun_ct", f"data.root={tmp_path / 'not_lsun'}", *shrink)
    assert "is an LMDB but not LSUN" in err
