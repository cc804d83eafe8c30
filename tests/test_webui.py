"""`latent-diffusion serve`: the page's generation (same PNGs as the CLI), its API, concurrency, errors, a browser.

The fast tests drive `latent_diffusion.apps.webui` in-process on the tiny test model. The served tests start the real
command (`latent-diffusion serve` on the embedded default model, 127.0.0.1 and a free port) once per module and
talk to it with gradio_client and headless chromium.
"""
import concurrent.futures
import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from latent_diffusion.apps.cli import main
from latent_diffusion.formats.assets import generation_default_path
from latent_diffusion.formats.pngmeta import read_png_metadata, save_png
from latent_diffusion.apps.webui import RANDOM_SEED, Studio, form_values, page_message
from latent_diffusion.settings import GenerationSettings

CLI_ARGS = ["--steps", "3", "--seed", "7", "--sampler", "ddim", "--guidance", "4", "--quiet"]
PROMPT = "a red circle above a blue square"
DEFAULTS = json.loads((generation_default_path() / "generation_config.json").read_text())  # what `serve` loads


@pytest.fixture(scope="module")
def tiny_pipe(sd_folder):
    from latent_diffusion.pipelines import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(str(sd_folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def studio(tiny_pipe, sd_folder, tmp_path):
    return Studio(tiny_pipe, str(sd_folder), tmp_path / "served")


# ----------------------------------------------------------------- in-process: the page's generation


def test_cli_and_page_write_identical_pngs(studio, sd_folder, tmp_path):
    cli_png = tmp_path / "cli.png"
    assert main(["generate", PROMPT, "-o", str(cli_png), "--model", str(sd_folder), *CLI_ARGS]) == 0
    [page_png] = studio.generate(PROMPT, "", "ddim", 3, 4.0, 7, None, None, 1)
    assert page_png.read_bytes() == cli_png.read_bytes()
    assert read_png_metadata(page_png)["seed"] == "7"


def test_clip_skip_page_png_equals_the_cli_png(studio, sd_folder, tmp_path):
    cli_png = tmp_path / "cli.png"
    assert main(["generate", PROMPT, "-o", str(cli_png), "--model", str(sd_folder), "--clip-skip", "1", *CLI_ARGS]) == 0
    [page_png] = studio.generate(PROMPT, "", "ddim", 3, 4.0, 7, None, None, 1, clip_skip=1)
    assert page_png.read_bytes() == cli_png.read_bytes()
    [off] = studio.generate(PROMPT, "", "ddim", 3, 4.0, 7, None, None, 1, clip_skip=0)  # the page's 0: off
    assert "clip_skip" not in read_png_metadata(off)
    with pytest.raises(ValueError, match="clip_skip must be"):
        studio.generate(PROMPT, steps=2, clip_skip=9)


def test_images_of_a_request_use_seed_plus_k_and_random_seeds_are_recorded(studio):
    batch = studio.generate(PROMPT, steps=2, seed=10, num_images=2)
    assert [read_png_metadata(p)["seed"] for p in batch] == ["10", "11"]
    [drawn] = studio.generate(PROMPT, steps=2, seed=RANDOM_SEED)
    seed = int(read_png_metadata(drawn)["seed"])
    [again] = studio.generate(PROMPT, steps=2, seed=seed)
    assert np.array_equal(np.asarray(Image.open(drawn)), np.asarray(Image.open(again)))


def test_progress_follows_every_denoising_step(studio):
    seen = []
    studio.generate(PROMPT, steps=4, seed=0, on_step=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


@pytest.mark.parametrize("settings, named", [
    ({"steps": -3}, "steps: num_inference_steps"),
    ({"width": 30}, "width must be a positive multiple"),
    ({"sampler": "nope"}, "sampler must be one of"),
    ({"seed": -5}, "seed must be an integer >= 0"),
    ({"num_images": 0}, "num_images must be an integer >= 1"),
])
def test_bad_settings_are_errors_naming_the_field(studio, settings, named):
    with pytest.raises(ValueError) as error:
        studio.generate(PROMPT, **settings)
    assert page_message(error.value).startswith(named)


def test_generation_metadata_fills_the_model_defaults(tiny_pipe):
    meta = GenerationSettings(prompt="p", seed=3).resolved(tiny_pipe).png_metadata()
    d = tiny_pipe.generation_defaults
    assert (meta["sampler"], meta["steps"], meta["guidance"]) == (d["sampler"], str(d["num_inference_steps"]),
                                                                  str(d["guidance_scale"]))
    assert (meta["height"], meta["width"]) == tuple(map(str, tiny_pipe.resolve_size(None, None)))
    assert (meta["negative_prompt"], meta["eta"], meta["model"]) == ("", "0.0", "embedded default")
    with pytest.raises(ValueError, match="height"):
        GenerationSettings(prompt="p", seed=3, height=30).resolved(tiny_pipe)


def test_save_png_leaves_only_the_png(tmp_path):
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "sub" / "x.png", {"prompt": "p"})
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]
    assert read_png_metadata(path) == {"prompt": "p"}


def test_reuse_settings_reads_a_png_back_into_the_form(studio):
    [png] = studio.generate(PROMPT, "blurry", "ddpm", 2, 3.5, 42, 32, 32)
    assert form_values(read_png_metadata(png)) == [PROMPT, "blurry", "ddpm", 2, 3.5, 42, 32, 32]
    with pytest.raises(ValueError, match="no generation settings"):
        form_values({"prompt": "only this"})


def test_generate_and_the_webui_module_never_import_gradio():
    code = ("import sys, latent_diffusion.apps.cli, latent_diffusion.apps.webui; "
            "sys.exit('gradio' in sys.modules or 'gradio_client' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=300).returncode == 0


# ----------------------------------------------------------------- in-process: the page and its API description


def api_parameters(demo, endpoint="/generate"):
    return {p["parameter_name"]: p for p in demo.get_api_info()["named_endpoints"][endpoint]["parameters"]}


def test_page_offers_every_sampler_and_the_model_defaults(studio, tiny_pipe):
    pytest.importorskip("gradio")
    from latent_diffusion.diffusion.samplers import SAMPLER_NAMES
    from latent_diffusion.apps.webui import build_app

    demo = build_app(studio)
    params = api_parameters(demo)
    assert list(params)[:9] == ["prompt", "negative_prompt", "sampler", "steps", "guidance", "seed", "width", "height",
                                "num_images"]
    assert set(list(params)[9:]) <= {"clip_skip", "image", "strength", "mask_image"}  # the pipeline takes them
    assert params["clip_skip"]["parameter_has_default"]
    d = tiny_pipe.generation_defaults
    assert [params[k]["parameter_default"] for k in ("sampler", "steps", "guidance", "seed")] == [
        d["sampler"], d["num_inference_steps"], d["guidance_scale"], RANDOM_SEED]
    dropdown = next(c for c in demo.config["components"] if c["props"].get("label") == "Sampler")
    assert [value for _, value in dropdown["props"]["choices"]] == list(SAMPLER_NAMES)
    # the pipeline takes image, strength and mask_image now: the page offers an image and a mask brush
    assert {"image", "imageeditor"} <= {c["type"] for c in demo.config["components"]}
    assert all(params[k]["parameter_has_default"] for k in ("image", "strength", "mask_image"))


class ImageInputsPipe:
    """The tiny pipeline seen through a __call__ that also takes img2img and inpainting inputs (recorded)."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []
        self.generation_defaults, self.resolve_size = pipe.generation_defaults, pipe.resolve_size

    def __call__(self, prompt, *, image=None, strength=0.8, mask_image=None, **kwargs):
        self.calls.append({"image": image, "strength": strength, "mask_image": mask_image})
        return self.pipe(prompt, **kwargs)


def test_page_offers_image_inputs_when_the_pipeline_takes_them(tiny_pipe, tmp_path):
    pytest.importorskip("gradio")
    from latent_diffusion.apps.webui import build_app

    pipe = ImageInputsPipe(tiny_pipe)
    assert "image" in inspect.signature(pipe.__call__).parameters
    studio = Studio(pipe, None, tmp_path)
    demo = build_app(studio)
    assert {"image", "strength", "mask_image"} <= set(api_parameters(demo))
    assert {"image", "imageeditor"} <= {c["type"] for c in demo.config["components"]}
    init = Image.new("RGB", (32, 32), "white")
    studio.generate(PROMPT, steps=2, seed=0, image=init, strength=0.5)
    assert pipe.calls[-1] == {"image": init, "strength": 0.5, "mask_image": None}


# ----------------------------------------------------------------- LoRA adapters behind the page (serve --lora)


@pytest.fixture(scope="module")
def lora_file(sd_folder, tmp_path_factory):
    from test_lora_loading import make_lora

    return str(make_lora(sd_folder, tmp_path_factory.mktemp("webui-lora")))


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_lora_page_matches_the_cli_and_its_strength_scales_the_adapter(sd_folder, lora_file, tmp_path):
    from latent_diffusion.apps.cli import _load_loras
    from latent_diffusion.pipelines import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(str(sd_folder))
    pipe.set_progress_bar_config(disable=True)
    spec = f"{lora_file}:0.8"
    studio = Studio(pipe, str(sd_folder), tmp_path / "served", _load_loras(pipe, [spec]))
    cli_png, base_png = tmp_path / "cli.png", tmp_path / "base.png"
    assert main(["generate", PROMPT, "-o", str(cli_png), "--model", str(sd_folder), "--lora", spec, *CLI_ARGS]) == 0
    assert main(["generate", PROMPT, "-o", str(base_png), "--model", str(sd_folder), *CLI_ARGS]) == 0
    [page] = studio.generate(PROMPT, "", "ddim", 3, 4.0, 7, None, None, 1)
    assert page.read_bytes() == cli_png.read_bytes()  # the same adapter, scale and metadata as the CLI
    assert np.abs(pixels(page) - pixels(base_png)).max() > 5  # the adapter matters
    [off] = studio.generate(PROMPT, "", "ddim", 3, 4.0, 7, None, None, 1, lora_scale=0.0)
    assert np.abs(pixels(off) - pixels(base_png)).max() <= 1  # strength 0: the base model
    assert read_png_metadata(off)["lora"] == f"{lora_file}:0"
    [half] = studio.generate(PROMPT, "", "ddim", 3, 4.0, 7, None, None, 1, lora_scale=0.5)
    assert read_png_metadata(half)["lora"] == f"{lora_file}:0.4"
    [again] = studio.generate(PROMPT, "", "ddim", 3, 4.0, 7, None, None, 1, lora_scale=1.0)
    assert np.array_equal(pixels(again), pixels(page))  # back to the loaded scale
    with pytest.raises(ValueError, match="lora_scale"):
        studio.generate(PROMPT, steps=2, lora_scale=5.0)
    pytest.importorskip("gradio")
    from latent_diffusion.apps.webui import build_app

    params = api_parameters(build_app(studio))
    assert params["lora_scale"]["parameter_has_default"]


def test_lora_scale_without_adapters_is_an_error_naming_it(studio):
    with pytest.raises(ValueError, match="lora_scale: no LoRA adapter is loaded"):
        studio.generate(PROMPT, steps=2, lora_scale=0.5)


def test_serve_with_a_missing_lora_exits_2_naming_the_flag(tmp_path, capsys):
    pytest.importorskip("gradio")
    assert main(["serve", "--no-example", "--lora", str(tmp_path / "missing.safetensors")]) == 2
    assert "--lora" in capsys.readouterr().err


# ----------------------------------------------------------------- the served app: API, concurrency, browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"latent-diffusion serve exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + "gradio_api/info", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"no server at {url} after {timeout} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`latent-diffusion serve` on the embedded default model at a free 127.0.0.1 port: (url, output folder)."""
    pytest.importorskip("gradio")
    pytest.importorskip("gradio_client")
    out = tmp_path_factory.mktemp("served")
    port = free_port()
    log = open(out / "server.log", "w")
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    process = subprocess.Popen([sys.executable, "-m", "latent_diffusion.apps.cli", "serve", "--port", str(port),
                                "--output-dir", str(out / "png"), "--max-queue", "32"],
                               stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_up(url, process)
        yield url, out
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server[0], verbose=False)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.slow
def test_api_image_is_what_the_prompt_asks_for(client):
    from latent_diffusion.shapes.scorer import judge

    [png] = client.predict(prompt="a red circle", seed=1, api_name="/generate")
    verdict = judge(png, "a red circle")
    assert verdict.correct, verdict.reasons
    meta = read_png_metadata(png)
    assert (meta["prompt"], meta["seed"], meta["sampler"], meta["model"]) == ("a red circle", "1", DEFAULTS["sampler"],
                                                                             "embedded default")


@pytest.mark.slow
def test_concurrent_requests_each_get_their_own_seed(client):
    seeds = list(range(100, 108))
    with concurrent.futures.ThreadPoolExecutor(len(seeds)) as pool:
        jobs = [pool.submit(client.predict, prompt=PROMPT, seed=s, steps=6, api_name="/generate") for s in seeds]
        together = [job.result(timeout=300) for job in jobs]
    for seed, [png] in zip(seeds, together):
        assert read_png_metadata(png)["seed"] == str(seed)
        [alone] = client.predict(prompt=PROMPT, seed=seed, steps=6, api_name="/generate")
        assert np.array_equal(pixels(png), pixels(alone)), f"seed {seed}: a concurrent image differs from a lone one"
    assert len({pixels(png).tobytes() for [png] in together}) == len(seeds)


@pytest.mark.slow
@pytest.mark.parametrize("settings, named", [
    ({"steps": -3}, "steps"), ({"width": 60}, "width"), ({"sampler": "nope"}, "sampler")])
def test_bad_request_is_refused_and_the_server_keeps_serving(client, settings, named):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as error:
        client.predict(prompt=PROMPT, seed=0, api_name="/generate", **settings)
    assert str(error.value).startswith(named), str(error.value)
    [png] = client.predict(prompt=PROMPT, seed=0, steps=2, api_name="/generate")
    assert read_png_metadata(png)["steps"] == "2"


@pytest.mark.slow
def test_reuse_settings_endpoint_reads_a_png(client):
    from gradio_client import handle_file

    [png] = client.predict(prompt="a blue square", negative_prompt="red", seed=5, steps=3, api_name="/generate")
    form = client.predict(handle_file(png), api_name="/reuse_settings")
    assert list(form) == ["a blue square", "red", DEFAULTS["sampler"], 3, DEFAULTS["guidance_scale"], 5, 64, 64]


def chromium(*args, timeout=120):
    return subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", *args], capture_output=True, text=True, timeout=timeout)


def colour_share(image: np.ndarray, colour, tolerance: int = 40) -> float:
    """Fraction of the pixels within `tolerance` (each channel) of `colour`."""
    return float((np.abs(image.astype(int) - np.array(colour)).max(axis=-1) <= tolerance).mean())


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (CI installs it)")
def test_browser_shows_the_form_and_a_generated_image(server, tmp_path):
    from latent_diffusion.shapes.world import COLOURS

    url, _ = server
    flags = [f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1000", "--virtual-time-budget=20000"]
    dom = chromium(*flags, "--dump-dom", url).stdout
    for text in ("Prompt", "Negative prompt", "Sampler", "Steps", "Guidance", "Seed", "Width", "Height",
                 "Generate", "Results", "Reuse settings"):
        assert text in dom, f"{text!r} is not in the page"
    assert "seed0.png" in dom  # the gallery shows the example PNG, generated at start with seed 0
    shot = tmp_path / "page.png"
    chromium(*flags, f"--screenshot={shot}", url)
    page = np.asarray(Image.open(shot).convert("RGB"))
    assert colour_share(page, (255, 255, 255)) < 0.98, "the screenshot is blank"
    # the example "a red circle above a blue square", scaled up in the gallery
    assert colour_share(page, COLOURS["red"]) > 0.0005 and colour_share(page, COLOURS["blue"]) > 0.0005
