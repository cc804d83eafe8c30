"""OpenAI's images API over the served models: what `openai.OpenAI(base_url=...).images` calls.

POST /v1/images/generations (JSON: prompt, n, size "WxH" or "auto", response_format "b64_json" (default)
or "url", model) and /v1/images/edits (multipart: image, optional mask, the same fields) answer
{"created", "data": [{"b64_json"} or {"url"}]}. An edit repaints where the mask is transparent (OpenAI's
rule: alpha 0 = edit), or, without a mask, where the image itself is transparent; an opaque image with
no mask is an image-to-image edit of the whole picture. Beyond OpenAI's fields a request may set
`seed`, `steps`, `negative_prompt` and (edits) `strength`; OpenAI's others (quality, style, user...)
are accepted and ignored. GET /v1/models lists the served models; a "url" answer points at
GET /v1/images/files/NAME, which serves only the server's own PNGs by their generated names.
"""
from __future__ import annotations

import base64
import re
import time
from pathlib import Path
from typing import Any, Optional

from PIL import Image

from latent_diffusion.apps.http_api import ApiServer, field, json_payload, records_of, renamed, with_errors
from latent_diffusion.apps.limits import Interrupted, RequestError, decode_image, read_body

RESPONSE_FORMATS = ("b64_json", "url")
FIELDS = {"num_inference_steps": "steps", "guidance_scale": "guidance", "sampler": "model", "height": "size",
          "width": "size", "num_images": "n", "seed": "seed", "prompt": "prompt", "negative_prompt": "negative_prompt",
          "strength": "strength", "mask_image": "mask", "image": "image"}
PNG_NAME = re.compile(r"[0-9]{5,}-seed[0-9]+\.png")  # Studio's file names: nothing else is ever served


def parse_size(text: Optional[str], defaults: dict) -> tuple[int, int]:
    """(width, height) of OpenAI's "WIDTHxHEIGHT" ("auto" or unset: the model's native size)."""
    if text is None or text == "auto":
        return defaults["width"], defaults["height"]
    match = re.fullmatch(r"([0-9]{1,5})x([0-9]{1,5})", text) if isinstance(text, str) else None
    if match is None:
        raise RequestError("size", f"must be WIDTHxHEIGHT (e.g. 512x512) or auto, got {text!r}")
    return int(match[1]), int(match[2])


def parse_request(fields: dict, server: ApiServer) -> dict[str, Any]:
    """The request's Studio.generate keywords (with `studio` and `response_format`), limits checked."""
    studio = server.studio("model", field(fields, "model", str))
    n = field(fields, "n", int, 1)
    if n < 1:
        raise RequestError("n", f"must be >= 1, got {n}")
    width, height = parse_size(field(fields, "size", str), studio.defaults())
    steps = field(fields, "steps", int)
    server.check_settings("steps", steps, "size", width, height, "n", n)
    response_format = field(fields, "response_format", str, "b64_json")
    if response_format not in RESPONSE_FORMATS:
        raise RequestError("response_format", f"must be one of {', '.join(RESPONSE_FORMATS)}, got {response_format!r}")
    prompt = field(fields, "prompt", str)
    if not prompt:
        raise RequestError("prompt", "is required")
    from latent_diffusion.apps.webui import resolve_seed

    seed = field(fields, "seed", int, -1)
    try:
        resolve_seed(seed, n)  # before the queue: image k uses seed + k, so seed + n - 1 must fit too
    except ValueError as error:
        raise renamed(error, FIELDS) from None
    return dict(studio=studio, response_format=response_format, prompt=prompt, num_images=n, width=width,
                height=height, steps=steps, seed=seed,
                negative_prompt=field(fields, "negative_prompt", str))


def generate(server: ApiServer, request: dict[str, Any], job) -> list[Path]:
    """The images of one request (interrupted: none; OpenAI has no partial answers)."""
    settings = {k: v for k, v in request.items() if k not in ("studio", "response_format")}
    try:
        return request["studio"].generate(on_step=server.board.step_callback(job), **settings)
    except Interrupted:
        raise RequestError(None, "the request was interrupted", 409) from None
    except ValueError as error:
        raise renamed(error, FIELDS) from None


def answer(paths: list[Path], response_format: str, base_url: str) -> dict[str, Any]:
    """OpenAI's ImagesResponse: each PNG (its settings in its metadata) as base64 or as a URL on this server."""
    def item(path: Path) -> dict[str, Any]:
        if response_format == "url":
            return {"url": f"{base_url}v1/images/files/{path.name}"}
        return {"b64_json": base64.b64encode(path.read_bytes()).decode("ascii")}

    records = records_of(paths)
    data = [{**item(path), "revised_prompt": record.prompt} for path, record in zip(paths, records)]
    return {"created": int(time.time()), "data": data,
            "output_format": "png", "size": f"{records[0].width}x{records[0].height}" if records else None}


def edit_mask(image: Image.Image, mask: Optional[Image.Image]) -> Optional[Image.Image]:
    """The pipeline's mask (white: repaint) from OpenAI's: transparent pixels of `mask`, else of `image`."""
    source = mask if mask is not None else image
    if "A" not in source.getbands() and "transparency" not in source.info:
        if mask is not None:
            raise RequestError("mask", "must be a PNG with transparency (transparent where to edit)")
        return None
    alpha = source.convert("RGBA").getchannel("A")
    if mask is not None and mask.size != image.size:
        raise RequestError("mask", f"must have the image's size {image.size[0]}x{image.size[1]}, got "
                                   f"{mask.size[0]}x{mask.size[1]}")
    return alpha.point(lambda value: 255 if value == 0 else 0)


async def edit_fields(request, server: ApiServer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the form's text fields, the pictures Studio takes) of a multipart /v1/images/edits request."""
    from starlette.requests import Request

    body = await read_body(request)

    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, replay).form(max_files=4, max_fields=32)
    uploads = {key: value for key, value in form.multi_items() if hasattr(value, "read")}
    texts = {key: _typed(key, value) for key, value in form.multi_items() if not hasattr(value, "read")}
    image_upload = uploads.get("image") or uploads.get("image[]")
    if image_upload is None:
        raise RequestError("image", "an edit needs an image file")
    limit = server.limits.max_pixels
    image = decode_image("image", await image_upload.read(), limit)
    mask = decode_image("mask", await uploads["mask"].read(), limit) if "mask" in uploads else None
    pictures = {"image": image.convert("RGB"), "mask_image": edit_mask(image, mask)}
    pictures["strength"] = field(texts, "strength", float)
    return texts, pictures


def _typed(key: str, value: str) -> Any:
    """A multipart text field as JSON would carry it: numbers for n, steps, seed and strength."""
    if key in ("n", "steps", "seed"):
        try:
            return int(value)
        except ValueError:
            raise RequestError(key, f"must be an integer, got {value!r}") from None
    if key == "strength":
        try:
            return float(value)
        except ValueError:
            raise RequestError(key, f"must be a number, got {value!r}") from None
    return value


def error_body(error: RequestError) -> dict[str, Any]:
    """OpenAI's error JSON."""
    kind = "rate_limit_error" if error.status == 429 else "invalid_request_error"
    return {"error": {"message": str(error), "type": kind, "param": error.field, "code": None}}


def add_routes(router, server: ApiServer, out_dir: Path) -> None:
    """The /v1 routes on `router`."""

    async def generations(request):
        parsed = parse_request(await json_payload(request), server)
        paths = await server.run(request, parsed["num_images"], lambda job: generate(server, parsed, job))
        return answer(paths, parsed["response_format"], str(request.base_url))

    async def edits(request):
        texts, pictures = await edit_fields(request, server)
        parsed = parse_request(texts, server)
        parsed.update({k: v for k, v in pictures.items() if v is not None})
        if texts.get("size") in (None, "auto"):  # the image's own size (within max_pixels: decode_image checked)
            parsed["width"], parsed["height"] = pictures["image"].size
        paths = await server.run(request, parsed["num_images"], lambda job: generate(server, parsed, job))
        return answer(paths, parsed["response_format"], str(request.base_url))

    async def models(request):
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "latent-diffusion"}
                                           for name in server.studios]}

    async def files(request):
        return served_png(out_dir, request.path_params["name"])

    for path, endpoint, method in (("/v1/images/generations", generations, "POST"), ("/v1/images/edits", edits, "POST"),
                                   ("/v1/models", models, "GET"), ("/v1/images/files/{name}", files, "GET")):
        router.add_api_route(path, with_errors(endpoint, error_body), methods=[method])


def served_png(out_dir: Path, name: str):
    """A generated PNG of `out_dir` by its bare generated name; 404 for any other name (no paths at all)."""
    from starlette.responses import FileResponse

    path = out_dir / name
    if not PNG_NAME.fullmatch(name) or not path.is_file():
        raise RequestError("name", "no such image on this server", 404)
    return FileResponse(path, media_type="image/png")
