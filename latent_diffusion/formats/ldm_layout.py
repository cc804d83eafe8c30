"""diffusers → original (LDM / CompVis) key layout, for single files that AUTOMATIC1111, ComfyUI and kohya load.

diffusers ships only the other direction (`diffusers.loaders.single_file_utils.convert_ldm_*`); these are
its inverses, rule by rule, and the tests prove each one by converting back with diffusers' functions and
getting the same state dict. Prefixes of the original layout:

    model.diffusion_model.          UNet
    first_stage_model.              VAE
    cond_stage_model.transformer.   SD 1.x text encoder (transformers CLIP names)
    cond_stage_model.model.         SD 2.x text encoder (OpenCLIP names)
    conditioner.embedders.0.transformer. / conditioner.embedders.1.model.   SDXL's two text encoders
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIXES = {"sd1": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
OPEN_CLIP_PREFIXES = {"sd2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model."}

# diffusers' resnet names → LDM's ResBlock names (inverse of update_unet_resnet_ldm_to_diffusers)
UNET_RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                     "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_LAYER_NAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                         "self_attn.out_proj": "attn.out_proj"}
OPEN_CLIP_FIXED = {"embeddings.position_embedding.weight": "positional_embedding",
                   "embeddings.token_embedding.weight": "token_embedding.weight",
                   "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def _rename(name: str, table: Mapping[str, str]) -> str:
    """`name` with its first dotted part found in `table` replaced (parts match whole, never inside a word)."""
    for old, new in table.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    return name


def unet_key_to_ldm(key: str, config: Mapping[str, Any]) -> str:
    """One UNet2DConditionModel key as LDM's UNetModel names it (input/middle/output_blocks numbering)."""
    per_down = int(config["layers_per_block"]) + 1  # resnets of a down level + its downsampler
    parts = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
    if parts:
        kind, level, sub, index, rest = parts[1], int(parts[2]), parts[3], int(parts[4]), parts[5]
        if kind == "down_blocks":
            block = f"input_blocks.{1 + level * per_down + index}"
            if sub == "downsamplers":
                return f"input_blocks.{(level + 1) * per_down}.0.op.{rest.removeprefix('conv.')}"
            return f"{block}.{0 if sub == 'resnets' else 1}.{_rename(rest, UNET_RESNET_NAMES)}"
        # up levels have one resnet more (per_down of them); the upsampler follows the last one's attention
        if sub == "upsamplers":
            has_attention = "CrossAttn" in config["up_block_types"][level]
            return f"output_blocks.{level * per_down + per_down - 1}.{2 if has_attention else 1}.{rest}"
        return f"output_blocks.{level * per_down + index}.{0 if sub == 'resnets' else 1}.{_rename(rest, UNET_RESNET_NAMES)}"
    middle = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if middle:
        index = 2 * int(middle[2]) if middle[1] == "resnets" else 1  # resnet, attention, resnet
        return f"middle_block.{index}.{_rename(middle[3], UNET_RESNET_NAMES)}"
    renamed = _rename(key, UNET_FIXED)
    if renamed == key:
        raise ValueError(f"unet weight {key!r} has no place in the original Stable Diffusion layout")
    return renamed


def unet_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {UNET_PREFIX + unet_key_to_ldm(key, config): value for key, value in state.items()}


def vae_key_to_ldm(key: str, num_levels: int) -> str:
    """One AutoencoderKL key as LDM's Encoder/Decoder name it (decoder levels count from the bottom)."""
    coder, rest = key.split(".", 1) if key.startswith(("encoder.", "decoder.")) else ("", key)
    level = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", rest)
    if level:
        index = int(level[2]) if level[1] == "down" else num_levels - 1 - int(level[2])
        inner = level[5].replace("conv_shortcut", "nin_shortcut")
        where = {"resnets": f"block.{level[4]}", "downsamplers": "downsample", "upsamplers": "upsample"}[level[3]]
        rest = f"{level[1]}.{index}.{where}.{inner}"
    elif rest.startswith("mid_block.resnets."):
        number, inner = rest[len("mid_block.resnets."):].split(".", 1)
        rest = f"mid.block_{int(number) + 1}.{inner.replace('conv_shortcut', 'nin_shortcut')}"
    elif rest.startswith("mid_block.attentions.0."):
        rest = "mid.attn_1." + _rename(rest[len("mid_block.attentions.0."):], VAE_ATTENTION_NAMES)
    elif rest.startswith("conv_norm_out."):
        rest = "norm_out." + rest[len("conv_norm_out."):]
    return f"{coder}.{rest}" if coder else rest


def vae_to_ldm(state: Mapping[str, torch.Tensor], num_levels: int, prefix: str = VAE_PREFIX) -> dict[str, torch.Tensor]:
    """The VAE in LDM names; the mid-block attention's linear weights become LDM's 1×1 convolutions."""
    out = {}
    for key, value in state.items():
        name = vae_key_to_ldm(key, num_levels)
        if ".mid.attn_1." in f".{name}" and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[prefix + name] = value
    return out


def _text_model_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP keys with the `text_model.` part (transformers ≥ 5.6 drops it from CLIPTextModel, not from ...WithProjection)."""
    return {key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key: value
            for key, value in state.items() if not key.endswith("position_ids")}


def clip_to_ldm(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model under `prefix` (SD 1.x and SDXL's first encoder keep transformers' names)."""
    return {prefix + key: value for key, value in _text_model_keys(state).items() if key != "text_projection.weight"}


def open_clip_to_ldm(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model in OpenCLIP's names (SD 2.x, SDXL's second encoder): q/k/v stacked into
    `in_proj_*`, the projection stored transposed (inverse of diffusers' convert_open_clip_checkpoint)."""
    out: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in _text_model_keys(state).items():
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
            continue
        key = key.removeprefix("text_model.")
        if key in OPEN_CLIP_FIXED:
            out[prefix + OPEN_CLIP_FIXED[key]] = value
            continue
        layer = re.match(r"encoder\.layers\.(\d+)\.(.*)", key)
        if layer is None:
            raise ValueError(f"text encoder weight {key!r} has no place in the OpenCLIP layout")
        block = f"{prefix}transformer.resblocks.{layer[1]}."
        projection = re.match(r"self_attn\.(q|k|v)_proj\.(weight|bias)", layer[2])
        if projection:
            layers.setdefault(f"{block}attn.in_proj_{projection[2]}", {})[projection[1]] = value
        else:
            out[block + _rename(layer[2], OPEN_CLIP_LAYER_NAMES)] = value
    for name, qkv in layers.items():
        out[name] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    return out
