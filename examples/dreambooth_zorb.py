"""Helpers of examples/train_dreambooth.sh: a new object word, "zorb", taught to the embedded default by DreamBooth.

A zorb is a large red circle (Shapes sizes: d from 0.38 to 0.44 of the canvas) anywhere on any background. The
word is outside the Shapes vocabulary (the tokenizer splits it into z / or / b), so before training "a zorb"
draws no large red circle. The class prompt is "a red circle" (a zorb is one kind of red circle); prior
preservation trains on the base model's own images of it so that the prompt keeps drawing what it drew.

    python examples/dreambooth_zorb.py data DIR [--n 8]        DIR/REPEATS_a zorb/*.png: a kohya instance folder
    python examples/dreambooth_zorb.py measure LORA_DIR OUT     before/after rates (Shapes scorer) and a PNG grid

`measure` generates "a zorb" and "a red circle" from the same seeds with the embedded default and with the
LoRA, judges each "a zorb" image as "a large red circle" and each "a red circle" image as "a red circle"
(latent_diffusion/shapes/scorer.py), and writes OUT/zorb_metrics.json and OUT/before_after.png.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

WORD_PROMPT = "a zorb"
ZORB = "a large red circle"  # what the word means: the scorer's prompt for "a zorb" images
CLASS_PROMPT = "a red circle"
REPEATS = 25  # kohya folder repeats: each instance image is seen 25 times per epoch


def zorb_scene(rng: np.random.Generator):
    """One zorb: a large red circle at a random place that keeps it inside, on a random background."""
    from latent_diffusion.shapes.world import BACKGROUNDS, SIZE_CLASSES, Scene, SceneObject

    low, high = SIZE_CLASSES["large"]
    d = float(rng.uniform(low, high))
    cx, cy = (float(v) for v in rng.uniform(d / 2, 1 - d / 2, size=2))
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return Scene((SceneObject("red", "circle", cx, cy, d, "large"),), background)


def write_instances(out_dir: str, n: int = 8, size: int = 64, repeats: int = REPEATS, seed: int = 0) -> Path:
    """`n` zorb images in OUT_DIR/<repeats>_a zorb/ (kohya's layout: the folder name is the caption)."""
    from latent_diffusion.shapes.world import render

    folder = Path(out_dir) / f"{repeats}_{WORD_PROMPT}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        render(zorb_scene(rng), size).save(folder / f"zorb-{i:02d}.png")
    return folder


def generate(pipe, prompt: str, seeds, batch: int = 25) -> list:
    """Images of `prompt`, image k from the generator seeded seeds[k] (the pipeline's defaults otherwise)."""
    import torch

    images = []
    for start in range(0, len(seeds), batch):
        chunk = list(seeds[start:start + batch])
        images += pipe([prompt] * len(chunk), generator=[torch.Generator().manual_seed(s) for s in chunk]).images
    return images


def rate(images, prompt: str) -> float:
    """The Shapes scorer's fraction of `images` correct for `prompt`."""
    from latent_diffusion.shapes import judge

    return float(np.mean([judge(image, prompt).correct for image in images]))


def measure(pipe, lora_dir, seeds) -> tuple[dict, dict]:
    """(rates, images): "word_*" the rate of "a zorb" images that are a large red circle, "class_*" the adherence
    of "a red circle" images, "class_large_*" the share of those drawn large (a zorb's size: drift towards the
    taught object shows here first), each before and after the LoRA; images under the word_ and class_ keys."""
    images = {"word_before": generate(pipe, WORD_PROMPT, seeds), "class_before": generate(pipe, CLASS_PROMPT, seeds)}
    pipe.load_lora_weights(str(lora_dir))
    images["word_after"] = generate(pipe, WORD_PROMPT, seeds)
    images["class_after"] = generate(pipe, CLASS_PROMPT, seeds)
    pipe.unload_lora_weights()
    rates = {key: rate(ims, ZORB if key.startswith("word") else CLASS_PROMPT) for key, ims in images.items()}
    rates.update({f"class_large_{when}": rate(images[f"class_{when}"], ZORB) for when in ("before", "after")})
    return rates, images


def grid(images: dict, columns: int = 8) -> Image.Image:
    """Rows: "a zorb" before, after; "a red circle" before, after; the first `columns` seeds."""
    rows = [np.concatenate([np.asarray(im) for im in images[key][:columns]], axis=1)
            for key in ("word_before", "word_after", "class_before", "class_after")]
    return Image.fromarray(np.concatenate(rows, axis=0))


def run_measure(lora_dir: str, out_dir: str, n: int) -> dict:
    """Measure the LoRA in `lora_dir` against the embedded default on seeds 0..n-1; write the grid and the JSON."""
    from latent_diffusion import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained("default-20-step")  # the model the LoRA was trained on
    pipe.set_progress_bar_config(disable=True)
    rates, images = measure(pipe, lora_dir, range(n))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grid(images).save(out / "before_after.png")
    report = {**rates, "class_change": rates["class_after"] - rates["class_before"], "images_per_rate": n,
              "word_judged_as": ZORB, "class_prompt": CLASS_PROMPT}
    (out / "zorb_metrics.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"'{WORD_PROMPT}' drawn as '{ZORB}': {rates['word_before']:.3f} before, {rates['word_after']:.3f} after; "
          f"'{CLASS_PROMPT}' adherence: {rates['class_before']:.3f} before, {rates['class_after']:.3f} after "
          f"(drawn large: {rates['class_large_before']:.3f} before, {rates['class_large_after']:.3f} after); "
          f"{n} seeds each; rows of {out / 'before_after.png'}: zorb before, after, class before, after")
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data")
    d.add_argument("out_dir")
    d.add_argument("--n", type=int, default=8)
    m = sub.add_parser("measure")
    m.add_argument("lora_dir")
    m.add_argument("out_dir")
    m.add_argument("--n", type=int, default=200, help="seeds per prompt and model")
    args = p.parse_args()
    if args.command == "data":
        print(write_instances(args.out_dir, args.n))
    else:
        run_measure(args.lora_dir, args.out_dir, args.n)


if __name__ == "__main__":
    main()
