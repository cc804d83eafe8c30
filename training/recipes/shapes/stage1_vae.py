"""Stage 1 of the Shapes recipe: a small `AutoencoderKL` trained on Shapes renders, and its latent scaling factor.

    python training/recipes/shapes/stage1_vae.py --output_dir /work/runs/shapes/stage1 --max_train_steps 5000

The VAE is a diffusers `AutoencoderKL` with 4 latent channels; the number of
entries in `--block_out_channels` sets the downsampling factor 2^(n - 1):
the default three give factor 4, so 64 px images become 16×16×4 latents.
(Factor 8, "16,32,64,64", was measured first: after 1250 steps it had a PSNR
of 22 dB and the Shapes scorer accepted 10% of its reconstructions, losing
small shapes and confusing circles with squares; factor 4 keeps them.)
Loss: L1 + L2 reconstruction on pixels in [-1, 1] plus `--kl_weight` times
the KL divergence to N(0, I), small enough that the KL term only keeps the
latents bounded and smooth rather than costing detail.

After training, `scaling_factor` = 1 / std of posterior samples of
`--scale_images` training images is written into the VAE's config (no magic
0.18215), and the VAE is saved as OUTPUT_DIR/vae. Then it is measured on
images of seeds never trained on: PSNR of reconstructions (posterior mean),
the Shapes scorer's accuracy on reconstructions judged against the full
captions of their ground-truth scenes (and on the ground truth itself, which
must be 1.0), the same after a float16 round trip of the weights (the
embedded model ships in fp16), and encode/decode times of one image.

Checkpoints and resuming: `common.train_stage` (OUTPUT_DIR/checkpoints).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from latent_diffusion.shapes import score_images
from latent_diffusion.training.recipes.shapes.common import (
    add_loop_arguments,
    shapes_batch,
    stage_output_dir,
    to_uint8_images,
    train_stage,
    write_json,
)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_loop_arguments(p, seed=1, train_batch_size=16, max_train_steps=3000, learning_rate=1e-3, adam_weight_decay=0.0)
    p.add_argument("--eval_seed", type=int, default=2_000_003, help="seed of the test images (never trained on)")
    p.add_argument("--resolution", type=int, default=64)
    # model
    p.add_argument("--block_out_channels", default="16,32,64",
                   help="comma-separated widths; n entries downsample by 2^(n-1)")
    p.add_argument("--layers_per_block", type=int, default=1)
    p.add_argument("--latent_channels", type=int, default=4)
    p.add_argument("--norm_num_groups", type=int, default=4,
                   help="GroupNorm groups; keep several channels per group (one per group is instance norm, which "
                   "erases the colour of flat images and leaves blob artifacts)")
    # loss
    p.add_argument("--kl_weight", type=float, default=1e-6)
    # measurement
    p.add_argument("--scale_images", type=int, default=4096, help="training images whose latents set scaling_factor")
    p.add_argument("--eval_images", type=int, default=1000)
    p.add_argument("--eval_batch_size", type=int, default=100)
    return p.parse_args(argv)


def build_vae(args):
    from diffusers import AutoencoderKL

    widths = tuple(int(w) for w in args.block_out_channels.split(","))
    torch.manual_seed(args.seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        block_out_channels=widths,
        layers_per_block=args.layers_per_block,
        latent_channels=args.latent_channels,
        norm_num_groups=args.norm_num_groups,
        sample_size=args.resolution,
    )


def vae_loss(vae, pixels: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, dict]:
    """L1 + L2 reconstruction of a posterior sample's decoding, plus kl_weight · KL(q(z|x) ‖ N(0, I)) per image."""
    posterior = vae.encode(pixels).latent_dist
    reconstruction = vae.decode(posterior.sample()).sample  # (B, 3, S, S)
    l1 = F.l1_loss(reconstruction, pixels)
    l2 = F.mse_loss(reconstruction, pixels)
    kl = posterior.kl().mean()
    return l1 + l2 + kl_weight * kl, {"l1": l1.item(), "l2": l2.item(), "kl": kl.item()}


# ---------------------------------------------------------------- measurement


@torch.no_grad()
def latent_statistics(vae, args) -> dict:
    """Mean and std of posterior samples of `scale_images` training images, overall and per channel."""
    latents = []
    for step in range(0, args.scale_images, args.eval_batch_size):
        count = min(args.eval_batch_size, args.scale_images - step)
        pixels = shapes_batch(args.seed + 7919, step, count, args.resolution).pixels
        generator = torch.Generator().manual_seed(step)
        latents.append(vae.encode(pixels).latent_dist.sample(generator))
    z = torch.cat(latents)  # (N, C, h, w)
    return {
        "mean": z.mean().item(),
        "std": z.std().item(),
        "channel_mean": z.mean(dim=(0, 2, 3)).tolist(),
        "channel_std": z.std(dim=(0, 2, 3)).tolist(),
        "latent_shape": list(z.shape[1:]),
        "images": int(z.shape[0]),
    }


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-image PSNR (dB) of uint8 image batches (B, H, W, 3)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))


@torch.no_grad()
def reconstruction_report(vae, args) -> dict:
    """PSNR and scorer accuracy of posterior-mean reconstructions of unseen images, with the full captions."""
    psnrs, originals, reconstructions, captions = [], [], [], []
    for group in range(0, args.eval_images, args.eval_batch_size):
        count = min(args.eval_batch_size, args.eval_images - group)
        data = shapes_batch(args.eval_seed, group, count, args.resolution)
        z = vae.encode(data.pixels).latent_dist.mean
        truth = to_uint8_images(data.pixels)
        recon = to_uint8_images(vae.decode(z).sample)
        psnrs.append(psnr(recon, truth) * count)
        originals += [Image.fromarray(a) for a in truth]
        reconstructions += [Image.fromarray(a) for a in recon]
        captions += data.full_captions
    recon_score = score_images(reconstructions, captions)
    truth_score = score_images(originals, captions)
    return {
        "psnr_db": float(np.sum(psnrs) / args.eval_images),
        "scorer_accuracy_reconstructions": recon_score["overall"],
        "scorer_accuracy_ground_truth": truth_score["overall"],
        "per_category_reconstructions": {k: recon_score[k] for k in ("single", "position", "two_objects", "background")},
        "failures": recon_score["failures"][:20],
        "images": args.eval_images,
    }


@torch.no_grad()
def timing(vae, args, repeats: int = 5) -> dict:
    """Median seconds to encode and to decode one image (batch 1, float32, this machine's threads)."""
    pixels = shapes_batch(args.eval_seed, 0, 1, args.resolution).pixels
    z = vae.encode(pixels).latent_dist.mean
    encode, decode = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        vae.encode(pixels)
        t1 = time.perf_counter()
        vae.decode(z)
        encode.append(t1 - t0)
        decode.append(time.perf_counter() - t1)
    return {"encode_s": float(np.median(encode)), "decode_s": float(np.median(decode)), "threads": torch.get_num_threads()}


def fp16_round_trip(vae):
    """A float32 copy of the VAE whose weights went through float16, as the shipped model's do."""
    return copy.deepcopy(vae).half().float()


# ---------------------------------------------------------------- main


def reconstruction_step(args, vae):
    """The stage's loss on batch `step`: L1 + L2 + kl_weight · KL."""
    def step_loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        pixels = shapes_batch(args.seed, step, args.train_batch_size, args.resolution).pixels
        return vae_loss(vae, pixels, args.kl_weight)
    return step_loss


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    """Train (resuming), set the scaling factor, save and measure; returns the metrics, or None when paused."""
    args = parse_args(argv)
    output_dir = stage_output_dir(args)
    vae = build_vae(args)
    trained = train_stage(args, vae, reconstruction_step(args, vae), desc="stage 1 VAE")
    if not trained.finished:  # paused by --stop_after_steps
        return None
    vae.eval()
    stats = latent_statistics(vae, args)
    vae.register_to_config(scaling_factor=1.0 / stats["std"])
    vae.save_pretrained(str(output_dir / "vae"), safe_serialization=True)
    metrics = {
        "stage": "vae",
        "max_train_steps": args.max_train_steps,
        "train_batch_size": args.train_batch_size,
        "compute_s": trained.compute_s,
        "parameters": sum(p.numel() for p in vae.parameters()),
        "downsampling_factor": 2 ** (len(vae.config.block_out_channels) - 1),
        "scaling_factor": 1.0 / stats["std"],
        "latents": stats,
        "eval": reconstruction_report(vae, args),
        "eval_fp16_weights": reconstruction_report(fp16_round_trip(vae), args),
        "timing_one_image": timing(vae, args),
        "args": vars(args),
    }
    write_json(output_dir / "metrics.json", metrics)
    summary = {k: metrics["eval"][k] for k in ("psnr_db", "scorer_accuracy_reconstructions", "scorer_accuracy_ground_truth")}
    print(summary, "scaling_factor", metrics["scaling_factor"], flush=True)
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
