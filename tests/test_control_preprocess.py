"""Control images from the user's own pictures (Canny edges) and the `generate` ControlNet flags."""
import numpy as np
import PIL.Image
import pytest

from latent_diffusion.control_images import canny, preprocess_control_image


def square(size=32, low=8, high=24):
    array = np.zeros((size, size, 3), np.uint8)
    array[low:high, low:high] = 255
    return PIL.Image.fromarray(array)


def test_canny_marks_the_square_outline_only():
    edges = np.asarray(canny(square()))
    assert edges.shape == (32, 32, 3) and set(np.unique(edges)) == {0, 255}
    on = edges[..., 0] > 0
    ring = np.zeros_like(on)
    ring[6:26, 6:26] = True
    ring[10:22, 10:22] = False  # edges lie within 2 pixels of the square's border
    assert on.any() and not (on & ~ring).any()
    assert on[8:24, 7:10].any() and on[8:24, 22:25].any()  # both vertical sides found


def test_flat_image_has_no_edges_and_none_keeps_the_image():
    flat = PIL.Image.new("L", (16, 16), 128)
    assert not np.asarray(canny(flat)).any()
    assert preprocess_control_image("none", flat).mode == "RGB"


@pytest.mark.parametrize("call, message", [
    (lambda: canny(square(), low=200, high=100), "low (200) must be below high (100)"),
    (lambda: preprocess_control_image("depth", square()), "preprocess must be one of"),
])
def test_bad_preprocess_arguments_are_named(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert message in str(error.value)


def test_cli_controlnet_flags(sd_folder, tmp_path):
    from latent_diffusion.apps.cli import main
    from latent_diffusion.pipelines import LatentDiffusionPipeline
    from latent_diffusion.tiny import tiny_controlnet

    tiny_controlnet(LatentDiffusionPipeline.from_pretrained(sd_folder).unet).save_pretrained(tmp_path / "net")
    square().save(tmp_path / "photo.png")

    def run(out, *extra):
        return main(["generate", "a red circle", "-o", str(tmp_path / out), "--model", str(sd_folder), "--steps", "3",
                     "--sampler", "ddim", "--quiet", *extra])

    control = ["--controlnet", str(tmp_path / "net"), "--control-image", str(tmp_path / "photo.png")]
    assert run("base.png") == 0
    assert run("canny.png", *control, "--control-preprocess", "canny", "--control-scale", "0.8") == 0
    assert run("zero.png", *control, "--control-scale", "0") == 0
    base, controlled, zero = (np.asarray(PIL.Image.open(tmp_path / n)).astype(int)
                              for n in ("base.png", "canny.png", "zero.png"))
    assert np.abs(base - controlled).max() > 5 and np.abs(base - zero).max() <= 1
    assert run("x.png", "--controlnet", str(tmp_path / "net")) == 2  # no --control-image
    assert run("x.png", *control, "--control-scale", "1", "--control-scale", "1") == 2
    assert run("x.png", "--controlnet", str(tmp_path / "missing"), "--control-image", str(tmp_path / "photo.png")) == 2
