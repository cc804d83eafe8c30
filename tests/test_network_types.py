"""--network_type lora|dora|loha|lokr in train_text2img.py: 2-step runs on tiny models whose output file loads in our
pipeline (and, for LoRA / DoRA in diffusers' layout, in diffusers') with the trained peft model's image."""
import numpy as np
import pytest
import torch
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file

from latent_diffusion.training.lora import add_adapters
from latent_diffusion.training.settings import LoraSettings
from test_lora_training import adapter_weights
from test_pipeline import generate, load_ours, load_theirs
from test_training import cache_dir, data_dir, train  # noqa: F401  (fixtures)

RANK, ALPHA = 4, 2.0
FLAGS = ["--lora_rank", str(RANK), "--lora_alpha", str(ALPHA), "--learning_rate", "5e-2"]
KEYS = {"lora": ".lora_up.weight", "dora": ".dora_scale", "loha": ".hada_w2_b", "lokr": ".lokr_w1"}
TOLERANCE = 1 / 255


def trained_peft_image(sd_folder, network_type, checkpoint):
    """The image of the trained peft adapter itself: the checkpoint's peft-layout weights in a fresh adapter."""
    pipe = load_ours(sd_folder)
    settings = LoraSettings(rank=RANK, alpha=ALPHA, dropout=0.0, target_modules=("to_k", "to_q", "to_v", "to_out.0"),
                            train_text_encoder=False, network_type=network_type)
    add_adapters(settings, pipe.unet, pipe.text_encoder)
    result = set_peft_model_state_dict(pipe.unet, load_file(str(checkpoint / "lora_model_0.safetensors")))
    assert not result.unexpected_keys
    pipe.unet.eval()
    return generate(pipe, sampler="dpm++", guidance_scale=3.0)


@pytest.mark.parametrize("network_type, save_format", [("lora", "kohya"), ("dora", "kohya"), ("dora", "diffusers"),
                                                       ("loha", None), ("lokr", None)])
def test_network_type_file_loads_with_the_trained_effect(sd_folder, data_dir, cache_dir, tmp_path,  # noqa: F811
                                                         network_type, save_format):
    out = tmp_path / "out"
    train(sd_folder, data_dir, out, *FLAGS, "--network_type", network_type, "--max_train_steps", 2,
          "--checkpointing_steps", 2, *(["--lora_save_format", save_format] if save_format else []),
          cache_dir=cache_dir)
    saved = load_file(str(out / "pytorch_lora_weights.safetensors"))
    key = "lora_magnitude_vector" if save_format == "diffusers" else KEYS[network_type]
    assert any(key in k for k in saved), sorted(saved)[:4]
    prefix = "unet." if save_format == "diffusers" else "lora_unet_"
    assert all(k.startswith(prefix) for k in saved)
    if save_format != "diffusers":
        assert all(float(v) == ALPHA for k, v in saved.items() if k.endswith(".alpha"))
    name = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}[network_type]
    assert f"A {name} adapter (rank {RANK}" in (out / "README.md").read_text()

    ours = load_ours(sd_folder)
    base = generate(ours, sampler="dpm++", guidance_scale=3.0)
    ours.load_lora_weights(str(out))
    loaded = generate(ours, sampler="dpm++", guidance_scale=3.0)
    assert np.abs(loaded - base).max() > 2 / 255  # training moved the adapter (by more than TOLERANCE)
    reference = trained_peft_image(sd_folder, network_type, out / "checkpoint-2")
    assert np.abs(loaded - reference).max() <= TOLERANCE  # the file computes the trained adapter
    if save_format == "diffusers" or network_type == "lora":
        theirs = load_theirs(sd_folder, "dpm++")
        theirs.load_lora_weights(str(out))
        assert np.abs(generate(theirs, guidance_scale=3.0) - loaded).max() <= TOLERANCE


def test_lora_and_dora_in_diffusers_layout_load_in_diffusers(sd_folder, data_dir, cache_dir, tmp_path):  # noqa: F811
    """The default layout (diffusers') of a LoRA run also loads in diffusers with our image."""
    out = tmp_path / "out"
    train(sd_folder, data_dir, out, *FLAGS, "--max_train_steps", 1, "--checkpointing_steps", 1, cache_dir=cache_dir)
    ours, theirs = load_ours(sd_folder), load_theirs(sd_folder, "dpm++")
    ours.load_lora_weights(str(out))
    theirs.load_lora_weights(str(out))
    a, b = generate(ours, sampler="dpm++", guidance_scale=3.0), generate(theirs, guidance_scale=3.0)
    assert np.abs(a - b).max() <= TOLERANCE


def test_loha_resume_is_exact(sd_folder, data_dir, cache_dir, tmp_path):  # noqa: F811
    """4 LoHa steps straight == 2, stop, 2 more: factors, their EMA and the optimizer come back exactly."""
    flags = [*FLAGS, "--network_type", "loha", "--use_ema", "--random_flip", "--checkpointing_steps", 2]
    train(sd_folder, data_dir, tmp_path / "straight", "--max_train_steps", 4, *flags, cache_dir=cache_dir)
    train(sd_folder, data_dir, tmp_path / "split", "--max_train_steps", 2, *flags, cache_dir=cache_dir)
    train(sd_folder, data_dir, tmp_path / "split", "--max_train_steps", 4, "--resume_from_checkpoint", "latest",
          *flags, cache_dir=cache_dir)
    straight = adapter_weights(tmp_path / "straight" / "checkpoint-4")
    split = adapter_weights(tmp_path / "split" / "checkpoint-4")
    assert any(".hada_w1_a" in k for k in straight) and any(k.startswith("ema.") for k in straight)
    assert straight.keys() == split.keys()
    for name in straight:
        torch.testing.assert_close(split[name], straight[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("flags, message", [
    (["--network_type", "loha"], "--network_type loha needs --lora_rank"),
    (["--lora_rank", "4", "--network_type", "lokr", "--lora_dropout", "0.1"], "--lora_dropout applies to"),
    (["--lora_rank", "4", "--network_type", "loha", "--lora_save_format", "diffusers"],
     "--lora_save_format diffusers cannot hold --network_type loha"),
    (["--lora_rank", "4", "--network_type", "boft"], "--network_type: invalid choice"),
])
def test_bad_network_type_combinations_are_named(sd_folder, data_dir, tmp_path, capsys, flags, message):  # noqa: F811
    with pytest.raises(SystemExit):
        train(sd_folder, data_dir, tmp_path / "out", *flags)
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()[-1]) > len(message)
