"""The sd-webui-controlnet extension's API on the A1111 server: ControlNet units in txt2img / img2img requests,
and its `GET /controlnet/model_list` and `/controlnet/module_list`.

A request's units are `"alwayson_scripts": {"controlnet": {"args": [unit, ...]}}`, each unit an object with
`image` (or the older `input_image`; base64, or {"image": base64, "mask": ...}; img2img without one: the init
image), `module` ("none" or "canny", with Canny's `threshold_a` < `threshold_b`), `model` (a ControlNet the
server was started with, by the name `model_list` gives, an A1111 " [hash]" suffix allowed), `weight`,
`guidance_start`, `guidance_end`, `control_mode` ("Balanced" / 0, or "ControlNet is more important" / 2:
diffusers' guess mode; the older `guessmode` true means the latter) and `enabled` (false: the unit is skipped).
`resize_mode`, `pixel_perfect`, `processor_res`, `low_vram` and `hr_option` are accepted and not used: control
images are stretched to the output size (sd-webui-controlnet's "Just Resize") and preprocessed at their own size.
"""
from __future__ import annotations

import re
from typing import Any, Optional

from latent_diffusion.apps.http_api import field
from latent_diffusion.apps.limits import RequestError, decode_base64, decode_image
from latent_diffusion.checks import check_finite
from latent_diffusion.control_images import PREPROCESSORS
from latent_diffusion.formats.infotext import control_model_name
from latent_diffusion.settings import ControlUnit

# sd-webui-controlnet's control modes -> guess mode; "My prompt is more important" (1) has no counterpart here
CONTROL_MODES = {"Balanced": False, 0: False, "ControlNet is more important": True, 2: True}
CANNY_RANGE = (0, 255)  # sd-webui-controlnet's threshold sliders for canny
RESIZE_NOTE = "resize_mode is not used: control images are stretched to the output size (Just Resize)"


def model_names(studio) -> list[str]:
    """The served ControlNets as `model_list` names them (a folder by its name)."""
    return [control_model_name(name) for name, _ in studio.controlnets]


def _served_name(studio, where: str, requested: Any) -> str:
    """The Studio's name of the ControlNet a unit's `model` names (A1111's " [hash]" suffix ignored)."""
    if not isinstance(requested, str):
        raise RequestError(f"{where}.model", f"must be a string naming a ControlNet, got {requested!r}")
    bare = re.sub(r" \[\w+\]$", "", requested)
    for name, _ in studio.controlnets:
        if bare in (name, control_model_name(name)):
            return name
    served = ", ".join(model_names(studio)) or "none (start it with serve --controlnet)"
    raise RequestError(f"{where}.model", f"{requested!r} is not a ControlNet of this server; it has {served}")


def _unit_image(unit: dict, where: str, init_image, max_pixels: int):
    value = unit.get("image") if unit.get("image") not in (None, "") else unit.get("input_image")
    if isinstance(value, dict):  # {"image": base64, "mask": base64}: the mask is for inpaint modules only
        value = value.get("image")
    if value in (None, ""):
        if init_image is None:
            raise RequestError(f"{where}.image", "txt2img needs a control image (base64) in each enabled unit")
        return init_image
    return decode_image(f"{where}.image", decode_base64(f"{where}.image", value), max_pixels).convert("RGB")


def _guess_mode(unit: dict, where: str) -> bool:
    if unit.get("guessmode") is True:
        return True
    mode = unit.get("control_mode", "Balanced")
    if mode not in CONTROL_MODES or isinstance(mode, bool):
        raise RequestError(f"{where}.control_mode", f"{mode!r} is not a control mode of this server; it has "
                                                    "'Balanced' (0) and 'ControlNet is more important' (2)")
    return CONTROL_MODES[mode]


def _thresholds(unit: dict, module: str) -> Optional[tuple[float, float]]:
    """Canny's (low, high) from threshold_a / threshold_b when both lie in [0, 255] with low < high, else the
    defaults (sd-webui-controlnet also falls back to its defaults for out-of-range values)."""
    low, high = field(unit, "threshold_a", float, -1.0), field(unit, "threshold_b", float, -1.0)
    lowest, highest = CANNY_RANGE
    return (low, high) if module == "canny" and lowest <= low < high <= highest else None


def parse_unit(unit: Any, where: str, studio, init_image, max_pixels: int) -> tuple[ControlUnit, bool]:
    """One enabled unit -> (ControlUnit with the decoded image, guess mode); RequestError naming its field."""
    if not isinstance(unit, dict):
        raise RequestError(where, "must be an object (a ControlNet unit)")
    model = _served_name(studio, where, unit.get("model", "None"))
    module = unit.get("module", "none")
    if module not in PREPROCESSORS:
        raise RequestError(f"{where}.module", f"{module!r} is not a preprocessor of this server; it has "
                                              f"{', '.join(PREPROCESSORS)}")
    values = {}
    for name, key, default, high in (("scale", "weight", 1.0, None), ("start", "guidance_start", 0.0, 1.0),
                                     ("end", "guidance_end", 1.0, 1.0)):
        try:
            values[name] = check_finite(key, field(unit, key, float, default), 0.0, high)
        except RequestError as error:
            raise RequestError(f"{where}.{key}", str(error).split(": ", 1)[-1]) from None
        except ValueError as error:
            raise RequestError(f"{where}.{key}", str(error).removeprefix(f"{key} ")) from None
    if values["start"] >= values["end"]:
        raise RequestError(f"{where}.guidance_start", f"({values['start']:g}) must be below guidance_end "
                                                      f"({values['end']:g})")
    image = _unit_image(unit, where, init_image, max_pixels)
    return ControlUnit(model, image, preprocess=module, thresholds=_thresholds(unit, module), **values), \
        _guess_mode(unit, where)


def request_controls(payload: dict, studio, init_image, max_pixels: int) -> tuple[dict[str, Any], list[str]]:
    """Studio.generate's `controls` and `guess_mode` from the request's sd-webui-controlnet units ({} without
    any), and the notes for `info`. One guess mode holds for all units (it is the pipeline's)."""
    scripts = field(payload, "alwayson_scripts", dict, {})
    key = next((name for name in scripts if name.lower() == "controlnet"), None)
    if key is None:
        return {}, []
    entry = scripts[key]
    args = entry.get("args", []) if isinstance(entry, dict) else None
    if not isinstance(args, list):
        raise RequestError(f"alwayson_scripts.{key}.args", "must be a list of ControlNet units")
    units, modes, notes = [], set(), []
    for index, unit in enumerate(args):
        if isinstance(unit, dict) and unit.get("enabled", True) is False:
            continue
        where = f"alwayson_scripts.{key}.args[{index}]"
        parsed, guess = parse_unit(unit, where, studio, init_image, max_pixels)
        units.append(parsed)
        modes.add(guess)
        if unit.get("resize_mode", "Just Resize") not in ("Just Resize", 0) and RESIZE_NOTE not in notes:
            notes.append(RESIZE_NOTE)
    if len(modes) > 1:
        raise RequestError(f"alwayson_scripts.{key}.args", "all units must have the same control_mode here "
                                                           "(guess mode is one setting for all ControlNets)")
    return ({"controls": units, "guess_mode": modes == {True}} if units else {}), notes


def model_list(server) -> dict[str, list[str]]:
    """`GET /controlnet/model_list`: the ControlNets of the current model's server."""
    return {"model_list": model_names(server.studio("model"))}


def module_list() -> dict[str, Any]:
    """`GET /controlnet/module_list`: the preprocessors (sd-webui-controlnet's names)."""
    return {"module_list": list(PREPROCESSORS), "module_detail": {name: {} for name in PREPROCESSORS}}
