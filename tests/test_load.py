"""Issue 30 item 7: a load test of `latent-diffusion serve`'s HTTP APIs with the request limits and a bounded queue.

50 requests from 10 client threads, half A1111 (`/sdapi/v1/txt2img`) and half OpenAI (`/v1/images/generations`),
each with its own seed and prompt, against the tiny test model served in-process with `max_queue=3`. Every
attempt is answered (200) or refused with the queue's 429; a refused client waits and tries again, as real
clients do, so every request is answered in the end. No answer belongs to another request (the PNG's own seed
and prompt, A1111's infotext, and for a sample the pixels of the same request made alone); the server's
resident memory is bounded (measured before and after; the server runs in this process).
"""
import base64
import concurrent.futures
import io
import json
import time

import pytest
from PIL import Image

from conftest import same_pixels
from test_http_api import Served, tiny_txt2img

pytest.importorskip("gradio")

REQUESTS, CLIENTS, MAX_QUEUE = 50, 10, 3
LIMITS = {"max_steps": 12, "max_pixels": 48 * 48, "max_images": 2}
RETRIES, RETRY_WAIT_S = 200, 0.05  # a refused client tries again after a pause: 10 s at most per request
RSS_GROWTH_LIMIT_MIB = 300  # the tiny model's working set is a few MiB; a leak per request would pass this


def rss_mib() -> float:
    """This process's resident memory now (VmRSS), in MiB."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def prompt_of(k: int) -> str:
    return f"a red circle above a blue square, request {k}"


def send(server, k: int) -> dict:
    """Request k (even: A1111, odd: OpenAI) at seed 1000 + k: its status, the returned PNG and A1111's info."""
    seed, prompt = 1000 + k, prompt_of(k)
    if k % 2 == 0:
        status, body = server.request("POST", "/sdapi/v1/txt2img", tiny_txt2img(prompt=prompt, seed=seed))
        images = body.get("images", []) if status == 200 else []
        info = json.loads(body["info"]) if status == 200 else None
    else:
        status, body = server.request("POST", "/v1/images/generations",
                                      {"prompt": prompt, "seed": seed, "steps": 2, "size": "32x32"})
        images = [item["b64_json"] for item in body.get("data", [])] if status == 200 else []
        info = None
    pngs = [Image.open(io.BytesIO(base64.b64decode(image))) for image in images]
    return {"k": k, "seed": seed, "prompt": prompt, "status": status, "body": body, "pngs": pngs, "info": info}


def send_until_answered(server, k: int) -> dict:
    """Request k, sent again after each 429 (each refusal checked to be the queue's); with `refusals` counted."""
    refusals = 0
    for _ in range(RETRIES):
        result = send(server, k)
        if result["status"] != 429:
            return {**result, "refusals": refusals}
        message = result["body"]["detail"] if k % 2 == 0 else result["body"]["error"]["message"]
        assert message.startswith(f"the queue is full ({MAX_QUEUE} requests waiting)"), message
        refusals += 1
        time.sleep(RETRY_WAIT_S)
    raise AssertionError(f"request {k} was refused {RETRIES} times")


def assert_answer_is_its_own(result: dict) -> None:
    """The answer of request k carries request k's seed and prompt, in the PNG and in A1111's infotext."""
    [png] = result["pngs"]
    assert (png.info["seed"], png.info["prompt"]) == (str(result["seed"]), result["prompt"]), result["k"]
    if result["info"] is not None:
        assert result["info"]["all_seeds"] == [result["seed"]]
        infotext = result["info"]["infotexts"][0]
        assert infotext.splitlines()[0] == result["prompt"] and f"Seed: {result['seed']}," in infotext


@pytest.fixture(scope="module")
def loaded_server(sd_folder, tmp_path_factory):
    server = Served(sd_folder, tmp_path_factory.mktemp("load") / "png", max_queue=MAX_QUEUE, limits=LIMITS)
    yield server
    server.demo.close()


def test_fifty_requests_from_ten_clients_are_answered_or_refused_and_never_mixed_up(loaded_server):
    for k in (-2, -1):  # warm-up of both APIs: first-call allocations are not growth
        assert send(loaded_server, k)["status"] == 200
    before = rss_mib()
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as clients:
        results = list(clients.map(lambda k: send_until_answered(loaded_server, k), range(REQUESTS)))
    seconds = time.monotonic() - started
    grown = rss_mib() - before
    refusals = sum(r["refusals"] for r in results)
    print(f"{REQUESTS} requests answered after {refusals} refusals (429) in {seconds:.1f} s; RSS {before:.0f} MiB "
          f"before, {grown:+.0f} MiB after")
    answered = [r for r in results if r["status"] == 200]
    assert len(answered) == REQUESTS, [(r["k"], r["status"], r["body"]) for r in results if r["status"] != 200]
    assert refusals > 0  # 10 clients against a queue of 3: the queue did refuse, with its status
    for result in answered:
        assert_answer_is_its_own(result)
    assert grown < RSS_GROWTH_LIMIT_MIB, f"resident memory grew by {grown:.0f} MiB over {REQUESTS} requests"
    for result in answered[:3]:  # the same request alone gives the same pixels: nothing of another request leaked in
        alone = send(loaded_server, result["k"])
        assert same_pixels(alone["pngs"][0], result["pngs"][0]), result["k"]
    assert loaded_server.request("GET", "/sdapi/v1/progress")[1]["state"]["job_count"] == 0  # nothing left behind
