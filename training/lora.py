"""LoRA adapters for training: add peft adapters to the UNet (and optionally the text encoder), and what trains.

`--lora_rank N` freezes the UNet and adds peft LoRA adapters (Hu et al. 2021:
W x + (α / r) · B A x, A ∈ R^{r×k}, B ∈ R^{d×r}, B = 0 at the start) to its
attention projections, as diffusers' `train_text_to_image_lora.py` does
(`unet.add_adapter(LoraConfig(...))`); only the adapter parameters reach the
optimizer, the EMA and the checkpoints. `--train_text_encoder_lora` adapts the
text encoder's attention projections too; its embeddings then change every
step, so captions are encoded every step (latents may stay cached); on SDXL both encoders get adapters.
Their learning rate, gradient averaging and clipping are shared with full fine-tuning (training/text_encoders.py).

The run's settings arrive as a `LoraSettings` (training/settings.py, α already
resolved); the adapters' checkpoints and output file are `lora_weights.py`,
the end of a LoRA run (card, upload) `lora_run.py`. `--network_type` picks LoRA, DoRA, LoHa or LoKr
adapters (training/network_types.py); everything here works the same for all four.
"""
from __future__ import annotations

import torch

from latent_diffusion.training.settings import LoraSettings

DEFAULT_UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # diffusers' attention projections
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP / T5-style attention projections


def lora_config(lora: LoraSettings, targets):
    """The peft config of the run's --network_type (training/network_types.py); step 0 is the base model."""
    from latent_diffusion.training.network_types import adapter_config

    return adapter_config(lora.network_type, lora.rank, lora.alpha, lora.dropout, targets)


def add_adapters(lora: LoraSettings, unet, text_encoder, text_encoder_2=None) -> None:
    """Freeze the UNet (and text encoders; SDXL: both) and add trainable float32 LoRA adapters to them."""
    unet.requires_grad_(False)
    try:
        unet.add_adapter(lora_config(lora, lora.target_modules))
    except ValueError as error:  # peft names the modules it could not find
        raise ValueError(f"--lora_target_modules {','.join(lora.target_modules)!r}: {error}") from None
    _upcast_trainable(unet)
    if not lora.train_text_encoder:
        return
    for encoder in (text_encoder, text_encoder_2):
        if encoder is None:
            continue
        encoder.requires_grad_(False)
        inject_text_encoder_adapter(encoder, lora_config(lora, TEXT_ENCODER_TARGETS))
        _upcast_trainable(encoder)
        encoder.train()  # so --lora_dropout applies; whether it trains is LoraSettings.train_text_encoder


def inject_text_encoder_adapter(text_encoder, config) -> None:
    """peft's own injection into the text encoder, not transformers' `add_adapter` (transformers 5 wants
    peft >= 0.22, diffusers works with 0.21): the same LoRA layers, and `peft_config` set as peft models have it,
    so peft's state-dict functions (checkpoints, the output file) read and write it."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, text_encoder, adapter_name="default")
    text_encoder.peft_config = {"default": config}


def _upcast_trainable(module: torch.nn.Module) -> None:
    for p in module.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def trained_modules(lora: LoraSettings | None, unet, text_encoder) -> torch.nn.Module:
    """What the optimizer steps: the UNet, plus the text encoder when its adapters train."""
    if lora is not None and lora.train_text_encoder:
        return torch.nn.ModuleList([unet, text_encoder])
    return unet


def count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
