"""`latent-diffusion serve`: a Gradio page and HTTP API over one loaded pipeline.

    latent-diffusion serve --model PATH --port 7860          # open http://127.0.0.1:7860

    from gradio_client import Client                        # the same from a script
    paths = Client("http://127.0.0.1:7860/").predict(prompt="a red circle", seed=0, api_name="/generate")

The page has the pipeline's settings (prompt, negative prompt, every sampler in
`SAMPLER_NAMES`, steps, guidance, seed with -1 for a random one, size, number
of images), a gallery, a progress bar over the denoising steps, the PNGs for
download (the same files, with the same metadata, that `latent-diffusion
generate` writes: `pngmeta`) and "reuse settings", which reads an uploaded
PNG's metadata back into the form. Where the pipeline's `__call__` takes
`image`, `strength` or `mask_image` (img2img, inpainting), the page shows
inputs for them and the API takes them. When the server has ControlNets
(`serve --controlnet`), the page has, for each, a control image, its
preprocessor (none, canny), weight and step window, and a guess-mode box;
a request without a control image runs the model without ControlNets.

Every request passes Gradio's queue (at most `max_queue` waiting, more are
refused) and one lock: the pipeline, which is not thread-safe, serves one
request at a time, each with its own generators, so seeds and images never mix.
Bad settings raise the pipeline's `ValueError`, shown as a `gr.Error` in the
page and returned through the API; the server keeps serving.

gradio is an optional extra (`pip install -e ".[ui]"`), imported only inside
the functions that build the app. This module takes a loaded pipeline and never
imports `pipelines/` (the CLI, the outermost layer, loads it).
"""
from __future__ import annotations

import inspect
import itertools
import logging
import os
import random
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from PIL import Image

from latent_diffusion.checks import check_finite, check_int
from latent_diffusion.diffusion.sdedit import IMG2IMG_STRENGTH
from latent_diffusion.formats.infotext import png_text
from latent_diffusion.formats.pngmeta import read_png_metadata, save_png
from latent_diffusion.settings import EMBEDDED_MODEL, ControlUnit, GenerationSettings

logger = logging.getLogger(__name__)
RANDOM_SEED = -1  # the seed field's "random" choice
MAX_SEED = 2**31 - 1  # random seeds are drawn from [0, MAX_SEED]
TORCH_MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes at most this
MAX_IMAGES = 8  # per request
MAX_LORA_SCALE = 2.0  # the page's LoRA strength slider: 0 is the base model, 1 each adapter at its --lora scale
EXAMPLE_PROMPT = "a red circle above a blue square"
# The page's names for the pipeline's arguments, so an error names the field the user filled in.
PAGE_NAMES = {"num_inference_steps": "steps", "guidance_scale": "guidance"}
# Optional pipeline inputs the page offers when the pipeline's __call__ accepts them.
IMAGE_INPUTS = ("image", "strength", "mask_image")
# The page's and the API's inputs for ControlNet k: these names for the first, "<name>_k" for the others.
CONTROL_INPUTS = {"control_image": "image", "control_preprocess": "preprocess", "control_scale": "scale",
                  "control_start": "start", "control_end": "end"}
MAX_CONTROL_SCALE = 2.0  # the weight slider's end, as sd-webui-controlnet's


class Studio:
    """One loaded pipeline behind a lock: turns the form's settings into PNG files in `out_dir`.

    `model` is the name the PNGs record (None: "embedded default"), as the CLI records `--model`.
    `loras`: (adapter name, path, scale) of the LoRA adapters already loaded into `pipe` (the CLI's
    `serve --lora PATH[:SCALE]`); a request's `lora_scale` multiplies every adapter's scale.
    `embeddings`: (path, token) of the embeddings loaded into `pipe`, listed on the page.
    `controlnets`: (name, default weight) of the ControlNets loaded into `pipe`, in its order (`serve --controlnet`).
    """

    def __init__(self, pipe, model: Optional[str], out_dir: Union[str, os.PathLike],
                 loras: Sequence[tuple[str, str, float]] = (), embeddings: Sequence[tuple[str, str]] = (),
                 controlnets: Sequence[tuple[str, float]] = ()):
        self.pipe = pipe
        self.controlnets = list(controlnets)
        self._plain_pipe = _without_controlnets(pipe) if self.controlnets else pipe  # requests without a control image
        self.model = model
        self.loras = list(loras)
        self.embeddings = list(embeddings)  # (path, token) of textual-inversion embeddings loaded into pipe
        self._lora_factor = 1.0  # what the adapters are set to now
        self.out_dir = Path(out_dir)
        self._lock = threading.Lock()
        self._numbers = itertools.count()

    def defaults(self) -> dict[str, Any]:
        """The form's initial values: the model's own sampler, steps, guidance and native size."""
        d = self.pipe.generation_defaults
        height, width = self.pipe.resolve_size(None, None)
        return {"sampler": d["sampler"], "steps": d["num_inference_steps"], "guidance": d["guidance_scale"],
                "width": width, "height": height}

    def optional_inputs(self) -> tuple[str, ...]:
        """Which of IMAGE_INPUTS (img2img, inpainting) this pipeline's __call__ accepts."""
        parameters = inspect.signature(self.pipe.__call__).parameters
        return tuple(name for name in IMAGE_INPUTS if name in parameters)

    def generate(
        self,
        prompt: str,
        negative_prompt: Optional[str] = None,
        sampler: Optional[str] = None,
        steps: Optional[int] = None,
        guidance: Optional[float] = None,
        seed: Optional[int] = RANDOM_SEED,
        width: Optional[int] = None,
        height: Optional[int] = None,
        num_images: int = 1,
        on_step: Optional[Callable[[int, int], None]] = None,
        lora_scale: Optional[float] = None,
        clip_skip: Optional[int] = None,
        prompt_syntax: Optional[str] = None,
        sigma_schedule: Optional[str] = None,
        eta: float = 0.0,
        controls: Sequence[ControlUnit] = (),
        guess_mode: bool = False,
        **image_inputs: Any,
    ) -> list[Path]:
        """PNGs of `num_images` images with seeds seed, seed + 1, ... (as `generate --n`); seed -1 or None draws one.

        None takes the model's default, as in the pipeline. `on_step(done, total)` follows the denoising
        steps. `lora_scale` (None: 1) multiplies the loaded adapters' scales; `clip_skip` (None or 0: off) is
        the pipeline's, as are `sigma_schedule` and `eta` (the HTTP APIs' schedulers), and so is `prompt_syntax`
        (None: "a1111"). `image_inputs` (image,
        strength, mask_image) go to the pipeline as they are; None ones are left out. `controls`: a
        `ControlUnit` for some or all of the served ControlNets, named by `controlnets`' names (none: the
        model without ControlNets). ValueError, naming the argument, for bad settings. The request is a
        `GenerationSettings`, as the CLI's.
        """
        unknown = sorted(set(image_inputs) - set(IMAGE_INPUTS))
        if unknown:
            raise ValueError(f"{unknown[0]}: not a setting; the image inputs are {', '.join(IMAGE_INPUTS)}")
        n = check_int("num_images", num_images, 1, MAX_IMAGES)
        factor = 1.0 if lora_scale is None else check_finite("lora_scale", lora_scale, 0.0, MAX_LORA_SCALE)
        if lora_scale is not None and not self.loras:
            raise ValueError("lora_scale: no LoRA adapter is loaded (serve the pipeline with `loras`)")
        settings = GenerationSettings(
            prompt=prompt, negative_prompt=negative_prompt or None, steps=steps, guidance=guidance,
            sampler=sampler or None, sigma_schedule=sigma_schedule, eta=eta, seed=resolve_seed(seed, n), height=height,
            width=width, n=n,
            clip_skip=clip_skip or None,  # the page's 0 means off
            image=image_inputs.get("image"), mask=image_inputs.get("mask_image"), strength=image_inputs.get("strength"),
            loras=tuple(self._lora_specs(factor)), model=self.model, prompt_syntax=prompt_syntax or "a1111",
            controls=tuple(controls), guess_mode=bool(guess_mode) and bool(controls))
        call, pipe = self._control_call(settings)
        with self._lock:
            self._set_lora_factor(factor)
            images = pipe(**call.pipeline_kwargs(), **self._step_callback(steps, on_step)).images
            records = settings.resolved(self.pipe).for_images(images)
            return [save_png(image, self._next_path(record.seed), png_text(record))
                    for image, record in zip(images, records)]

    def _control_call(self, settings: GenerationSettings) -> tuple[GenerationSettings, Any]:
        """(the settings the pipeline runs, the pipeline): without controls, the model without its ControlNets;
        with some, every served ControlNet in order, those not asked for at weight 0 on the first unit's image."""
        names = [name for name, _ in self.controlnets]
        given = {}
        for unit in settings.controls:
            if unit.model not in names:
                raise ValueError(f"controls: {unit.model!r} is not a ControlNet of this server; it has "
                                 f"{', '.join(names) or 'none (serve it with --controlnet)'}")
            if unit.model in given:
                raise ValueError(f"controls: ControlNet {unit.model!r} is given twice")
            check_finite("control_scale", unit.scale, 0.0)  # the pipeline takes negative weights; the page does not
            given[unit.model] = unit
        if not given:
            return settings, self._plain_pipe
        filler = ControlUnit("", image=settings.controls[0].image, scale=0.0)  # its residuals are multiplied by 0
        return settings.replace(controls=tuple(given.get(name, filler.replace(model=name)) for name in names)), self.pipe

    def _lora_specs(self, factor: float) -> list[str]:
        """PATH[:SCALE] of each adapter as the PNG records it: the --lora spec's form when the factor is 1."""
        if factor == 1.0:
            return [path if scale == 1.0 else f"{path}:{scale:g}" for _, path, scale in self.loras]
        return [f"{path}:{scale * factor:g}" for _, path, scale in self.loras]

    def _set_lora_factor(self, factor: float) -> None:
        """Set every adapter to its scale times `factor` (only when it changed: a change drops the UNet traces)."""
        if self.loras and factor != self._lora_factor:
            self.pipe.set_adapters([name for name, _, _ in self.loras], [scale * factor for _, _, scale in self.loras])
            self._lora_factor = factor

    def _next_path(self, seed: int) -> Path:
        return self.out_dir / f"{next(self._numbers):05d}-seed{seed}.png"

    def _step_callback(self, steps: Optional[int], on_step: Optional[Callable[[int, int], None]]) -> dict:
        """callback_on_step_end for the pipeline, reporting (done, total) and leaving the latents alone, as a
        keyword argument ({} without `on_step`)."""
        if on_step is None:
            return {}
        total = steps if steps is not None else self.pipe.generation_defaults["num_inference_steps"]

        def callback(pipe, i: int, t, tensors: dict) -> dict:
            on_step(min(i + 1, total), total)
            return {}

        return {"callback_on_step_end": callback}


def _without_controlnets(pipe):
    """`pipe`'s components without its ControlNets (sharing the weights, so LoRA scales apply to both), built
    once per Studio: a pipeline made per request would also start its UNet trace over every time."""
    from latent_diffusion.evaluation.control_adherence import without_controlnet

    return without_controlnet(pipe)


def resolve_seed(seed: Optional[int], images: int = 1) -> int:
    """The seed a request of `images` images uses: a fresh random one for -1 (or None), else the given one,
    checked so that the last image's seed (seed + images - 1) is still one torch takes."""
    if seed is None or seed == RANDOM_SEED:
        return random.SystemRandom().randint(0, MAX_SEED)
    highest = TORCH_MAX_SEED - (images - 1)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= highest:
        why = f" (image k of {images} uses seed + k)" if images > 1 else ""
        raise ValueError(f"seed must be an integer >= 0 and <= {highest}{why}, or {RANDOM_SEED} for a random seed, "
                         f"got {seed!r}")
    return seed


def refusal(gr, error: Exception):
    """The page's error for a bad request, logged as one line in the server log instead of a traceback."""
    message = page_message(error)
    logger.warning(f"refused a request: {message}")
    return gr.Error(message, print_exception=False)


def page_message(error: Exception) -> str:
    """The pipeline's message, led by the page's name for the argument when it differs (steps, guidance)."""
    message = str(error)
    for argument, field in PAGE_NAMES.items():
        if message.startswith(argument):
            return f"{field}: {message}"
    return message


def form_values(metadata: dict[str, str]) -> list[Any]:
    """prompt, negative_prompt, sampler, steps, guidance, seed, width, height from a generated PNG's metadata.

    The form's fields in the order of the `generate` endpoint's parameters; ValueError when the PNG has none.
    Reads our PNGs, A1111's infotext and plain ComfyUI graphs (`formats.png_settings`).
    """
    from latent_diffusion.formats.png_settings import settings_from_text_chunks

    try:
        settings = settings_from_text_chunks(metadata)
    except ValueError as error:
        raise ValueError(f"{error}; reuse settings reads PNGs made by this page, `latent-diffusion generate`, "
                         "AUTOMATIC1111 or a plain ComfyUI text-to-image graph") from None
    return [settings.prompt, settings.negative_prompt or "", settings.sampler, settings.steps, settings.guidance,
            settings.seed, settings.width, settings.height]


def describe(metadata: dict[str, str]) -> str:
    """One line of the settings an image was made with, for its caption and the page."""
    s = GenerationSettings.from_png_metadata(metadata)
    return f"seed {s.seed} · {s.sampler}, {s.steps} steps, guidance {s.guidance}, {s.width}×{s.height}"


def gallery_items(paths: list) -> list[tuple[str, str]]:
    """(path, caption) for each PNG, the caption read back from its own metadata."""
    return [(str(path), describe(read_png_metadata(path))) for path in paths]


def mask_from_editor(value: Optional[dict]) -> Optional[Image.Image]:
    """An ImageMask value -> the mask the pipeline takes: white where the user painted, black elsewhere."""
    if not value or not value.get("layers"):
        return None
    painted = value["layers"][0].convert("RGBA").getchannel("A")
    return painted.point(lambda alpha: 255 if alpha else 0).convert("L")


def build_app(studio: Studio, max_queue: Optional[int] = 16, example: Optional[list[Path]] = None):
    """The Gradio Blocks app over `studio`, its queue holding at most `max_queue` waiting requests.

    `example`: PNGs the gallery shows when the page opens (the prompt box starts with their prompt).
    """
    import gradio as gr

    first = read_png_metadata(example[0]) if example else {}
    with gr.Blocks(title="latent-diffusion") as demo:
        gr.Markdown(f"## latent-diffusion\nModel: `{studio.model or EMBEDDED_MODEL}`" + loaded_files(studio))
        with gr.Row():
            with gr.Column(scale=2):
                fields = _settings_form(gr, studio.defaults(), first.get("prompt", ""))
                syntax = gr.State("a1111")  # the page's choice; a State, so the API keeps its parameters
                fields["prompt_syntax"].change(lambda value: value, inputs=fields["prompt_syntax"], outputs=syntax,
                                               api_visibility="private")
                extra_inputs = {"clip_skip": fields["clip_skip"], "prompt_syntax": syntax,
                                **_lora_input(gr, studio.loras)}
                run = fields["run"]
                with gr.Accordion("Image to image / inpainting", open=False):
                    image_inputs = _image_inputs(gr, studio.optional_inputs())
                control_inputs = _control_inputs(gr, studio.controlnets)
                reuse = gr.File(label="Reuse settings: drop a PNG made here or by `latent-diffusion generate`",
                                file_types=[".png"], type="filepath")
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Results", value=gallery_items(example or []), columns=3,
                                     fit_columns=False, object_fit="contain", height="auto", preview=False)
                used = gr.Markdown(describe(first) if first else "")
                files = gr.File(label="PNG files (with their generation settings)", file_count="multiple",
                                value=[str(path) for path in example or []], interactive=False)
        form = [fields[name] for name in FORM_FIELDS]
        generate = _page_generate(gr, studio, tuple(image_inputs))
        gr.on([run.click, fields["prompt"].submit], generate, inputs=form + [fields["num_images"]],
              inputs_kwargs={**extra_inputs, **image_inputs, **control_inputs}, outputs=files, api_name="generate", concurrency_limit=1
              ).success(_show, inputs=files, outputs=[gallery, used], api_visibility="private")
        fields["random_seed"].click(lambda: RANDOM_SEED, outputs=fields["seed"], api_visibility="private")
        reuse.upload(_reuse_settings(gr), inputs=reuse, outputs=form, api_name="reuse_settings")
    return demo.queue(max_size=max_queue, default_concurrency_limit=1)


def _page_generate(gr, studio: Studio, offered: tuple[str, ...]) -> Callable:
    """The page's and the API's `generate`, offering the image inputs named in `offered`."""

    def generate(prompt, negative_prompt, sampler, steps, guidance, seed, width, height, num_images=1,
                 progress=gr.Progress(), image=None, strength=None, mask_image=None, lora_scale=None,
                 clip_skip=None, prompt_syntax=None, guess_mode=None, **control):
        """Generate images; returns the PNG file(s), each with its settings in its metadata.

        The image inputs, clip skip and the LoRA strength are explicit keywords defaulting to None, so the
        API marks them optional. `control`: the ControlNet inputs (CONTROL_INPUTS, "_k" for net k > 0).
        """
        given = {"image": image, "strength": strength, "mask_image": mask_image}
        image_inputs = {name: given[name] for name in offered}  # only those the pipeline takes
        if image is None:  # text-to-image: the strength slider and an empty mask mean nothing
            image_inputs = {}
        if "mask_image" in image_inputs:
            image_inputs["mask_image"] = mask_from_editor(image_inputs["mask_image"])
        try:
            paths = studio.generate(prompt, negative_prompt, sampler, steps, guidance, seed, width, height,
                                    1 if num_images is None else int(num_images),
                                    on_step=lambda done, total: progress((done, total), desc="denoising"),
                                    lora_scale=lora_scale, clip_skip=clip_skip, prompt_syntax=prompt_syntax,
                                    controls=page_controls(studio.controlnets, control), guess_mode=bool(guess_mode),
                                    **image_inputs)
            return [str(path) for path in paths]
        except ValueError as error:
            raise refusal(gr, error) from None

    return with_control_parameters(generate, len(studio.controlnets))


def with_control_parameters(generate: Callable, num_nets: int) -> Callable:
    """`generate` with its **control named in its signature, each defaulting to None, so that Gradio's API marks
    the ControlNet inputs optional (a Gradio input without a default is required)."""
    signature = inspect.signature(generate)
    named = [inspect.Parameter(control_key(name, k), inspect.Parameter.KEYWORD_ONLY, default=None)
             for k in range(num_nets) for name in CONTROL_INPUTS]
    kept = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    generate.__signature__ = signature.replace(parameters=kept + named)
    return generate


def page_controls(controlnets: Sequence[tuple[str, float]], values: dict[str, Any]) -> list[ControlUnit]:
    """The page's ControlNet inputs as ControlUnits: one for each served net given a control image.

    `values` holds CONTROL_INPUTS' names for the first net and "<name>_k" for net k; unset ones take the
    unit's defaults (the served weight). ValueError naming an input the server does not have.
    """
    keys = {control_key(name, k) for k in range(len(controlnets)) for name in CONTROL_INPUTS}
    unknown = sorted(set(values) - keys)
    if unknown:
        raise ValueError(f"{unknown[0]}: not a setting of this server (its ControlNet inputs: "
                         f"{', '.join(sorted(keys)) or 'none; serve it with --controlnet'})")
    units = []
    for k, (model, weight) in enumerate(controlnets):
        given = {field: values.get(control_key(name, k)) for name, field in CONTROL_INPUTS.items()}
        if given["image"] is not None:
            defaults = {"scale": weight, "start": 0.0, "end": 1.0, "preprocess": "none"}
            units.append(ControlUnit(model, **{f: defaults[f] if v is None else v for f, v in given.items()
                                              if f != "image"}, image=given["image"]))
    return units


def control_key(name: str, index: int) -> str:
    return name if index == 0 else f"{name}_{index}"


def _show(paths):
    """The gallery's items and the settings line of the PNGs just made."""
    items = gallery_items(paths or [])
    return items, "  \n".join(caption for _, caption in items)


def _reuse_settings(gr) -> Callable:
    def reuse_settings(png):
        """Read a generated PNG's settings into the form (prompt, ..., height)."""
        try:
            return form_values(read_png_metadata(png))
        except (ValueError, OSError) as error:
            raise refusal(gr, error) from None

    return reuse_settings


FORM_FIELDS = ("prompt", "negative_prompt", "sampler", "steps", "guidance", "seed", "width", "height")  # form_values' order


def _settings_form(gr, defaults: dict[str, Any], prompt: str) -> dict[str, Any]:
    """The form's generation settings (FORM_FIELDS, num_images, clip_skip), the Generate ("run") and random-seed buttons."""
    from latent_diffusion.diffusion.samplers import SAMPLER_NAMES  # read now: samplers added later appear in the page

    with gr.Row(equal_height=True):  # Generate beside the prompt, above everything else
        fields = {"prompt": gr.Textbox(label="Prompt", value=prompt, lines=2, placeholder=EXAMPLE_PROMPT, scale=4),
                  "run": gr.Button("Generate", variant="primary", scale=1)}
    fields["negative_prompt"] = gr.Textbox(label="Negative prompt", value="")
    with gr.Row():
        fields["sampler"] = gr.Dropdown(label="Sampler", choices=list(SAMPLER_NAMES), value=defaults["sampler"],
                                        allow_custom_value=True)  # the pipeline names the allowed ones
        fields["steps"] = gr.Number(label="Steps", value=defaults["steps"], precision=0)
        fields["guidance"] = gr.Number(label="Guidance", value=defaults["guidance"], step=0.5)
    with gr.Row():
        fields["seed"] = gr.Number(label=f"Seed ({RANDOM_SEED}: random)", value=RANDOM_SEED, precision=0)
        fields["random_seed"] = gr.Button("Random seed", scale=0)
    with gr.Row():
        fields["width"] = gr.Number(label="Width", value=defaults["width"], precision=0, step=8)
        fields["height"] = gr.Number(label="Height", value=defaults["height"], precision=0, step=8)
        fields["num_images"] = gr.Slider(label="Images", minimum=1, maximum=MAX_IMAGES, value=1, step=1)
    with gr.Row():
        fields["clip_skip"] = gr.Number(label="Clip skip (0: off; k: the text encoder's states k layers back)",
                                        value=0, precision=0, minimum=0)
        fields["prompt_syntax"] = gr.Radio(label="Prompt syntax ((word:1.2), [word], BREAK as A1111; plain: as typed)",
                                           choices=["a1111", "plain"], value="a1111")
    return fields


def loaded_files(studio: Studio) -> str:
    """Markdown lines naming the LoRA and embedding files given at start (empty when none)."""
    lines = [f"\nLoRA: `{Path(path).name}` ×{scale:g}" for _, path, scale in studio.loras]
    lines += [f"\nEmbedding: `{token}` (`{Path(path).name}`), usable in the prompt and negative prompt"
              for path, token in studio.embeddings]
    return "".join(f"{line}  " for line in lines)


def _lora_input(gr, loras: Sequence[tuple[str, str, float]]) -> dict[str, Any]:
    """The LoRA strength slider, keyed "lora_scale", when adapters are loaded."""
    if not loras:
        return {}
    names = ", ".join(f"{Path(path).parent.name or path}/{Path(path).name} ×{scale:g}" for _, path, scale in loras)
    return {"lora_scale": gr.Slider(label=f"LoRA strength: {names} (1: as loaded, 0: off)", minimum=0.0,
                                    maximum=MAX_LORA_SCALE, value=1.0, step=0.05)}


def _image_inputs(gr, accepted: tuple[str, ...]) -> dict[str, Any]:
    """Components for the optional pipeline inputs the pipeline accepts, keyed by argument name."""
    components = {}
    if "image" in accepted:
        components["image"] = gr.Image(label="Init image (img2img)", type="pil", sources=["upload", "clipboard"])
    if "strength" in accepted:
        components["strength"] = gr.Slider(label="Strength (img2img)", minimum=0.0, maximum=1.0, value=IMG2IMG_STRENGTH,
                                           step=0.05)
    if "mask_image" in accepted:
        components["mask_image"] = gr.ImageMask(label="Inpainting mask: paint where to repaint", type="pil")
    return components


def _control_inputs(gr, controlnets: Sequence[tuple[str, float]]) -> dict[str, Any]:
    """For each served ControlNet, a section with its control image, preprocessor, weight and step window
    (keyed as `page_controls` reads them), and one guess-mode box; nothing without ControlNets."""
    from latent_diffusion.control_images import PREPROCESSORS

    components = {}
    for k, (name, weight) in enumerate(controlnets):
        with gr.Accordion(f"ControlNet: {name}", open=k == 0):
            components[control_key("control_image", k)] = gr.Image(
                label=f"Control image ({name}); empty: not used", type="pil", sources=["upload", "clipboard"])
            components[control_key("control_preprocess", k)] = gr.Radio(
                label="Preprocess (canny: the image's edges)", choices=list(PREPROCESSORS), value="none")
            components[control_key("control_scale", k)] = gr.Slider(
                label="Control weight", minimum=0.0, maximum=MAX_CONTROL_SCALE, value=weight, step=0.05)
            with gr.Row():
                components[control_key("control_start", k)] = gr.Slider(
                    label="Starting control step", minimum=0.0, maximum=1.0, value=0.0, step=0.05)
                components[control_key("control_end", k)] = gr.Slider(
                    label="Ending control step", minimum=0.0, maximum=1.0, value=1.0, step=0.05)
    if controlnets:
        components["guess_mode"] = gr.Checkbox(label="Guess mode (ControlNet is more important)", value=False)
    return components


SERVE_LIMITS = {"port": (1, 65535), "max_queue": (1, None)}  # serve()'s integer settings: (minimum, maximum)


def check_serve_settings(port: int, max_queue: int) -> None:
    """ValueError naming `port` or `max_queue` when it is out of range."""
    for name, value in (("port", port), ("max_queue", max_queue)):
        check_int(name, value, *SERVE_LIMITS[name])


def serve(
    pipe,
    model: Optional[str] = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    max_queue: int = 16,
    output_dir: Optional[Union[str, os.PathLike]] = None,
    example: bool = True,
    block: bool = True,
    loras: Sequence[tuple[str, str, float]] = (),
    limits: Optional[dict[str, Optional[int]]] = None,
    api_key: Optional[str] = None,
    auth: Optional[tuple[str, str]] = None,
    extra_models: Sequence[tuple[str, Any]] = (),
    embeddings: Sequence[tuple[str, str]] = (),
    controlnets: Sequence[tuple[str, float]] = (),
):
    """Serve `pipe` at http://host:port/; returns the launched app (at once when `block` is False).

    PNGs go to `output_dir` (default: a new temporary folder). `example` generates one image of
    EXAMPLE_PROMPT at seed 0 first, shown when the page opens. `loras`: (adapter name, path, scale) of
    adapters loaded into `pipe`; the page then has a LoRA strength slider. The same server answers
    A1111's and OpenAI's HTTP APIs (`http_api`): `limits` (max_steps, max_pixels, max_images; None or
    missing: sized for the model) bound each request, `api_key` guards them, `auth` (user, password)
    guards the page, and `extra_models` (name, pipeline) are models those APIs can switch to.
    `controlnets`: (name, default weight) of the ControlNets loaded into `pipe`: the page gets their inputs,
    the A1111 API takes sd-webui-controlnet units naming them.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no usage pings
    check_serve_settings(port, max_queue)
    out_dir = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="latent-diffusion-serve-"))
    pipe.set_progress_bar_config(disable=True)  # the page has its own progress bar
    studio = Studio(pipe, model, out_dir, loras, embeddings, controlnets)
    shown = studio.generate(EXAMPLE_PROMPT, seed=0) if example else None
    demo = build_app(studio, max_queue, shown)
    from latent_diffusion.apps.http_api import mount_kwargs

    app_kwargs = mount_kwargs(studio, extra_models, limits or {}, max_queue, api_key, host, auth)
    demo.launch(server_name=host, server_port=port, share=share, allowed_paths=[str(out_dir)],
                prevent_thread_lock=True, show_error=True, quiet=True, auth=auth,
                app_kwargs=app_kwargs)  # quiet: gradio's hint names share=True
    print(f"* Running on {demo.local_url}" + (f" and {demo.share_url}" if demo.share_url else
                                             "; for a public link, run `latent-diffusion serve --share`"), flush=True)
    if block:
        demo.block_thread()
    return demo
