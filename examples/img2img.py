"""Image-to-image and inpainting with the embedded Shapes model: generate, recolour, inpaint; save them side by side.

    python examples/img2img.py [-o img2img.png] [--strength 0.6]

Left to right: the generated source (a red circle above a blue square), the
same picture through img2img with the prompt's colour changed (the layout
stays, the colour follows the new prompt), the top half inpainted with a green
circle (the bottom half is kept), and the mask used (white: repaint).
"""
import argparse

import numpy as np
import torch
from PIL import Image

from latent_diffusion import LatentDiffusionPipeline

SOURCE = "a red circle above a blue square on a black background"
RECOLOURED = "a green circle above a blue square on a black background"


def top_half_mask(image: Image.Image) -> Image.Image:
    """White (repaint) over the top half, black (keep) below."""
    mask = np.zeros((image.height, image.width), np.uint8)
    mask[: image.height // 2] = 255
    return Image.fromarray(mask)


def side_by_side(images: list[Image.Image]) -> Image.Image:
    row = Image.new("RGB", (sum(im.width for im in images), images[0].height))
    for k, image in enumerate(images):
        row.paste(image.convert("RGB"), (k * image.width, 0))
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="img2img.png")
    parser.add_argument("--strength", type=float, default=0.6, help="img2img strength, in (0, 1]")
    args = parser.parse_args()
    pipe = LatentDiffusionPipeline.from_pretrained()
    source = pipe(SOURCE, generator=torch.Generator().manual_seed(0)).images[0]
    recoloured = pipe(RECOLOURED, image=source, strength=args.strength,
                      generator=torch.Generator().manual_seed(1)).images[0]
    mask = top_half_mask(source)
    inpainted = pipe(RECOLOURED, image=source, mask_image=mask, generator=torch.Generator().manual_seed(1)).images[0]
    side_by_side([source, recoloured, inpainted, mask]).save(args.output)
    print(args.output)


if __name__ == "__main__":
    main()
