"""Model FLOP utilisation (MFU) of one UNet step: analytic FLOPs / measured time, against this machine's matmul peak.

    python benchmarks/bench_unet_mfu.py [--config training/recipes/shapes/unet_config.json | sd15-scaled | --model PATH]
                                        [--batch 2] [--latent 8] [--seq-len 77] [--repeats 20] [--device cpu]

FLOPs of one UNet forward are counted analytically with forward hooks, from
the shapes each layer actually sees (a multiply-add counts as 2 FLOPs):

    Conv2d      2 · B · H_out · W_out · C_out · (C_in / groups) · k_h · k_w
    Linear      2 · (rows of the input) · in_features · out_features
    Attention   4 · B · N · M · inner_dim   (Q Kᵀ and softmax · V; N queries, M keys; the Q/K/V/out
                                             projections are Linear layers, counted above)

Normalisations, activations and additions are left out, as is usual for MFU.
torch's own FlopCounterMode is run on the same forward as a cross-check.
Time: the median wall time of `--repeats` forwards after warm-up, under
inference_mode. Peak: the best of several fp32 `torch.matmul` of two n×n
matrices (2 n³ FLOPs each), on the same device in the same run.

The default config is the embedded default model's UNet (training/recipes/shapes/unet_config.json);
without it, an SD-1.5-shaped UNet scaled down (channels 320/640/1280/1280 → 64/128/256/256).
Batch 2 is one guided sampling step of one image (conditional and unconditional rows).
Prints a markdown line for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SHAPES_CONFIG = ROOT / "training" / "recipes" / "shapes" / "unet_config.json"
SD15_SCALED = dict(  # SD 1.5's layout, channels divided by 5 (rounded to multiples of 32)
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=[64, 128, 256, 256],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)


def unet_config(args: argparse.Namespace) -> tuple[dict, str]:
    """(config dict, where it came from): --model's unet/config.json, --config, the Shapes config, or SD-1.5 scaled."""
    if args.config == "sd15-scaled" or (not args.model and not args.config and not SHAPES_CONFIG.is_file()):
        return dict(SD15_SCALED), "SD-1.5 layout, channels ÷5"
    if args.model:
        path = Path(args.model) / "unet" / "config.json"
    else:
        path = Path(args.config) if args.config else SHAPES_CONFIG
    if not path.is_file():
        raise SystemExit(f"--config/--model: no UNet config at {path}")
    config = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    inside = ROOT in path.resolve().parents
    return config, str(path.resolve().relative_to(ROOT) if inside else path)


# ---------------------------------------------------------------- analytic FLOPs


def conv_flops(module: nn.Conv2d, output: torch.Tensor) -> int:
    """2 · B · H_out · W_out · C_out · (C_in / groups) · k_h · k_w."""
    k_h, k_w = module.kernel_size
    return 2 * output.numel() * (module.in_channels // module.groups) * k_h * k_w


def linear_flops(module: nn.Linear, inputs: torch.Tensor) -> int:
    """2 · rows · in_features · out_features."""
    return 2 * (inputs.numel() // module.in_features) * module.in_features * module.out_features


def attention_flops(module: nn.Module, hidden: torch.Tensor, context: torch.Tensor | None) -> int:
    """4 · B · N · M · inner_dim for Q Kᵀ and the weighted sum of V."""
    batch = hidden.shape[0]
    queries = hidden.shape[1] if hidden.ndim == 3 else hidden.shape[2] * hidden.shape[3]
    keys = queries if context is None else context.shape[1]
    return 4 * batch * queries * keys * module.to_q.out_features


class FlopCounter:
    """Forward hooks adding up conv, linear and attention-matmul FLOPs, per kind."""

    def __init__(self, model: nn.Module):
        from diffusers.models.attention_processor import Attention

        self.flops = {"conv": 0, "linear": 0, "attention": 0}
        self.handles = []
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                self.handles.append(module.register_forward_hook(self._conv))
            elif isinstance(module, nn.Linear):
                self.handles.append(module.register_forward_hook(self._linear))
            elif isinstance(module, Attention):
                self.handles.append(module.register_forward_hook(self._attention, with_kwargs=True))

    def _conv(self, module, args, output):
        self.flops["conv"] += conv_flops(module, output)

    def _linear(self, module, args, output):
        self.flops["linear"] += linear_flops(module, args[0])

    def _attention(self, module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        self.flops["attention"] += attention_flops(module, hidden, context)

    @property
    def total(self) -> int:
        return sum(self.flops.values())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# ---------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, repeats: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(n: int, device: torch.device, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` fp32 n×n matmuls (2 n³ FLOPs each), after one warm-up."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    times = []
    torch.matmul(a, b)
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times)


def unet_inputs(config: dict, args, device: torch.device) -> tuple:
    latent = args.latent or config.get("sample_size", 8)
    x = torch.randn(args.batch, config.get("in_channels", 4), latent, latent, device=device)  # (B, C, h, w)
    t = torch.full((args.batch,), 500, device=device)
    context = torch.randn(args.batch, args.seq_len, config["cross_attention_dim"], device=device)  # (B, L, D)
    return x, t, context


def torch_counted_flops(unet: nn.Module, inputs: tuple) -> int | None:
    """FLOPs by torch.utils.flop_counter.FlopCounterMode (aten matmuls, convolutions, attention), or None."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2])
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None,
                        help="UNet config.json, or sd15-scaled (default: the Shapes model's)")
    parser.add_argument("--model", default=None, help="diffusers folder: use its unet/config.json")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one guided step of one image)")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default: the config's sample_size)")
    parser.add_argument("--seq-len", type=int, default=77, help="text tokens in the cross-attention context")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--peak-size", type=int, default=2048, help="n of the n×n matmul measuring the peak")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import UNet2DConditionModel

    device = torch.device(args.device)
    config, source = unet_config(args)
    unet = UNet2DConditionModel(**config).to(device).eval()
    inputs = unet_inputs(config, args, device)
    counter = FlopCounter(unet)
    with torch.inference_mode():
        unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2])
    counter.remove()
    flops, by_kind = counter.total, dict(counter.flops)
    torch_flops = torch_counted_flops(unet, inputs)

    def forward():
        with torch.inference_mode():
            unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2])

    seconds = median_seconds(forward, args.repeats, warmup=3, device=device)
    peak = matmul_peak(args.peak_size, device)
    report(args, source, unet, inputs, flops, by_kind, torch_flops, seconds, peak)


def cross_check(flops: int, by_kind: dict, torch_flops: int | None) -> str:
    """How torch's FlopCounterMode compares; on CPU it does not see the fused attention kernel."""
    if not torch_flops:
        return ""
    without_attention = flops - by_kind["attention"]
    if abs(torch_flops - without_attention) <= 0.005 * flops and by_kind["attention"]:
        return (f"; torch FlopCounterMode {torch_flops / 1e9:.3f} GFLOP = ours without attention "
                "(its counter misses this device's attention kernel)")
    return f"; torch FlopCounterMode {torch_flops / 1e9:.3f} GFLOP"


def report(args, source, unet, inputs, flops, by_kind, torch_flops, seconds, peak) -> None:
    achieved = flops / seconds
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    shares = ", ".join(f"{k} {v / flops:.0%}" for k, v in by_kind.items())
    check = cross_check(flops, by_kind, torch_flops)
    print(f"UNet {source}: {params:.2f} M parameters, input {tuple(inputs[0].shape)}, context {tuple(inputs[2].shape)}")
    print(f"analytic FLOPs per forward: {flops / 1e9:.3f} GFLOP ({shares}){check}")
    print(f"forward: {seconds * 1e3:.2f} ms (median of {args.repeats}) -> {achieved / 1e9:.2f} GFLOP/s; "
          f"fp32 matmul peak ({args.peak_size}²): {peak / 1e9:.2f} GFLOP/s; threads {torch.get_num_threads()}")
    print(f"MFU = {achieved / peak:.1%}")
    command = "python benchmarks/bench_unet_mfu.py " + " ".join(sys.argv[1:])
    print(f"| {source}, batch {args.batch}, latent {inputs[0].shape[-1]}, {args.device} | {flops / 1e9:.3f} GFLOP "
          f"| {seconds * 1e3:.2f} ms | {achieved / 1e9:.2f} GFLOP/s | {peak / 1e9:.2f} GFLOP/s "
          f"| **{achieved / peak:.1%}** | `{command.strip()}` |")


if __name__ == "__main__":
    main()
