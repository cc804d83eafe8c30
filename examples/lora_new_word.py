"""Helpers of examples/train_lora.sh: teach the embedded default a new colour word, "cobalt", drawn in the palette's blue.

    python examples/lora_new_word.py data OUT_DIR [--n 64]          an imagefolder: blue shapes captioned "cobalt", plus
                                                                   ordinary Shapes images so the other words keep their meaning
    python examples/lora_new_word.py grid LORA_DIR OUT.png          rows: the embedded default, then with the LoRA
    python examples/lora_new_word.py score LORA_DIR OUT.json [--seeds 8]   the Shapes scorer's verdicts, both models

Why a new word and not a new colour: the embedded VAE decodes only the nine Shapes palette colours (a pink
object comes back orange; tests/test_example_outcomes.py), so a UNet LoRA can teach what a word draws, not a
colour the VAE cannot draw. The base model ignores "cobalt" (not in its captions) and draws its usual red.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
from PIL import Image

WORD, COLOUR = "cobalt", "blue"  # the new word, and the palette colour it is taught to draw
GRID_PROMPTS = [f"a {WORD} circle", f"a {WORD} square", f"a large {WORD} triangle",
                f"a small {WORD} circle on a black background", "a red square"]
SHAPES = ("circle", "square", "triangle")
KNOWN = ("red", "green", "yellow")  # words the LoRA must leave alone (none of their pairs below is held out)


def _with_word(caption: str) -> str:
    """A Shapes caption of a blue object with the colour word replaced by the new one."""
    return " ".join(WORD if word == COLOUR else word for word in caption.split())


def write_data(out_dir: str, n: int, size: int = 64) -> None:
    """`n` single blue objects captioned with the new word, and n // 2 ordinary Shapes scenes with their captions."""
    from latent_diffusion.shapes import caption, render, sample_scene

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    while len(lines) < n + n // 2:
        scene = sample_scene(rng)
        taught = len(lines) < n
        if taught:
            if len(scene.objects) != 1:
                continue
            scene = dataclasses.replace(scene, objects=(dataclasses.replace(scene.objects[0], colour=COLOUR),))
        text = caption(scene, rng)
        name = f"{len(lines):04d}.png"
        render(scene, size).save(out / name)
        lines.append(json.dumps({"file_name": name, "text": _with_word(text) if taught else text}))
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def _pipelines(lora_dir: str):
    """The embedded default, then the same pipeline with the LoRA loaded (one object; yields it twice)."""
    import diffusers
    import transformers

    from latent_diffusion import LatentDiffusionPipeline

    diffusers.utils.logging.disable_progress_bar()  # loading bars would bury the one line this prints
    transformers.utils.logging.disable_progress_bar()

    pipe = LatentDiffusionPipeline.from_pretrained("default-20-step")  # the model the LoRA was trained on
    pipe.set_progress_bar_config(disable=True)
    yield "base", pipe
    pipe.load_lora_weights(lora_dir)
    yield "lora", pipe


def _images(pipe, prompts: list[str]):
    import torch

    return pipe(prompts, generator=[torch.Generator().manual_seed(k) for k in range(len(prompts))]).images


def write_grid(lora_dir: str, out_png: str) -> None:
    """One row per model (base, base + LoRA), one column per prompt, same seeds."""
    rows = [np.concatenate([np.asarray(im) for im in _images(pipe, GRID_PROMPTS)], axis=1)  # (H, n·W, 3)
            for _, pipe in _pipelines(lora_dir)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(out_png)
    print(f"{out_png}: top row the embedded default, bottom row with the LoRA; prompts {GRID_PROMPTS}")


def _fraction_correct(pipe, prompts: list[str], judged_as: list[str]) -> float:
    from latent_diffusion.shapes import judge

    images = _images(pipe, prompts)
    return float(np.mean([judge(im, p).correct for im, p in zip(images, judged_as)]))


def score(lora_dir: str, out_json: str, seeds: int) -> dict:
    """Fraction of images the Shapes scorer judges correct, per model: the new word's prompts (judged as the
    colour it stands for) and prompts with known colour words (which the LoRA should not change)."""
    taught = [f"a {WORD} {shape}" for shape in SHAPES for _ in range(seeds)]
    known = [f"a {colour} {shape}" for colour, shape in zip(KNOWN, np.roll(SHAPES, 1)) for _ in range(seeds)]
    result = {"word": WORD, "colour": COLOUR, "images_per_set": len(taught)}
    for name, pipe in _pipelines(lora_dir):
        result[name] = {WORD: _fraction_correct(pipe, taught, [_as_colour(p) for p in taught]),
                        "known_words": _fraction_correct(pipe, known, known)}
    Path(out_json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"Shapes scorer, fraction correct ('{WORD}' judged as {COLOUR}; known words {', '.join(KNOWN)}): "
          f"base {result['base']}, with the LoRA {result['lora']}")
    return result


def _as_colour(prompt: str) -> str:
    return " ".join(COLOUR if word == WORD else word for word in prompt.split())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data")
    d.add_argument("out_dir")
    d.add_argument("--n", type=int, default=64)
    g = sub.add_parser("grid")
    g.add_argument("lora_dir")
    g.add_argument("out_png")
    s = sub.add_parser("score")
    s.add_argument("lora_dir")
    s.add_argument("out_json")
    s.add_argument("--seeds", type=int, default=8)
    args = p.parse_args()
    if args.command == "data":
        write_data(args.out_dir, args.n)
    elif args.command == "grid":
        write_grid(args.lora_dir, args.out_png)
    else:
        score(args.lora_dir, args.out_json, args.seeds)


if __name__ == "__main__":
    main()
