"""LoRA fine-tuning with peft: adapters on the UNet (and optionally the text encoder), their checkpoints and output.

`--lora_rank N` freezes the UNet and adds peft LoRA adapters (Hu et al. 2021:
W x + (α / r) · B A x, A ∈ R^{r×k}, B ∈ R^{d×r}, B = 0 at the start) to its
attention projections, as diffusers' `train_text_to_image_lora.py` does
(`unet.add_adapter(LoraConfig(...))`); only the adapter parameters reach the
optimizer, the EMA and the checkpoints. `--train_text_encoder_lora` adapts the
text encoder's attention projections too; its embeddings then change every
step, so that combination needs `--no_cache` (refused otherwise).

Checkpoints hold the adapters, not the frozen base: accelerate's save/load
hooks write `lora_model_<i>.safetensors` (peft's own key layout, loaded back
with `set_peft_model_state_dict`, so resuming is exact) beside the optimizer
and RNG state. The run's output is `OUT/pytorch_lora_weights.safetensors` in
diffusers' layout (`get_peft_model_state_dict` → `convert_state_dict_to_diffusers`,
written by `StableDiffusionPipeline.save_lora_weights` with the LoraConfig as
metadata, so an `--lora_alpha` different from the rank survives), a model card,
and a validation grid; `--push_to_hub` uploads only those.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from latent_diffusion.formats.atomic import atomic_write, write_text_atomic

DEFAULT_UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # diffusers' attention projections
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP / T5-style attention projections
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
CHECKPOINT_ADAPTER = "lora_model_{index}.safetensors"
TEXT_ENCODER_ADAPTER = "lora_text_encoder.safetensors"
UPLOADED = (LORA_WEIGHTS, "README.md", "validation_grid.png")

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- flags


def add_lora_args(g) -> None:
    g.add_argument("--lora_rank", type=int, default=None,
                   help="train peft LoRA adapters of this rank instead of the whole UNet (the UNet stays frozen)")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA scale numerator α (default: the rank)")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the LoRA branch's input")
    g.add_argument("--lora_target_modules", default=",".join(DEFAULT_UNET_TARGETS),
                   help="comma-separated UNet module names to adapt (default: %(default)s)")
    g.add_argument("--train_text_encoder_lora", action="store_true",
                   help="also add LoRA adapters to the text encoder's attention (needs --no_cache)")


def check_lora_args(args: argparse.Namespace) -> list[str]:
    """Problems with the LoRA flags, each naming its flag."""
    problems = []
    if args.lora_rank is None:
        if args.train_text_encoder_lora:
            problems.append("--train_text_encoder_lora needs --lora_rank")
        return problems
    if args.lora_rank < 1:
        problems.append(f"--lora_rank must be >= 1, got {args.lora_rank}")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        problems.append(f"--lora_alpha must be > 0, got {args.lora_alpha}")
    if not 0.0 <= args.lora_dropout < 1.0:
        problems.append(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if not target_modules(args):
        problems.append("--lora_target_modules must name at least one module, e.g. to_k,to_q,to_v,to_out.0")
    if args.train_text_encoder_lora and not args.no_cache:
        problems.append("--train_text_encoder_lora trains the text encoder, so its embeddings cannot be cached: "
                        "add --no_cache")
    if getattr(args, "unet_config", None):
        problems.append("--lora_rank adapts a pretrained UNet; it cannot be combined with --unet_config")
    return problems


def lora_enabled(args: argparse.Namespace) -> bool:
    return getattr(args, "lora_rank", None) is not None


def target_modules(args: argparse.Namespace) -> list[str]:
    return [name.strip() for name in args.lora_target_modules.split(",") if name.strip()]


# ----------------------------------------------------------------------------- adapters


def lora_config(args: argparse.Namespace, targets):
    """The peft LoraConfig of the run; B starts at zero ("gaussian" init of A), so step 0 is the base model."""
    from peft import LoraConfig

    return LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or args.lora_rank, lora_dropout=args.lora_dropout,
                      init_lora_weights="gaussian", target_modules=list(targets))


def add_adapters(args: argparse.Namespace, unet, text_encoder) -> None:
    """Freeze the UNet (and text encoder) and add trainable float32 LoRA adapters to them."""
    unet.requires_grad_(False)
    try:
        unet.add_adapter(lora_config(args, target_modules(args)))
    except ValueError as error:  # peft names the modules it could not find
        raise ValueError(f"--lora_target_modules {args.lora_target_modules!r}: {error}") from None
    _upcast_trainable(unet)
    if args.train_text_encoder_lora:
        text_encoder.requires_grad_(False)
        try:  # transformers' peft integration; it may want a newer peft than diffusers does
            text_encoder.add_adapter(lora_config(args, TEXT_ENCODER_TARGETS))
        except ValueError as error:
            raise ValueError(f"--train_text_encoder_lora: {error}") from None
        _upcast_trainable(text_encoder)
        text_encoder.train()  # marks it as trained: batch_inputs then encodes captions with gradients


def _upcast_trainable(module: torch.nn.Module) -> None:
    for p in module.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def trained_modules(args: argparse.Namespace, unet, text_encoder) -> torch.nn.Module:
    """What the optimizer steps: the UNet, plus the text encoder when its adapters train."""
    if lora_enabled(args) and args.train_text_encoder_lora:
        return torch.nn.ModuleList([unet, text_encoder])
    return unet


def count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def sync_text_encoder_gradients(accelerator, optimizer, text_encoder) -> None:
    """Average the text encoder's LoRA gradients over processes before each optimizer step.

    The text encoder is not wrapped in DDP (our encoding code reads its `.device` and calls it directly),
    so its gradients are all-reduced here, from a step pre-hook of the underlying torch optimizer.
    """
    if accelerator.num_processes == 1:
        return
    params = [p for p in text_encoder.parameters() if p.requires_grad]

    def all_reduce(*_):
        for p in params:
            if p.grad is not None:
                p.grad = accelerator.reduce(p.grad, reduction="mean")

    getattr(optimizer, "optimizer", optimizer).register_step_pre_hook(all_reduce)


# ----------------------------------------------------------------------------- checkpoints


def register_checkpoint_hooks(accelerator, text_encoder=None) -> None:
    """Make accelerate's save_state/load_state write and read only the adapters (peft layout), not the base."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    def save_adapters(models, weights, output_dir):
        if accelerator.is_main_process:
            for index, model in enumerate(models):
                _save_tensors(get_peft_model_state_dict(accelerator.unwrap_model(model)),
                              os.path.join(output_dir, CHECKPOINT_ADAPTER.format(index=index)))
            if text_encoder is not None:
                _save_tensors(get_peft_model_state_dict(text_encoder), os.path.join(output_dir, TEXT_ENCODER_ADAPTER))
        weights.clear()  # accelerate must not also write the full (frozen) weights

    def load_adapters(models, input_dir):
        for index, model in enumerate(models):
            _load_adapter(set_peft_model_state_dict, accelerator.unwrap_model(model),
                          os.path.join(input_dir, CHECKPOINT_ADAPTER.format(index=index)))
        if text_encoder is not None:
            _load_adapter(set_peft_model_state_dict, text_encoder, os.path.join(input_dir, TEXT_ENCODER_ADAPTER))
        models.clear()

    accelerator.register_save_state_pre_hook(save_adapters)
    accelerator.register_load_state_pre_hook(load_adapters)


def _save_tensors(tensors: dict, path: str) -> None:
    with atomic_write(path, suffix=".safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))


def _load_adapter(set_state, model, path: str) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"--resume_from_checkpoint: {os.path.dirname(path)!r} has no {os.path.basename(path)}; "
                         "was it written by a LoRA run (--lora_rank)?")
    result = set_state(model, load_file(path), adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"{path}: adapter keys that the model does not have: {unexpected[:5]}")


# ----------------------------------------------------------------------------- output


def lora_layers(module) -> dict[str, torch.Tensor]:
    """The module's adapter weights in diffusers' key layout (lora_A/lora_B → lora.down/lora.up), float32, CPU."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def adapter_metadata(module) -> dict:
    """The adapter's LoraConfig as a dict, stored in the safetensors header (rank, alpha, targets)."""
    config = module.peft_config["default"].to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}


def save_lora_weights(output_dir: str, unet, text_encoder=None) -> str:
    """Write OUT/pytorch_lora_weights.safetensors (diffusers' layout and metadata); return its path."""
    from diffusers import StableDiffusionPipeline

    te = text_encoder if text_encoder is not None and getattr(text_encoder, "peft_config", None) else None
    StableDiffusionPipeline.save_lora_weights(
        output_dir, unet_lora_layers=lora_layers(unet), unet_lora_adapter_metadata=adapter_metadata(unet),
        text_encoder_lora_layers=lora_layers(te) if te is not None else None,
        text_encoder_lora_adapter_metadata=adapter_metadata(te) if te is not None else None,
        safe_serialization=True,
    )
    return os.path.join(output_dir, LORA_WEIGHTS)


def write_lora_card(output_dir: str, args: argparse.Namespace, *, hyperparameters: dict, metrics: dict,
                    grid: Optional[str]) -> str:
    """README.md for the adapter: Hub metadata (base model, `lora` tag) and how to load it with us and diffusers."""
    import shutil

    from latent_diffusion.formats.hub import card_metadata

    base = args.pretrained_model_name_or_path
    data = card_metadata(base_model=base, dataset=args.dataset_name or args.train_data_dir,
                         tags=["text-to-image", "latent-diffusion", "diffusers", "lora"], license="apache-2.0",
                         prompts=args.validation_prompts or [])
    grid_name = None
    if grid is not None:
        grid_name = "validation_grid.png"
        if os.path.abspath(grid) != os.path.abspath(os.path.join(output_dir, grid_name)):
            shutil.copyfile(grid, os.path.join(output_dir, grid_name))
    prompt = (args.validation_prompts or ["a red circle above a blue square"])[0]
    rows = "\n".join(f"| {k} | {v} |" for k, v in {**hyperparameters, **metrics}.items())
    body = f"""# LoRA adapter for {base}

A LoRA adapter (rank {args.lora_rank}, alpha {args.lora_alpha or args.lora_rank}) for the UNet
{"and the text encoder " if args.train_text_encoder_lora else ""}of `{base}`, trained with
latent_diffusion's `training/train_text2img.py`. The file `{LORA_WEIGHTS}` is in diffusers' format;
the base model is not included.

## How to use

```python
from latent_diffusion import LatentDiffusionPipeline

pipe = LatentDiffusionPipeline.from_pretrained("{base}")
pipe.load_lora_weights("PATH_OR_HUB_ID_OF_THIS_ADAPTER")
image = pipe("{prompt}").images[0]
```

With diffusers: `StableDiffusionPipeline.from_pretrained("{base}").load_lora_weights("PATH_OR_HUB_ID")`.
From the command line: `latent-diffusion generate "{prompt}" --model {base} --lora PATH[:SCALE]`.
{f"{chr(10)}## Validation grid{chr(10)}{chr(10)}![validation grid]({grid_name}){chr(10)}" if grid_name else ""}
## Training hyperparameters

| Setting | Value |
|---|---|
{rows}
"""
    path = os.path.join(output_dir, "README.md")
    write_text_atomic(path, f"---\n{data.to_yaml()}\n---\n\n{body}")
    return path


def save_lora_run(args: argparse.Namespace, accelerator, models, unet, ema, step: int, make_pipeline) -> None:
    """The end of a LoRA run: OUT/pytorch_lora_weights.safetensors (EMA weights when on), card, grid, upload."""
    from latent_diffusion.training.validation import run_validation

    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    trained = accelerator.unwrap_model(unet)
    trained.eval()
    if ema is not None:  # training is over: the adapter keeps the averaged weights
        ema.copy_to(trained)
    text_encoder = models.text_encoder if args.train_text_encoder_lora else None
    path = save_lora_weights(args.output_dir, trained, text_encoder)
    grid, metrics = None, {}
    if args.validation_prompts:
        grid, metrics = run_validation(
            make_pipeline(models, trained), args.validation_prompts, step=step, output_dir=args.output_dir,
            seed=args.seed, num_inference_steps=args.num_validation_inference_steps,
            guidance_scale=args.validation_guidance_scale, resolution=args.resolution,
            metric_names=args.validation_metrics)
    hyper = {k: getattr(args, k) for k in (
        "lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "train_text_encoder_lora", "resolution",
        "train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler", "max_train_steps",
        "mixed_precision", "use_ema", "snr_gamma", "seed")}
    hyper["lora_alpha"] = args.lora_alpha or args.lora_rank
    write_lora_card(args.output_dir, args, hyperparameters=hyper, metrics=metrics, grid=grid)
    trainable, total = count_parameters(trained)
    logger.info(f"saved the LoRA adapter to {path} ({os.path.getsize(path) / 2**20:.2f} MiB; {trainable} of "
                f"{total} UNet parameters trained)")
    if args.push_to_hub:
        from latent_diffusion.formats.hub import push_folder

        push_folder(args.output_dir, args.hub_model_id, token=args.hub_token, commit_message="End of LoRA training",
                    allow_patterns=list(UPLOADED))
