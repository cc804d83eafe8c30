"""ControlNet in the apps (issue 27's last items): the page's control inputs (`serve --controlnet`), the A1111
API's sd-webui-controlnet units and lists through the real `webuiapi` client, the PNG's ControlNet records
(ours and A1111's infotext lines) and `generate --from-png` reading them back.

Fast tests use the tiny test model with a tiny ControlNet saved as a folder; the slow test serves the embedded
default with the shipped `default-outline` and checks that the API's outline places the object."""
import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from conftest import same_pixels

from latent_diffusion.apps.cli import main
from latent_diffusion.apps.webui import Studio
from latent_diffusion.formats.infotext import PARAMETERS_KEY, format_infotext, settings_from_infotext
from latent_diffusion.formats.pngmeta import read_png_metadata, save_png
from latent_diffusion.settings import ControlUnit, GenerationSettings

PROMPT = "a red circle"
CLI_ARGS = ["--steps", "3", "--seed", "7", "--sampler", "ddim", "--guidance", "4", "--quiet"]


def edges(seed: int = 0, size: int = 32) -> Image.Image:
    """A black picture with a few white lines, as an edge map looks."""
    array = np.zeros((size, size, 3), np.uint8)
    rng = np.random.default_rng(seed)
    array[rng.integers(0, size, 4), :] = 255
    array[:, rng.integers(0, size, 4)] = 255
    return Image.fromarray(array)


def pixels(source) -> np.ndarray:
    image = source if isinstance(source, Image.Image) else Image.open(source)
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def save_controlnet(sd_folder, path, seed):
    """A tiny ControlNet whose control-image encoder is made 30× louder, so that two control images differ
    visibly in 3 steps (tiny_controlnet's alone: < 1/255)."""
    import torch

    from latent_diffusion.pipelines import LatentDiffusionPipeline
    from latent_diffusion.tiny import tiny_controlnet

    net = tiny_controlnet(LatentDiffusionPipeline.from_pretrained(str(sd_folder)).unet, seed=seed)
    with torch.no_grad():
        net.controlnet_cond_embedding.conv_out.weight.mul_(30)
    net.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def nets(sd_folder, tmp_path_factory):
    """Two tiny ControlNet folders for the tiny model."""
    root = tmp_path_factory.mktemp("controlnets")
    return [save_controlnet(sd_folder, root / name, seed) for seed, name in ((1, "edges-a"), (2, "edges-b"))]


def served_pipe(sd_folder, controlnets):
    from latent_diffusion.pipelines import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(str(sd_folder), controlnet=controlnets[0] if len(controlnets) == 1
                                                   else list(controlnets))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def control_studio(sd_folder, nets, tmp_path_factory):
    """The page's Studio over the tiny model served with one ControlNet (default weight 0.8)."""
    return Studio(served_pipe(sd_folder, nets[:1]), str(sd_folder), tmp_path_factory.mktemp("served"),
                  controlnets=[(nets[0], 0.8)])


# ----------------------------------------------------------------- the page (Studio and its Gradio app)


def test_page_control_image_equals_the_cli_and_steers(control_studio, sd_folder, nets, tmp_path):
    control = tmp_path / "edges.png"
    edges().save(control)
    cli_png = tmp_path / "cli.png"
    assert main(["generate", PROMPT, "-o", str(cli_png), "--model", str(sd_folder), "--controlnet", nets[0],
                 "--control-image", str(control), "--control-scale", "0.8", *CLI_ARGS]) == 0
    unit = ControlUnit(nets[0], image=edges(), scale=0.8)
    [page] = control_studio.generate(PROMPT, "", "ddim", 3, 4.0, 7, None, None, 1, controls=[unit])
    assert same_pixels(pixels(page), pixels(cli_png))  # the same net, image and weight as the CLI
    [other] = control_studio.generate(PROMPT, "", "ddim", 3, 4.0, 7, None, None, 1,
                                      controls=[unit.replace(image=edges(seed=5))])
    assert np.abs(pixels(other) - pixels(page)).max() > 3  # the control image matters
    recorded = GenerationSettings.from_png_metadata(read_png_metadata(page))
    assert recorded.controls == (ControlUnit(nets[0], scale=0.8),)  # a picture from the page: no image path
    assert json.loads(read_png_metadata(cli_png)["controlnet"])[0]["image"] == str(control)
    infotext = read_png_metadata(page)[PARAMETERS_KEY]
    assert 'ControlNet 0: "Module: none, Model: edges-a, Weight: 0.8, Resize Mode: Just Resize' in infotext


def test_page_without_control_image_is_the_plain_model(control_studio, sd_folder, tmp_path):
    """A request without a control image runs the model without its ControlNet: the CLI's PNG byte for byte."""
    cli_png = tmp_path / "plain.png"
    assert main(["generate", PROMPT, "-o", str(cli_png), "--model", str(sd_folder), *CLI_ARGS]) == 0
    [page] = control_studio.generate(PROMPT, "", "ddim", 3, 4.0, 7, None, None, 1)
    assert page.read_bytes() == cli_png.read_bytes()


def test_one_of_two_served_controlnets_equals_that_net_alone(sd_folder, nets, tmp_path):
    two = Studio(served_pipe(sd_folder, nets), None, tmp_path / "two", controlnets=[(n, 1.0) for n in nets])
    one = Studio(served_pipe(sd_folder, nets[1:]), None, tmp_path / "one", controlnets=[(nets[1], 1.0)])
    unit = ControlUnit(nets[1], image=edges(3), scale=0.7, start=0.2)
    [a] = two.generate(PROMPT, "", "ddim", 3, 4.0, 7, None, None, 1, controls=[unit])
    [b] = one.generate(PROMPT, "", "ddim", 3, 4.0, 7, None, None, 1, controls=[unit])
    assert np.abs(pixels(a) - pixels(b)).max() <= 1  # the other net runs at weight 0
    assert GenerationSettings.from_png_metadata(read_png_metadata(a)).controls == (unit.replace(image=None),)
    with pytest.raises(ValueError, match="controls: ControlNet .* is given twice"):
        two.generate(PROMPT, steps=1, controls=[unit, unit])


@pytest.mark.parametrize("unit, named", [
    (ControlUnit("elsewhere"), "controls: 'elsewhere' is not a ControlNet of this server; it has "),
    (ControlUnit("SERVED", start=0.6, end=0.5), "control_guidance_start \\(0.6\\) must be below"),
    (ControlUnit("SERVED", scale=-1.0), "control_scale must be a finite number >= 0"),
    (ControlUnit("SERVED", preprocess="depth"), "preprocess must be one of"),
])
def test_page_control_errors_name_the_argument(control_studio, unit, named):
    model = control_studio.controlnets[0][0] if unit.model == "SERVED" else unit.model
    with pytest.raises(ValueError, match=named):
        control_studio.generate(PROMPT, steps=1, controls=[unit.replace(model=model, image=edges())])


def test_control_units_on_a_server_without_controlnet_are_refused(sd_folder, tmp_path):
    from latent_diffusion.pipelines import LatentDiffusionPipeline

    studio = Studio(LatentDiffusionPipeline.from_pretrained(str(sd_folder)), None, tmp_path)
    with pytest.raises(ValueError, match="none \\(serve it with --controlnet\\)"):
        studio.generate(PROMPT, steps=1, controls=[ControlUnit("any", image=edges())])


def test_page_shows_control_inputs_only_with_a_controlnet(control_studio, sd_folder, tmp_path):
    gr = pytest.importorskip("gradio")
    from latent_diffusion.apps.webui import _page_generate, build_app
    from latent_diffusion.pipelines import LatentDiffusionPipeline
    from test_webui_layout import by_label, enclosing

    demo = build_app(control_studio)
    name = control_studio.controlnets[0][0]
    image = by_label(demo, gr.Image, f"Control image ({name}); empty: not used")
    assert enclosing(image, gr.Accordion).label == f"ControlNet: {name}"
    assert by_label(demo, gr.Radio, "Preprocess (canny: the image's edges)").choices == [("none", "none"),
                                                                                       ("canny", "canny")]
    assert by_label(demo, gr.Slider, "Control weight").value == 0.8  # serve --control-scale
    for label in ("Starting control step", "Ending control step"):
        by_label(demo, gr.Slider, label)
    params = {p["parameter_name"]: p for p in demo.get_api_info()["named_endpoints"]["/generate"]["parameters"]}
    assert all(params[k]["parameter_has_default"] for k in ("control_image", "control_preprocess", "control_scale",
                                                            "control_start", "control_end", "guess_mode"))
    plain = build_app(Studio(LatentDiffusionPipeline.from_pretrained(str(sd_folder)), None, tmp_path))
    assert not [b for b in plain.blocks.values() if "Control" in str(getattr(b, "label", ""))]
    # the page's own generate: the control inputs reach the pipeline (canny of a square: its outline)
    generate = _page_generate(gr, control_studio, ())
    square = Image.new("RGB", (32, 32), "black")
    square.paste((255, 255, 255), (8, 8, 24, 24))
    [canny] = generate(PROMPT, "", "ddim", 3, 4.0, 7, None, None, 1, control_image=square,
                       control_preprocess="canny", control_scale=0.8, control_start=0.0, control_end=1.0)
    [raw] = generate(PROMPT, "", "ddim", 3, 4.0, 7, None, None, 1, control_image=square,
                     control_preprocess="none", control_scale=0.8, control_start=0.0, control_end=1.0)
    assert np.abs(pixels(canny) - pixels(raw)).max() > 3
    assert json.loads(read_png_metadata(canny)["controlnet"])[0]["preprocess"] == "canny"
    with pytest.raises(gr.Error, match="control_image_1: not a setting of this server"):
        generate(PROMPT, "", "ddim", 1, 4.0, 7, None, None, 1, control_image_1=square)


# ----------------------------------------------------------------- PNG records and --from-png


def test_infotext_controlnet_lines_round_trip():
    settings = GenerationSettings(prompt=PROMPT, steps=20, guidance=4.0, sampler="ddim", seed=3, height=64, width=64,
                                  controls=(ControlUnit("default-outline", scale=0.8, preprocess="canny",
                                                        thresholds=(50.0, 150.0)),
                                            ControlUnit("lllyasviel/sd-controlnet-depth", start=0.2, end=0.9)),
                                  guess_mode=True)
    text = format_infotext(settings)
    assert ('ControlNet 0: "Module: canny, Model: default-outline, Weight: 0.8, Resize Mode: Just Resize, '
            'Processor Res: -1, Threshold A: 50.0, Threshold B: 150.0, Guidance Start: 0.0, Guidance End: 1.0, '
            'Pixel Perfect: False, Control Mode: ControlNet is more important"') in text
    back = settings_from_infotext(text)
    assert back.controls == settings.controls and back.guess_mode
    a1111 = ('a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, ControlNet 0: "Module: canny, '
             'Model: control_v11p_sd15_canny [d14c016b], Weight: 1, Resize Mode: Crop and Resize, Low Vram: False, '
             'Processor Res: 512, Threshold A: 100, Threshold B: 200, Guidance Start: 0, Guidance End: 1, '
             'Pixel Perfect: False, Control Mode: Balanced"')
    assert settings_from_infotext(a1111).controls == (ControlUnit("control_v11p_sd15_canny", preprocess="canny",
                                                                  thresholds=(100.0, 200.0)),)
    with pytest.raises(ValueError, match="png: ControlNet 0's module 'depth_midas' has no counterpart here"):
        settings_from_infotext(a1111.replace("Module: canny", "Module: depth_midas"))


def test_from_png_reads_the_controlnet_back(sd_folder, nets, tmp_path, capsys):
    control = tmp_path / "edges.png"
    edges(4).save(control)
    made = tmp_path / "made.png"
    assert main(["generate", PROMPT, "-o", str(made), "--model", str(sd_folder), "--controlnet", nets[0],
                 "--control-image", str(control), "--control-scale", "0.6", "--control-end", "0.8", "--guess-mode",
                 *CLI_ARGS]) == 0
    assert read_png_metadata(made)["guess_mode"] == "true"
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(made), "-o", str(again), "--quiet"]) == 0  # the recorded path
    assert again.read_bytes() == made.read_bytes()
    moved = tmp_path / "moved.png"
    control.rename(moved)
    capsys.readouterr()
    assert main(["generate", "--from-png", str(made), "-o", str(tmp_path / "x.png"), "--quiet"]) == 2  # usage
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "holds no control image; give --control-image" in err and "Traceback" not in err
    third = tmp_path / "third.png"
    assert main(["generate", "--from-png", str(made), "--control-image", str(moved), "-o", str(third), "--quiet"]) == 0
    assert same_pixels(pixels(third), pixels(made))  # model, weight and window from the PNG
    a1111 = tmp_path / "a1111.png"  # A1111's infotext only: the model and weight, never the image
    record = GenerationSettings.from_png_metadata(read_png_metadata(made))
    save_png(Image.open(made), a1111, {PARAMETERS_KEY: format_infotext(record)})
    assert main(["generate", "--from-png", str(a1111), "-o", str(tmp_path / "y.png"), "--quiet"]) == 2
    assert "holds no control image; give --control-image" in capsys.readouterr().err


def test_control_flag_errors_name_the_flag(sd_folder, nets, tmp_path, capsys):
    control = tmp_path / "edges.png"
    edges().save(control)
    base = ["generate", PROMPT, "--model", str(sd_folder), "--controlnet", nets[0], "--control-image", str(control)]
    assert main([*base, "--control-start", "0.7", "--control-end", "0.5"]) == 2
    assert "--control-start (0.7) must be below --control-end (0.5)" in capsys.readouterr().err
    assert main([*base, "--control-end", "2"]) == 2
    assert "--control-end" in capsys.readouterr().err
    pytest.importorskip("gradio")
    assert main(["serve", "--no-example", "--controlnet", str(tmp_path / "missing")]) == 2
    assert "--controlnet" in capsys.readouterr().err


# ----------------------------------------------------------------- the A1111 API (sd-webui-controlnet's format)


@pytest.fixture(scope="module")
def control_server(sd_folder, nets, tmp_path_factory):
    """An in-process `serve` over the tiny model with one ControlNet, and the Studio it uses."""
    pytest.importorskip("gradio")
    from test_http_api import free_port

    from latent_diffusion.apps import webui

    studios, real = [], webui.Studio

    def recording(*args, **kwargs):
        studios.append(real(*args, **kwargs))
        return studios[-1]

    port = free_port()
    webui.Studio = recording
    try:
        demo = webui.serve(served_pipe(sd_folder, nets[:1]), str(sd_folder), port=port, example=False, block=False,
                           output_dir=tmp_path_factory.mktemp("api") / "png", controlnets=[(nets[0], 1.0)])
    finally:
        webui.Studio = real
    yield port, studios[0]
    demo.close()


def test_webuiapi_controlnet_units_lists_and_errors(control_server, nets):
    webuiapi = pytest.importorskip("webuiapi")
    port, studio = control_server
    api = webuiapi.WebUIApi(port=port)
    # every call passes a fresh alwayson_scripts: webuiapi writes its units into the default dict of its signature,
    # which would send them with every later request of the process (the next test module's too)
    assert api.controlnet_model_list() == ["edges-a"] and api.controlnet_module_list() == ["none", "canny"]
    unit = webuiapi.ControlNetUnit(image=edges(), module="none", model="edges-a [0123abcd]", weight=0.8,
                                   guidance_start=0.0, guidance_end=1.0)
    tiny = dict(prompt=PROMPT, seed=7, steps=3, sampler_name="DDIM", cfg_scale=4.0, width=32, height=32, eta=0.0)
    made = api.txt2img(alwayson_scripts={}, controlnet_units=[unit], **tiny)
    [expected] = studio.generate(PROMPT, "", "ddim", 3, 4.0, 7, 32, 32, 1,
                                 controls=[ControlUnit(nets[0], image=edges(), scale=0.8)])
    assert same_pixels(pixels(made.image), pixels(expected))
    assert 'ControlNet 0: "Module: none, Model: edges-a, Weight: 0.8' in made.info["infotexts"][0]
    assert "resize_mode is not used" in " ".join(made.info["notes"])  # webuiapi sends "Resize and Fill"
    plain = api.txt2img(alwayson_scripts={}, controlnet_units=[webuiapi.ControlNetUnit(image=edges(), model="edges-a", enabled=False)],
                        **tiny)
    assert np.abs(pixels(plain.image) - pixels(made.image)).max() > 5  # a disabled unit: the plain model
    # img2img: a unit without an image reads the init image
    init = edges(9)
    edited = api.img2img(images=[init], denoising_strength=0.6, alwayson_scripts={}, controlnet_units=[
        webuiapi.ControlNetUnit(model="edges-a", module="canny", threshold_a=50, threshold_b=150)], **tiny)
    [same] = studio.generate(PROMPT, "", "ddim", 3, 4.0, 7, 32, 32, 1, image=init, strength=0.6, controls=[
        ControlUnit(nets[0], image=init, preprocess="canny", thresholds=(50.0, 150.0))])
    assert same_pixels(pixels(edited.image), pixels(same))


def test_page_api_takes_the_control_image(control_server, nets, tmp_path):
    """gradio_client's /generate with control_image (a file) gives the Studio's image for the same unit."""
    from gradio_client import Client, handle_file

    port, studio = control_server
    control = tmp_path / "edges.png"
    edges(2).save(control)
    page = Client(f"http://127.0.0.1:{port}/", verbose=False)
    [made] = page.predict(prompt=PROMPT, sampler="ddim", steps=3, guidance=4.0, seed=7, width=32, height=32,
                          control_image=handle_file(str(control)), control_scale=0.5, control_end=0.7,
                          api_name="/generate")
    [expected] = studio.generate(PROMPT, "", "ddim", 3, 4.0, 7, 32, 32, 1,
                                 controls=[ControlUnit(nets[0], image=edges(2), scale=0.5, end=0.7)])
    assert same_pixels(pixels(made), pixels(expected))
    [plain] = page.predict(prompt=PROMPT, sampler="ddim", steps=3, guidance=4.0, seed=7, width=32, height=32,
                           api_name="/generate")
    assert "controlnet" not in read_png_metadata(plain) and np.abs(pixels(plain) - pixels(made)).max() > 3


@pytest.mark.parametrize("unit, status, named", [
    ({"model": "control_v11p_sd15_canny"}, 400,
     "alwayson_scripts.controlnet.args[0].model: 'control_v11p_sd15_canny' is not a ControlNet of this server"),
    ({"model": "edges-a", "module": "depth_midas"}, 400, "args[0].module: 'depth_midas' is not a preprocessor"),
    ({"model": "edges-a", "weight": -1}, 400, "args[0].weight: must be a finite number >= 0"),
    ({"model": "edges-a", "guidance_start": 0.8, "guidance_end": 0.2}, 400, "args[0].guidance_start: (0.8) must be"),
    ({"model": "edges-a", "control_mode": "My prompt is more important"}, 400, "args[0].control_mode"),
    ({"model": "edges-a", "image": ""}, 400, "args[0].image: txt2img needs a control image"),
    ({"model": "edges-a", "image": "bm90IGFuIGltYWdl"}, 400, "args[0].image"),
])
def test_bad_controlnet_units_are_400s_naming_the_field(control_server, unit, status, named):
    import http.client

    port, _ = control_server
    body = {"prompt": PROMPT, "steps": 1, "width": 32, "height": 32,
            "alwayson_scripts": {"controlnet": {"args": [{"image": png_base64(edges()), **unit}]}}}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request("POST", "/sdapi/v1/txt2img", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    answer = json.loads(response.read())
    assert response.status == status and named in answer["detail"], answer


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ----------------------------------------------------------------- the embedded default with default-outline


@pytest.mark.slow
def test_the_apis_outline_places_the_object_on_the_default_model(tmp_path):
    """Same prompt and seed, two outlines at places no caption names: each image has the object at its outline's
    place (judge_outline), and without the ControlNet neither would be (the model picks its own place)."""
    webuiapi = pytest.importorskip("webuiapi")
    from test_http_api import free_port

    from latent_diffusion.apps import webui
    from latent_diffusion.formats.assets import DEFAULT_CONTROLNETS
    from latent_diffusion.pipelines import LatentDiffusionPipeline
    from latent_diffusion.shapes.captions import full_caption
    from latent_diffusion.shapes.outline import judge_outline, outline_image
    from latent_diffusion.shapes.world import Scene, SceneObject

    if not (DEFAULT_CONTROLNETS["default-outline"] / "config.json").is_file():
        pytest.skip("no shipped outline ControlNet in this checkout")
    port = free_port()
    demo = webui.serve(LatentDiffusionPipeline.from_pretrained(controlnet="default-outline"), port=port,
                       example=False, block=False, output_dir=tmp_path, controlnets=[("default-outline", 1.0)])
    try:
        api = webuiapi.WebUIApi(port=port)
        scenes = [Scene((SceneObject("red", "circle", x, y, 0.3),), "white") for x, y in ((0.37, 0.62), (0.63, 0.38))]
        prompt = full_caption(scenes[0])
        assert full_caption(scenes[1]) == prompt  # no caption names either place
        made = [api.txt2img(prompt=prompt, seed=1, steps=20, sampler_name="DDIM",
                            cfg_scale=4.0, width=64, height=64, alwayson_scripts={}, controlnet_units=[webuiapi.ControlNetUnit(
                                image=outline_image(scene, 64), model="default-outline")]).image for scene in scenes]
    finally:
        demo.close()
    for image, scene in zip(made, scenes):
        assert judge_outline(image, scene).correct, judge_outline(image, scene)
    assert not judge_outline(made[0], scenes[1]).correct  # the other outline's place is empty
