"""Adapter network types for training (`--network_type lora|loha|lokr|dora`) and their kohya / LyCORIS files.

Every type is a peft adapter with the run's rank r, α and target modules (training/lora.py adds it):

    lora   W x + (α/r) B A x                                       peft LoraConfig
    dora   m ⊙ (W + (α/r) B A) / ‖W + (α/r) B A‖  (row norms)       LoraConfig(use_dora=True)  (Liu et al. 2024)
    loha   W + (α/r) (w1_a w1_b) ⊙ (w2_a w2_b)                     peft LoHaConfig            (FedPara / LyCORIS)
    lokr   W + (α/r) w1 ⊗ (w2_a w2_b)  (w2 unfactored when r is large)   peft LoKrConfig       (LyCORIS)

The output file in kohya / LyCORIS key layout (`lora_unet_<module>` / `lora_te_<module>`) is what
AUTOMATIC1111, ComfyUI and our loader (pipelines/lora.py, pipelines/lycoris.py) read (SDXL's two text
encoders as `lora_te1_<module>` / `lora_te2_<module>`):

    loha   .hada_w1_a .hada_w1_b .hada_w2_a .hada_w2_b .alpha      (the factors as peft holds them)
    lokr   .lokr_w1 (.lokr_w1_a/_b) .lokr_w2 (.lokr_w2_a/_b) .alpha
    dora   .lora_down.weight .lora_up.weight .alpha .dora_scale    (m as (out, 1): LyCORIS' wd_on_out)

LyCORIS scales a LoKr module whose factors are all unfactored by 1, not α/r as peft does, so such a
module's w2 is written times α/r: the file then computes peft's ΔW exactly.
"""
from __future__ import annotations

from typing import Optional

import torch

NETWORK_TYPES = ("lora", "loha", "lokr", "dora")
DIFFUSERS_LAYOUT = ("lora", "dora")  # the types diffusers' layout (and load_lora_weights) can hold
PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te"}
SDXL_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}  # kohya's SDXL names


def adapter_config(network_type: str, rank: int, alpha: float, dropout: float, targets):
    """The peft config of one network type; the adapter starts as the identity (LoRA/DoRA: B = 0, LoHa: w2_b = 0,
    LoKr: w1 = 0), so step 0 is the base model."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    targets = list(targets)
    if network_type in ("lora", "dora"):
        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                          target_modules=targets, use_dora=network_type == "dora")
    if network_type == "loha":
        return LoHaConfig(r=rank, alpha=alpha, target_modules=targets)
    if network_type == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, target_modules=targets)
    raise ValueError(f"network_type must be one of {', '.join(NETWORK_TYPES)}, got {network_type!r}")


def default_save_format(network_type: str) -> str:
    """diffusers' layout where it can hold the type (LoRA, DoRA), kohya / LyCORIS' otherwise (LoHa, LoKr)."""
    return "diffusers" if network_type in DIFFUSERS_LAYOUT else "kohya"


def kohya_network_state(models: dict, network_type: str, alpha: Optional[float] = None,
                        sdxl: bool = False) -> dict[str, torch.Tensor]:
    """The adapters of `models` ({"unet": ..., "text_encoder": ..., SDXL "text_encoder_2": ...}) in kohya /
    LyCORIS' layout, float32 on CPU (SDXL's encoders as `lora_te1_` / `lora_te2_`); every module's `.alpha` is
    `alpha`, or (None) the layer's own α = scaling · r."""
    prefixes = SDXL_PREFIXES if sdxl else PREFIXES
    state: dict[str, torch.Tensor] = {}
    for component, model in models.items():
        if model is None:
            continue
        for module_name, layer in adapter_layers(model):
            name = f"{prefixes[component]}_{kohya_module_name(component, module_name)}"
            module_alpha = alpha if alpha is not None else layer.scaling["default"] * layer.r["default"]
            state.update({f"{name}.{key}": value
                          for key, value in module_factors(layer, network_type, module_alpha).items()})
    return state


def kohya_module_name(component: str, module_name: str) -> str:
    """A dotted module name with '_' for '.'; CLIP's names keep `text_model.` (transformers >= 5.6 drops it)."""
    if component.startswith("text_encoder") and not module_name.startswith("text_model."):
        module_name = "text_model." + module_name
    return module_name.replace(".", "_")


def adapter_layers(model: torch.nn.Module):
    """(dotted name, peft layer) of every module that holds the "default" adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and "default" in getattr(module, "scaling", {}):
            yield name, module


def module_factors(layer, network_type: str, alpha: float) -> dict[str, torch.Tensor]:
    """One module's tensors under their kohya / LyCORIS names (without the module prefix)."""
    factors = {"alpha": torch.tensor(float(alpha))}
    if network_type in ("lora", "dora"):
        factors["lora_down.weight"] = _tensor(layer.lora_A["default"].weight)
        factors["lora_up.weight"] = _tensor(layer.lora_B["default"].weight)
        if network_type == "dora":
            factors["dora_scale"] = _tensor(layer.lora_magnitude_vector["default"].weight).reshape(-1, 1)
        return factors
    prefix = "hada_" if network_type == "loha" else "lokr_"
    for attribute in sorted(a for a in vars(layer)["_modules"] if a.startswith(prefix)):
        if "default" in getattr(layer, attribute):
            factors[attribute] = _tensor(getattr(layer, attribute)["default"])
    if network_type == "lokr" and not any(key.endswith(("_a", "_b")) for key in factors):
        factors["lokr_w2"] = factors["lokr_w2"] * (alpha / layer.r["default"])  # LyCORIS scales this module by 1
    return factors


def _tensor(value) -> torch.Tensor:
    return value.detach().float().cpu().contiguous()


def check_network_args(network_type: str, lora_rank: Optional[int], dropout: float, save_format: Optional[str]
                       ) -> list[str]:
    """Problems with --network_type and the flags it combines with, each naming its flags."""
    problems = []
    if network_type != "lora" and lora_rank is None:
        problems.append(f"--network_type {network_type} needs --lora_rank (the adapter's rank)")
    if network_type in ("loha", "lokr") and dropout > 0:
        problems.append(f"--lora_dropout applies to --network_type lora or dora; peft's {network_type} has no "
                        "input dropout: leave it at 0")
    if network_type not in DIFFUSERS_LAYOUT and save_format == "diffusers":
        problems.append(f"--lora_save_format diffusers cannot hold --network_type {network_type} "
                        "(diffusers' layout is LoRA/DoRA only): use --lora_save_format kohya (LyCORIS keys)")
    return problems
