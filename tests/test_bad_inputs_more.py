"""Issue 30 item 7: more bad and hostile inputs, over the CLI, training, the web UI and the HTTP APIs.

Adds to the tables of `tests/test_bad_inputs.py`: pickles renamed `.safetensors`, decompression bombs, device
files, folders and FIFOs where pictures belong, sizes whose memory cannot fit, path tricks, devices this machine
lacks, hostile request bodies (JSON nested 100000 deep, 1 MB prompts, 2^40-pixel sizes, seeds past 2^64) and a
flood of concurrent requests against a full queue. Each case is one line (or one HTTP error) naming the argument,
never a traceback, and the server answers the next request.
"""
import base64
import concurrent.futures
import io
import os
import struct
import time
import zlib

import pytest
import torch
from PIL import Image

from test_bad_inputs import data_dir, generate, train_cli  # noqa: F401  (data_dir: fixture)

# ----------------------------------------------------------------------------- hostile files


def pickle_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A 1×1 PNG whose header claims width × height pixels (a decompression bomb's header)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    real = bytearray(buffer.getvalue())
    real[16:24] = struct.pack(">II", width, height)  # IHDR's width and height, then its CRC again
    real[29:33] = struct.pack(">I", zlib.crc32(bytes(real[12:29])))
    return bytes(real)


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    """A folder of hostile files, the working directory; a fixed memory budget so size refusals do not depend
    on the machine."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LATENT_DIFFUSION_MEMORY_GIB", "8")
    (tmp_path / "pickle.safetensors").write_bytes(pickle_bytes())
    (tmp_path / "bomb.png").write_bytes(bomb_png(100_000, 100_000))
    (tmp_path / "fake.png").write_bytes(b"\xff\xd8\xff" + b"\0" * 100)  # a JPEG start and nothing else
    Image.new("RGB", (32, 32)).save(tmp_path / "ok.png")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "lora_folder.safetensors").mkdir()
    os.mkfifo(tmp_path / "fifo.png")
    return tmp_path


HOSTILE_GENERATE_CASES = [
    (["--model", "pickle.safetensors"], "--model 'pickle.safetensors': pickle.safetensors is truncated or not a safetensors file"),
    (["--vae", "pickle.safetensors"], "--vae 'pickle.safetensors': pickle.safetensors is truncated or not a safetensors"),
    (["--lora", "pickle.safetensors"], "--lora 'pickle.safetensors': pickle.safetensors is truncated or not a safetensors"),
    (["--embedding", "pickle.safetensors"], "--embedding 'pickle.safetensors': pickle.safetensors is truncated or not"),
    (["--image", "bomb.png"], "image 'bomb.png' is too large to decode"),
    (["--image", "ok.png", "--mask", "bomb.png"], "mask 'bomb.png' is too large to decode"),
    (["--image", "fake.png"], "image 'fake.png' is not a readable image"),
    (["--image", "folder.png"], "--image: no such file 'folder.png'"),
    (["--image", "fifo.png"], "--image: no such file 'fifo.png'"),  # a FIFO is never opened: it would block
    (["--image", "/dev/zero"], "--image: no such file '/dev/zero'"),  # a device is never read: it never ends
    (["--lora", "lora_folder.safetensors"], "--lora 'lora_folder.safetensors': LoRA folder"),
    (["--height", "8192", "--width", "8192"], "--height × --width (8192×8192) needs about 43.8 GiB for this model, more than the 8 GiB"),
    (["--n", "256", "--height", "4096", "--width", "4096"], "(4096×4096) needs about 2.8e+03 GiB for this model, more than the 8 GiB"),
    (["--model", "/etc/passwd"], "--model '/etc/passwd' is a file but not a .safetensors checkpoint"),
    (["--vae", "/etc/passwd"], "--vae '/etc/passwd' is a file but not a .safetensors checkpoint"),
    (["--lora", "/etc/passwd"], "--lora '/etc/passwd': LoRA file '/etc/passwd' is not .safetensors"),
    (["--embedding", "/etc/passwd"], "--embedding '/etc/passwd' must be a .safetensors file"),
    (["--model", "/proc/self"], "--model '/proc/self' is missing ['model_index.json'"),
    (["--model", "x" * 5000], "cannot be opened (File name too long)"),
    (["--device", "nope"], "--device must be a torch device such as cpu, cuda, cuda:1 or mps, got 'nope'"),
    (["--clip-skip", "1000"], "clip_skip must be an integer from 1 to 2"),
    (["--clip-skip", "-1"], "clip_skip must be an integer from 1 to 2"),
    (["--seed", "99999999999999999999999"], "--seed must be an integer >= 0 and <= 18446744073709551615"),
    (["--seed", str(2 ** 64 - 1), "--n", "2"],  # image k uses seed + k: the second would be 2^64
     "--seed must be an integer >= 0 and <= 18446744073709551614, got 18446744073709551615"),
]


@pytest.mark.parametrize("flags, message", HOSTILE_GENERATE_CASES, ids=[" ".join(c[0])[:40] for c in HOSTILE_GENERATE_CASES])
def test_generate_hostile_inputs(sd_folder, hostile, capsys, flags, message):
    assert generate("--steps", "1", *flags, model=None if "--model" in flags else sd_folder, tmp_path=hostile) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("latent-diffusion generate: error: ") and message in last and "Traceback" not in err
    assert not (hostile / "x.png").exists()


@pytest.mark.parametrize("output", ["/proc/x.png", "/proc/self/x.png"])
def test_generate_output_where_no_file_can_be_created_names_the_flag(sd_folder, tmp_path, capsys, output):
    """/proc passes os.access for root; a file made and removed there up front says no, before the model loads."""
    assert generate("--steps", "1", model=sd_folder, output=output) == 2
    err = capsys.readouterr().err
    folder = os.path.dirname(output)
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"latent-diffusion generate: error: -o/--output {output!r}: folder {folder!r} is not "
                           "writable"), err
    if output == "/proc/x.png":  # os.access says yes here; the file made up front says no
        assert last.endswith("(no file can be created there: No such file or directory)")
    assert "Traceback" not in err


@pytest.mark.parametrize("flags, message", [
    (["--num-prompts", "1000000000"], "--num-prompts must be an integer >= 1 and <= 100000, got 1000000000"),
    (["--seeds", "1000000000"], "--seeds must be an integer >= 1 and <= 10000, got 1000000000"),
    (["--batch-size", "100000"], "--batch-size must be an integer >= 1 and <= 256, got 100000"),
])
def test_eval_counts_are_bounded_before_their_lists_are_built(sd_folder, tmp_path, capsys, flags, message):
    from latent_diffusion.apps.cli import main as cli_main

    assert cli_main(["eval", "--model", str(sd_folder), "--out", str(tmp_path / "eval"), "--quiet", *flags]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"latent-diffusion eval: error: {message}" and "Traceback" not in err


def test_generate_refuses_a_cuda_device_this_machine_lacks(sd_folder, tmp_path, capsys):
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert generate("--device", "cuda:7", model=sd_folder, tmp_path=tmp_path) == 2
    assert "error: --device 'cuda:7': this machine has" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the training script


@pytest.mark.parametrize("kind, flags, message", [
    ("pickle_model", [], "--pretrained_model_name_or_path '"),
    ("missing_data", [], "--train_data_dir '"),
    ("file_as_data", [], "--train_data_dir '"),
    ("checkpoint_of_pickles", ["--resume_from_checkpoint"], "is not a complete checkpoint folder"),
    ("ok", ["--lora_rank", "0"], "--lora_rank must be >= 1, got 0"),
])
def test_training_hostile_inputs(sd_folder, data_dir, tmp_path, capsys, kind, flags, message):  # noqa: F811
    model, data = sd_folder, data_dir
    (tmp_path / "pickle.safetensors").write_bytes(pickle_bytes())
    if kind == "pickle_model":
        model = tmp_path / "pickle.safetensors"
    elif kind == "missing_data":
        data = tmp_path / "no" / "data"
    elif kind == "file_as_data":
        data = tmp_path / "pickle.safetensors"
    elif kind == "checkpoint_of_pickles":  # a folder holding a pickle renamed model.safetensors
        (tmp_path / "ck").mkdir()
        (tmp_path / "ck" / "model.safetensors").write_bytes(pickle_bytes())
        flags = [*flags, str(tmp_path / "ck")]
    assert train_cli(model, data, tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# ----------------------------------------------------------------------------- the web UI (the page's generate)


@pytest.fixture(scope="module")
def studio(sd_folder, tmp_path_factory):
    from latent_diffusion.apps.webui import Studio
    from latent_diffusion.pipelines import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(str(sd_folder))
    pipe.set_progress_bar_config(disable=True)
    return Studio(pipe, str(sd_folder), tmp_path_factory.mktemp("page"))


@pytest.mark.parametrize("settings, named", [
    ({"seed": 2 ** 64}, "seed must be an integer >= 0 and <= 18446744073709551615"),
    ({"seed": "7"}, "seed must be an integer >= 0"),
    ({"seed": 2 ** 64 - 1, "num_images": 2},  # image k uses seed + k: the second image's seed would overflow
     "seed must be an integer >= 0 and <= 18446744073709551614 (image k of 2 uses seed + k)"),
    ({"num_images": 1000}, "num_images must be an integer >= 1 and <= 8"),
    ({"lora_scale": 0.5}, "lora_scale: no LoRA adapter is loaded"),
    ({"prompt_syntax": "comfy"}, "prompt_syntax must be one of"),
    ({"eta": float("nan")}, "eta must be a finite number >= 0"),
    ({"height": 100000}, "height must be a positive multiple of"),
    ({"control_image": "x.png"}, "control_image: not a setting; the image inputs are"),
])
def test_page_bad_settings_name_the_field(studio, settings, named):
    from latent_diffusion.apps.webui import page_message

    with pytest.raises(ValueError) as error:
        studio.generate("a red circle", steps=1, **settings)
    assert named in page_message(error.value) and "\n" not in page_message(error.value)


# ----------------------------------------------------------------------------- the HTTP APIs


@pytest.fixture(scope="module")
def served(sd_folder, tmp_path_factory):
    pytest.importorskip("gradio")
    from test_http_api import LIMITS, Served

    server = Served(sd_folder, tmp_path_factory.mktemp("hostile-api") / "png", max_queue=1, limits=LIMITS)
    yield server
    server.demo.close()


def txt2img(**payload):
    return {"prompt": "a red circle", "steps": 2, "width": 32, "height": 32, "sampler_name": "DDIM", **payload}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def ok_png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, "PNG")
    return b64(buffer.getvalue())


HOSTILE_API_CASES = [
    ("/sdapi/v1/txt2img", txt2img(width=100000, height=100000), "width: 100000x100000 is 10000000000 pixels, over"),
    ("/sdapi/v1/txt2img", txt2img(width=2 ** 40, height=2 ** 40), "width: 1099511627776x1099511627776 is"),
    ("/sdapi/v1/txt2img", txt2img(n_iter=10 ** 9), "batch_size: 1000000000 images is over this server's limit"),
    ("/sdapi/v1/txt2img", txt2img(steps=-1), "steps: num_inference_steps must be an integer >= 1, got -1"),
    ("/sdapi/v1/txt2img", txt2img(prompt="x" * 1_000_000), "prompt: must be at most 10000 characters, got 1000000"),
    ("/sdapi/v1/txt2img", txt2img(negative_prompt="x" * 20000), "negative_prompt: must be at most 10000 characters"),
    ("/sdapi/v1/txt2img", txt2img(seed=2 ** 64), "seed: must be an integer >= 0 and <= 18446744073709551615"),
    ("/sdapi/v1/txt2img", txt2img(seed=1.5), "seed: must be int, got 1.5"),
    ("/sdapi/v1/txt2img", txt2img(seed=2 ** 64 - 1, batch_size=2),  # seed + k overflows for the second image
     "seed: must be an integer >= 0 and <= 18446744073709551614 (image k of 2 uses seed + k)"),
    ("/sdapi/v1/txt2img", txt2img(seed=2 ** 64 - 2, batch_size=2, n_iter=2),  # iteration 1's seeds: seed + 2, + 3
     "seed: must be an integer >= 0 and <= 18446744073709551612 (image k of 4 uses seed + k)"),
    ("/sdapi/v1/txt2img", txt2img(cfg_scale="inf"), "cfg_scale: must be float, got 'inf'"),
    ("/sdapi/v1/txt2img", txt2img(prompt=["a", "b"]), "prompt: must be str"),
    ("/sdapi/v1/txt2img", txt2img(eta=float("nan")), "eta: must be a finite number >= 0, got nan"),
    ("/sdapi/v1/txt2img", txt2img(override_settings={"sd_model_checkpoint": "../../etc/passwd"}),
     "override_settings: '../../etc/passwd' is not a model of this server"),
    ("/sdapi/v1/txt2img", b"[" * 100000 + b"]" * 100000, "the body's JSON is nested too deeply"),
    ("/sdapi/v1/txt2img", b"\xff\xfe\x00garbage", "the body is not JSON"),
    ("/sdapi/v1/img2img", txt2img(init_images=[ok_png()], denoising_strength=float("nan")),
     "denoising_strength: strength must be a finite number >= 0 <= 1, got nan"),
    ("/sdapi/v1/img2img", txt2img(init_images=[b64(pickle_bytes())]), "init_images: is not an image PIL can read"),
    ("/sdapi/v1/img2img", txt2img(init_images=[b64(bomb_png(100_000, 100_000))]), "init_images: "),
    ("/sdapi/v1/img2img", txt2img(init_images=[ok_png()], mask="%%%"), "mask: is not valid base64"),
    ("/sdapi/v1/img2img", txt2img(init_images="notalist"), "init_images: must be list, got 'notalist'"),
    ("/sdapi/v1/options", {"sd_model_checkpoint": "../../../etc/passwd"}, "sd_model_checkpoint: '../../../etc/passwd' is not"),
    ("/v1/images/generations", {"prompt": "x", "size": "0x0"}, "size: height must be a positive multiple of"),
    ("/v1/images/generations", {"prompt": "x", "size": "100000x100000"}, "size: must be WIDTHxHEIGHT"),
    ("/v1/images/generations", {"prompt": "x", "n": 0}, "n: must be >= 1, got 0"),
    ("/v1/images/generations", {"prompt": "x", "n": 3, "seed": 2 ** 64 - 2},
     "seed: must be an integer >= 0 and <= 18446744073709551613 (image k of 3 uses seed + k)"),
    ("/v1/images/generations", {"prompt": "x" * 1_000_000}, "prompt: must be at most 10000 characters"),
    ("/v1/images/generations", {"prompt": 5}, "prompt: must be str, got 5"),
    ("/v1/images/generations", {"prompt": "x", "steps": 0}, "steps: num_inference_steps must be an integer >= 1"),
    ("/v1/images/generations", {"prompt": "x", "model": "../../../etc/passwd"}, "model: '../../../etc/passwd' is not"),
    ("/v1/images/generations", b"[" * 100000 + b"]" * 100000, "the body's JSON is nested too deeply"),
]


@pytest.mark.parametrize("path, payload, named", HOSTILE_API_CASES,
                         ids=[f"{c[0].split('/')[-1]}-{k}" for k, c in enumerate(HOSTILE_API_CASES)])
def test_api_hostile_request_is_400_naming_the_field(served, path, payload, named):
    status, answer = served.request("POST", path, payload)
    message = answer["detail"] if path.startswith("/sdapi") else answer["error"]["message"]
    assert status == 400 and message.startswith(named) and "\n" not in message, (status, message)
    status, answer = served.request("POST", "/sdapi/v1/txt2img", txt2img(seed=1))  # and it keeps serving
    assert status == 200 and len(answer["images"]) == 1


def test_api_edit_with_a_pickle_renamed_png_is_refused(served):
    status, answer = served.request("POST", "/v1/images/edits", b"--x\r\n",
                                    {"Content-Type": "multipart/form-data; boundary=x"})
    assert status == 400 and answer["error"]["message"] == "image: an edit needs an image file"
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{served.port}/v1", api_key="unused", max_retries=0, timeout=120)
    for name in ("pickle.png", "weights.safetensors"):
        with pytest.raises(openai.BadRequestError, match="image: is not an image PIL can read"):
            client.images.edit(image=(name, pickle_bytes(), "image/png"), prompt="x")


def test_api_flood_against_a_full_queue_is_429_and_the_server_keeps_serving(served):
    """40 requests at once while the pipeline is busy: one waits (max_queue=1), every other is the queue's 429."""
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        with served.studio._lock:  # the pipeline is busy: nothing leaves the queue while the flood arrives
            futures = [pool.submit(served.request, "POST", "/sdapi/v1/txt2img", txt2img(seed=k)) for k in range(40)]
            deadline = time.monotonic() + 60
            while sum(f.done() for f in futures) < 39 and time.monotonic() < deadline:
                time.sleep(0.1)
            refused = [f.result() for f in futures if f.done()]
        answers = [f.result(timeout=120) for f in futures]  # the lock is free: the waiting one is answered
    assert len(refused) == 39 and all(status == 429 and body["detail"].startswith("the queue is full (1 requests waiting)")
                                      for status, body in refused), refused
    assert sorted(status for status, _ in answers) == [200] + [429] * 39
    status, answer = served.request("POST", "/sdapi/v1/txt2img", txt2img(seed=1))
    assert status == 200 and len(answer["images"]) == 1


def test_api_request_of_the_largest_allowed_size_finishes_and_one_more_is_refused(served):
    """At the server's limits (LIMITS: 12 steps, 48×48, 4 images) with the highest seed that still fits, a request
    finishes within the time bound, every image with its own seed up to 2^64 − 1; one over each limit is a 400."""
    import json

    from test_http_api import LIMITS

    largest = txt2img(steps=LIMITS["max_steps"], width=48, height=48, batch_size=2, n_iter=2, seed=2 ** 64 - 4)
    start = time.monotonic()
    status, answer = served.request("POST", "/sdapi/v1/txt2img", largest, timeout=120)
    assert status == 200 and len(answer["images"]) == LIMITS["max_images"], answer
    assert time.monotonic() - start < 120
    assert json.loads(answer["info"])["all_seeds"] == [2 ** 64 - 4 + k for k in range(4)]
    for over, field in ((dict(steps=LIMITS["max_steps"] + 1), "steps"), (dict(width=52), "width"),
                        (dict(batch_size=5, n_iter=1), "batch_size"), (dict(seed=2 ** 64 - 3), "seed")):
        status, answer = served.request("POST", "/sdapi/v1/txt2img", {**largest, **over})
        assert status == 400 and answer["detail"].startswith(f"{field}: "), (over, answer)
