"""Issue 31, item 2: what examples/train_lora.sh can teach. Its pink comes out orange because the embedded VAE
decodes only the Shapes palette; these tests pin that cause, so a VAE that learns pink fails them and the
example's "expected result" note must then be revisited."""
import numpy as np
import pytest
import torch

PINK = (255, 105, 180)  # examples/lora_pink.py


@pytest.fixture(scope="module")
def vae():
    from latent_diffusion.pipelines import LatentDiffusionPipeline

    return LatentDiffusionPipeline.from_pretrained().vae


@pytest.fixture(scope="module")
def scene():
    from latent_diffusion.shapes.world import sample_scene

    rng = np.random.default_rng(0)
    while True:
        scene = sample_scene(rng)
        if len(scene.objects) == 1:
            return scene


def round_trip_colour(vae, scene, colour) -> np.ndarray:
    """The mean decoded colour of the scene's object painted `colour`, after VAE encode and decode."""
    from latent_diffusion.shapes.world import COLOURS, render_array

    pixels = render_array(scene, 64)
    mask = (pixels == COLOURS[scene.objects[0].colour]).all(-1)
    pixels[mask] = colour
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1  # (1, 3, 64, 64)
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return ((y[0].permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255)[mask].mean(0)


def nearest_palette_colour(rgb) -> str:
    from latent_diffusion.shapes.world import COLOURS

    return min(COLOURS, key=lambda name: np.abs(rgb - COLOURS[name]).sum())


def test_palette_colours_survive_the_vae(vae, scene):
    from latent_diffusion.shapes.world import OBJECT_COLOURS, COLOURS

    for name in OBJECT_COLOURS:
        assert nearest_palette_colour(round_trip_colour(vae, scene, COLOURS[name])) == name


def test_pink_decodes_as_orange(vae, scene):
    """Why train_lora.sh draws orange: no UNet LoRA can make this VAE decode pink."""
    decoded = round_trip_colour(vae, scene, PINK)
    assert np.abs(decoded - PINK).max() > 100  # the blue channel of pink (180) is gone
    assert nearest_palette_colour(decoded) in ("orange", "red")
