"""A1111 infotext in every PNG we write, and `generate --from-png` from ours, A1111's and ComfyUI's PNGs.

`a1111_fields` below is a reader written from A1111's documented format (wiki "PNG info" / infotext):
prompt lines, an optional "Negative prompt:" part, and a last line of `Key: value` pairs split on ", "
outside double quotes, quoted values being JSON strings.
"""
import hashlib
import json
import re
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from latent_diffusion.apps.cli import main
from latent_diffusion.diffusion.samplers import SAMPLER_NAMES
from latent_diffusion.formats.comfyui import COMFY_SAMPLERS
from latent_diffusion.formats.infotext import A1111_SAMPLERS, format_infotext
from latent_diffusion.settings import GenerationSettings

DOCS = Path(__file__).resolve().parents[1] / "docs"


def a1111_fields(text):
    """(prompt, negative prompt, {key: value}) the way A1111's documented format reads."""
    lines = text.split("\n")
    settings_line = lines.pop()
    fields, key, value, quoted = {}, "", "", False
    for char in settings_line + ",":
        if char == '"' and not value.endswith("\\"):
            quoted = not quoted
        if char == "," and not quoted:
            name, _, raw = (key + value).partition(": ")
            fields[name.strip()] = json.loads(raw) if raw.startswith('"') else raw
            key, value = "", ""
        else:
            value += char
    body = "\n".join(lines)
    prompt, _, negative = body.partition("\nNegative prompt: ")
    if body.startswith("Negative prompt: "):
        prompt, negative = "", body[len("Negative prompt: "):]
    return prompt, negative, fields


def generate(folder, out, *extra, prompt=("a (red) circle\nabove a blue square",)):
    return main(["generate", *prompt, "-o", str(out), "--model", str(folder), "--steps", "3", "--quiet", *extra])


def test_generate_writes_a1111_parameters(sd_folder, tmp_path):
    out = tmp_path / "out.png"
    assert generate(sd_folder, out, "--seed", "7", "--sampler", "dpm++", "--sigma-schedule", "karras",
                    "--guidance", "4", "--clip-skip", "1", "--negative-prompt", "blurry, ugly") == 0
    text = Image.open(out).text
    prompt, negative, fields = a1111_fields(text["parameters"])
    assert prompt == "a (red) circle\nabove a blue square" and negative == "blurry, ugly"
    assert fields == {"Steps": "3", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "4", "Seed": "7",
                      "Size": "32x32", "Model": str(sd_folder), "Clip skip": "2"}
    assert text["seed"] == "7" and text["prompt"] == prompt  # our own keys stay


def test_img2img_records_denoising_strength_and_no_negative_line(sd_folder, tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(init)
    assert generate(sd_folder, tmp_path / "edit.png", "--image", str(init), "--strength", "0.5",
                    "--sampler", "euler_a") == 0
    parameters = Image.open(tmp_path / "edit.png").text["parameters"]
    assert "Negative prompt" not in parameters
    fields = a1111_fields(parameters)[2]
    assert fields["Denoising strength"] == "0.5" and fields["Sampler"] == "Euler a"
    assert fields["Schedule type"] == "Automatic" and "Clip skip" not in fields


def test_model_hash_and_lora_hashes_of_single_files(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights" * 100)
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"lora" * 10)
    settings = GenerationSettings(prompt="a, b: c", steps=20, guidance=7.0, sampler="ddim", seed=1, height=512,
                                  width=768, model=str(weights), loras=(f"{lora}:0.8",), eta=0.5)
    prompt, negative, fields = a1111_fields(format_infotext(settings))
    assert prompt == "a, b: c" and negative == ""
    assert fields["Model hash"] == hashlib.sha256(weights.read_bytes()).hexdigest()[:10]
    assert fields["Model"] == "model" and fields["Size"] == "768x512" and fields["CFG scale"] == "7"
    assert fields["Lora hashes"] == f"style: {hashlib.sha256(lora.read_bytes()).hexdigest()[:12]}"
    assert fields["Eta DDIM"] == "0.5" and "Model hash" not in a1111_fields(
        format_infotext(settings.replace(model="some/hub-id")))[2]


def test_from_png_remakes_our_png_byte_for_byte(sd_folder, tmp_path):
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    assert generate(sd_folder, first, "--seed", "5", "--sampler", "ddim", "--negative-prompt", "[blurry]",
                    "--clip-skip", "1", "--guidance", "3.5", "--prompt-syntax", "plain") == 0
    assert main(["generate", "--from-png", str(first), "-o", str(again), "--quiet"]) == 0
    assert again.read_bytes() == first.read_bytes()
    assert main(["generate", "--from-png", str(first), "-o", str(tmp_path / "seed0.png"), "--seed", "0",
                 "--quiet"]) == 0
    changed = Image.open(tmp_path / "seed0.png").text
    assert changed["seed"] == "0" and changed["sampler"] == "ddim" and changed["prompt_syntax"] == "plain"


def _png_with_text(path, **chunks):
    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


A1111_TEXT = ("a (red:1.2) circle, BREAK a blue square\nNegative prompt: blurry\n"
              "Steps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 123, Size: 32x32, "
              'Model hash: 0123456789, Model: sd15, Clip skip: 2, Lora hashes: "a: 1, b: 2", Version: v1.10.0')


def test_from_png_reads_a1111_infotext_setting_for_setting(sd_folder, tmp_path):
    source = _png_with_text(tmp_path / "a1111.png", parameters=A1111_TEXT)
    out = tmp_path / "remade.png"
    assert main(["generate", "--from-png", str(source), "-o", str(out), "--model", str(sd_folder), "--quiet"]) == 0
    meta = Image.open(out).text
    assert meta["prompt"] == "a (red:1.2) circle, BREAK a blue square" and meta["negative_prompt"] == "blurry"
    assert (meta["steps"], meta["sampler"], meta["sigma_schedule"], meta["guidance"], meta["seed"]) == (
        "4", "dpm++", "karras", "6.5", "123")
    assert (meta["height"], meta["width"], meta["clip_skip"]) == ("32", "32", "1")
    assert a1111_fields(meta["parameters"])[2]["Sampler"] == "DPM++ 2M"


@pytest.mark.parametrize("sampler, ours", [("DPM++ 2M Karras", ("dpm++", "karras")), ("Euler a", ("euler_a", None))])
def test_old_style_sampler_names(sampler, ours):
    from latent_diffusion.formats.infotext import settings_from_infotext

    s = settings_from_infotext(f"p\nSteps: 3, Sampler: {sampler}, CFG scale: 7, Seed: 1, Size: 64x32")
    assert (s.sampler, s.sigma_schedule, s.width, s.height, s.clip_skip) == (*ours, 64, 32, None)


def comfy_graph(**changes):
    graph = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["10", 0]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["10", 0]}},
        "10": {"class_type": "CLIPSetLastLayer", "inputs": {"stop_at_clip_layer": -2, "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 9, "steps": 3, "cfg": 5.0, "sampler_name": "dpmpp_2m",
                                                   "scheduler": "karras", "denoise": 1.0, "model": ["4", 0],
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "ComfyUI"}},
    }
    graph.update(changes)
    return json.dumps(graph)


def test_from_png_reads_a_plain_comfyui_graph(sd_folder, tmp_path):
    source = _png_with_text(tmp_path / "comfy.png", prompt=comfy_graph(), workflow="{}")
    out = tmp_path / "remade.png"
    assert main(["generate", "--from-png", str(source), "-o", str(out), "--model", str(sd_folder), "--quiet"]) == 0
    meta = Image.open(out).text
    assert (meta["prompt"], meta["negative_prompt"], meta["seed"], meta["steps"], meta["guidance"]) == (
        "a red circle", "blurry", "9", "3", "5.0")
    assert (meta["sampler"], meta["sigma_schedule"], meta["clip_skip"], meta["width"]) == ("dpm++", "karras", "1", "32")


@pytest.mark.parametrize("changes, refused", [
    ({"11": {"class_type": "LoraLoader", "inputs": {}}}, "ComfyUI graph with LoraLoader refused"),
    ({"5": {"class_type": "VAEEncode", "inputs": {}}}, "ComfyUI graph with VAEEncode refused"),
    ({"6": {"class_type": "CLIPTextEncode", "inputs": {"text": ["12", 0]}}}, "positive prompt refused"),
])
def test_from_png_refuses_other_comfyui_graphs_in_one_line(tmp_path, capsys, changes, refused):
    source = _png_with_text(tmp_path / "comfy.png", prompt=comfy_graph(**changes))
    assert main(["generate", "--from-png", str(source), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert refused in err and "\n" not in err and err.startswith("latent-diffusion generate: error: --from-png")


def test_from_png_without_settings_and_generate_without_prompt(tmp_path, capsys):
    assert main(["generate", "--from-png", str(_png_with_text(tmp_path / "bare.png", title="x"))]) == 2
    assert "no generation settings" in capsys.readouterr().err
    assert main(["generate", "-o", str(tmp_path / "x.png")]) == 2
    assert "prompt: give a prompt, or --from-png" in capsys.readouterr().err


def test_reuse_settings_reads_a1111_and_comfyui(tmp_path):
    from latent_diffusion.apps.webui import form_values

    assert form_values({"parameters": A1111_TEXT}) == [
        "a (red:1.2) circle, BREAK a blue square", "blurry", "dpm++", 4, 6.5, 123, 32, 32]
    assert form_values({"prompt": comfy_graph()}) == ["a red circle", "blurry", "dpm++", 3, 5.0, 9, 32, 32]


def test_sampler_docs_table_is_the_code_table():
    """docs/samplers.md's A1111 and ComfyUI columns are A1111_SAMPLERS and COMFY_SAMPLERS."""
    rows = [line.split("|")[1:-1] for line in (DOCS / "samplers.md").read_text().splitlines()
            if re.match(r"\| `\"", line)]
    table = {cells[0].strip().strip('`"'): (cells[2].strip(), cells[3].strip().strip("`")) for cells in rows}
    comfy = {ours: name for name, ours in COMFY_SAMPLERS.items()}
    assert table == {name: (A1111_SAMPLERS[name], comfy[name]) for name in SAMPLER_NAMES}


def test_web_ui_prompt_syntax_field_and_infotext(sd_folder, tmp_path):
    """The page has the prompt-syntax choice (not an API parameter: the API keeps its own and reads "a1111");
    its PNGs carry the infotext and record a plain syntax."""
    pytest.importorskip("gradio")
    from latent_diffusion.apps.webui import Studio, build_app
    from latent_diffusion.pipelines import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(str(sd_folder))
    pipe.set_progress_bar_config(disable=True)
    studio = Studio(pipe, str(sd_folder), tmp_path / "served")
    demo = build_app(studio)
    radio = next(c for c in demo.config["components"] if str(c["props"].get("label", "")).startswith("Prompt syntax"))
    assert [value for _, value in radio["props"]["choices"]] == ["a1111", "plain"]
    params = demo.get_api_info()["named_endpoints"]["/generate"]["parameters"]
    assert "prompt_syntax" not in [p["parameter_name"] for p in params]
    [png] = studio.generate("a (red) circle", steps=2, seed=3, prompt_syntax="plain")
    text = Image.open(png).text
    assert text["prompt_syntax"] == "plain" and a1111_fields(text["parameters"])[2]["Seed"] == "3"
