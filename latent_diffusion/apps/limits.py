"""What keeps the HTTP APIs of `latent-diffusion serve` safe: request limits, the job board, keys, uploads.

- `RequestLimits`: the most steps, pixels and images one request may ask for (`serve --max-steps`,
  `--max-pixels`, `--max-images`); `default_limits(pipe)` sizes them for the model. Over a limit is
  `RequestError` (HTTP 400) naming the request's field.
- `JobBoard`: the API requests waiting or running (more than `max_queue` waiting: HTTP 429), their
  progress (A1111's /progress), interrupting the running one, and `run_watching`, which cancels a job
  whose client has disconnected. Jobs stop between denoising steps (`Interrupted` from the step callback).
- `decode_image`: an uploaded picture opened only after its header's size is checked, so a decompression
  bomb or a truncated file is a 400, never a memory spike; `read_body` bounds a request's body.
- `check_key`: `--api-key` (Bearer, or HTTP Basic with the key as password, as A1111 clients send it);
  `exposure_warning`: the line printed when a non-loopback address is served without a key or login.

This module imports starlette/anyio (gradio's dependencies) only inside the functions that need them.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import io
import ipaddress
import itertools
import threading
import time
from typing import Any, Callable, Optional, TypeVar

from PIL import Image

from latent_diffusion.checks import check_int

MAX_STEPS = 150  # A1111's own slider maximum
MAX_BODY_BYTES = 32 * 2**20  # one request's body: base64 or multipart pictures within max_pixels fit many times over
T = TypeVar("T")


class RequestError(ValueError):
    """A refused request: the HTTP status and the field it names (None: the request as a whole)."""

    def __init__(self, field: Optional[str], message: str, status: int = 400):
        super().__init__(f"{field}: {message}" if field else message)
        self.field, self.status = field, status


class Interrupted(Exception):
    """Raised from the step callback of a job that was interrupted or whose client went away."""


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """The most one request may ask for: denoising steps, pixels per image (width × height), images."""

    max_steps: int = MAX_STEPS
    max_pixels: int = 0
    max_images: int = 8

    def __post_init__(self):
        for name in ("max_steps", "max_pixels", "max_images"):
            check_int(name, getattr(self, name), 1)

    def check_steps(self, field: str, steps: Optional[int]) -> None:
        if steps is not None and steps > self.max_steps:
            raise RequestError(field, f"{steps} steps is over this server's limit of {self.max_steps}")

    def check_size(self, field: str, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise RequestError(field, f"{width}x{height} is {width * height} pixels, over this server's limit of "
                                      f"{self.max_pixels}")

    def check_images(self, field: str, images: int) -> None:
        if images > self.max_images:
            raise RequestError(field, f"{images} images is over this server's limit of {self.max_images} per request")


def default_limits(pipe, max_steps: Optional[int] = None, max_pixels: Optional[int] = None,
                   max_images: Optional[int] = None) -> RequestLimits:
    """The limits for `pipe`, each None taking its default: 150 steps, twice the native side (4× its pixels),
    8 images."""
    height, width = pipe.resolve_size(None, None)
    return RequestLimits(max_steps=max_steps or MAX_STEPS, max_pixels=max_pixels or 4 * height * width,
                         max_images=max_images or 8)


# ----------------------------------------------------------------- uploads


def decode_base64(field: str, text: Any) -> bytes:
    """The bytes of a base64 string, with or without a `data:image/png;base64,` header."""
    if not isinstance(text, str):
        raise RequestError(field, f"must be a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text.split(",", 1)[1] if text.startswith("data:") else text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(field, "is not valid base64") from None


def decode_image(field: str, data: bytes, max_pixels: int) -> Image.Image:
    """The picture in `data`, loaded; RequestError naming `field` when it is no picture, truncated, or over
    `max_pixels` (checked on the header, before any pixel is decompressed)."""
    try:
        opened = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # PIL's own refusal, past 2 × Image.MAX_IMAGE_PIXELS
        raise RequestError(field, f"declares more than {2 * Image.MAX_IMAGE_PIXELS} pixels, over this server's "
                                  f"limit of {max_pixels}") from None
    except (OSError, SyntaxError, ValueError):
        raise RequestError(field, "is not an image PIL can read (PNG, JPEG, WebP...)") from None
    width, height = opened.size
    if width * height > max_pixels:
        raise RequestError(field, f"{width}x{height} is {width * height} pixels, over this server's limit of "
                                  f"{max_pixels}")
    try:
        opened.load()  # PIL refuses truncated data unless ImageFile.LOAD_TRUNCATED_IMAGES is set
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise RequestError(field, "is truncated or corrupt") from None
    return opened


async def read_body(request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request's body, refused with 413 as soon as it passes `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(None, f"the request body is over this server's limit of {limit} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(None, f"the request body is over this server's limit of {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


# ----------------------------------------------------------------- keys and exposure


def check_key(authorization: Optional[str], api_key: Optional[str]) -> bool:
    """Whether an Authorization header carries `api_key` (always true when the server has none)."""
    if api_key is None:
        return True
    scheme, _, credentials = (authorization or "").partition(" ")
    if scheme.lower() == "bearer":
        given = credentials.strip()
    elif scheme.lower() == "basic":  # webuiapi's set_auth(user, KEY): any user name, the key as password
        try:
            given = base64.b64decode(credentials.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    else:
        return False
    return hmac.compare_digest(given.encode(), api_key.encode())


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, api_key: Optional[str], auth: Optional[tuple[str, str]]) -> Optional[str]:
    """The warning for serving `host` to other machines with no API key or no page login; None when safe."""
    if is_loopback(host):
        return None
    missing = [what for what, given in (("--api-key", api_key), ("--auth", auth)) if not given]
    if not missing:
        return None
    return (f"warning: serving {host}, reachable from other machines, without {' and '.join(missing)}: anyone who "
            f"can reach it can generate images and use the server's time")


# ----------------------------------------------------------------- the job board


@dataclasses.dataclass
class Job:
    """One API request: its progress over the denoising steps and why it was stopped, if it was."""

    number: int
    images_total: int
    images_done: int = 0
    step: int = 0
    steps: int = 0
    started: Optional[float] = None
    stop_reason: Optional[str] = None


class JobBoard:
    """The API requests waiting or running, at most `max_queue` waiting (more: RequestError 429)."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self._jobs: list[Job] = []
        self._lock = threading.Lock()
        self._numbers = itertools.count(1)
        self.last_interrupted = False

    def enter(self, images: int) -> Job:
        with self._lock:
            waiting = sum(job.started is None for job in self._jobs)
            if waiting >= self.max_queue:
                raise RequestError(None, f"the queue is full ({self.max_queue} requests waiting); try again later", 429)
            job = Job(next(self._numbers), images)
            self._jobs.append(job)
            return job

    def leave(self, job: Job) -> None:
        with self._lock:
            self._jobs.remove(job)
            self.last_interrupted = job.stop_reason == "interrupted"

    def active(self) -> list[Job]:
        with self._lock:
            return list(self._jobs)

    def interrupt(self) -> bool:
        """Stop the running job (the oldest when none has started a step yet); whether there was one."""
        with self._lock:
            running = [job for job in self._jobs if job.started is not None] or self._jobs[:1]
            for job in running[:1]:
                job.stop_reason = "interrupted"
            return bool(running)

    @staticmethod
    def step_callback(job: Job) -> Callable[[int, int], None]:
        """Studio's `on_step`: records the step and stops the job (Interrupted) when it was told to stop."""

        def on_step(done: int, total: int) -> None:
            job.started = job.started or time.time()
            job.step, job.steps = done, total
            if job.stop_reason:
                raise Interrupted(job.stop_reason)

        return on_step

    def progress(self) -> dict[str, Any]:
        """A1111's /sdapi/v1/progress answer for the running job (all zero when idle)."""
        jobs = self.active()
        job = next((j for j in jobs if j.started is not None), None)
        fraction = 0.0
        if job is not None and job.steps:
            fraction = (job.images_done + job.step / job.steps) / max(job.images_total, 1)
        elapsed = time.time() - job.started if job is not None else 0.0
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        state = {"skipped": False, "interrupted": bool(job and job.stop_reason) or self.last_interrupted,
                 "stopping_generation": False, "job": f"job {job.number}" if job else "", "job_count": len(jobs),
                 "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started)) if job else "0",
                 "job_no": job.images_done if job else 0, "sampling_step": job.step if job else 0,
                 "sampling_steps": job.steps if job else 0}
        return {"progress": min(fraction, 1.0), "eta_relative": eta, "state": state, "current_image": None,
                "textinfo": None}


async def run_watching(request, job: Job, work: Callable[[], T]) -> T:
    """`work()` in a worker thread while watching the client: when it disconnects, the job is stopped at the
    next denoising step (the Studio lock is then free for the next request). The watch ends with the work."""
    import anyio

    finished = anyio.Event()

    async def watch() -> None:
        while not finished.is_set():
            if await request.is_disconnected():
                job.stop_reason = "client disconnected"
                return
            with anyio.move_on_after(0.25):
                await finished.wait()

    outcome: list = []
    async with anyio.create_task_group() as group:
        group.start_soon(watch)
        try:
            outcome.append(await anyio.to_thread.run_sync(work))
        except Exception as error:  # raised below, outside the group (which would wrap it in an ExceptionGroup)
            outcome.append(error)
        finally:
            finished.set()
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]
