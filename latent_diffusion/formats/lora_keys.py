"""LoRA key layouts: diffusers' (`unet.<module>.lora.down.weight`) to kohya / A1111's (`lora_unet_<module>.lora_down.weight`) and back.

diffusers' layout, as `StableDiffusionPipeline.save_lora_weights` writes it:

    unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight   (r, k)   A
    unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight     (d, r)   B
    text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora.down.weight
    (the scale α lives in the file's metadata, one per component; peft's lora_A / lora_B names are read too)

kohya's sd-scripts layout (SD 1.x/2.x; what A1111 and ComfyUI read), one `.alpha` per module:

    lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight
    lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight
    lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha          ()  α
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight
    (SDXL: lora_te1_... for text_encoder, lora_te2_... for text_encoder_2)

Both compute W + (α / r) B A. Module names lose their dots in kohya's layout,
so going back needs the model's module names (`kohya_to_diffusers`).
diffusers' `load_lora_weights` reads kohya files directly; these functions
let us write them.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional

import torch

DIFFUSERS_PREFIX_TO_KOHYA = {"unet": "lora_unet", "text_encoder": "lora_te"}
SDXL_PREFIX_TO_KOHYA = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
KOHYA_TO_DIFFUSERS_PREFIX = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                             "lora_te2": "text_encoder_2"}
_DIFFUSERS_KEY = re.compile(r"^(unet|text_encoder_2|text_encoder)\.(.+)\.(lora\.down|lora\.up|lora_A|lora_B)\.weight$")
_KOHYA_KEY = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te)_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")


def diffusers_to_kohya(state_dict: Mapping[str, torch.Tensor],
                       alphas: Optional[Mapping[str, float]] = None) -> dict[str, torch.Tensor]:
    """A diffusers-layout LoRA state dict -> kohya's layout, with a `.alpha` per module.

    `alphas` maps a component ("unet", "text_encoder", "text_encoder_2") to its α; a component missing there gets
    α = r, which is what diffusers assumes for a file without metadata. A state dict with `text_encoder_2` keys is
    SDXL's: its encoders become `lora_te1_` / `lora_te2_`, as kohya names them.
    """
    sdxl = any(key.startswith("text_encoder_2.") for key in state_dict)
    prefixes = SDXL_PREFIX_TO_KOHYA if sdxl else DIFFUSERS_PREFIX_TO_KOHYA
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        match = _DIFFUSERS_KEY.match(key)
        if match is None:
            raise ValueError(f"state_dict key {key!r} is not a diffusers LoRA key "
                             "(<unet|text_encoder|text_encoder_2>.<module>.lora.<down|up>.weight)")
        prefix, module, part = match.groups()
        name = f"{prefixes[prefix]}_{module.replace('.', '_')}"
        down = part in ("lora.down", "lora_A")
        out[f"{name}.{'lora_down' if down else 'lora_up'}.weight"] = tensor
        if down:  # r is the down projection's output size
            alpha = (alphas or {}).get(prefix, tensor.shape[0])
            out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=tensor.dtype)
    return out


def kohya_to_diffusers(state_dict: Mapping[str, torch.Tensor], module_names: Mapping[str, Iterable[str]]
                       ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """A kohya-layout LoRA -> (diffusers-layout state dict, {component: α}).

    `module_names` maps "unet" / "text_encoder" (/ "text_encoder_2") to the dotted names of that model's modules
    (`[n for n, _ in unet.named_modules()]`), which resolve the underscored kohya names. All modules of
    a component must share one α (diffusers' layout stores one per component).
    """
    lookup = {prefix: {name.replace(".", "_"): name for name in names} for prefix, names in module_names.items()}
    out: dict[str, torch.Tensor] = {}
    alphas: dict[str, set] = {}
    for key, tensor in state_dict.items():
        match = _KOHYA_KEY.match(key)
        if match is None:
            raise ValueError(f"state_dict key {key!r} is not a kohya SD LoRA key "
                             "(lora_<unet|te|te1|te2>_<module>.<lora_down.weight|lora_up.weight|alpha>)")
        kohya_prefix, flat, part = match.groups()
        prefix = KOHYA_TO_DIFFUSERS_PREFIX[kohya_prefix]
        module = lookup.get(prefix, {}).get(flat)
        if module is None:
            raise ValueError(f"state_dict key {key!r}: the {prefix} has no module named like {flat!r}")
        if part == "alpha":
            alphas.setdefault(prefix, set()).add(float(tensor))
        else:
            out[f"{prefix}.{module}.{'lora.down' if part.startswith('lora_down') else 'lora.up'}.weight"] = tensor
    for prefix, values in alphas.items():
        if len(values) > 1:
            raise ValueError(f"the {prefix} modules have different alphas {sorted(values)}; diffusers' layout "
                             "stores one α per component")
    return out, {prefix: values.pop() for prefix, values in alphas.items()}
