"""LoRA adapter weights on disk: adapter-only checkpoints (peft's layout) and the run's diffusers-layout file.

Checkpoints hold the adapters, not the frozen base: accelerate's save/load
hooks write `lora_model_<i>.safetensors` (peft's own key layout, loaded back
with `set_peft_model_state_dict`, so resuming is exact) beside the optimizer
and RNG state. The run's output file is `OUT/pytorch_lora_weights.safetensors`
in diffusers' layout (`get_peft_model_state_dict` → `convert_state_dict_to_diffusers`,
written by `StableDiffusionPipeline.save_lora_weights` with the LoraConfig as
metadata, so an α different from the rank survives; DoRA's magnitudes as
`lora_magnitude_vector`), or with `--lora_save_format kohya` (always for LoHa / LoKr)
in kohya / LyCORIS' layout (`lora_unet_*` / `lora_te_*`, SDXL `lora_te1_*` / `lora_te2_*`, with a per-module
`.alpha`, training/network_types.py). SDXL's second text encoder has its own checkpoint file and, in diffusers'
layout, its `text_encoder_2.` keys (`StableDiffusionXLPipeline.save_lora_weights`).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from latent_diffusion.formats.atomic import atomic_write

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
CHECKPOINT_ADAPTER = "lora_model_{index}.safetensors"
TEXT_ENCODER_ADAPTER = "lora_text_encoder.safetensors"
TEXT_ENCODER_2_ADAPTER = "lora_text_encoder_2.safetensors"  # SDXL's second encoder
ADAPTER_FILES = {"text_encoder": TEXT_ENCODER_ADAPTER, "text_encoder_2": TEXT_ENCODER_2_ADAPTER}


def encoder_dict(text_encoders) -> dict:
    """None, one text encoder, or {"text_encoder": ..., "text_encoder_2": ...} -> the dict of those given."""
    if text_encoders is None:
        return {}
    if isinstance(text_encoders, torch.nn.Module):
        return {"text_encoder": text_encoders}
    return {name: encoder for name, encoder in text_encoders.items() if encoder is not None}


# ----------------------------------------------------------------------------- checkpoints


def register_checkpoint_hooks(accelerator, text_encoders=None) -> None:
    """Make accelerate's save_state/load_state write and read only the adapters (peft layout), not the base;
    `text_encoders` (one, or a dict by component name) are the encoders whose adapters train."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    encoders = encoder_dict(text_encoders)

    def save_adapters(models, weights, output_dir):
        if accelerator.is_main_process:
            for index, model in enumerate(models):
                _save_tensors(get_peft_model_state_dict(accelerator.unwrap_model(model)),
                              os.path.join(output_dir, CHECKPOINT_ADAPTER.format(index=index)))
            for name, encoder in encoders.items():
                _save_tensors(get_peft_model_state_dict(encoder), os.path.join(output_dir, ADAPTER_FILES[name]))
        weights.clear()  # accelerate must not also write the full (frozen) weights

    def load_adapters(models, input_dir):
        for index, model in enumerate(models):
            _load_adapter(set_peft_model_state_dict, accelerator.unwrap_model(model),
                          os.path.join(input_dir, CHECKPOINT_ADAPTER.format(index=index)))
        for name, encoder in encoders.items():
            _load_adapter(set_peft_model_state_dict, encoder, os.path.join(input_dir, ADAPTER_FILES[name]))
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


# ----------------------------------------------------------------------------- the run's adapter file


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


def save_lora_weights(output_dir: str, unet, text_encoders=None, save_format: str = "diffusers",
                      alpha: Optional[float] = None, network_type: str = "lora") -> str:
    """Write OUT/pytorch_lora_weights.safetensors (diffusers' layout and metadata, or kohya / LyCORIS'); return
    its path. `text_encoders`: one, or {"text_encoder", "text_encoder_2"} (SDXL) whose adapters are saved too;
    `network_type` (training/network_types.py) says which adapter the modules hold."""
    from latent_diffusion.training.network_types import DIFFUSERS_LAYOUT, kohya_network_state

    encoders = {name: encoder for name, encoder in encoder_dict(text_encoders).items()
                if getattr(encoder, "peft_config", None)}
    if save_format == "kohya" or network_type not in DIFFUSERS_LAYOUT:
        path = os.path.join(output_dir, LORA_WEIGHTS)
        _save_tensors(kohya_network_state({"unet": unet, **encoders}, network_type, alpha,
                                          sdxl="text_encoder_2" in encoders), path)
        return path
    layers = {f"{name}_lora_layers": lora_layers(encoder) for name, encoder in encoders.items()}
    metadata = {f"{name}_lora_adapter_metadata": adapter_metadata(encoder) for name, encoder in encoders.items()}
    pipeline_class = _lora_saver("text_encoder_2" in encoders)
    pipeline_class.save_lora_weights(output_dir, unet_lora_layers=lora_layers(unet),
                                     unet_lora_adapter_metadata=adapter_metadata(unet), safe_serialization=True,
                                     **layers, **metadata)
    return os.path.join(output_dir, LORA_WEIGHTS)


def _lora_saver(sdxl: bool):
    """diffusers' pipeline class whose save_lora_weights takes these components (SDXL's takes text_encoder_2)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
