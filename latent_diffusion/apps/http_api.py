"""The HTTP APIs other programs speak (AUTOMATIC1111's `/sdapi/v1/*`, OpenAI's `/v1/images/*`), mounted on
the Gradio server's FastAPI app by `latent-diffusion serve`.

`ApiServer` holds what both APIs share: the loaded models (each a `Studio`, the page's generator, so a
request becomes the same `GenerationSettings` and the same PNG as on the page and in the CLI), the one
that answers by default, the request limits, the job board and the API key. `api_routes` is the list of
routes for `FastAPI(routes=...)`; every route checks the key, and a refused request answers with its
status and a message naming the field, in the error format of the API it belongs to.
"""
from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

from starlette.requests import Request

from latent_diffusion.apps.limits import JobBoard, RequestError, RequestLimits, check_key, read_body, run_watching
from latent_diffusion.formats.pngmeta import read_png_metadata
from latent_diffusion.settings import GenerationSettings



@dataclasses.dataclass
class ApiServer:
    """The models a server was started with (name -> Studio), the current one, limits, job board, key."""

    studios: dict[str, Any]
    limits: RequestLimits
    board: JobBoard
    api_key: Optional[str] = None
    current: str = ""

    def __post_init__(self):
        self.current = self.current or next(iter(self.studios))
        self._switch = threading.Lock()

    def studio(self, field: str, name: Optional[str] = None):
        """The Studio of model `name` (None: the current one); RequestError naming `field` for another name."""
        if name is None or name == "":
            return self.studios[self.current]
        if name not in self.studios:
            raise RequestError(field, f"{name!r} is not a model of this server; it serves {', '.join(self.studios)}")
        return self.studios[name]

    def switch(self, field: str, name: str) -> None:
        self.studio(field, name)
        with self._switch:
            self.current = name

    def check_settings(self, steps_field: str, steps: Optional[int], size_field: str, width: int, height: int,
                       images_field: str, images: int) -> None:
        self.limits.check_steps(steps_field, steps)
        self.limits.check_size(size_field, width, height)
        self.limits.check_images(images_field, images)

    async def run(self, request, images: int, work: Callable[[Any], Any]) -> Any:
        """`work(job)` as a job on the board (429 when the queue is full), cancelled if the client goes away."""
        job = self.board.enter(images)
        try:
            return await run_watching(request, job, lambda: work(job))
        finally:
            self.board.leave(job)


def field(payload: dict, name: str, kind: type, default: Any = None) -> Any:
    """payload[name] checked to be of `kind` (an integral float counts as an int), else `default` when absent
    or null; RequestError naming the field for another type."""
    value = payload.get(name)
    if value is None:
        return default
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise RequestError(name, f"must be {kind.__name__}, got {value!r}")


def renamed(error: ValueError, names: dict[str, str]) -> RequestError:
    """A pipeline/Studio ValueError as a 400 led by the API's name for the argument it names."""
    if isinstance(error, RequestError):
        return error
    message = str(error)
    for argument in sorted(names, key=len, reverse=True):  # longest first: "mask_image" before "image"
        if message.startswith(argument):
            return RequestError(names[argument], message if names[argument] != argument else message[len(argument):]
                                .lstrip(": "))
    return RequestError(None, message)


def records_of(paths: list[Path]) -> list[GenerationSettings]:
    """The settings each generated PNG records (its own seed and size)."""
    return [GenerationSettings.from_png_metadata(read_png_metadata(path)) for path in paths]


async def json_payload(request) -> dict:
    """The request's JSON object (body bounded by read_body); RequestError for anything else."""
    import json

    body = await read_body(request)
    try:
        payload = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError(None, "the body is not JSON") from None
    except RecursionError:  # arrays or objects nested thousands deep: a hostile body, not a request
        raise RequestError(None, "the body's JSON is nested too deeply") from None
    if not isinstance(payload, dict):
        raise RequestError(None, "the body must be a JSON object")
    return payload


def with_errors(endpoint: Callable[..., Awaitable[Any]], error_body: Callable[[RequestError], dict]):
    """`endpoint`, answering a RequestError with its status and `error_body(error)` as JSON."""
    from starlette.responses import JSONResponse

    async def answer(request: Request):  # FastAPI passes the request by this annotation
        try:
            return await endpoint(request)
        except RequestError as error:
            return JSONResponse(error_body(error), status_code=error.status)

    answer.__name__ = getattr(endpoint, "__name__", "endpoint")
    return answer


def api_routes(server: ApiServer, out_dir: Path) -> list:
    """The routes of both APIs, each behind the API key when the server has one."""
    from fastapi import APIRouter, Depends, HTTPException

    from latent_diffusion.apps import a1111_api, openai_api

    def require_key(request: Request) -> None:
        if not check_key(request.headers.get("authorization"), server.api_key):
            raise HTTPException(401, "a valid API key is required: Authorization: Bearer KEY",
                                headers={"WWW-Authenticate": "Bearer"})

    router = APIRouter(dependencies=[Depends(require_key)])
    a1111_api.add_routes(router, server)
    openai_api.add_routes(router, server, out_dir)
    return list(router.routes)


def mount_kwargs(studio, extra_models, limits: dict, max_queue: int, api_key: Optional[str], host: str,
                 auth: Optional[tuple[str, str]]) -> dict[str, Any]:
    """`launch(app_kwargs=...)` putting both APIs on the Gradio server's FastAPI app, over `studio` (the page's)
    and a Studio for each (name, pipeline) of `extra_models`; prints the exposure warning when there is one."""
    import sys

    from latent_diffusion.apps.limits import default_limits, exposure_warning
    from latent_diffusion.apps.webui import Studio
    from latent_diffusion.settings import EMBEDDED_MODEL

    studios = {studio.model or EMBEDDED_MODEL: studio}
    for name, pipe in extra_models:
        pipe.set_progress_bar_config(disable=True)
        studios[name] = Studio(pipe, name, studio.out_dir)
        studios[name]._numbers = studio._numbers  # one numbering: file names never collide in the shared folder
    server = ApiServer(studios, default_limits(studio.pipe, **limits), JobBoard(max_queue), api_key)
    warning = exposure_warning(host, api_key, auth)
    if warning:
        print(warning, file=sys.stderr)
    return {"routes": api_routes(server, studio.out_dir)}
