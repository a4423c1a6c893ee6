"""Train the embedded digits VAE: a tiny diffusers ``AutoencoderKL`` (16x16x1 digits -> 4x4x4 latents), saved
with ``save_pretrained`` (config.json + diffusion_pytorch_model.safetensors) into cm_lightning/latent/digits_vae/,
the same layout as stabilityai/sd-vae-ft-*, so the project's one loader reads both.

    OMP_NUM_THREADS=1 python scripts/train_digits_vae.py   # about 3 minutes on one CPU core

The loss is the VAE's ELBO with a small KL weight (as the SD VAE's 1e-6 keeps its latents close to a
deterministic code); the reconstruction error of the posterior mean is printed at the end."""

import argparse
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from cm_lightning.data.digits import digits_tensor

OUT = Path(__file__).resolve().parents[1] / "cm_lightning" / "latent" / "digits_vae"


def tiny_vae() -> AutoencoderKL:
    """Two down blocks (16 -> 8 -> 4): a factor of 4, 4 latent channels like the SD VAE."""
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=16,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=170.0, help="wall-clock budget of the training loop")
    p.add_argument("--kl", type=float, default=1e-4)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    torch.manual_seed(0)
    x, _ = digits_tensor(16)
    vae = tiny_vae()
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    start, step = time.monotonic(), 0
    while time.monotonic() - start < args.seconds:
        batch = x[torch.randint(0, len(x), (64,))]
        post = vae.encode(batch).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = (rec - batch).square().mean() + args.kl * post.kl().mean() / batch[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 200 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.monotonic() - start:.0f}s", flush=True)
    vae.eval()
    with torch.no_grad():
        rec = torch.cat([vae.decode(vae.encode(b).latent_dist.mean).sample for b in x.split(256)])
    mse = (rec.clamp(-1, 1) - x).square().mean().item()
    print(f"{step} steps; reconstruction MSE of the posterior mean on all 1,797 digits in [-1, 1]: {mse:.5f}")
    vae.save_pretrained(args.out, safe_serialization=True)


if __name__ == "__main__":
    main()
