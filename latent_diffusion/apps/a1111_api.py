"""AUTOMATIC1111's web API (`/sdapi/v1/*`) over the served models, field names and types as A1111 documents.

POST /sdapi/v1/txt2img and /img2img take A1111's JSON (prompt, negative_prompt, seed, steps, cfg_scale,
sampler_name/sampler_index and scheduler in A1111's names, width, height, batch_size, n_iter, eta,
denoising_strength, init_images and mask as base64, inpainting_mask_invert, override_settings with
sd_model_checkpoint and CLIP_stop_at_last_layers) and answer {"images": [base64 PNG], "parameters",
"info": a JSON string with A1111's keys and the infotext}. Fields A1111 has and this server does not use
(hires fix, restore_faces, scripts, subseeds...) are accepted and ignored; subseeds get a note in `info`.
sd-webui-controlnet's units (`alwayson_scripts.controlnet.args`) drive the server's ControlNets
(`a1111_controlnet`). Iteration i of n_iter makes batch_size images with seeds seed + i·batch_size + k, as A1111 does.
GET /samplers, /schedulers, /sd-models, /loras, /options, /progress, /scripts; POST /options
(sd_model_checkpoint: switch among the models the server was started with) and /interrupt; GET
/controlnet/model_list and /controlnet/module_list.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Optional

from latent_diffusion.apps import a1111_controlnet
from latent_diffusion.apps.http_api import ApiServer, field, json_payload, records_of, renamed, with_errors
from latent_diffusion.apps.limits import Interrupted, RequestError, decode_base64, decode_image
from latent_diffusion.formats.infotext import control_unit_text, format_infotext
from latent_diffusion.settings import EMBEDDED_MODEL, GenerationSettings

# A1111 sampler name -> (our sampler, A1111's aliases). "DPM++ 2M SDE" is diffusers' sde-dpmsolver++ (ours: dpm++_sde).
SAMPLERS = {"DPM++ 2M": ("dpm++", ["k_dpmpp_2m"]), "DPM++ 2M SDE": ("dpm++_sde", ["k_dpmpp_2m_sde"]),
            "Euler a": ("euler_a", ["k_euler_a", "k_euler_ancestral"]), "Euler": ("euler", ["k_euler"]),
            "Heun": ("heun", ["k_heun"]), "UniPC": ("unipc", []), "DDIM": ("ddim", []), "DDPM": ("ddpm", []),
            "LCM": ("lcm", ["k_lcm"]), "TCD": ("tcd", [])}
# A1111 scheduler (name, label) -> our sigma_schedule (None: the model's scheduler config decides).
SCHEDULERS = {("automatic", "Automatic"): None, ("uniform", "Uniform"): "default", ("karras", "Karras"): "karras",
              ("exponential", "Exponential"): "exponential"}
# The pipeline's argument names -> A1111's fields, so errors name what the client sent.
FIELDS = {"num_inference_steps": "steps", "guidance_scale": "cfg_scale", "sampler": "sampler_name",
          "sigma_schedule": "scheduler", "strength": "denoising_strength", "mask_image": "mask", "image": "init_images",
          "height": "height", "width": "width", "num_images": "batch_size", "clip_skip": "override_settings",
          "seed": "seed", "prompt": "prompt", "negative_prompt": "negative_prompt", "eta": "eta"}
SUBSEED_NOTE = "subseed and subseed_strength are ignored: this server has no variation seeds"


@dataclasses.dataclass
class A1111Request:
    """One txt2img/img2img request, checked: what Studio.generate takes, plus the A1111-only counts."""

    model: Optional[str]
    batch_size: int
    n_iter: int
    seed: int
    settings: dict[str, Any]  # Studio.generate's keywords, without seed and num_images
    notes: list[str]


def sampler_of(name: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """(our sampler, sigma schedule) of an A1111 sampler name; old names' " Karras"/" Exponential" suffix
    is the schedule. None: the model's default sampler."""
    if name is None or name == "":
        return None, None
    schedule = None
    for suffix, value in ((" Karras", "karras"), (" Exponential", "exponential")):
        if name.endswith(suffix):
            name, schedule = name[: -len(suffix)], value
    for label, (ours, aliases) in SAMPLERS.items():
        if name.lower() in (label.lower(), ours, *aliases):
            return ours, schedule
    raise RequestError("sampler_name", f"{name!r} is not a sampler of this server; it has {', '.join(SAMPLERS)}")


def schedule_of(name: Optional[str]) -> Optional[str]:
    """Our sigma_schedule for an A1111 scheduler name or label (None and "automatic": the model's)."""
    if name is None or name == "":
        return None
    for (key, label), ours in SCHEDULERS.items():
        if name.lower() in (key, label.lower()):
            return ours
    raise RequestError("scheduler", f"{name!r} is not a scheduler of this server; it has "
                                    f"{', '.join(key for key, _ in SCHEDULERS)}")


def _override(payload: dict) -> tuple[Optional[str], Optional[int]]:
    """(model, clip_skip) from override_settings: A1111's CLIP_stop_at_last_layers k is our clip_skip k - 1."""
    overrides = field(payload, "override_settings", dict, {})
    model = field(overrides, "sd_model_checkpoint", str)
    stop = field(overrides, "CLIP_stop_at_last_layers", int)
    if stop is not None and stop < 1:
        raise RequestError("override_settings", f"CLIP_stop_at_last_layers must be >= 1, got {stop}")
    return model, None if stop is None or stop == 1 else stop - 1


def parse_request(payload: dict, server: ApiServer, pictures: dict[str, Any]) -> A1111Request:
    """A txt2img/img2img JSON body -> A1111Request, limits checked; `pictures`: image, mask_image, strength."""
    model, clip_skip = _override(payload)
    studio = server.studio("override_settings", model)
    defaults = studio.defaults()
    sampler, suffix_schedule = sampler_of(field(payload, "sampler_name", str) or field(payload, "sampler_index", str))
    schedule = schedule_of(field(payload, "scheduler", str)) or suffix_schedule
    steps = field(payload, "steps", int)
    batch_size, n_iter = field(payload, "batch_size", int, 1), field(payload, "n_iter", int, 1)
    for name, value in (("batch_size", batch_size), ("n_iter", n_iter)):
        if value < 1:
            raise RequestError(name, f"must be >= 1, got {value}")
    size = _output_size(payload, pictures.get("image"), defaults)
    server.check_settings("steps", steps, "width", *size, "batch_size", batch_size * n_iter)
    settings = dict(prompt=field(payload, "prompt", str, ""), negative_prompt=field(payload, "negative_prompt", str),
                    sampler=sampler, sigma_schedule=schedule, steps=steps, guidance=field(payload, "cfg_scale", float),
                    width=size[0], height=size[1], clip_skip=clip_skip, **pictures)
    if sampler == "ddim":  # A1111's eta is DDIM's η here; the other samplers of this server have none
        settings["eta"] = field(payload, "eta", float, 0.0)
    controls, control_notes = a1111_controlnet.request_controls(payload, studio, pictures.get("image"),
                                                                server.limits.max_pixels)
    settings.update(controls)
    from latent_diffusion.apps.webui import resolve_seed

    try:
        seed = resolve_seed(field(payload, "seed", int, -1), batch_size * n_iter)  # seed + k for every image
    except ValueError as error:
        raise renamed(error, FIELDS) from None
    return A1111Request(model, batch_size, n_iter, seed, settings, _notes(payload) + control_notes)


def _output_size(payload: dict, image, defaults: dict) -> tuple[int, int]:
    """(width, height): the request's; unset, the init image's (img2img) or the model's native size."""
    fallback = image.size if image is not None else (defaults["width"], defaults["height"])
    return field(payload, "width", int, fallback[0]), field(payload, "height", int, fallback[1])


def _notes(payload: dict) -> list[str]:
    subseed = field(payload, "subseed", int, -1)
    return [SUBSEED_NOTE] if subseed != -1 or field(payload, "subseed_strength", float, 0.0) else []


def img2img_pictures(payload: dict, server: ApiServer) -> dict[str, Any]:
    """image, mask_image and strength from init_images / mask / denoising_strength (A1111's defaults 0.75)."""
    images = field(payload, "init_images", list)
    if not images:
        raise RequestError("init_images", "img2img needs one base64 image")
    limit = server.limits.max_pixels
    image = decode_image("init_images", decode_base64("init_images", images[0]), limit).convert("RGB")
    pictures = {"image": image, "strength": field(payload, "denoising_strength", float, 0.75)}
    if payload.get("mask"):
        mask = decode_image("mask", decode_base64("mask", payload["mask"]), limit).convert("L")
        if field(payload, "inpainting_mask_invert", int, 0):
            mask = mask.point(lambda value: 255 - value)
        pictures["mask_image"] = mask
    return pictures


def generate(server: ApiServer, request: A1111Request, job) -> tuple[list[Path], bool]:
    """The request's n_iter batches (seeds seed + i·batch_size + k) and whether it was interrupted (the
    batches finished before that are kept, as A1111 keeps them)."""
    studio = server.studio("override_settings", request.model)
    seed, paths = request.seed, []
    for i in range(request.n_iter):
        try:
            paths += studio.generate(seed=seed + i * request.batch_size, num_images=request.batch_size,
                                     on_step=server.board.step_callback(job), **request.settings)
        except Interrupted:
            return paths, True
        except ValueError as error:
            raise renamed(error, FIELDS) from None
        job.images_done = len(paths)
    return paths, False


def sampler_label(sampler: str) -> str:
    return next((label for label, (ours, _) in SAMPLERS.items() if ours == sampler), sampler)


def schedule_label(schedule: Optional[str]) -> str:
    return next((label for (_, label), ours in SCHEDULERS.items() if ours == schedule), "Automatic")


def info(records: list[GenerationSettings], request: A1111Request, interrupted: bool) -> dict[str, Any]:
    """The `info` object A1111 returns (as a JSON string) for the images made, from their own PNG records."""
    first = records[0] if records else None
    settings = request.settings
    return {
        "prompt": settings["prompt"], "all_prompts": [r.prompt for r in records],
        "negative_prompt": settings["negative_prompt"] or "",
        "all_negative_prompts": [r.negative_prompt or "" for r in records],
        "seed": first.seed if first else request.seed, "all_seeds": [r.seed for r in records],
        "subseed": -1, "all_subseeds": [-1] * len(records), "subseed_strength": 0,
        "width": first.width if first else settings["width"], "height": first.height if first else settings["height"],
        "sampler_name": sampler_label(first.sampler) if first else None, "cfg_scale": first.guidance if first else None,
        "steps": first.steps if first else None, "batch_size": request.batch_size, "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": first.model or EMBEDDED_MODEL if first else None,
        "sd_model_hash": None, "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1,
        "seed_resize_from_h": -1, "denoising_strength": first.strength if first else None,
        "extra_generation_params": _extra_params(first),
        "index_of_first_image": 0, "infotexts": [format_infotext(r) for r in records], "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": (first.clip_skip or 0) + 1 if first else 1,
        "is_using_inpainting_conditioning": False, "version": "latent-diffusion", "interrupted": interrupted,
        "notes": request.notes}


def _extra_params(first: Optional[GenerationSettings]) -> dict[str, Any]:
    """A1111's extra_generation_params: the schedule type and, as sd-webui-controlnet adds them, the units."""
    if first is None:
        return {}
    units = {f"ControlNet {k}": control_unit_text(unit, first.guess_mode) for k, unit in enumerate(first.controls)}
    return {"Schedule type": schedule_label(first.sigma_schedule), **units}


def answer(payload: dict, paths: list[Path], request: A1111Request, interrupted: bool) -> dict[str, Any]:
    """A1111's response: base64 PNGs (each with its settings in its metadata), the request, `info` as JSON."""
    images = [base64.b64encode(path.read_bytes()).decode("ascii") for path in paths]
    if not field(payload, "send_images", bool, True):
        images = []
    parameters = {k: v for k, v in payload.items() if k not in ("init_images", "mask")}
    return {"images": images, "parameters": parameters,
            "info": json.dumps(info(records_of(paths), request, interrupted))}


def error_body(error: RequestError) -> dict[str, Any]:
    """A1111's error JSON (its API answers {"error", "detail", "body", "errors"})."""
    kind = {400: "BadRequest", 401: "Unauthorized", 413: "PayloadTooLarge", 429: "TooManyRequests"}
    return {"error": kind.get(error.status, "HTTPException"), "detail": str(error), "body": "", "errors": str(error)}


def add_routes(router, server: ApiServer) -> None:
    """The /sdapi/v1 routes on `router`."""
    endpoints = _endpoints(server)
    for method, path in (("POST", "txt2img"), ("POST", "img2img"), ("GET", "samplers"), ("GET", "schedulers"),
                         ("GET", "sd-models"), ("GET", "loras"), ("GET", "options"), ("POST", "options"),
                         ("GET", "progress"), ("POST", "interrupt"), ("GET", "scripts")):
        endpoint = endpoints[f"{method.lower()}_{path.replace('-', '_')}"]
        router.add_api_route(f"/sdapi/v1/{path}", with_errors(endpoint, error_body), methods=[method])
    for path, make in (("model_list", lambda: a1111_controlnet.model_list(server)),
                       ("module_list", a1111_controlnet.module_list)):
        router.add_api_route(f"/controlnet/{path}", with_errors(_constant(make), error_body), methods=["GET"])


def _endpoints(server: ApiServer) -> dict[str, Any]:
    async def generation(request, img2img: bool):
        payload = await json_payload(request)
        pictures = img2img_pictures(payload, server) if img2img else {}
        parsed = parse_request(payload, server, pictures)
        paths, interrupted = await server.run(request, parsed.batch_size * parsed.n_iter,
                                              lambda job: generate(server, parsed, job))
        return answer(payload, paths, parsed, interrupted)

    async def post_options(request):
        payload = await json_payload(request)
        if "sd_model_checkpoint" in payload:
            server.switch("sd_model_checkpoint", field(payload, "sd_model_checkpoint", str))
        return None  # A1111 answers null; other options are accepted and ignored

    async def post_interrupt(request):
        server.board.interrupt()
        return None

    return {"post_txt2img": lambda request: generation(request, False),
            "post_img2img": lambda request: generation(request, True),
            "get_samplers": _constant(lambda: samplers()), "get_schedulers": _constant(lambda: schedulers()),
            "get_sd_models": _constant(lambda: sd_models(server)), "get_loras": _constant(lambda: loras(server)),
            "get_options": _constant(lambda: options(server)), "post_options": post_options,
            "get_progress": _constant(lambda: server.board.progress()), "post_interrupt": post_interrupt,
            "get_scripts": _constant(lambda: scripts(server))}


def _constant(make):
    async def endpoint(request):
        return make()

    return endpoint


def scripts(server: ApiServer) -> dict[str, list[str]]:
    """The always-on scripts A1111 would list: "controlnet" when the current model has ControlNets."""
    names = ["controlnet"] if server.studio("sd_model_checkpoint").controlnets else []
    return {"txt2img": names, "img2img": list(names)}


def samplers() -> list[dict[str, Any]]:
    return [{"name": label, "aliases": aliases, "options": {}} for label, (_, aliases) in SAMPLERS.items()]


def schedulers() -> list[dict[str, Any]]:
    return [{"name": key, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
            for key, label in SCHEDULERS]


def sd_models(server: ApiServer) -> list[dict[str, Any]]:
    return [{"title": name, "model_name": name, "hash": None, "sha256": None,
             "filename": studio.model or EMBEDDED_MODEL, "config": None} for name, studio in server.studios.items()]


def loras(server: ApiServer) -> list[dict[str, Any]]:
    """The adapters loaded with `serve --lora` (always applied; A1111's <lora:...> prompt syntax is not read)."""
    return [{"name": name, "alias": name, "path": path, "metadata": {"scale": scale}}
            for studio in server.studios.values() for name, path, scale in studio.loras]


def options(server: ApiServer) -> dict[str, Any]:
    studio = server.studio("sd_model_checkpoint")
    return {"sd_model_checkpoint": server.current, "sd_checkpoint_hash": None, "CLIP_stop_at_last_layers": 1,
            "samples_format": "png", "outdir_samples": str(studio.out_dir), "eta_ddim": 0.0}
