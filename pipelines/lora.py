"""LoRA loading for `LatentDiffusionPipeline`: diffusers' `StableDiffusionLoraLoaderMixin`, made safe and trace-aware.

The mixin (peft underneath) does the loading, in any layout it knows
(diffusers', kohya / A1111's, peft's), and the adapter bookkeeping:

    pipe.load_lora_weights("path/or/hub-id", adapter_name="shapes")     # a folder, a .safetensors file or a Hub id
    pipe.set_adapters(["shapes", "style"], adapter_weights=[1.0, 0.5])  # mix and scale them
    pipe.fuse_lora(lora_scale=0.8); pipe.unfuse_lora()                  # bake into / take out of the weights
    pipe.unload_lora_weights()                                          # back to the base model

What we add: only safetensors files are read (a `.bin` / pickle LoRA is
refused, never unpickled), and every call that changes the adapters clears the
pipeline's UNet traces (`TracedUNet`), which would otherwise replay the old
weights and scales. `parse_lora_spec` / `apply_loras` read adapter specs
'PATH[:SCALE]'; a bad one is a `LoraSpecError` naming the spec, which a front
end words its own way (the CLI: its `--lora` flag).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Optional, Sequence, Union

from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
from safetensors import SafetensorError

from latent_diffusion.checks import one_line
from latent_diffusion.formats.model_files import check_safetensors_file

SAFE_SUFFIX = ".safetensors"


def check_safetensors_source(source, weight_name: Optional[str] = None) -> tuple[object, Optional[str]]:
    """(source, weight_name) to hand to diffusers, or a ValueError for anything but safetensors.

    A file path becomes (its folder, its name); a folder must hold a .safetensors file; a Hub id is
    fetched by diffusers with `use_safetensors=True`, which never falls back to a pickle.
    """
    if isinstance(source, dict):
        return source, weight_name
    if weight_name is not None and not str(weight_name).endswith(SAFE_SUFFIX):
        raise ValueError(f"weight_name must name a {SAFE_SUFFIX} file, got {weight_name!r} "
                         "(pickled LoRA files are not loaded)")
    path = Path(os.fspath(source))
    if path.is_file():
        if path.suffix != SAFE_SUFFIX:
            raise ValueError(f"LoRA file {str(path)!r} is not {SAFE_SUFFIX}; pickled (.bin, .pt, .ckpt) LoRA files "
                             "are not loaded: convert it to safetensors first")
        return str(path.parent), path.name
    if path.is_dir():
        found = sorted(p.name for p in path.glob(f"*{SAFE_SUFFIX}"))
        if weight_name is None and not found:
            raise ValueError(f"LoRA folder {str(path)!r} has no {SAFE_SUFFIX} file (pickled LoRA files are not loaded)")
        if weight_name is None and len(found) > 1 and "pytorch_lora_weights.safetensors" not in found:
            raise ValueError(f"LoRA folder {str(path)!r} holds several {SAFE_SUFFIX} files {found}: give weight_name")
        return str(path), weight_name
    if os.path.isabs(os.fspath(source)) or str(source).startswith("."):
        raise FileNotFoundError(f"LoRA {str(source)!r} does not exist")
    return source, weight_name  # a Hub id


class _NoMissingTextEncoderKeys(logging.Filter):
    """Drops diffusers' "No LoRA keys associated to CLIPTextModel" warning: a UNet-only LoRA is the usual case."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No LoRA keys associated to")


@contextlib.contextmanager
def _quiet_text_encoder_warning():
    """While a LoRA loads, diffusers' loaders do not warn that it has no text-encoder keys."""
    loggers = [logging.getLogger(name) for name in ("diffusers.loaders.lora_base", "diffusers.loaders.peft")]
    quiet = _NoMissingTextEncoderKeys()
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


class LatentDiffusionLoraMixin(StableDiffusionLoraLoaderMixin):
    """diffusers' LoRA loader for our pipeline: safetensors only, and the UNet traces follow adapter changes.
    An SDXL pipeline (with `text_encoder_2`) loads as diffusers' SDXL loader does: the second encoder's keys
    (`text_encoder_2.`, kohya's `lora_te2_`) go into it; set_adapters / fuse / unload cover it too."""

    _lora_loadable_modules = ["unet", "text_encoder", "text_encoder_2"]  # a missing (SD) component is skipped

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: Optional[str] = None, **kwargs):
        """Load a LoRA (diffusers, kohya or peft layout) into the UNet and text encoder as `adapter_name`."""
        source, weight_name = check_safetensors_source(pretrained_model_name_or_path_or_dict, kwargs.pop("weight_name", None))
        lycoris, dora = _lycoris_state(source, weight_name)
        if lycoris is not None:  # LoHa / LoKr: peft's layers with the file's factors (pipelines/lycoris.py)
            from latent_diffusion.pipelines.lycoris import load_lycoris

            count = sum(len(names) for names in self.get_list_adapters().values())
            load_lycoris(self, lycoris, adapter_name or f"default_{count}")
        elif dora is not None:  # kohya DoRA: diffusers loads the LoRA, the magnitudes are set here
            from latent_diffusion.pipelines.lycoris import apply_dora_scales, split_dora_scales

            state, scales = split_dora_scales(dora)
            name = adapter_name or f"default_{sum(len(names) for names in self.get_list_adapters().values())}"
            self._load_diffusers_lora(state, adapter_name=name, **kwargs)
            apply_dora_scales(self, scales, name)
        else:
            kwargs["use_safetensors"] = True
            with _quiet_text_encoder_warning():
                self._load_diffusers_lora(source, adapter_name=adapter_name, weight_name=weight_name, **kwargs)
        self._adapters_changed()

    def _load_diffusers_lora(self, source, **kwargs):
        """diffusers' SD loader, or its SDXL loader (which also fills text_encoder_2) for an SDXL pipeline."""
        if getattr(self, "text_encoder_2", None) is not None:
            StableDiffusionXLLoraLoaderMixin.load_lora_weights(self, source, **kwargs)
        else:
            super().load_lora_weights(source, **kwargs)

    def set_adapters(self, adapter_names: Union[str, Sequence[str]], adapter_weights=None):
        super().set_adapters(adapter_names, adapter_weights)
        self._adapters_changed()

    def fuse_lora(self, *args, **kwargs):
        if not args and "components" not in kwargs:  # by default every adapted component, SDXL's text_encoder_2 too
            kwargs["components"] = self._present_lora_components()
        super().fuse_lora(*args, **kwargs)
        self._adapters_changed()

    def unfuse_lora(self, *args, **kwargs):
        if not args and "components" not in kwargs:
            kwargs["components"] = self._present_lora_components()
        super().unfuse_lora(*args, **kwargs)
        self._adapters_changed()

    def _present_lora_components(self) -> list[str]:
        return [name for name in self._lora_loadable_modules if getattr(self, name, None) is not None]

    def unload_lora_weights(self, *args, **kwargs):
        super().unload_lora_weights(*args, **kwargs)
        self._adapters_changed()

    def delete_adapters(self, adapter_names):
        super().delete_adapters(adapter_names)
        self._adapters_changed()

    def enable_lora(self):
        super().enable_lora()
        self._adapters_changed()

    def disable_lora(self):
        super().disable_lora()
        self._adapters_changed()

    def _adapters_changed(self) -> None:
        traced = getattr(self, "_traced_unet", None)
        if traced is not None:
            traced.clear()


def _lycoris_state(source, weight_name: Optional[str]) -> tuple[Optional[dict], Optional[dict]]:
    """(state dict of a LoHa/LoKr source, of a kohya DoRA source): a dict or a local .safetensors file; Nones else."""
    from latent_diffusion.pipelines.lycoris import is_lycoris

    if isinstance(source, dict):
        keys = source
    else:
        path = Path(os.fspath(source)) / weight_name if weight_name else _weights_file(Path(os.fspath(source)))
        if not path.is_file() or path.suffix != SAFE_SUFFIX:
            return None, None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = dict.fromkeys(f.keys())
    lycoris, dora = is_lycoris(keys), any(key.endswith(".dora_scale") for key in keys)
    if not (lycoris or dora):
        return None, None
    if not isinstance(source, dict):
        from safetensors.torch import load_file

        source = load_file(str(path))
    return (source, None) if lycoris else (None, source)


def _weights_file(path: Path) -> Path:
    """A folder's adapter file as diffusers picks it: pytorch_lora_weights.safetensors, else its one .safetensors."""
    if not path.is_dir():
        return path
    found = sorted(path.glob(f"*{SAFE_SUFFIX}"))
    named = path / "pytorch_lora_weights.safetensors"
    return named if named.is_file() else found[0] if len(found) == 1 else path


class LoraSpecError(ValueError):
    """A bad adapter spec: the `spec` itself and the `problem` (what is wrong and allowed)."""

    def __init__(self, spec: str, problem: str):
        self.spec, self.problem = spec, problem
        super().__init__(f"lora spec {spec!r}: {problem}")


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """'PATH[:SCALE]' -> (path, scale); the scale defaults to 1 (a path may itself hold ':' if no scale follows)."""
    path, _, scale = spec.rpartition(":")
    if path and scale:
        try:
            value = float(scale)
        except ValueError:
            value = None
        if value is not None and not math.isfinite(value):
            raise LoraSpecError(spec, f"its scale must be a finite number, got {scale!r}")
        if value is not None:
            return path, value
    if not spec:
        raise LoraSpecError(spec, "needs a path or Hub id, optionally followed by :SCALE")
    return spec, 1.0


def apply_loras(pipe, specs: Sequence[str]) -> list[str]:
    """Load each 'PATH[:SCALE]' as adapter lora0, lora1, … and activate them all with their scales."""
    names, scales = [], []
    for k, spec in enumerate(specs):
        path, scale = parse_lora_spec(spec)
        name = f"lora{k}"
        try:
            if os.path.isfile(path) and path.endswith(".safetensors"):
                check_safetensors_file(Path(path))  # a truncated file: named, before safetensors' own error
            pipe.load_lora_weights(path, adapter_name=name)
        except (OSError, ValueError, RuntimeError, SafetensorError) as error:  # RuntimeError: shapes that do not fit
            raise LoraSpecError(spec, one_line(error)) from None
        names.append(name)
        scales.append(scale)
    if names:
        pipe.set_adapters(names, scales)
    return names
