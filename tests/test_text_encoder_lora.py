"""--train_text_encoder_lora on SD: the text encoder's adapters train, are checkpointed, saved in the output file
and load in our pipeline and diffusers' with the trained effect (peft and transformers versions as installed)."""
import os

import numpy as np
from safetensors.torch import load_file

from test_pipeline import generate, load_ours, load_theirs
from test_training import data_dir, train  # noqa: F401  (fixture)


def test_text_encoder_lora_trains_saves_and_loads(sd_folder, data_dir, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    train(sd_folder, data_dir, out, "--lora_rank", "4", "--learning_rate", "5e-2", "--train_text_encoder_lora",
          "--no_cache", "--max_train_steps", 3, "--checkpointing_steps", 3)
    checkpoint = load_file(str(out / "checkpoint-3" / "lora_text_encoder.safetensors"))
    assert checkpoint and all("lora" in k for k in checkpoint)
    lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
    te = {k: v for k, v in lora.items() if k.startswith("text_encoder.")}
    assert te and all(".lora" in k for k in te)  # diffusers' text-encoder layout: ...q_proj.lora_linear_layer.up
    ups = [v for k, v in te.items() if k.endswith("up.weight")]
    assert any(float(v.abs().max()) > 0 for v in ups)  # B started at zero: training moved it

    ours, theirs = load_ours(sd_folder), load_theirs(sd_folder, "dpm++")
    base = generate(ours, sampler="dpm++", guidance_scale=3.0)
    ours.load_lora_weights(str(out))
    theirs.load_lora_weights(str(out))
    a, b = generate(ours, sampler="dpm++", guidance_scale=3.0), generate(theirs, guidance_scale=3.0)
    assert np.abs(a - base).max() > 1 / 255
    assert np.abs(a - b).max() <= 1 / 255
    assert os.path.isfile(out / "README.md")
