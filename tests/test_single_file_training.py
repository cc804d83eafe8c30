"""Training starts from a single-file checkpoint and writes one (--save_single_file) that diffusers and we load."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from latent_diffusion import LatentDiffusionPipeline
from latent_diffusion.tiny import tiny_components
from test_data import make_imagefolder


def train(model, data_dir, output_dir, *flags):
    from accelerate.state import AcceleratorState, GradientState

    from latent_diffusion.training.train_text2img import main

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    main(["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data_dir),
          "--output_dir", str(output_dir), "--resolution", "32", "--train_batch_size", "2", "--learning_rate", "1e-3",
          "--lr_warmup_steps", "0", "--report_to", "none", "--seed", "3", "--max_train_steps", "2",
          "--checkpointing_steps", "100", *map(str, flags)])


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    pipe = LatentDiffusionPipeline(**tiny_components(scheduler="ddim"))
    return pipe.save_single_file(tmp_path_factory.mktemp("base") / "base.safetensors", dtype=None)


@pytest.mark.slow  # two tiny runs; ~40 s on a loaded 2-core box
def test_training_from_a_single_file_writes_one(single_file, tmp_path):
    data = make_imagefolder(tmp_path / "images", 4, captions=["a red circle", "a cat on a sofa"])
    out = tmp_path / "out"
    train(single_file, data, out, "--save_single_file")
    base = load_file(single_file)
    written = load_file(out / "model.safetensors")
    assert set(written) == set(base)
    assert all(t.dtype == torch.float16 for t in written.values() if t.is_floating_point())
    unet_keys = [k for k in base if k.startswith("model.diffusion_model.")]
    assert any(not torch.equal(written[k].float(), base[k].half().float()) for k in unet_keys)  # the UNet trained
    vae_key = "first_stage_model.decoder.conv_out.weight"
    assert torch.equal(written[vae_key], base[vae_key].half())  # the VAE did not
    folder = LatentDiffusionPipeline.from_pretrained(out)
    again = LatentDiffusionPipeline.from_single_file(out / "model.safetensors")
    assert torch.equal(again.unet.conv_in.weight, folder.unet.conv_in.weight.half().float())
    kwargs = dict(num_inference_steps=3, output_type="np", sampler="ddim")
    a = folder("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = again("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(a - b).max() <= 2 / 255  # the file is float16
