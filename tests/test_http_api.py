"""The HTTP APIs of `latent-diffusion serve` (A1111's /sdapi/v1, OpenAI's /v1/images) driven by their real clients.

The fast tests serve the tiny test model in-process (`webui.serve(block=False)` on 127.0.0.1 and a free port)
and talk to it with `webuiapi`, `openai` and raw HTTP: generation, listings, limits, the queue, interrupting,
disconnecting, keys, file routes, hostile uploads. The slow tests start the real command on the embedded
default model and judge the images with the Shapes scorer. Every request loop here is bounded.
"""
import base64
import concurrent.futures
import http.client
import io
import json
import resource
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import same_pixels

from latent_diffusion.formats.assets import generation_default_path
from latent_diffusion.formats.infotext import A1111_SAMPLERS
from latent_diffusion.apps.limits import RequestLimits, decode_image, exposure_warning, RequestError, check_key

webuiapi = pytest.importorskip("webuiapi")
openai = pytest.importorskip("openai")
pytest.importorskip("gradio")

LIMITS = {"max_steps": 12, "max_pixels": 48 * 48, "max_images": 4}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """An in-process server over the tiny model: its port, output folder, Studio and the demo to close."""

    def __init__(self, sd_folder, out_dir, **settings):
        from latent_diffusion.apps import webui
        from latent_diffusion.pipelines import LatentDiffusionPipeline

        pipe = LatentDiffusionPipeline.from_pretrained(str(sd_folder))
        self.port, self.out_dir, self.model = free_port(), out_dir, str(sd_folder)
        studios = []
        real_studio = webui.Studio

        def recording_studio(*args, **kwargs):  # keep the page's Studio: the tests hold its lock
            studios.append(real_studio(*args, **kwargs))
            return studios[-1]

        webui.Studio = recording_studio
        try:
            self.demo = webui.serve(pipe, str(sd_folder), port=self.port, example=False, block=False,
                                    output_dir=out_dir, **settings)
        finally:
            webui.Studio = real_studio
        self.studio = studios[0]

    def request(self, method: str, path: str, body=None, headers=None, timeout: float = 120):
        """(status, parsed JSON or raw bytes) of one raw HTTP request: no client-side path normalisation."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
            connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            response = connection.getresponse()
            raw = response.read()
        finally:
            connection.close()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw

    def pngs(self) -> set:
        return {p.name for p in self.out_dir.glob("*.png")}


@pytest.fixture(scope="module")
def served(sd_folder, tmp_path_factory):
    from latent_diffusion.pipelines import LatentDiffusionPipeline

    second = LatentDiffusionPipeline.from_pretrained(str(sd_folder))
    server = Served(sd_folder, tmp_path_factory.mktemp("api") / "png", max_queue=1, limits=LIMITS,
                    extra_models=[("second", second)])
    yield server
    server.demo.close()


@pytest.fixture(scope="module")
def a1111(served):
    return webuiapi.WebUIApi(port=served.port)


@pytest.fixture(scope="module")
def oai(served):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{served.port}/v1", api_key="unused", max_retries=0, timeout=120)


def tiny_txt2img(**payload):
    return {"prompt": "a red circle", "steps": 2, "width": 32, "height": 32, "sampler_name": "DDIM", **payload}


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def assert_still_serving(served):
    status, body = served.request("POST", "/sdapi/v1/txt2img", tiny_txt2img(seed=1))
    assert status == 200 and len(body["images"]) == 1, body


# ----------------------------------------------------------------- A1111 through webuiapi


def test_webuiapi_txt2img_batches_seeds_info_and_png_metadata(a1111, served):
    result = a1111.txt2img(prompt="a red circle", negative_prompt="blue", seed=3, steps=2, width=32, height=32,
                           sampler_name="DDIM", batch_size=2, n_iter=2, cfg_scale=4.0)
    assert len(result.images) == 4 and {image.size for image in result.images} == {(32, 32)}
    info = result.info
    assert info["all_seeds"] == [3, 4, 5, 6] and info["seed"] == 3 and info["sampler_name"] == "DDIM"
    assert (info["steps"], info["cfg_scale"], info["width"], info["height"]) == (2, 4.0, 32, 32)
    assert info["infotexts"][1].splitlines()[:2] == ["a red circle", "Negative prompt: blue"]
    assert "Steps: 2, Sampler: DDIM, Schedule type: Automatic, CFG scale: 4, Seed: 4, Size: 32x32" in info["infotexts"][1]
    assert info["infotexts"][1] == result.images[1].info["parameters"]  # A1111's infotext, as in the PNG itself
    assert [image.info["seed"] for image in result.images] == ["3", "4", "5", "6"]  # our PNG metadata travels along
    assert info["notes"] == []
    again = a1111.txt2img(prompt="a red circle", negative_prompt="blue", seed=4, steps=2, width=32, height=32,
                          sampler_name="DDIM", cfg_scale=4.0, subseed=9, subseed_strength=0.5)
    assert same_pixels(pixels(again.image), pixels(result.images[1]))  # seed + k is the image alone at that seed
    assert "subseed" in again.info["notes"][0]


def test_webuiapi_sampler_and_scheduler_names_reach_the_pipeline(a1111):
    for sampler, scheduler, ours, schedule in (("Euler a", "automatic", "euler_a", None),
                                               ("DPM++ 2M", "Karras", "dpm++", "karras"),
                                               ("DPM++ 2M Karras", None, "dpm++", "karras"),
                                               ("LCM", None, "lcm", None), ("TCD", None, "tcd", None)):
        result = a1111.txt2img(prompt="a blue square", seed=0, steps=2, width=32, height=32, sampler_name=sampler,
                               scheduler=scheduler or "")
        assert result.image.info["sampler"] == ours and result.image.info.get("sigma_schedule") == schedule
    assert set(a1111.util_get_sampler_names()) == set(A1111_SAMPLERS.values())  # every sampler, by its A1111 name
    assert {"automatic", "karras", "exponential"} <= set(a1111.util_get_scheduler_names())


def same_as_studio(served, api_image, **settings) -> bool:
    """Whether the API's image is the page's Studio's for the same settings (the tiny model's VAE is random,
    so the pictures themselves prove nothing; the plumbing is what is checked here)."""
    [path] = served.studio.generate(**settings)
    return same_pixels(pixels(api_image), pixels(Image.open(path)))


def test_webuiapi_img2img_and_inpainting_reach_the_pipeline(a1111, served):
    init = Image.new("RGB", (32, 32), (255, 255, 255))
    init.paste((200, 0, 0), (8, 8, 24, 24))
    common = dict(prompt="a red square", seed=2, steps=4, sampler_name="DDIM")
    studio = dict(prompt="a red square", seed=2, steps=4, sampler="ddim", guidance=7.0, width=32, height=32, image=init,
                  eta=1.0)  # webuiapi sends eta 1, which A1111 applies to DDIM
    result = a1111.img2img(images=[init], width=32, height=32, denoising_strength=0.5, **common)
    assert result.image.size == (32, 32) and result.info["denoising_strength"] == 0.5
    assert "Denoising strength: 0.5" in result.info["infotexts"][0]
    assert same_as_studio(served, result.image, strength=0.5, **studio)
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))  # repaint the left half
    painted = a1111.img2img(images=[init], mask_image=mask, width=32, height=32, denoising_strength=1.0, **common)
    assert same_as_studio(served, painted.image, strength=1.0, mask_image=mask, **studio)
    inverted = a1111.img2img(images=[init], mask_image=mask, inpainting_mask_invert=1, width=32, height=32,
                             denoising_strength=1.0, **common)
    flipped = mask.point(lambda value: 255 - value)
    assert same_as_studio(served, inverted.image, strength=1.0, mask_image=flipped, **studio)
    assert not np.array_equal(pixels(inverted.image), pixels(painted.image))
    resized = a1111.img2img(images=[init.resize((40, 40))], width=32, height=32, denoising_strength=0.5, **common)
    assert resized.image.size == (32, 32)  # A1111 makes width x height from any init image


def test_webuiapi_listings_options_progress_and_model_switch(a1111, served):
    assert a1111.util_get_model_names() == sorted([served.model, "second"])
    assert a1111.util_get_current_model() == served.model
    assert a1111.get_loras() == []
    progress = a1111.get_progress()
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0
    a1111.util_set_model("second", find_closest=False)
    try:
        assert a1111.util_get_current_model() == "second"
        assert a1111.txt2img(**tiny_txt2img(seed=0)).image.info["model"] == "second"
        once = a1111.txt2img(**tiny_txt2img(seed=0, override_settings={"sd_model_checkpoint": served.model}))
        assert once.image.info["model"] == served.model and a1111.util_get_current_model() == "second"
    finally:
        assert a1111.set_options({"sd_model_checkpoint": served.model, "some_other_option": 1}) is None
    assert a1111.util_get_current_model() == served.model
    status, body = served.request("POST", "/sdapi/v1/options", {"sd_model_checkpoint": "nope"})
    assert status == 400 and body["detail"].startswith("sd_model_checkpoint: 'nope' is not a model of this server")
    status, body = served.request("POST", "/sdapi/v1/txt2img", tiny_txt2img(override_settings={"sd_model_checkpoint": "x"}))
    assert status == 400 and body["detail"].startswith("override_settings")
    status, body = served.request("GET", "/sdapi/v1/scripts")
    assert status == 200 and body == {"txt2img": [], "img2img": []}


def test_clip_skip_override_is_recorded(a1111):
    result = a1111.txt2img(prompt="a red circle", seed=0, steps=2, width=32, height=32, sampler_name="DDIM",
                           override_settings={"CLIP_stop_at_last_layers": 2})
    assert result.image.info["clip_skip"] == "1" and "Clip skip: 2" in result.info["infotexts"][0]


# ----------------------------------------------------------------- OpenAI through openai


def test_openai_generate_b64_and_url_and_models(oai, served):
    assert [model.id for model in oai.models.list().data] == [served.model, "second"]
    made = oai.images.generate(prompt="a blue square", size="32x32", n=2, model=served.model,
                               extra_body={"steps": 2, "seed": 5})
    images = [Image.open(io.BytesIO(base64.b64decode(item.b64_json))) for item in made.data]
    assert [image.info["seed"] for image in images] == ["5", "6"] and images[0].size == (32, 32)
    linked = oai.images.generate(prompt="a blue square", size="32x32", response_format="url",
                                 extra_body={"steps": 2, "seed": 5})
    path = linked.data[0].url.split(str(served.port), 1)[1]
    status, raw = served.request("GET", path)
    assert status == 200 and same_pixels(pixels(Image.open(io.BytesIO(raw))), pixels(images[0]))


def test_openai_edit_repaints_where_the_mask_is_transparent(oai, served):
    init = Image.new("RGBA", (32, 32), (255, 255, 255, 255))
    mask = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 16, 32))  # transparent: edit the left half
    edited = oai.images.edit(image=("init.png", png_bytes(init), "image/png"),
                             mask=("mask.png", png_bytes(mask), "image/png"), prompt="a red square",
                             extra_body={"steps": 4, "seed": 1})
    out = Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json)))
    assert out.size == (32, 32) and out.info["strength"] == "1.0"  # inpainting's default strength
    white_left = Image.new("L", (32, 32), 0)
    white_left.paste(255, (0, 0, 16, 32))
    assert same_as_studio(served, out, prompt="a red square", seed=1, steps=4, width=32, height=32,
                          image=init.convert("RGB"), mask_image=white_left)
    whole = oai.images.edit(image=("init.png", png_bytes(init.convert("RGB")), "image/png"), prompt="a red square",
                            extra_body={"steps": 4, "seed": 1})  # opaque, no mask: image-to-image
    assert Image.open(io.BytesIO(base64.b64decode(whole.data[0].b64_json))).info["strength"] == "0.8"
    with pytest.raises(openai.BadRequestError, match="mask: must be a PNG with transparency"):
        oai.images.edit(image=("init.png", png_bytes(init), "image/png"),
                        mask=("mask.png", png_bytes(mask.convert("L")), "image/png"), prompt="x")


# ----------------------------------------------------------------- limits and bad requests


@pytest.mark.parametrize("path, payload, status, named", [
    ("/sdapi/v1/txt2img", tiny_txt2img(steps=13), 400, "steps: 13 steps is over this server's limit of 12"),
    ("/sdapi/v1/txt2img", tiny_txt2img(width=64, height=64), 400, "width: 64x64 is 4096 pixels, over"),
    ("/sdapi/v1/txt2img", tiny_txt2img(batch_size=3, n_iter=2), 400, "batch_size: 6 images is over"),
    ("/sdapi/v1/txt2img", tiny_txt2img(batch_size=0), 400, "batch_size: must be >= 1"),
    ("/sdapi/v1/txt2img", tiny_txt2img(steps="many"), 400, "steps: must be int"),
    ("/sdapi/v1/txt2img", tiny_txt2img(seed=-5), 400, "seed: must be an integer >= 0"),
    ("/sdapi/v1/txt2img", tiny_txt2img(sampler_name="LMS"), 400, "sampler_name: 'LMS' is not a sampler"),
    ("/sdapi/v1/txt2img", tiny_txt2img(scheduler="beta"), 400, "scheduler: 'beta' is not a scheduler"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x",', 400, "the body is not JSON"),
    ("/sdapi/v1/txt2img", tiny_txt2img(cfg_scale=float("nan")), 400, "cfg_scale: guidance_scale must be"),
    ("/sdapi/v1/txt2img", tiny_txt2img(width=30), 400, "width"),
    ("/sdapi/v1/txt2img", tiny_txt2img(sampler_name="DDIM", scheduler="karras"), 400, "scheduler"),
    ("/sdapi/v1/txt2img", [1, 2], 400, "the body must be a JSON object"),
    ("/sdapi/v1/img2img", tiny_txt2img(), 400, "init_images: img2img needs one base64 image"),
    ("/sdapi/v1/img2img", tiny_txt2img(init_images=["%%%"]), 400, "init_images: is not valid base64"),
    ("/sdapi/v1/img2img", tiny_txt2img(init_images=[base64.b64encode(b"not a picture").decode()]), 400,
     "init_images: is not an image"),
    ("/v1/images/generations", {"prompt": "x", "steps": 13}, 400, "steps: 13 steps is over"),
    ("/v1/images/generations", {"prompt": "x", "size": "64x64"}, 400, "size: 64x64 is 4096 pixels"),
    ("/v1/images/generations", {"prompt": "x", "n": 5}, 400, "n: 5 images is over"),
    ("/v1/images/generations", {"prompt": "x", "size": "big"}, 400, "size: must be WIDTHxHEIGHT"),
    ("/v1/images/generations", {"prompt": "x", "response_format": "gif"}, 400, "response_format: must be one of"),
    ("/v1/images/generations", {"prompt": "x", "model": "dall-e-3"}, 400, "model: 'dall-e-3' is not a model"),
    ("/v1/images/generations", {"n": 1}, 400, "prompt: is required"),
])
def test_bad_request_is_refused_naming_the_field_and_the_server_keeps_serving(served, path, payload, status, named):
    got, answer = served.request("POST", path, payload)
    message = answer["detail"] if path.startswith("/sdapi") else answer["error"]["message"]
    assert (got, message[:len(named)]) == (status, named), message
    assert_still_serving(served)


def test_request_limits_check_their_own_settings():
    with pytest.raises(ValueError, match="max_steps must be an integer >= 1"):
        RequestLimits(max_steps=0, max_pixels=10)


def test_oversized_body_is_refused_with_413(served):
    status, body = served.request("POST", "/sdapi/v1/txt2img", b"{" + b" " * (33 * 2**20) + b"}")
    assert status == 413 and "request body is over" in body["detail"]
    assert_still_serving(served)


def bomb_png(width: int, height: int) -> bytes:
    """A 1×1 grey PNG whose header claims width × height pixels (a decompression bomb's header)."""
    real = bytearray(png_bytes(Image.new("L", (1, 1))))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    real[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    real[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(real[ihdr - 4:ihdr + 13])))
    return bytes(real)


def zlib_bomb_png(side: int) -> bytes:
    """A real side × side grey PNG of zeros: a few hundred kB that inflate to side² bytes."""
    raw = zlib.compress(b"\0" * (side + 1) * side, 9)  # each row: filter byte + pixels

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def test_decompression_bombs_and_truncated_images_are_refused_without_memory(served, oai):
    bombs = [bomb_png(100_000, 100_000), zlib_bomb_png(12_000)]  # 10 G and 144 M pixels declared
    truncated = png_bytes(Image.effect_noise((32, 32), 50).convert("RGB"))[:300]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; the server runs in this process
    for data in bombs:
        encoded = base64.b64encode(data).decode()
        status, body = served.request("POST", "/sdapi/v1/img2img", tiny_txt2img(init_images=[encoded]))
        assert status == 400 and "pixels, over this server's limit of 2304" in body["detail"], body
        status, body = served.request("POST", "/sdapi/v1/img2img",
                                      tiny_txt2img(init_images=[base64.b64encode(png_bytes(Image.new("RGB", (32, 32))))
                                                                .decode()], mask=encoded))
        assert status == 400 and body["detail"].startswith("mask: "), body
        with pytest.raises(openai.BadRequestError, match="image: .* pixels, over"):
            oai.images.edit(image=("bomb.png", data, "image/png"), prompt="x")
    status, body = served.request("POST", "/sdapi/v1/img2img",
                                  tiny_txt2img(init_images=[base64.b64encode(truncated).decode()]))
    assert status == 400 and body["detail"] in ("init_images: is truncated or corrupt",
                                                "init_images: is not an image PIL can read (PNG, JPEG, WebP...)"), body
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    assert grown_mib < 100, f"the peak memory grew by {grown_mib:.0f} MiB"
    assert_still_serving(served)


def test_decode_image_checks_the_header_before_the_pixels():
    with pytest.raises(RequestError, match="image: 10000x10000 is 100000000 pixels, over this server's limit of 4096"):
        decode_image("image", bomb_png(10_000, 10_000), 4096)
    with pytest.raises(RequestError, match="image: declares more than .* pixels, over this server's limit of 4096"):
        decode_image("image", bomb_png(100_000, 100_000), 4096)
    assert decode_image("image", png_bytes(Image.new("RGB", (8, 8))), 64).size == (8, 8)


# ----------------------------------------------------------------- the queue, interrupting, disconnecting


def wait_for(condition, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def job_count(served) -> int:
    return served.request("GET", "/sdapi/v1/progress")[1]["state"]["job_count"]


def test_full_queue_answers_429_and_interrupt_stops_the_waiting_job(served, oai):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with served.studio._lock:  # the pipeline is busy (as with a page request): the API job waits
            first = pool.submit(served.request, "POST", "/sdapi/v1/txt2img", tiny_txt2img(seed=0, n_iter=2))
            wait_for(lambda: job_count(served) == 1, what="the first job never reached the board")
            status, body = served.request("POST", "/sdapi/v1/txt2img", tiny_txt2img())
            assert status == 429 and "queue is full" in body["detail"]
            with pytest.raises(openai.RateLimitError):
                oai.images.generate(prompt="x", size="32x32")
            assert served.request("POST", "/sdapi/v1/interrupt")[0] == 200
        status, body = first.result(timeout=120)
    assert status == 200 and body["images"] == [] and json.loads(body["info"])["interrupted"] is True
    assert served.request("GET", "/sdapi/v1/progress")[1]["state"]["interrupted"] is True
    assert_still_serving(served)


def test_a_disconnected_clients_job_is_cancelled(served):
    before = served.pngs()
    with served.studio._lock:
        with pytest.raises(TimeoutError):
            served.request("POST", "/sdapi/v1/txt2img", tiny_txt2img(n_iter=3), timeout=2)  # gives up, hangs up
        assert job_count(served) == 1
        # the server polls its client every 0.25 s: keep the pipeline busy for six polls after the hang-up, else
        # the tiny model's fast first image can finish before the poll that sees it (a waiting job shows no state)
        time.sleep(1.5)
    wait_for(lambda: job_count(served) == 0, timeout=60, what="the abandoned job kept running")
    assert served.pngs() == before  # stopped at its first step: no image made
    assert_still_serving(served)


# ----------------------------------------------------------------- files: only the output folder's PNGs


def test_no_route_serves_a_file_outside_the_output_folder(served):
    secret = served.out_dir.parent / "secret.txt"
    secret.write_text("SECRET-CONTENT")
    status, body = served.request("POST", "/sdapi/v1/txt2img", tiny_txt2img(seed=0))
    made = sorted(served.out_dir.glob("*.png"))[-1]
    out = served.out_dir
    assert served.request("GET", f"/gradio_api/file={made}")[0] == 200  # the routes do serve the output folder
    assert served.request("GET", f"/v1/images/files/{made.name}")[0] == 200
    attempts = [f"/gradio_api/file={secret}", f"/gradio_api/file={out}/../secret.txt",
                f"/gradio_api/file={out}/%2e%2e/secret.txt", f"/gradio_api/file={out}%2F..%2Fsecret.txt",
                "/gradio_api/file=/etc/passwd", "/gradio_api/file=%2Fetc%2Fpasswd", "/gradio_api/file=../secret.txt",
                f"/file={secret}", f"/gradio_api/file/{secret}", "/gradio_api/file/..%2F..%2F..%2Fetc%2Fpasswd",
                "/v1/images/files/..%2Fsecret.txt", "/v1/images/files/%2E%2E%2Fsecret.txt", "/v1/images/files/secret.txt",
                f"/v1/images/files/{secret}", "/v1/images/files/%2Fetc%2Fpasswd", "/static/..%2F..%2F..%2Fetc%2Fpasswd",
                "/assets/..%2F..%2F..%2F..%2Fetc%2Fpasswd", "/svelte/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
                "/static/../../../../etc/passwd", f"/gradio_api/file={out}/../../{secret.parent.name}/secret.txt"]
    for path in attempts:
        status, raw = served.request("GET", path)
        text = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
        assert b"SECRET-CONTENT" not in text and b"root:x:0:0" not in text, (path, status)
        assert status in (400, 403, 404, 405), (path, status)
    assert_still_serving(served)


# ----------------------------------------------------------------- keys and logins


@pytest.fixture(scope="module")
def guarded(sd_folder, tmp_path_factory):
    server = Served(sd_folder, tmp_path_factory.mktemp("guarded") / "png", api_key="s3cret", auth=("ann", "pw"),
                    limits=LIMITS)
    yield server
    server.demo.close()


def test_api_key_guards_the_apis_and_auth_the_page(guarded):
    for path in ("/sdapi/v1/sd-models", "/v1/models", "/sdapi/v1/progress"):
        assert guarded.request("GET", path)[0] == 401
        assert guarded.request("GET", path, headers={"Authorization": "Bearer wrong"})[0] == 401
        assert guarded.request("GET", path, headers={"Authorization": "Bearer s3cret"})[0] == 200
    assert guarded.request("POST", "/sdapi/v1/txt2img", tiny_txt2img())[0] == 401
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{guarded.port}/v1", api_key="s3cret", max_retries=0)
    assert client.images.generate(prompt="x", size="32x32", extra_body={"steps": 2}).data
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{guarded.port}/v1", api_key="nope", max_retries=0).models.list()
    api = webuiapi.WebUIApi(port=guarded.port, username="anyone", password="s3cret")  # A1111 clients' Basic auth
    assert len(api.txt2img(prompt="x", steps=2, width=32, height=32, sampler_name="DDIM").images) == 1
    assert guarded.request("GET", "/config")[0] == 401  # the page needs its login
    assert guarded.request("GET", "/gradio_api/info")[0] == 401


def test_check_key_accepts_bearer_and_basic_password_only():
    basic = "Basic " + base64.b64encode(b"user:k3y").decode()
    assert check_key("Bearer k3y", "k3y") and check_key(basic, "k3y") and check_key(None, None)
    assert not any(check_key(header, "k3y") for header in (None, "Bearer k3", "k3y", "Basic !!", "Token k3y"))


def test_exposing_the_server_without_key_or_login_warns():
    assert exposure_warning("127.0.0.1", None, None) is None and exposure_warning("localhost", None, None) is None
    assert exposure_warning("::1", None, None) is None
    warning = exposure_warning("0.0.0.0", None, None)
    assert "--api-key and --auth" in warning
    assert "--auth" in exposure_warning("192.168.1.5", "k", None) and "--api-key" not in exposure_warning(
        "192.168.1.5", "k", None)
    assert exposure_warning("0.0.0.0", "k", ("u", "p")) is None


def test_serve_prints_the_exposure_warning(served, capsys):
    from latent_diffusion.apps.http_api import mount_kwargs

    routes = mount_kwargs(served.studio, [], {}, 1, None, "0.0.0.0", None)["routes"]
    assert "warning: serving 0.0.0.0" in capsys.readouterr().err
    assert {"/sdapi/v1/txt2img", "/v1/images/generations"} <= {route.path for route in routes}
    mount_kwargs(served.studio, [], {}, 1, "k", "0.0.0.0", ("u", "p"))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("flags, named", [(["--auth", "nocolon"], "--auth must be USER:PASSWORD"),
                                          (["--auth", ":pw"], "--auth must be USER:PASSWORD"),
                                          (["--max-steps", "0"], "--max-steps must be an integer >= 1"),
                                          (["--max-pixels", "-1"], "--max-pixels must be"),
                                          (["--max-images", "0"], "--max-images must be")])
def test_serve_flags_are_checked_before_the_model_loads(flags, named, capsys):
    from latent_diffusion.apps.cli import main

    assert main(["serve", "--no-example", *flags]) == 2
    assert named in capsys.readouterr().err


# ----------------------------------------------------------------- the real command on the embedded default model


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    """`latent-diffusion serve --no-example` on the embedded default model at a free 127.0.0.1 port: its URL."""
    import os
    import subprocess
    import sys

    from test_webui import wait_until_up

    out = tmp_path_factory.mktemp("default-served")
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    with open(out / "server.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "latent_diffusion.apps.cli", "serve", "--no-example",
                                    "--port", str(port), "--output-dir", str(out / "png"), "--max-queue", "8",
                                    "--max-steps", "40"],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}/"
        try:
            wait_until_up(url, process)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=30)


INPAINT_PROMPT, INPAINT_SEED = "a red circle to the left of a blue square", 1  # the right half repainted
DEFAULTS = json.loads((generation_default_path() / "generation_config.json").read_text())  # what `serve` loads
# The model's own settings, which webuiapi's defaults (Euler a, cfg 7, eta 1: A1111 applies eta to DDIM) are not
MODEL_DEFAULTS = dict(sampler_name=A1111_SAMPLERS[DEFAULTS["sampler"]], cfg_scale=DEFAULTS["guidance_scale"], eta=0.0,
                      width=64, height=64)


def decoded(item) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item.b64_json)))


def shapes_scene(*objects) -> Image.Image:
    from latent_diffusion.shapes.world import Scene, SceneObject, render

    return render(Scene(objects=tuple(SceneObject(*o) for o in objects), background="white"), 64)


@pytest.mark.slow
def test_webuiapi_images_on_the_default_model_are_judged_correct(default_server):
    from latent_diffusion.shapes.scorer import judge

    api = webuiapi.WebUIApi(baseurl=default_server + "sdapi/v1")
    made = api.txt2img(prompt="a red circle", seed=1, steps=DEFAULTS["num_inference_steps"], **MODEL_DEFAULTS)
    assert judge(made.image, "a red circle").correct, judge(made.image, "a red circle").reasons
    square = shapes_scene(("blue", "square", 0.5, 0.5, 0.4))
    edited = api.img2img(images=[square], prompt="a blue square", seed=1, steps=12, denoising_strength=0.5,
                         **MODEL_DEFAULTS)
    assert judge(edited.image, "a blue square").correct, judge(edited.image, "a blue square").reasons
    left = shapes_scene(("red", "circle", 0.25, 0.5, 0.3))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))  # repaint the right half
    painted = api.img2img(images=[left], mask_image=mask, prompt=INPAINT_PROMPT, seed=INPAINT_SEED, steps=12,
                          denoising_strength=1.0, **MODEL_DEFAULTS)
    assert judge(painted.image, INPAINT_PROMPT).correct, judge(painted.image, INPAINT_PROMPT).reasons


@pytest.mark.slow
def test_openai_images_on_the_default_model_are_judged_correct(default_server):
    from latent_diffusion.shapes.scorer import judge

    client = openai.OpenAI(base_url=default_server + "v1", api_key="unused", max_retries=0, timeout=600)
    made = decoded(client.images.generate(prompt="a red circle", extra_body={"seed": 1, "steps": 20}).data[0])
    assert made.size == (64, 64) and judge(made, "a red circle").correct, judge(made, "a red circle").reasons
    left = shapes_scene(("red", "circle", 0.25, 0.5, 0.3)).convert("RGBA")
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (32, 0, 64, 64))  # transparent: edit the right half
    edited = decoded(client.images.edit(image=("left.png", png_bytes(left), "image/png"),
                                        mask=("mask.png", png_bytes(mask), "image/png"), prompt=INPAINT_PROMPT,
                                        extra_body={"seed": INPAINT_SEED, "steps": 12}).data[0])
    assert judge(edited, INPAINT_PROMPT).correct, judge(edited, INPAINT_PROMPT).reasons
    with pytest.raises(openai.BadRequestError, match="steps: 41 steps is over this server's limit of 40"):
        client.images.generate(prompt="a red circle", extra_body={"steps": 41})  # serve --max-steps 40
    with pytest.raises(openai.BadRequestError, match="size: 256x256 is 65536 pixels, over this server's limit of 16384"):
        client.images.generate(prompt="a red circle", size="256x256")  # the default: 4x the model's 64x64


@pytest.mark.slow
def test_concurrent_clients_of_both_kinds_and_the_page_get_their_own_seeds_and_images(default_server):
    from gradio_client import Client

    api = webuiapi.WebUIApi(baseurl=default_server + "sdapi/v1")
    client = openai.OpenAI(base_url=default_server + "v1", api_key="unused", max_retries=0, timeout=600)
    page = Client(default_server, verbose=False)
    prompt, steps = "a red circle above a blue square", 3
    calls = {
        100: lambda: api.txt2img(prompt=prompt, seed=100, steps=steps, **MODEL_DEFAULTS).image,
        101: lambda: api.txt2img(prompt=prompt, seed=101, steps=steps, **MODEL_DEFAULTS).image,
        102: lambda: decoded(client.images.generate(prompt=prompt, extra_body={"seed": 102, "steps": steps}).data[0]),
        103: lambda: decoded(client.images.generate(prompt=prompt, extra_body={"seed": 103, "steps": steps}).data[0]),
        104: lambda: Image.open(page.predict(prompt=prompt, seed=104, steps=steps, api_name="/generate")[0]),
    }
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        jobs = {seed: pool.submit(call) for seed, call in calls.items()}
        together = {seed: job.result(timeout=900) for seed, job in jobs.items()}
    for seed, image in together.items():
        assert image.info["seed"] == str(seed)
        alone = api.txt2img(prompt=prompt, seed=seed, steps=steps, **MODEL_DEFAULTS).image  # the same settings, alone
        assert same_pixels(pixels(image), pixels(alone)), f"seed {seed}: a concurrent image differs from a lone one"
    assert len({pixels(image).tobytes() for image in together.values()}) == len(calls)
