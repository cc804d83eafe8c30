"""--lora_save_format kohya: the adapter file in kohya's layout gives the same image as the diffusers-layout file."""
import numpy as np
import torch
from safetensors.torch import load_file

from latent_diffusion import LatentDiffusionPipeline
from latent_diffusion.training.lora import add_adapters
from latent_diffusion.training.lora_weights import save_lora_weights
from latent_diffusion.training.settings import LoraSettings


def test_kohya_and_diffusers_files_give_one_image(sd_folder, tmp_path):
    trained = LatentDiffusionPipeline.from_pretrained(sd_folder)
    settings = LoraSettings(rank=4, alpha=2.0, dropout=0.0, target_modules=("to_q", "to_k", "to_v", "to_out.0"),
                            train_text_encoder=False)  # text encoder adapters need peft >= 0.22 with transformers 5
    add_adapters(settings, trained.unet, trained.text_encoder)
    torch.manual_seed(0)
    for name, p in trained.unet.named_parameters():  # lora_B starts at zero: give the adapters an effect
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    images = []
    for layout in ("diffusers", "kohya"):
        out = tmp_path / layout
        out.mkdir()
        path = save_lora_weights(str(out), trained.unet, save_format=layout, alpha=2.0)
        pipe = LatentDiffusionPipeline.from_pretrained(sd_folder)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(path)
        images.append(pipe("a red circle", num_inference_steps=3, output_type="np",
                           generator=torch.Generator().manual_seed(0)).images)
    keys = load_file(tmp_path / "kohya" / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("lora_unet_") and k.endswith(".alpha") for k in keys)
    assert all(float(v) == 2.0 for k, v in keys.items() if k.endswith(".alpha"))
    base = LatentDiffusionPipeline.from_pretrained(sd_folder)
    base.set_progress_bar_config(disable=True)
    plain = base("a red circle", num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert np.abs(images[0] - images[1]).max() <= 1 / 255
    assert np.abs(images[0] - plain).max() > 1 / 255
