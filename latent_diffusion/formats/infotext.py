"""AUTOMATIC1111's "infotext" (the PNG `parameters` chunk) written from and read into GenerationSettings.

Format (what A1111's "PNG Info", civitai and image browsers read): the prompt (one or more lines), then
`Negative prompt: ...` (only when there is one, possibly several lines), then one line of `Key: value`
pairs separated by ", ", a value holding ",", ":" or a newline written as a JSON string:

    a red circle
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, Model: sd15

Keys in A1111's order: Steps, Sampler, Schedule type, CFG scale, Seed, Size (width x height), Model hash
(first 10 hex of the weights file's SHA-256, when the model is one file), Model, Denoising strength
(img2img), Clip skip (A1111 counts the last layer as 1: ours + 1; only above 1), Eta DDIM, Lora hashes
(`name: first 12 hex of the SHA-256` of each adapter file), then one `ControlNet i` per ControlNet, its value the
unit as the sd-webui-controlnet extension writes it (a quoted list of `Key: value` pairs: Module, Model, Weight,
Resize Mode, Processor Res, Threshold A, Threshold B, Guidance Start, Guidance End, Pixel Perfect, Control Mode):

    ..., ControlNet 0: "Module: canny, Model: default-outline, Weight: 0.8, Resize Mode: Just Resize, ..."

Our own PNG keys stay alongside; reading a PNG prefers them.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Optional

from latent_diffusion.control_images import CANNY_HIGH, CANNY_LOW
from latent_diffusion.settings import ControlUnit, GenerationSettings

PARAMETERS_KEY = "parameters"  # the PNG text chunk A1111 writes and reads
# Our sampler names and A1111's (also ComfyUI's `sampler_name`); docs/samplers.md's A1111 column is this table.
A1111_SAMPLERS = {"dpm++": "DPM++ 2M", "dpm++_sde": "DPM++ 2M SDE", "unipc": "UniPC", "euler": "Euler",
                  "euler_a": "Euler a", "heun": "Heun", "ddim": "DDIM", "ddpm": "DDPM", "lcm": "LCM", "tcd": "TCD"}
A1111_SCHEDULES = {None: "Automatic", "default": "Automatic", "karras": "Karras", "exponential": "Exponential"}
MODEL_HASH_LENGTH, LORA_HASH_LENGTH = 10, 12  # A1111's short checkpoint hash and its network short hash
# sd-webui-controlnet's control modes: ours is diffusers' guess mode ("ControlNet is more important") or not.
CONTROL_MODES = {False: "Balanced", True: "ControlNet is more important"}
_CONTROL_KEY = re.compile(r"ControlNet (\d+)$")
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # Key: value, value maybe quoted


def short_hash(path: Path, length: int = MODEL_HASH_LENGTH) -> str:
    """The first `length` hex digits of the file's SHA-256 (A1111's short model hash for 10)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def _quote(value: str) -> str:
    """A value as A1111 writes it: as it is, or a JSON string when it holds ',', ':' or a newline."""
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ",:\n") else value


def _number(value: float) -> str:
    return f"{value:g}" if float(value).is_integer() else repr(float(value))


def format_infotext(settings: GenerationSettings) -> str:
    """A1111's `parameters` text of one image made with these resolved (n = 1) settings."""
    fields = {"Steps": str(settings.steps), "Sampler": A1111_SAMPLERS.get(settings.sampler, str(settings.sampler)),
              "Schedule type": A1111_SCHEDULES.get(settings.sigma_schedule, str(settings.sigma_schedule)),
              "CFG scale": _number(settings.guidance), "Seed": str(settings.seed),
              "Size": f"{settings.width}x{settings.height}"}
    model = Path(settings.model) if settings.model else None
    if model is not None and model.is_file():
        fields["Model hash"] = short_hash(model)
    fields["Model"] = model.stem if model is not None and model.is_file() else (settings.model or "embedded")
    if settings.strength is not None:  # set only for img2img / inpainting (records read back hold no image)
        fields["Denoising strength"] = _number(settings.strength)
    if settings.clip_skip:
        fields["Clip skip"] = str(settings.clip_skip + 1)
    if settings.eta:
        fields["Eta DDIM"] = _number(settings.eta)
    hashes = _lora_hashes(settings.loras)
    if hashes:
        fields["Lora hashes"] = hashes
    for index, unit in enumerate(settings.controls):
        fields[f"ControlNet {index}"] = control_unit_text(unit, settings.guess_mode)
    lines = [settings.prompt]
    if settings.negative_prompt:
        lines.append(f"Negative prompt: {settings.negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields.items()))
    return "\n".join(lines)


def control_model_name(model: str) -> str:
    """The name a ControlNet goes by in infotext and the A1111 API: a local folder's name, else the name given."""
    path = Path(model).expanduser()
    return path.name if path.is_dir() and path.name else model


def control_unit_text(unit: ControlUnit, guess_mode: bool) -> str:
    """One ControlNet unit as sd-webui-controlnet writes it into infotext (control images are stretched to the
    output size: its "Just Resize"; preprocessors run at the image's own resolution: Processor Res -1)."""
    low, high = (unit.thresholds or (CANNY_LOW, CANNY_HIGH)) if unit.preprocess == "canny" else (-1, -1)
    values = {"Module": unit.preprocess, "Model": control_model_name(unit.model), "Weight": float(unit.scale),
              "Resize Mode": "Just Resize", "Processor Res": -1, "Threshold A": float(low),
              "Threshold B": float(high), "Guidance Start": float(unit.start), "Guidance End": float(unit.end),
              "Pixel Perfect": False, "Control Mode": CONTROL_MODES[bool(guess_mode)]}
    return ", ".join(f"{key}: {value}" for key, value in values.items())


def controls_from_infotext(values: dict[str, str]) -> tuple[tuple[ControlUnit, ...], bool]:
    """(units, guess mode) of the `ControlNet i` entries; ValueError (argument `png`) for a module we lack."""
    from latent_diffusion.control_images import PREPROCESSORS

    units, guess = [], False
    for key in sorted((k for k in values if _CONTROL_KEY.match(k)), key=lambda k: int(_CONTROL_KEY.match(k)[1])):
        unit = dict(part.split(": ", 1) for part in values[key].split(", ") if ": " in part)
        module = unit.get("Module", "none")
        if module not in PREPROCESSORS:
            raise ValueError(f"png: {key}'s module {module!r} has no counterpart here (known: {', '.join(PREPROCESSORS)})")
        low, high = float(unit.get("Threshold A", -1)), float(unit.get("Threshold B", -1))
        thresholds = (low, high) if module == "canny" and 0 <= low < high else None
        units.append(ControlUnit(model=re.sub(r" \[\w+\]$", "", unit.get("Model", "None")),
                                 scale=float(unit.get("Weight", 1.0)), start=float(unit.get("Guidance Start", 0.0)),
                                 end=float(unit.get("Guidance End", 1.0)), preprocess=module, thresholds=thresholds))
        guess = guess or unit.get("Control Mode") == CONTROL_MODES[True]
    return tuple(units), guess


def _lora_hashes(loras) -> str:
    """`name: hash, ...` of the adapters loaded from single files (folders and Hub ids have no file hash)."""
    from latent_diffusion.pipelines.lora import parse_lora_spec

    files = [Path(parse_lora_spec(spec)[0]) for spec in loras]
    return ", ".join(f"{path.stem}: {short_hash(path, LORA_HASH_LENGTH)}" for path in files if path.is_file())


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, {key: value}) of an A1111 `parameters` text; JSON-quoted values unquoted.

    The last line is the settings line when it holds at least three `Key: value` pairs (as A1111 reads it).
    """
    *lines, last = text.strip().split("\n")
    pairs = _PAIR.findall(last)
    if len(pairs) < 3:
        lines.append(last)
        pairs = []
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    values = {key.strip(): json.loads(value) if value.startswith('"') else value.strip() for key, value in pairs}
    return "\n".join(prompt), "\n".join(negative), values


def settings_from_infotext(text: str) -> GenerationSettings:
    """GenerationSettings from A1111 infotext; ValueError (argument `png`) for a sampler or schedule we lack."""
    prompt, negative, values = parse_infotext(text)
    if "Steps" not in values or "Seed" not in values:
        raise ValueError("png: its A1111 parameters have no Steps or Seed")
    sampler, schedule = _our_sampler(values.get("Sampler", "DPM++ 2M"), values.get("Schedule type", "Automatic"))
    width, height = (int(side) for side in values.get("Size", "").split("x")) if "Size" in values else (None, None)
    strength = float(values["Denoising strength"]) if "Denoising strength" in values else None
    controls, guess_mode = controls_from_infotext(values)
    return GenerationSettings(
        prompt=prompt, negative_prompt=negative or None, steps=int(values["Steps"]),
        guidance=float(values["CFG scale"]) if "CFG scale" in values else None, sampler=sampler,
        sigma_schedule=schedule, eta=float(values.get("Eta DDIM", 0.0)), seed=int(values["Seed"]),
        height=height, width=width, clip_skip=int(values["Clip skip"]) - 1 if int(values.get("Clip skip", 1)) > 1
        else None, strength=strength, controls=controls, guess_mode=guess_mode)


def _our_sampler(sampler: str, schedule: str) -> tuple[str, Optional[str]]:
    """(our sampler, our sigma schedule) of A1111's names; old infotexts write "DPM++ 2M Karras" as one name."""
    for suffix in (" Karras", " Exponential"):
        if sampler.endswith(suffix) and sampler[: -len(suffix)] in A1111_SAMPLERS.values():
            sampler, schedule = sampler[: -len(suffix)], suffix.strip()
    ours = {name: key for key, name in A1111_SAMPLERS.items()}
    schedules = {"Automatic": None, "Karras": "karras", "Exponential": "exponential"}
    if sampler not in ours:
        raise ValueError(f"png: A1111 sampler {sampler!r} has no counterpart here (known: {', '.join(ours)})")
    if schedule not in schedules:
        raise ValueError(f"png: A1111 schedule type {schedule!r} has no counterpart here "
                         f"(known: {', '.join(schedules)})")
    return ours[sampler], schedules[schedule]


def png_text(settings: GenerationSettings) -> dict[str, str]:
    """Every text chunk of a generated PNG: our keys (`png_metadata`) and A1111's `parameters`."""
    return {**settings.png_metadata(), PARAMETERS_KEY: format_infotext(settings)}
