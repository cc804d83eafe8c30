"""Helpers of examples/train_lora.sh: a new Shapes colour ("pink") as an imagefolder, and a before/after grid.

    python examples/lora_pink.py data OUT_DIR [--n 64]      single pink shapes, captioned "a pink circle" ...
    python examples/lora_pink.py grid LORA_DIR OUT.png      rows: the embedded default, then with the LoRA
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

PINK = (255, 105, 180)
PROMPTS = ["a pink circle", "a pink square", "a pink triangle", "a large pink circle on a black background"]


def write_data(out_dir: str, n: int, size: int = 64) -> None:
    """Shapes single-object scenes rendered by the Shapes world, their object recoloured pink."""
    from latent_diffusion.shapes.world import COLOURS, render_array, sample_scene

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    while len(lines) < n:
        scene = sample_scene(rng)
        if len(scene.objects) != 1:
            continue
        obj = scene.objects[0]
        pixels = render_array(scene, size)
        pixels[(pixels == COLOURS[obj.colour]).all(-1)] = PINK  # the object's exact palette colour
        name = f"{len(lines):04d}.png"
        Image.fromarray(pixels).save(out / name)
        lines.append(json.dumps({"file_name": name, "text": f"a pink {obj.shape} on a {scene.background} background"}))
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def write_grid(lora_dir: str, out_png: str) -> None:
    """One row per model (base, base + LoRA), one column per prompt, same seeds."""
    import torch

    from latent_diffusion import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained()
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for use_lora in (False, True):
        if use_lora:
            pipe.load_lora_weights(lora_dir)
        images = pipe(PROMPTS, generator=[torch.Generator().manual_seed(k) for k in range(len(PROMPTS))]).images
        rows.append(np.concatenate([np.asarray(im) for im in images], axis=1))  # (H, n·W, 3)
    Image.fromarray(np.concatenate(rows, axis=0)).save(out_png)
    print(f"{out_png}: top row the embedded default, bottom row with the LoRA; prompts {PROMPTS}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data")
    d.add_argument("out_dir")
    d.add_argument("--n", type=int, default=64)
    g = sub.add_parser("grid")
    g.add_argument("lora_dir")
    g.add_argument("out_png")
    args = p.parse_args()
    write_data(args.out_dir, args.n) if args.command == "data" else write_grid(args.lora_dir, args.out_png)


if __name__ == "__main__":
    main()
