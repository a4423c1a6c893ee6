"""Latent-space training (cm_lightning/latent/): the VAE loader, both scalings, the shard cache and the CLI path."""

import json

import numpy as np
import pytest
import torch
from helpers import TINY
from helpers.launch import run_script
from torch.utils.data import TensorDataset

from cm_lightning.data.digits import DigitsDataModule, digits_tensor
from cm_lightning.errors import ConfigError
from cm_lightning.latent import cache
from cm_lightning.latent.autoencoder import Autoencoder
from cm_lightning.latent.data import LatentDataModule
from cm_lightning.latent.scaling import EDM2_RAW_MEAN, EDM2_RAW_STD, ConstantScaling, EDM2Scaling

# scripts/train_digits_vae.py printed 0.00235 for the shipped weights (posterior mean, all 1,797 digits).
DIGITS_VAE_MSE = 0.005


def digits_vae(scaling=None) -> Autoencoder:
    return Autoencoder("digits", scaling or ConstantScaling(1.0))


def test_edm2_scaling_and_inverse_are_the_formulas():
    s = EDM2Scaling()
    mean, std = torch.randn(2, 4, 3, 3), torch.rand(2, 4, 3, 3)
    row = s.stored(mean, std)
    assert row.shape == (2, 8, 3, 3) and torch.equal(row[:, :4], mean) and torch.equal(row[:, 4:], std)
    x = s.read(row[0], torch.Generator().manual_seed(1))
    eps = torch.randn(mean[0].shape, generator=torch.Generator().manual_seed(1))
    m, d = torch.tensor(EDM2_RAW_MEAN).view(4, 1, 1), torch.tensor(EDM2_RAW_STD).view(4, 1, 1)
    torch.testing.assert_close(x, (mean[0] + std[0] * eps - m) * 0.5 / d)
    torch.testing.assert_close(s.to_vae(x), mean[0] + std[0] * eps)
    # a posterior with the published statistics reads back at std 0.5
    z = m + d * torch.randn(4, 64, 64)
    assert abs(s.read(torch.cat([z, torch.zeros_like(z)])).std().item() - 0.5) < 0.01


def test_constant_scaling_is_dit_convention():
    s, mean, std = ConstantScaling(), torch.randn(4, 2, 2), torch.rand(4, 2, 2)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    row = s.stored(mean, std, torch.Generator().manual_seed(0))
    torch.testing.assert_close(row, 0.18215 * (mean + std * eps))
    torch.testing.assert_close(s.to_vae(s.read(row)), mean + std * eps)


def test_a_tiny_random_vae_loads_through_the_sd_vae_path(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        layers_per_block=1,
    )
    vae.save_pretrained(tmp_path, safe_serialization=True)
    ae = Autoencoder(tmp_path, EDM2Scaling())
    assert (ae.factor, ae.latent_channels, ae.image_channels) == (2, 4, 3)
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    rows = ae.encode(x)
    with torch.no_grad():
        post = vae.encode(x).latent_dist
    torch.testing.assert_close(rows, torch.cat([post.mean, post.std], 1))
    torch.testing.assert_close(ae.latents(x), EDM2Scaling().from_vae(post.mean))  # editing's encoding: the mean
    assert ae.decode(EDM2Scaling().read(rows[0])[None]).shape == (1, 3, 8, 8)


def test_bad_vae_folders_stop_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="is not a folder"):
        Autoencoder(tmp_path / "absent", ConstantScaling())
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ConfigError, match="only pickled weights") as e:
        Autoencoder(tmp_path, ConstantScaling())
    assert "\n" not in str(e.value)
    (tmp_path / "diffusion_pytorch_model.bin").unlink()
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="no config.json"):
        Autoencoder(tmp_path, ConstantScaling())


def test_the_shipped_digits_vae_round_trips():
    ae, (x, _) = digits_vae(), digits_tensor(16)
    x = x[:512]
    post_mean = ae.vae.encode(x).latent_dist.mean
    with torch.no_grad():
        rec = ae.vae.decode(post_mean).sample.clamp(-1, 1)
    assert (rec - x).square().mean().item() < DIGITS_VAE_MSE
    assert ae.encode(x[:4]).shape == (4, 4, 4, 4) and ae.decode(ae.encode(x[:4])).shape == (4, 1, 16, 16)


class Exploding(TensorDataset):
    """Dies at item ``at``, as a killed encode would."""

    def __init__(self, *tensors, at: int):
        super().__init__(*tensors)
        self.at = at

    def __getitem__(self, i):
        if i == self.at:
            raise KeyboardInterrupt
        return super().__getitem__(i)


def test_cache_is_built_once_and_a_killed_encode_resumes_bit_equal(tmp_path):
    ae, (x, y) = digits_vae(), digits_tensor(16)
    x, y = x[:100], y[:100]
    manifest = {"vae": "digits", **ae.describe(), "resolution": 16, "source": "test", "flips": True}
    whole = tmp_path / "whole"
    assert cache.build(whole, TensorDataset(x, y), ae, manifest, True, 32, 0) == 4
    assert cache.build(whole, TensorDataset(x, y), ae, manifest, True, 32, 0) == 0  # read, not encoded again
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        cache.build(cut, Exploding(x, y, at=70), ae, manifest, True, 32, 0)
    assert len(list(cut.glob("rows_*.npy"))) == 2 and not list(cut.glob("*.tmp"))
    assert cache.build(cut, TensorDataset(x, y), ae, manifest, True, 32, 0) == 2
    for a in sorted(whole.glob("*.npy")):
        assert np.array_equal(np.load(a), np.load(cut / a.name))
    rows = cache.LatentRows(whole, ae.scaling)
    assert len(rows) == 100
    # index i + n is item i's mirror (the sampler's convention): it decodes to the flipped digit
    mirror, label = rows[105]
    decoded = ae.decode(mirror[None])[0]
    assert label == y[5] and (decoded - x[5].flip(-1)).square().mean() < (decoded - x[5]).square().mean() / 2
    other = dict(manifest, scaling=EDM2Scaling().describe())
    with pytest.raises(ConfigError, match="was made with scaling"):
        cache.build(whole, TensorDataset(x, y), ae, other, True, 32, 0)


def test_latent_data_module_bad_shapes_stop_in_one_line(tmp_path):
    ae = digits_vae()
    with pytest.raises(ConfigError, match="not divisible by the VAE's downsampling factor 4"):
        LatentDataModule(DigitsDataModule(image_size=18), ae, tmp_path, image_size=4, channels=4)
    with pytest.raises(ConfigError, match="data.channels=3 .* set data.channels=4"):
        LatentDataModule(DigitsDataModule(image_size=16), ae, tmp_path, image_size=4, channels=3)
    with pytest.raises(ConfigError, match="autoencoder is none"):
        LatentDataModule(DigitsDataModule(image_size=16), {}, tmp_path, image_size=4, channels=4)
    data = LatentDataModule(DigitsDataModule(image_size=16), ae, tmp_path, image_size=4, channels=4, batch_size=8)
    data.prepare_data()
    manifest = json.loads((tmp_path / cache.MANIFEST).read_text())
    assert manifest["weights_sha256"] == ae.digest and manifest["resolution"] == 16
    data.setup()
    assert data.dataset[0][0].shape == (4, 4, 4) and data.num_classes == 10


@pytest.mark.slow
def test_cli_latent_teacher_trains_and_samples_pixels(tmp_path):
    run, out = tmp_path / "run", tmp_path / "eval"
    cache_dir = f"data.cache_dir={tmp_path / 'cache'}"
    run_script("train.py", "experiment=digits_latent_edm", *TINY, cache_dir, "logger=csv", f"hydra.run.dir={run}")
    assert (run / "samples" / "final_18step.png").is_file()
    run_script("evaluate.py", "task=sample", f"ckpt={run}/checkpoints/last.ckpt", f"out_dir={out}", "num=4")
    assert np.load(out / "samples_18step.npz")["arr_0"].shape == (4, 16, 16, 1)
    edit = run_script(
        "evaluate.py", "task=inpaint", f"ckpt={run}/checkpoints/last.ckpt", f"out_dir={out}_edit", check=False
    )
    # the teacher is refused as an editor; a latent consistency model edits (tests/test_latent_editing.py)
    assert edit.returncode != 0 and "is an EDM teacher" in edit.stderr + edit.stdout


class Constant(torch.nn.Module):
    """F = -8 everywhere: one TrigFlow step from t_max gives f = cos(t) x_t + 8 sin(t) sigma_d, about 4."""

    in_channels, image_size = 4, 4

    def forward(self, x, c_noise, labels=None):
        return torch.full_like(x, -8.0)


class Recorder:
    factor, image_channels = 4, 1

    def to(self, device):
        return self

    def decode(self, latents):
        self.seen = latents
        return latents


@pytest.mark.parametrize("decoder", [None, Recorder()])
def test_latent_samples_are_not_clamped_images_are(decoder):
    """Consistency samples of a model whose f(x_t, t_min) is far outside [-1, 1]: an image model clamps them as the
    authors do, a latent model hands them to the decoder as they are."""
    from cm_lightning.diffusion.trigflow import TrigFlow
    from cm_lightning.sampler import Sampler

    sampler = Sampler(Constant(), TrigFlow(sigma_max=80.0), decoder=decoder)
    out, _ = sampler(8, steps=1)
    if decoder is None:
        assert out.max() == 1.0
    else:
        assert out is decoder.seen and out.min() > 3.9
