"""Trains the digits VAE: a one-level `AutoencoderKL` (no downsampling, `vae_scale_factor` 1) on 8x8 grayscale digits.

    python examples/digits/train_vae.py --output_dir /work/digits_artifacts/vae --judge_dir /work/digits_artifacts/judge

Stable Diffusion pipelines need a real `AutoencoderKL`; at 8x8 a learned one-level autoencoder is cheap and keeps the
latent as detailed as the image (8x8 positions, `--latent_channels` channels). The loss is the pixel MSE plus a small
KL term (`--kl_weight`, per latent element) that keeps the posterior variance small and the latents near unit scale.
After training, `scaling_factor` is set to `1 / std` of the training latents (Stable Diffusion's convention, so the
diffusion model sees unit-variance latents) and the reconstruction of the test split is measured: MSE, PSNR and, with
`--judge_dir`, digits-FID and judge accuracy of the reconstructions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from digits_data import load_digits_split


__all__ = ["build_vae", "main", "reconstruct", "train_vae"]


def build_vae(latent_channels: int = 4, channels: int = 32, seed: int = 0) -> AutoencoderKL:
    r"""A one-level `AutoencoderKL` for `(N, 1, 8, 8)` images: one ResNet per block, a mid-block with attention."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(channels,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=min(32, channels),
        sample_size=8,
    )


def train_vae(
    vae: AutoencoderKL,
    images: torch.Tensor,
    max_train_steps: int = 1500,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    kl_weight: float = 1e-3,
    seed: int = 0,
    log_every: int = 100,
) -> AutoencoderKL:
    r"""Trains `vae` on `images` `(N, 1, 8, 8)` in `[-1, 1]` with `mse(decode(sample), x) + kl_weight * mean KL`."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, max_train_steps) / max_train_steps))
    )
    vae.train()
    start = time.perf_counter()
    for step in range(1, max_train_steps + 1):
        batch = images[torch.randint(0, len(images), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        mse = F.mse_loss(reconstruction, batch)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + kl_weight * kl
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        if step % log_every == 0 or step == max_train_steps:
            seconds = (time.perf_counter() - start) / step
            print(f"step {step}: mse {mse.item():.5f} kl/elem {kl.item():.4f} ({seconds:.3f} s/step)", flush=True)
    return vae.eval()


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
    r"""`decode(encode(images))` through the posterior mean (or a sample), clamped to `[-1, 1]`."""
    posterior = vae.encode(images).latent_dist
    latents = posterior.sample() if sample else posterior.mean
    return vae.decode(latents).sample.clamp(-1, 1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--judge_dir", default=None, help="a judge saved by judge.py, to report reconstruction FID")
    parser.add_argument("--latent_channels", type=int, default=4)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--max_train_steps", type=int, default=1500)
    parser.add_argument("--train_batch_size", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--kl_weight", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    train_images, _ = load_digits_split("train")
    test_images, test_labels = load_digits_split("test")
    vae = build_vae(args.latent_channels, args.channels, args.seed)
    print(f"vae parameters: {sum(p.numel() for p in vae.parameters()) / 1e6:.3f}M")
    train_vae(
        vae, train_images, args.max_train_steps, args.train_batch_size, args.learning_rate, args.kl_weight, args.seed
    )
    train_seconds = time.perf_counter() - start

    # Stable Diffusion's convention: the UNet sees `latents * scaling_factor` with unit variance
    with torch.no_grad():
        generator = torch.Generator().manual_seed(args.seed)
        posterior = vae.encode(train_images).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))

    reconstruction = reconstruct(vae, test_images)
    mse = F.mse_loss(reconstruction, test_images).item()
    results = {
        "train_seconds": round(train_seconds, 1),
        "scaling_factor": vae.config.scaling_factor,
        "latent_mean": float(latents.mean()),
        "posterior_std_mean": float(posterior.std.mean()),
        "test_mse": mse,
        # PSNR of images in [-1, 1] (peak-to-peak 2)
        "test_psnr_db": 10 * math.log10(4.0 / mse),
        "test_mse_sampled": F.mse_loss(reconstruct(vae, test_images, sample=True), test_images).item(),
    }
    if args.judge_dir is not None:
        from evaluate import judge_features_and_logits, load_judge, real_features

        from diffusers_onestep.evaluation import fid_from_features, prompt_accuracy

        judge = load_judge(args.judge_dir)
        train_features = real_features("train", judge)
        test_features, _ = judge_features_and_logits(test_images, judge, value_range=(-1, 1))
        features, logits = judge_features_and_logits(reconstruction, judge, value_range=(-1, 1))
        results["fid_floor_test_vs_train"] = fid_from_features(test_features, train_features)
        results["fid_reconstructed_test_vs_train"] = fid_from_features(features, train_features)
        results["fid_reconstructed_test_vs_test"] = fid_from_features(features, test_features)
        results["judge_accuracy_reconstructed_test"] = prompt_accuracy(logits, test_labels)

    vae.save_pretrained(args.output_dir, safe_serialization=True)
    with open(os.path.join(args.output_dir, "reconstruction.json"), "w") as f:
        json.dump(results, f, indent=2)
    for name, value in results.items():
        print(f"{name}: {value}")
    return results


if __name__ == "__main__":
    main()
