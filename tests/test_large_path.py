"""The large-model path on tiny components: dtype choice, attention slicing and tiled VAE decode in our pipeline."""
import numpy as np
import torch
from PIL import Image

from latent_diffusion.apps.cli import main
from latent_diffusion.pipelines import LatentDiffusionPipeline

PROMPT = "a red circle above a blue square"


def generate(pipe, size=32):
    return pipe(PROMPT, num_inference_steps=3, guidance_scale=7.5, sampler="ddim", height=size, width=size,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def test_bfloat16_weights_run_and_stay_close_to_float32(sd_folder):
    full = LatentDiffusionPipeline.from_pretrained(sd_folder)
    half = LatentDiffusionPipeline.from_pretrained(sd_folder, dtype=torch.bfloat16)
    assert half.unet.dtype == half.vae.dtype == half.text_encoder.dtype == torch.bfloat16
    a, b = generate(full), generate(half)
    assert np.isfinite(b).all() and np.abs(a - b).mean() < 0.05


def test_attention_slicing_gives_the_same_image(sd_folder):
    pipe = LatentDiffusionPipeline.from_pretrained(sd_folder)
    pipe.trace_unet = False
    plain = generate(pipe)
    pipe.enable_attention_slicing(1)  # one head at a time
    np.testing.assert_allclose(generate(pipe), plain, atol=1e-5)


def test_tiled_vae_decode_works_in_decode_latents(sd_folder):
    pipe = LatentDiffusionPipeline.from_pretrained(sd_folder)
    whole = generate(pipe, size=64)
    pipe.vae.enable_tiling()
    pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = 32, 16  # 64 px = overlapping 32 px tiles
    tiled = generate(pipe, size=64)
    assert tiled.shape == whole.shape == (1, 64, 64, 3)
    assert np.isfinite(tiled).all() and 0 < np.abs(tiled - whole).max() < 0.5  # blended tile seams differ a little


def test_cli_dtype_bfloat16_writes_an_image(sd_folder, tmp_path):
    out = tmp_path / "b.png"
    assert main(["generate", PROMPT, "-o", str(out), "--model", str(sd_folder), "--steps", "2",
                 "--dtype", "bfloat16", "--quiet"]) == 0
    assert Image.open(out).size == (32, 32)
