"""The UNet's training step under the speed options, in one process: fp32, bf16 autocast, channels_last, compile.

    python benchmarks/bench_train_step.py [--model PATH] [--options fp32,bf16,channels_last,compile]
                                          [--batch_size 16] [--rounds 3] [--steps 10] [--threads 2]

One step is what `training/train_text2img.py` does per batch once latents and text embeddings come from
its cache: UNet forward on (z_t, t, context), MSE against ε, backward, fused AdamW, zero_grad. Every option
gets its own copy of the UNet (from `--model`, default the embedded Shapes model) and its first two steps
(compilation, for `compile`) are timed apart; then rounds of `--steps` steps alternate between the options,
and the median per-step time of each is printed with its speed against the first option.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

OPTIONS = ("fp32", "bf16", "channels_last", "compile")


def make_trainee(unet: torch.nn.Module, option: str):
    """A fresh copy of the UNet set up for `option`, with its fused AdamW."""
    unet = copy.deepcopy(unet).train()
    if option == "channels_last":
        unet.to(memory_format=torch.channels_last)
    if option == "compile":
        unet.compile()
    return unet, torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True)


def train_step(unet, optimizer, batch: dict, option: str) -> None:
    with torch.autocast("cpu", torch.bfloat16, enabled=option == "bf16"):
        out = unet(batch["z_t"], batch["t"], encoder_hidden_states=batch["context"]).sample
    torch.nn.functional.mse_loss(out.float(), batch["noise"]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def random_batch(unet, batch_size: int, context_length: int) -> dict:
    """Inputs of the UNet's shapes: latents at its sample size, text embeddings of its cross-attention width."""
    config, g = unet.config, torch.Generator().manual_seed(0)
    shape = (batch_size, config.in_channels, config.sample_size, config.sample_size)
    return dict(z_t=torch.randn(shape, generator=g), noise=torch.randn(shape, generator=g),
                t=torch.randint(0, 1000, (batch_size,), generator=g),
                context=torch.randn(batch_size, context_length, config.cross_attention_dim, generator=g))


def main() -> None:
    from diffusers import UNet2DConditionModel

    from latent_diffusion.formats.assets import default_model_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(default_model_path()), help="an SD folder (its unet/ is used)")
    parser.add_argument("--options", default="fp32,bf16,channels_last,compile",
                        help=f"comma-separated, from {', '.join(OPTIONS)}; the first is the reference")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--context_length", type=int, default=32, help="text tokens (the embedded model's: 32)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    options = args.options.split(",")
    if unknown := [o for o in options if o not in OPTIONS]:
        parser.error(f"--options: unknown {unknown}; choose from {', '.join(OPTIONS)}")
    torch.set_num_threads(args.threads)
    base = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet", torch_dtype=torch.float32)
    batch = random_batch(base, args.batch_size, args.context_length)
    trainees = {}
    for option in options:
        start = time.perf_counter()
        trainees[option] = make_trainee(base, option)
        for _ in range(2):
            train_step(*trainees[option], batch, option)
        print(f"{option}: first two steps {time.perf_counter() - start:.1f} s", flush=True)
    times = {option: [] for option in options}
    for _ in range(args.rounds):
        for option in options:
            start = time.perf_counter()
            for _ in range(args.steps):
                train_step(*trainees[option], batch, option)
            times[option].append((time.perf_counter() - start) / args.steps)
    reference = statistics.median(times[options[0]])
    for option in options:
        median = statistics.median(times[option])
        print(f"| {option} | {median * 1000:.1f} ms | {reference / median:.2f}x | "
              f"{', '.join(f'{t * 1000:.1f}' for t in times[option])} |")


if __name__ == "__main__":
    main()
