"""Peak memory and time of one VAE decode at a large size, whole against tiled (`vae.enable_tiling()`).

    python benchmarks/bench_vae_tiling.py --vae PATH/vae [--size 1024] [--threads 2]

Each mode decodes the same random latents (4 × size/8 × size/8, seed 0) through our
`latent_diffusion.vae.decode_latents`, in its own fresh process, after one warm-up decode at
a quarter of the size; peak resident memory from `latent_diffusion.evaluation.measure`. Prints a markdown
line for benchmarks/RESULTS.md with the ratio tiled/whole of the memory a decode adds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MIB = 1024 * 1024


def worker(vae_path: str, size: int, tiled: bool) -> dict:
    import torch
    from diffusers import AutoencoderKL

    from latent_diffusion.vae import decode_latents
    from latent_diffusion.evaluation import measure

    vae = AutoencoderKL.from_pretrained(vae_path).eval()
    if tiled:
        vae.enable_tiling()
    latents = torch.randn((1, vae.config.latent_channels, size // 8, size // 8), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        decode_latents(vae, latents[..., : size // 32, : size // 32])  # warm-up at a quarter of the side
        m = measure(lambda: decode_latents(vae, latents), warmup=0, repeats=1)
    return dict(peak=m.peak_bytes, added=m.peak_increase_bytes, seconds=m.seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vae", required=True, help="a diffusers AutoencoderKL folder")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--worker", choices=("whole", "tiled"), default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.vae, args.size, args.worker == "tiled")))
        return
    env = dict(os.environ, HF_HUB_OFFLINE="1", **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    results = {}
    for mode in ("whole", "tiled"):
        done = subprocess.run([sys.executable, __file__, "--vae", args.vae, "--size", str(args.size), "--worker", mode],
                              capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(f"{mode} worker failed:\n{done.stderr[-2000:]}")
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(f"{mode}: peak {r['peak'] / MIB:.0f} MiB, +{r['added'] / MIB:.0f} MiB over before the decode, {r['seconds']:.1f} s")
    ratio = results["tiled"]["added"] / results["whole"]["added"]
    command = "python benchmarks/bench_vae_tiling.py " + " ".join(sys.argv[1:])
    print(f"| VAE decode {args.size} px | +{results['whole']['added'] / MIB:.0f} MiB, {results['whole']['seconds']:.1f} s "
          f"| +{results['tiled']['added'] / MIB:.0f} MiB, {results['tiled']['seconds']:.1f} s | **{ratio:.2f}** | `{command}` |")


if __name__ == "__main__":
    main()
