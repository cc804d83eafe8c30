"""Control adherence of an outline ControlNet for the embedded default model, with and without it.

    python benchmarks/bench_controlnet_adherence.py [--controlnet default-outline] [--num_scenes 200]
        [--scale 1.0] [--json OUT.json]

Held-out scenes at places no caption can name (`latent_diffusion.evaluation.control_adherence`): single
objects outside every position box, and two-object scenes; each prompted with its full caption (colour,
shape, size, relation, background, never a position). Each is generated once with the ControlNet reading
its outline and once without (same prompt, same seed), at the model's generation defaults, and judged by
the Shapes outline judge: the fraction of outlined objects matched by exactly one generated object of their
shape within 0.06·S of their centre and in the prompt's colour, and the fraction of images wholly right.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--controlnet", default="default-outline", help="ControlNet folder or shipped name")
    parser.add_argument("--model", default=None, help="base model folder (default: the embedded Shapes model)")
    parser.add_argument("--num_scenes", type=int, default=200, help="scenes per kind (single, two objects)")
    parser.add_argument("--scale", type=float, default=1.0, help="controlnet_conditioning_scale")
    parser.add_argument("--seed", type=int, default=None, help="scene seed (default: the held-out seed)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    from latent_diffusion.evaluation.control_adherence import (HELD_OUT_SEED, adherence_table, control_adherence,
                                                               unnameable_scenes)
    from latent_diffusion.pipelines import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(args.model, controlnet=args.controlnet)
    pipe.set_progress_bar_config(disable=True)
    seed = HELD_OUT_SEED if args.seed is None else args.seed
    results, start = {}, time.perf_counter()
    for objects, kind in ((1, "one object"), (2, "two objects")):
        scenes = unnameable_scenes(args.num_scenes, seed, objects=objects)
        results[f"{kind}, with the ControlNet"] = control_adherence(pipe, scenes, True,
                                                                    controlnet_conditioning_scale=args.scale)
        results[f"{kind}, without"] = control_adherence(pipe, scenes, False)
    caption = (f"{args.num_scenes} held-out scenes per kind (seed {seed}), controlnet {args.controlnet}, scale "
               f"{args.scale}, generation defaults {pipe.generation_defaults}; {time.perf_counter() - start:.0f} s")
    print(adherence_table(results, caption))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "results": {k: r.as_dict() for k, r in results.items()}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
