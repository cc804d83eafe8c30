"""LoRA in the pipeline: diffusers' loader mixed into ours, same image as diffusers, scales, fuse, kohya keys, CLI.

The adapters here are made with peft on the tiny UNet with random (non-zero) A and B and α ≠ r, so they
change the image visibly and the stored α matters. (Text-encoder adapters go through transformers' peft
integration, which needs a newer peft than this environment has; see test_lora_training.py.)
"""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from latent_diffusion.formats.lora_keys import diffusers_to_kohya, kohya_to_diffusers
from latent_diffusion.pipelines.lora import parse_lora_spec
from test_pipeline import generate, load_ours, load_theirs


def make_lora(folder, out, text_encoder=False, seed=1):
    """A random LoRA for the tiny model in `folder`, saved by training/lora_weights.py's writer (diffusers layout)."""
    from peft import LoraConfig

    from latent_diffusion.training.lora import DEFAULT_UNET_TARGETS, TEXT_ENCODER_TARGETS
    from latent_diffusion.training.lora_weights import save_lora_weights

    pipe = load_ours(folder)
    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=list(DEFAULT_UNET_TARGETS)))
    if text_encoder:
        pipe.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                                 target_modules=list(TEXT_ENCODER_TARGETS)))
    return save_lora_weights(str(out), pipe.unet, pipe.text_encoder if text_encoder else None)


@pytest.fixture(scope="module")
def lora_file(sd_folder, tmp_path_factory):
    return make_lora(sd_folder, tmp_path_factory.mktemp("lora"))


def diff255(a, b):
    return float(np.abs(a - b).max() * 255)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_lora_gives_the_diffusers_image(sd_folder, lora_file, sampler):
    ours, theirs = load_ours(sd_folder), load_theirs(sd_folder, sampler)
    base = generate(ours, sampler=sampler)
    ours.load_lora_weights(lora_file)  # a file path
    theirs.load_lora_weights(str(lora_file).rsplit("/", 1)[0])  # its folder
    a, b = generate(ours, sampler=sampler), generate(theirs)
    assert diff255(a, base) > 5  # the adapter matters
    assert diff255(a, b) <= 1


def test_scales_fuse_unfuse_and_unload(sd_folder, lora_file):
    pipe = load_ours(sd_folder)
    base = generate(pipe, sampler="ddim")
    pipe.load_lora_weights(lora_file, adapter_name="a")
    full = generate(pipe, sampler="ddim")
    pipe.set_adapters(["a"], [0.0])
    assert diff255(generate(pipe, sampler="ddim"), base) <= 1 / 2  # scale 0 is the base model (traces refreshed)
    pipe.set_adapters(["a"], [0.5])
    half = generate(pipe, sampler="ddim")
    assert diff255(half, base) > 1 and diff255(half, full) > 1
    pipe.set_adapters(["a"], [1.0])
    pipe.fuse_lora()
    assert diff255(generate(pipe, sampler="ddim"), full) <= 1
    pipe.unfuse_lora()
    assert diff255(generate(pipe, sampler="ddim"), full) <= 1
    pipe.unload_lora_weights()
    assert diff255(generate(pipe, sampler="ddim"), base) <= 1 / 2


def test_two_adapters_combine(sd_folder, lora_file, tmp_path):
    other = make_lora(sd_folder, tmp_path / "other", seed=2)
    pipe = load_ours(sd_folder)
    pipe.load_lora_weights(lora_file, adapter_name="a")
    pipe.load_lora_weights(other, adapter_name="b")
    pipe.set_adapters(["a", "b"], [1.0, 0.7])
    assert pipe.get_active_adapters() == ["a", "b"]
    both = generate(pipe, sampler="ddim")
    pipe.set_adapters(["a"], [1.0])
    assert diff255(both, generate(pipe, sampler="ddim")) > 1


def test_kohya_round_trip_and_kohya_file_gives_the_same_image(sd_folder, lora_file, tmp_path):
    from safetensors import safe_open

    from latent_diffusion.training.lora_weights import LORA_WEIGHTS  # noqa: F401

    ours = load_ours(sd_folder)
    state = load_file(str(lora_file))
    kohya = diffusers_to_kohya(state, alphas={"unet": 8.0})
    some = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {f"{some}.lora_down.weight", f"{some}.lora_up.weight", f"{some}.alpha"} <= set(kohya)
    assert float(kohya[f"{some}.alpha"]) == 8.0
    names = {"unet": [n for n, _ in ours.unet.named_modules()],
             "text_encoder": [n for n, _ in ours.text_encoder.named_modules()]}
    back, alphas = kohya_to_diffusers(kohya, names)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    assert alphas == {"unet": 8.0}
    with safe_open(str(lora_file), "pt") as f:
        assert '"unet.lora_alpha": 8' in f.metadata()["lora_adapter_metadata"]
    kohya_path = tmp_path / "kohya.safetensors"
    save_file(kohya, str(kohya_path))
    ours.load_lora_weights(lora_file)
    a = generate(ours, sampler="ddim")
    ours.unload_lora_weights()
    ours.load_lora_weights(kohya_path)  # diffusers' loader converts kohya keys and their alphas
    assert diff255(generate(ours, sampler="ddim"), a) <= 1


def test_kohya_text_encoder_keys():
    state = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora.down.weight": torch.ones(2, 32),
             "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora.up.weight": torch.ones(32, 2)}
    kohya = diffusers_to_kohya(state)
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert set(kohya) == {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"}
    assert float(kohya[f"{name}.alpha"]) == 2.0  # α = r without metadata
    back, alphas = kohya_to_diffusers(kohya, {"text_encoder": ["text_model.encoder.layers.0.self_attn.q_proj"]})
    assert back.keys() == state.keys() and alphas == {"text_encoder": 2.0}


def test_kohya_converter_errors_name_the_key(sd_folder):
    with pytest.raises(ValueError, match="not a diffusers LoRA key"):
        diffusers_to_kohya({"unet.conv_in.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="has no module named like"):
        kohya_to_diffusers({"lora_unet_nope_to_q.alpha": torch.tensor(1.0)}, {"unet": ["mid_block"]})


def test_pickled_lora_is_refused(sd_folder, lora_file, tmp_path):
    pipe = load_ours(sd_folder)
    pickled = tmp_path / "pytorch_lora_weights.bin"
    torch.save(load_file(str(lora_file)), pickled)
    with pytest.raises(ValueError, match="pickled"):
        pipe.load_lora_weights(pickled)
    with pytest.raises(ValueError, match="no .safetensors file"):
        pipe.load_lora_weights(tmp_path)  # a folder holding only the .bin
    with pytest.raises(ValueError, match="weight_name must name a .safetensors"):
        pipe.load_lora_weights(tmp_path, weight_name="pytorch_lora_weights.bin")


def test_parse_lora_spec():
    assert parse_lora_spec("out/lora:0.5") == ("out/lora", 0.5)
    assert parse_lora_spec("user/my-lora") == ("user/my-lora", 1.0)
    assert parse_lora_spec("C:/x/lora.safetensors") == ("C:/x/lora.safetensors", 1.0)


def test_cli_lora_flag(sd_folder, lora_file, tmp_path):
    from latent_diffusion.apps.cli import main

    def run(out, *extra):
        return main(["generate", "a red circle above a blue square", "-o", str(out), "--model", str(sd_folder),
                     "--steps", "3", "--sampler", "ddim", "--quiet", *extra])

    assert run(tmp_path / "base.png") == 0
    assert run(tmp_path / "lora.png", "--lora", str(lora_file)) == 0
    assert run(tmp_path / "zero.png", "--lora", f"{lora_file}:0", "--lora", f"{lora_file}:0") == 0
    base, lora, zero = (np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int) for n in ("base", "lora", "zero"))
    assert np.abs(base - lora).max() > 5 and np.abs(base - zero).max() <= 1
    assert Image.open(tmp_path / "lora.png").text["lora"] == str(lora_file)
    assert run(tmp_path / "x.png", "--lora", str(tmp_path / "missing.safetensors")) == 2
