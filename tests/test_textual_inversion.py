"""Textual-inversion embeddings: SD (A1111 emb_params) and SDXL (clip_l + clip_g) safetensors files."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import save_file

from latent_diffusion import LatentDiffusionPipeline
from latent_diffusion.tiny import tiny_sdxl_components

KW = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np")


def run(pipe, prompt, **kwargs):
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **KW, **kwargs).images


@pytest.fixture
def embedding(tmp_path):
    """A two-vector A1111-style embedding for the tiny 32-wide text encoder."""
    torch.manual_seed(5)
    path = tmp_path / "shiny.safetensors"
    save_file({"emb_params": torch.randn(2, 32)}, str(path))
    return path


def test_embedding_gives_diffusers_image_in_prompt_and_negative(sd_folder, embedding):
    ours = LatentDiffusionPipeline.from_pretrained(sd_folder)
    plain = run(ours, "a red circle shiny", sampler="ddim")
    ours.load_textual_inversion(embedding)  # token: the file's name
    theirs = StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None, requires_safety_checker=False)
    theirs.scheduler = DDIMScheduler.from_config(theirs.scheduler.config)
    theirs.load_textual_inversion(str(embedding), token="shiny")
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    kwargs = dict(negative_prompt="blurry shiny")
    a, b = run(ours, "a red circle shiny", sampler="ddim", **kwargs), run(theirs, "a red circle shiny", **kwargs)
    assert np.abs(a - b).max() <= 1 / 255
    assert np.abs(run(ours, "a red circle shiny", sampler="ddim") - plain).max() > 1 / 255  # it changes the image
    ids = ours.tokenizer(ours.expand_embedding_tokens(["shiny"])[0]).input_ids
    rows = ours.text_encoder.get_input_embeddings().weight[ids[1:3]]
    from safetensors.torch import load_file

    assert torch.equal(rows, load_file(embedding)["emb_params"])


def test_sdxl_embedding_loads_into_both_encoders(tmp_path):
    pipe = LatentDiffusionPipeline(**tiny_sdxl_components())
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(6)
    vectors = {"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 32)}
    save_file(vectors, str(tmp_path / "xl.safetensors"))
    before = run(pipe, "a cat <xl>")
    pipe.load_textual_inversion(tmp_path / "xl.safetensors", token="<xl>")
    for tokenizer, encoder, key in ((pipe.tokenizer, pipe.text_encoder, "clip_l"),
                                    (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g")):
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("<xl>")]
        assert torch.equal(row, vectors[key][0])
    assert np.abs(run(pipe, "a cat <xl>") - before).max() > 1 / 255


def test_sd_model_refuses_an_sdxl_embedding(sd_folder, tmp_path):
    save_file({"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 32)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(ValueError, match="SDXL embedding"):
        LatentDiffusionPipeline.from_pretrained(sd_folder).load_textual_inversion(tmp_path / "xl.safetensors")


@pytest.mark.parametrize("name, message", [("e.pt", "is a pickle"), ("none.safetensors", "does not exist"),
                                           ("cut.safetensors", "truncated")])
def test_bad_embedding_files_are_refused(sd_folder, tmp_path, capsys, monkeypatch, name, message):
    from latent_diffusion.apps.cli import main

    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    path = tmp_path / name
    if name == "e.pt":
        path.write_bytes(b"\x80\x04")
    if name == "cut.safetensors":
        save_file({"emb_params": torch.zeros(4, 32)}, str(path))
        path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match=message):
        LatentDiffusionPipeline.from_pretrained(sd_folder).load_textual_inversion(path)
    assert main(["generate", "a cat", "--model", str(sd_folder), "--embedding", str(path), "--steps", "1",
                 "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "--embedding" in err and message in err and "Traceback" not in err


def test_generate_embedding_flag_with_a_token(sd_folder, embedding, tmp_path):
    from latent_diffusion.apps.cli import main

    args = ["generate", "a cat <s>", "--model", str(sd_folder), "--steps", "2", "--quiet"]
    assert main([*args, "-o", str(tmp_path / "a.png")]) == 0
    assert main([*args, "--embedding", f"{embedding}:<s>", "-o", str(tmp_path / "b.png")]) == 0
    from PIL import Image

    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "ab")
    assert np.abs(a.astype(int) - b.astype(int)).max() > 1
