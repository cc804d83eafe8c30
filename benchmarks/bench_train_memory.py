"""Calibration of training/bounds.py's TRAIN_BACKWARD: peak memory of a UNet forward + backward against
limits.py's forward estimate, on the CPU.

    python benchmarks/bench_train_memory.py [--sides 128 256] [--model FOLDER]

For each latent side, two fresh processes run the model folder's UNet (default: the tiny one of
`latent_diffusion/tiny.py`, built here) on one latent: a forward without gradients, and a forward plus the
backward of a mean-square loss. Each prints the growth of its peak resident memory (the kernel's ru_maxrss)
over the loaded model, divided by `unet_activation_elements` × 4 bytes. The ratio of the training runs is what
TRAIN_BACKWARD must cover.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile

CHILD = """
import resource, sys, torch
from diffusers import UNet2DConditionModel
from latent_diffusion.limits import unet_activation_elements
folder, side, train = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "train"
unet = UNet2DConditionModel.from_pretrained(folder)
torch.set_grad_enabled(train)
x = torch.randn(1, unet.config.in_channels, side, side)
context = torch.randn(1, 77, unet.config.cross_attention_dim)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = unet(x, torch.tensor([10]), encoder_hidden_states=context).sample
if train:
    out.pow(2).mean().backward()
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(grown / (unet_activation_elements(unet.config, side, side) * 4))
"""


def ratio(folder: str, side: int, mode: str) -> float:
    """Peak memory growth of one run in a fresh process over the forward estimate."""
    done = subprocess.run([sys.executable, "-c", CHILD, folder, str(side), mode], capture_output=True, text=True,
                          check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[128, 256], help="latent sides to measure")
    parser.add_argument("--model", default=None, help="a UNet folder (default: the tiny UNet, built from config)")
    args = parser.parse_args()
    folder = args.model
    if folder is None:
        from latent_diffusion.tiny import tiny_components

        folder = tempfile.mkdtemp(prefix="tiny-unet-")
        tiny_components()["unet"].save_pretrained(folder)
    print("| latent side | forward / estimate | forward + backward / estimate |\n|---|---|---|")
    for side in args.sides:
        print(f"| {side} | {ratio(folder, side, 'infer'):.2f} | {ratio(folder, side, 'train'):.2f} |")


if __name__ == "__main__":
    main()
