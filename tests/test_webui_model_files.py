"""The web UI over a single-file model with an embedding given at start: it generates, and the page lists the files."""
import argparse

import pytest
import torch
from safetensors.torch import save_file

from latent_diffusion import LatentDiffusionPipeline
from latent_diffusion.apps.cli import _load_pipeline
from latent_diffusion.apps.webui import Studio, loaded_files
from latent_diffusion.tiny import tiny_components


def test_single_file_model_with_an_embedding_serves_and_is_listed(tmp_path):
    file = LatentDiffusionPipeline(**tiny_components()).save_single_file(tmp_path / "tiny.safetensors")
    torch.manual_seed(0)
    save_file({"emb_params": torch.randn(1, 32)}, str(tmp_path / "glow.safetensors"))
    args = argparse.Namespace(model=str(file), model_config=None, vae=None,
                              embedding=[f"{tmp_path / 'glow.safetensors'}:<glow>"])
    pipe = _load_pipeline(args)  # what `latent-diffusion serve --model FILE --embedding PATH:TOKEN` loads
    pipe.set_progress_bar_config(disable=True)
    studio = Studio(pipe, str(file), tmp_path / "served", embeddings=args.loaded_embeddings)
    assert "Embedding: `<glow>` (`glow.safetensors`)" in loaded_files(studio)
    [png] = studio.generate("a red circle <glow>", "", "ddim", 2, 4.0, 7, None, None, 1)
    assert png.exists()
    pytest.importorskip("gradio")
    from latent_diffusion.apps.webui import build_app

    texts = [c["props"].get("value") for c in build_app(studio).config["components"] if c["type"] == "markdown"]
    assert any("tiny.safetensors" in str(t) and "<glow>" in str(t) for t in texts)
