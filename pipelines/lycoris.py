"""LyCORIS LoHa and LoKr adapter files (kohya / A1111 key layout) through peft's LoHa and LoKr layers.

diffusers' `load_lora_weights` reads kohya LoRA, LoCon (LoRA on convolutions) and DoRA (`dora_scale`) files,
but not LyCORIS' Hadamard (`hada_w1_a` ...) or Kronecker (`lokr_w1` ...) products. This module puts peft's
LoHa / LoKr layers (`peft.inject_adapter_in_model`) on the modules the file names and gives them the file's
factors as they are, so the weight update is LyCORIS' own:

    LoHa   ΔW = (α/r) · (w1_a w1_b) ⊙ (w2_a w2_b)            r = w1_b's rows
    LoKr   ΔW = (α/r) · w1 ⊗ w2   (w1 = w1_a w1_b, w2 = w2_a w2_b when factored; α/r = 1 when neither is)

The adapters then behave as diffusers' LoRA adapters do (`set_adapters` scales, `unload_lora_weights`).
Module names: `lora_unet_<name>` (diffusers' dotted names with '_', or the original SD layout's for SDXL
files), `lora_te_` / `lora_te1_` (text encoder), `lora_te2_` (SDXL's second). A key that names no module
of the model is a ValueError naming it.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import torch

LYCORIS_KIND = {"hada_": "loha", "lokr_": "lokr"}
_KEY = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te)_(.+?)\.(hada_\w+|lokr_\w+|alpha|dora_scale)$")
COMPONENT = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}


def is_lycoris(state: Mapping[str, Any]) -> bool:
    """True when the state dict holds LoHa or LoKr factors."""
    return any(f".{prefix}" in key for key in state for prefix in LYCORIS_KIND)


def module_lookup(model: torch.nn.Module, unet_config: Optional[Mapping[str, Any]] = None) -> dict[str, str]:
    """kohya's underscored module name -> the dotted name, for every module of `model`.

    CLIP names also answer with `text_model_` in front (transformers ≥ 5.6 drops it); a UNet's also in the
    original SD layout's names (kohya's SDXL files use them).
    """
    from latent_diffusion.formats.ldm_layout import unet_key_to_ldm

    lookup = {}
    for name, _ in model.named_modules():
        flat = name.replace(".", "_")
        lookup[flat] = lookup[f"text_model_{flat}"] = name
        if unet_config is not None and name:
            try:
                lookup[unet_key_to_ldm(name + ".weight", unet_config).removesuffix(".weight").replace(".", "_")] = name
            except ValueError:
                pass
    return lookup


def group_modules(pipe, state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """{component: {dotted module name: {factor name: tensor}}}; a key naming no module is a ValueError."""
    groups: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    lookups: dict[str, dict[str, str]] = {}
    for key, tensor in state.items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"LyCORIS key {key!r} is not lora_<unet|te|te1|te2>_<module>.<hada_*|lokr_*|alpha>")
        component = COMPONENT[match[1]]
        model = getattr(pipe, component, None)
        if model is None:
            raise ValueError(f"LyCORIS key {key!r} is for {component}, which this model does not have")
        if component not in lookups:
            lookups[component] = module_lookup(model, model.config if component == "unet" else None)
        name = lookups[component].get(match[2])
        if name is None:
            raise ValueError(f"LyCORIS key {key!r}: the {component} has no module named like {match[2]!r}")
        groups.setdefault(component, {}).setdefault(name, {})[match[3]] = tensor
    return groups


def rank_and_alpha(kind: str, factors: Mapping[str, torch.Tensor]) -> tuple[int, float]:
    """(r, α) of one module as LyCORIS computes its scale α/r (α defaults to r, LoKr's unfactored α/r is 1)."""
    if kind == "loha":
        rank = factors["hada_w1_b"].shape[0]
    elif "lokr_w1_b" in factors or "lokr_w2_b" in factors:
        rank = factors["lokr_w1_b" if "lokr_w1_b" in factors else "lokr_w2_b"].shape[0]
    else:
        return 1, 1.0
    alpha = float(factors["alpha"]) if "alpha" in factors else float(rank)
    return rank, alpha


def inject(model: torch.nn.Module, kind: str, modules: Mapping[str, Mapping[str, torch.Tensor]], adapter_name: str):
    """peft LoHa/LoKr layers on `modules`, holding the file's factors and scales."""
    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model

    config_cls = LoHaConfig if kind == "loha" else LoKrConfig
    inject_adapter_in_model(config_cls(r=1, alpha=1, target_modules=sorted(modules)), model, adapter_name=adapter_name)
    for name, factors in modules.items():
        layer = model.get_submodule(name)
        for attribute in [a for a in vars(layer)["_modules"] if a.startswith(("hada_", "lokr_"))]:
            if adapter_name in getattr(layer, attribute):  # peft's own initial factors: replaced below
                del getattr(layer, attribute)[adapter_name]
        base = layer.get_base_layer().weight
        for factor, tensor in factors.items():
            if factor.startswith(("hada_", "lokr_")):
                getattr(layer, factor)[adapter_name] = torch.nn.Parameter(
                    tensor.to(base.device, base.dtype), requires_grad=False)
        rank, alpha = rank_and_alpha(kind, factors)
        layer.r[adapter_name], layer.alpha[adapter_name] = rank, alpha
        layer.scaling[adapter_name] = alpha / rank


def split_dora_scales(state: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """(the state without `dora_scale` keys, those keys): diffusers' kohya loader drops DoRA scales with a warning."""
    scales = {key: value for key, value in state.items() if key.endswith(".dora_scale")}
    return {key: value for key, value in state.items() if key not in scales}, scales


def apply_dora_scales(pipe, scales: Mapping[str, torch.Tensor], adapter_name: str) -> None:
    """Turn the loaded LoRA layers that `scales` name into peft DoRA layers with the file's magnitudes:
    W' = m ⊙ (W + (α/r) B A) / ‖W + (α/r) B A‖ row by row (kohya / LyCORIS store m as (out, 1))."""
    for component, modules in group_modules(pipe, scales).items():
        model = getattr(pipe, component)
        for name, factors in modules.items():
            layer = model.get_submodule(name)
            variant_cls = getattr(layer, "lora_variants", {}).get(("use_dora",))
            if adapter_name not in getattr(layer, "lora_A", {}) or variant_cls is None:
                raise ValueError(f"dora_scale of {name!r} ({component}): no LoRA layer there takes DoRA")
            variant_cls.init(layer, adapter_name=adapter_name)
            layer.lora_variant[adapter_name] = variant_cls()
            layer.use_dora[adapter_name] = True
            magnitude = layer.lora_magnitude_vector[adapter_name].weight
            magnitude.data.copy_(factors["dora_scale"].reshape(magnitude.shape))


def load_lycoris(pipe, state: Mapping[str, torch.Tensor], adapter_name: str) -> None:
    """Add the LoHa/LoKr adapter `state` (kohya layout) to the pipeline's UNet and text encoders."""
    for component, modules in group_modules(pipe, state).items():
        model = getattr(pipe, component)
        by_kind: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        for name, factors in modules.items():
            kinds = {LYCORIS_KIND[p] for p in LYCORIS_KIND if any(f.startswith(p) for f in factors)}
            if len(kinds) != 1:
                raise ValueError(f"LyCORIS module {name!r} of the {component} holds {sorted(factors)}: "
                                 "one of LoHa (hada_*) or LoKr (lokr_*) factors is needed")
            by_kind.setdefault(kinds.pop(), {})[name] = factors
        if len(by_kind) > 1:
            raise ValueError(f"the {component} mixes LoHa and LoKr modules in one file, which one adapter cannot hold")
        for kind, kind_modules in by_kind.items():
            inject(model, kind, kind_modules, adapter_name)
