"""`GenerationSettings`: the one record of how a generation is asked for and how its PNGs record it.

The CLI (`generate`), the web UI (`serve`) and the evaluation all build one, turn it into the pipeline's
keyword arguments (`pipeline_kwargs`, or `batch_pipeline_kwargs` for several prompts in one call) and
into each PNG's text metadata (`resolved(pipe)`, `for_images`, `png_metadata`); `from_png_metadata`
reads a PNG's settings back. Unset (None) sampler, steps, guidance and size take what the pipeline
takes for them: the model's `generation_defaults` (its generation_config.json, else
`FALLBACK_DEFAULTS`) and its native size; an unset strength takes the img2img / inpainting default
(`latent_diffusion.diffusion.sdedit`). The pipeline is duck-typed (`generation_defaults`,
`resolve_size`): this module never imports it.

PNG keys (as `latent-diffusion generate` has always written them): prompt, negative_prompt, seed,
sampler, [sigma_schedule], steps, guidance, guidance_rescale, eta, height, width, model ("embedded
default" for the embedded model), [lora: PATH[:SCALE] of each adapter, space-separated], [clip_skip],
[prompt_syntax: "plain"; absent means "a1111"], versions; with an input image also [image: its path], strength, [mask: its path];
with ControlNets also controlnet (a JSON list, one object per net: model, scale, start, end, preprocess,
[thresholds], [image: its path]) and [guess_mode: "true"].
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

# The pipeline's defaults for models whose folder has no generation_config.json (SDXL folders: guidance 5).
FALLBACK_DEFAULTS = {"num_inference_steps": 25, "guidance_scale": 7.5, "sampler": "dpm++"}
EMBEDDED_MODEL = "embedded default"  # the PNG's `model` for the embedded Shapes model (model None)
REQUIRED_PNG_KEYS = ("prompt", "seed", "sampler", "steps", "guidance", "height", "width")


@dataclasses.dataclass(frozen=True)
class ControlUnit:
    """One ControlNet of a generation: the net (by the name it was loaded with: a folder, Hub id or
    "default-outline"), its control image, its preprocessor, its weight and the fraction of the steps it acts in.

    `image`: a path (opened when the pipeline's arguments are made, and recorded) or a picture (PIL, array,
    tensor; not recorded); None in a record read back from a PNG, which holds no control image.
    `thresholds`: Canny's (low, high) for `preprocess` "canny" (None: the preprocessor's defaults).
    """

    model: str
    image: Any = None
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocess: str = "none"
    thresholds: Optional[tuple[float, float]] = None

    def replace(self, **changes: Any) -> "ControlUnit":
        return dataclasses.replace(self, **changes)

    def picture(self, argument: str = "control_image") -> Any:
        """The control image as the ControlNet reads it: opened (errors name `argument`), then preprocessed."""
        from latent_diffusion.control_images import preprocess_control_image

        image = open_picture(argument, self.image)
        if self.preprocess == "none" and not hasattr(image, "convert"):
            return image  # arrays and tensors go to the pipeline as they are
        return preprocess_control_image(self.preprocess, image, self.thresholds)

    def record(self) -> dict[str, Any]:
        """This unit as our PNG's `controlnet` list records it (the image only when it is a path)."""
        entry = {"model": self.model, "scale": self.scale, "start": self.start, "end": self.end,
                 "preprocess": self.preprocess}
        if self.thresholds is not None:
            entry["thresholds"] = list(self.thresholds)
        return {**entry, "image": str(self.image)} if _is_path(self.image) else entry

    @classmethod
    def from_record(cls, entry: dict[str, Any]) -> "ControlUnit":
        thresholds = entry.get("thresholds")
        return cls(model=str(entry["model"]), image=entry.get("image"), scale=float(entry.get("scale", 1.0)),
                   start=float(entry.get("start", 0.0)), end=float(entry.get("end", 1.0)),
                   preprocess=str(entry.get("preprocess", "none")),
                   thresholds=None if thresholds is None else (float(thresholds[0]), float(thresholds[1])))


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """The settings of one request: `n` images of `prompt` with seeds seed, seed + 1, ..., seed + n - 1.

    `image` / `mask` (img2img / inpainting): a path (opened when the pipeline's arguments are made, and
    recorded in the PNG) or a picture the pipeline takes (PIL, array, tensor; not recorded). `loras`:
    the PATH[:SCALE] spec of each adapter the pipeline has loaded (recorded only: loading is the app's).
    `model`: the name the PNG records, None for the embedded default model. `controls`: one `ControlUnit`
    per ControlNet the pipeline has loaded, in its order; `guess_mode` is the pipeline's (for all of them).
    """

    prompt: str
    negative_prompt: Optional[str] = None
    steps: Optional[int] = None
    guidance: Optional[float] = None
    guidance_rescale: float = 0.0
    sampler: Optional[str] = None
    sigma_schedule: Optional[str] = None
    eta: float = 0.0
    seed: int = 0
    height: Optional[int] = None
    width: Optional[int] = None
    n: int = 1
    clip_skip: Optional[int] = None
    image: Any = None
    mask: Any = None
    strength: Optional[float] = None
    loras: tuple[str, ...] = ()
    model: Optional[str] = None
    prompt_syntax: str = "a1111"
    controls: tuple[ControlUnit, ...] = ()
    guess_mode: bool = False

    def replace(self, **changes: Any) -> "GenerationSettings":
        return dataclasses.replace(self, **changes)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + k for k in range(self.n)]

    # ----- to the pipeline --------------------------------------------------------------------------------

    def pipeline_kwargs(self) -> dict[str, Any]:
        """`pipe(**settings.pipeline_kwargs())` generates the n images (one generator per image)."""
        return batch_pipeline_kwargs([self])

    def pictures(self) -> tuple[Any, Any]:
        """(image, mask) as the pipeline takes them: paths opened, pictures as they are; FileNotFoundError
        naming the argument for a missing file."""
        return open_picture("image", self.image), open_picture("mask", self.mask)

    # ----- to and from PNG metadata -----------------------------------------------------------------------

    def resolved(self, pipe) -> "GenerationSettings":
        """What a call of `pipe` with these settings uses: the model's defaults and native size where unset,
        the img2img / inpainting default strength when an image is given. ValueError naming a bad size."""
        from latent_diffusion.diffusion.sdedit import default_strength

        d = pipe.generation_defaults
        height, width = pipe.resolve_size(self.height, self.width)
        strength = None if self.image is None else default_strength(self.strength, inpainting=self.mask is not None)
        return self.replace(
            sampler=d["sampler"] if self.sampler is None else self.sampler,
            steps=d["num_inference_steps"] if self.steps is None else self.steps,
            guidance=d["guidance_scale"] if self.guidance is None else self.guidance,
            height=height, width=width, strength=strength)

    def for_images(self, images: Sequence[Any]) -> list["GenerationSettings"]:
        """One record per generated PIL image: its own seed (seed + k), n = 1, and its real size (an input
        image's size sets an img2img output's)."""
        return [self.replace(seed=self.seed + k, n=1, height=image.height, width=image.width)
                for k, image in enumerate(images)]

    def png_metadata(self) -> dict[str, str]:
        """The PNG text metadata of one image made with these (resolved, `n` = 1) settings."""
        from latent_diffusion.formats.pngmeta import library_versions

        meta = {"prompt": self.prompt, "negative_prompt": self.negative_prompt or "", "seed": str(self.seed),
                "sampler": str(self.sampler)}
        if self.sigma_schedule:
            meta["sigma_schedule"] = self.sigma_schedule
        meta.update(steps=str(self.steps), guidance=str(self.guidance), guidance_rescale=str(self.guidance_rescale),
                    eta=str(self.eta), height=str(self.height), width=str(self.width),
                    model=str(self.model or EMBEDDED_MODEL))
        if self.loras:
            meta["lora"] = " ".join(self.loras)
        if self.clip_skip:
            meta["clip_skip"] = str(self.clip_skip)
        if self.prompt_syntax != "a1111":
            meta["prompt_syntax"] = self.prompt_syntax
        meta["versions"] = json.dumps(library_versions())
        return {**meta, **self._image_input_metadata(), **self._control_metadata()}

    def _control_metadata(self) -> dict[str, str]:
        if not self.controls:
            return {}
        meta = {"controlnet": json.dumps([unit.record() for unit in self.controls])}
        return {**meta, "guess_mode": "true"} if self.guess_mode else meta

    def _image_input_metadata(self) -> dict[str, str]:
        if self.image is None:
            return {}
        meta = {"image": str(self.image)} if _is_path(self.image) else {}
        meta["strength"] = str(self.strength)
        return {**meta, "mask": str(self.mask)} if _is_path(self.mask) else meta

    @classmethod
    def from_png_metadata(cls, metadata: dict[str, str]) -> "GenerationSettings":
        """The settings a PNG records (`png_metadata`'s inverse; an empty negative prompt reads as None).

        ValueError naming the missing keys when the PNG has no generation settings.
        """
        missing = [key for key in REQUIRED_PNG_KEYS if key not in metadata]
        if missing:
            raise ValueError(f"png: no generation settings in this image (missing {', '.join(missing)})")
        get = metadata.get
        number = lambda key, kind, default=None: kind(metadata[key]) if key in metadata else default  # noqa: E731
        return cls(prompt=metadata["prompt"], negative_prompt=get("negative_prompt") or None,
                   steps=number("steps", int), guidance=number("guidance", float),
                   guidance_rescale=number("guidance_rescale", float, 0.0), sampler=metadata["sampler"],
                   sigma_schedule=get("sigma_schedule"), eta=number("eta", float, 0.0), seed=number("seed", int),
                   height=number("height", int), width=number("width", int), clip_skip=number("clip_skip", int),
                   image=get("image"), mask=get("mask"), strength=number("strength", float),
                   prompt_syntax=get("prompt_syntax", "a1111"), loras=tuple(get("lora", "").split()),
                   model=None if get("model", EMBEDDED_MODEL) == EMBEDDED_MODEL else metadata["model"],
                   controls=tuple(ControlUnit.from_record(entry) for entry in json.loads(get("controlnet", "[]"))),
                   guess_mode=get("guess_mode") == "true")


def batch_pipeline_kwargs(requests: Sequence[GenerationSettings]) -> dict[str, Any]:
    """One pipeline call for several requests that differ only in prompt, negative prompt and seed.

    The prompts (each request's n times) and one seeded generator per image, in order; the rest from the
    first request. ValueError when the requests differ in anything else (pictures: by identity).
    """
    import torch

    first = requests[0]

    def shared(r: GenerationSettings) -> GenerationSettings:  # pictures by identity: tensors have no truth value
        return r.replace(prompt="", negative_prompt=None, seed=0, n=1, image=id(r.image), mask=id(r.mask),
                         controls=tuple(unit.replace(image=id(unit.image)) for unit in r.controls))

    if any(shared(r) != shared(first) for r in requests[1:]):
        raise ValueError("requests: one pipeline call takes requests that differ only in prompt, negative prompt "
                         "and seed")
    negatives = [r.negative_prompt or "" for r in requests for _ in range(r.n)]
    image, mask = first.pictures()
    optional = {"image": image, "mask_image": mask, "strength": first.strength,
                "prompt_syntax": None if first.prompt_syntax == "a1111" else first.prompt_syntax}  # a1111: the default
    return dict(
        prompt=[r.prompt for r in requests for _ in range(r.n)],
        negative_prompt=negatives if any(r.negative_prompt is not None for r in requests) else None,
        num_inference_steps=first.steps, guidance_scale=first.guidance, guidance_rescale=first.guidance_rescale,
        sampler=first.sampler, sigma_schedule=first.sigma_schedule, eta=first.eta,
        height=first.height, width=first.width, clip_skip=first.clip_skip,
        generator=[torch.Generator().manual_seed(seed) for r in requests for seed in r.seeds],
        **{name: value for name, value in optional.items() if value is not None}, **control_kwargs(first))


def control_kwargs(settings: GenerationSettings) -> dict[str, Any]:
    """The pipeline's ControlNet arguments ({} without controls): one value per net, or the value for one net."""
    units = settings.controls
    if not units:
        return {}
    one = lambda values: values[0] if len(values) == 1 else list(values)  # noqa: E731
    kwargs = {"control_image": one([unit.picture() for unit in units]),
              "controlnet_conditioning_scale": one([unit.scale for unit in units]),
              "control_guidance_start": one([unit.start for unit in units]),
              "control_guidance_end": one([unit.end for unit in units])}
    return {**kwargs, "guess_mode": True} if settings.guess_mode else kwargs


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def open_picture(argument: str, value: Any) -> Any:
    """A path opened as a PIL image (copied, so the file is closed); anything else as it is."""
    if not _is_path(value):
        return value
    from latent_diffusion.formats.images import ImageReadError, as_seen, open_image

    if not Path(value).is_file():
        raise FileNotFoundError(f"{argument}: no such file {str(value)!r}")
    try:  # as viewers show it: EXIF rotation applied, 16-bit scaled; oversized headers refused before decoding
        with open_image(value) as opened:
            return as_seen(opened).copy()
    except ImageReadError as error:
        raise ValueError(f"{argument} {str(value)!r} {error}") from None
