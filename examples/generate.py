"""Generate one prompt with each sampler and save them side by side.

    python examples/generate.py "a red circle above a blue square" [--model PATH] [-o samplers.png]
"""
import argparse

import torch
from PIL import Image

from latent_diffusion import LatentDiffusionPipeline


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt")
    parser.add_argument("--model", default=None, help="diffusers folder or Hub id (default: the embedded model)")
    parser.add_argument("-o", "--output", default="samplers.png")
    args = parser.parse_args()
    pipe = LatentDiffusionPipeline.from_pretrained(args.model) if args.model else LatentDiffusionPipeline.from_pretrained()
    images = [
        pipe(args.prompt, sampler=sampler, generator=torch.Generator().manual_seed(0)).images[0]
        for sampler in ("ddpm", "ddim", "dpm++")
    ]
    row = Image.new("RGB", (sum(im.width for im in images), images[0].height))
    for k, image in enumerate(images):
        row.paste(image, (k * image.width, 0))
    row.save(args.output)
    print(args.output)


if __name__ == "__main__":
    main()
