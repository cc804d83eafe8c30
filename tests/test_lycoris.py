"""LyCORIS LoHa / LoKr and LoCon files (kohya layout) against their weight updates applied by hand."""
import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from latent_diffusion import LatentDiffusionPipeline

ATTN = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # Linear 16 -> 16
CONV = "down_blocks.0.resnets.0.conv1"  # Conv2d 8 -> 8, 3×3


def kohya(name):
    return "lora_unet_" + name.replace(".", "_")


def generate(pipe, output_type="np"):
    """The image (or, where the tiny random VAE hides small changes, the latents) of one fixed request."""
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red circle", num_inference_steps=3, guidance_scale=5.0, output_type=output_type, sampler="ddim",
                  generator=torch.Generator().manual_seed(0)).images
    return np.asarray(images)


def by_hand(pipe, deltas, scale=1.0):
    """A copy of the pipeline with W + scale·ΔW written into the named UNet modules."""
    ref = copy.deepcopy(pipe)
    with torch.no_grad():
        for name, delta in deltas.items():
            weight = ref.unet.get_submodule(name).weight
            weight += scale * delta.reshape(weight.shape)
    return ref


def loha_file(path):
    torch.manual_seed(0)
    r, state, deltas = 2, {}, {}
    for name, (out, fan_in) in {ATTN: (16, 16), CONV: (8, 8 * 9)}.items():
        f = {k: torch.randn(*shape) * 1.5 for k, shape in
             {"hada_w1_a": (out, r), "hada_w1_b": (r, fan_in), "hada_w2_a": (out, r), "hada_w2_b": (r, fan_in)}.items()}
        state.update({f"{kohya(name)}.{k}": v for k, v in f.items()})
        state[f"{kohya(name)}.alpha"] = torch.tensor(1.0)
        deltas[name] = (1.0 / r) * (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
    save_file(state, str(path))
    return deltas


def lokr_file(path):
    torch.manual_seed(1)
    w1, w2_a, w2_b = torch.randn(4, 4) * 0.5, torch.randn(4, 2) * 0.5, torch.randn(2, 4) * 0.5  # 16 = 4 × 4
    state = {f"{kohya(ATTN)}.lokr_w1": w1, f"{kohya(ATTN)}.lokr_w2_a": w2_a, f"{kohya(ATTN)}.lokr_w2_b": w2_b,
             f"{kohya(ATTN)}.alpha": torch.tensor(1.0)}
    save_file(state, str(path))
    return {ATTN: (1.0 / 2) * torch.kron(w1, w2_a @ w2_b)}


def locon_file(path):
    torch.manual_seed(2)
    down, up = torch.randn(2, 8, 3, 3) * 0.3, torch.randn(8, 2, 1, 1) * 0.3
    save_file({f"{kohya(CONV)}.lora_down.weight": down, f"{kohya(CONV)}.lora_up.weight": up,
               f"{kohya(CONV)}.alpha": torch.tensor(1.0)}, str(path))
    return {CONV: (1.0 / 2) * (up.flatten(1) @ down.flatten(1))}


@pytest.mark.parametrize("make", [loha_file, lokr_file, locon_file], ids=["loha", "lokr", "locon"])
def test_adapter_file_equals_its_update_applied_by_hand(sd_folder, tmp_path, make):
    pipe = LatentDiffusionPipeline.from_pretrained(sd_folder)
    deltas = make(tmp_path / "adapter.safetensors")
    reference = by_hand(pipe, deltas)
    base = generate(pipe, "latent")
    pipe.load_lora_weights(tmp_path / "adapter.safetensors", adapter_name="a")
    assert np.abs(generate(pipe) - generate(reference)).max() <= 1 / 255
    latents = generate(pipe, "latent")
    assert np.abs(latents - generate(reference, "latent")).max() <= 1e-4 * np.abs(latents).max()
    assert np.abs(latents - base).max() > 1e-3 * np.abs(latents).max()  # the adapter matters (10× the tolerance)
    pipe.set_adapters(["a"], [0.5])  # scales as a LoRA's do
    assert np.abs(generate(pipe) - generate(by_hand(LatentDiffusionPipeline.from_pretrained(sd_folder), deltas,
                                                    0.5))).max() <= 1 / 255


def test_loha_and_lokr_together_through_the_cli_flag(sd_folder, tmp_path):
    from latent_diffusion.pipelines.lora import apply_loras

    pipe = LatentDiffusionPipeline.from_pretrained(sd_folder)
    d1, d2 = loha_file(tmp_path / "loha.safetensors"), lokr_file(tmp_path / "lokr.safetensors")
    reference = by_hand(by_hand(pipe, d1, 1.0), {ATTN: 0.7 * d2[ATTN]})
    apply_loras(pipe, [str(tmp_path / "loha.safetensors"), f"{tmp_path / 'lokr.safetensors'}:0.7"])
    assert np.abs(generate(pipe) - generate(reference)).max() <= 1 / 255


def test_key_naming_no_layer_is_an_error_naming_it(sd_folder, tmp_path):
    save_file({"lora_unet_no_such_block.hada_w1_a": torch.zeros(2, 2), "lora_unet_no_such_block.hada_w1_b":
               torch.zeros(2, 2)}, str(tmp_path / "bad.safetensors"))
    pipe = LatentDiffusionPipeline.from_pretrained(sd_folder)
    with pytest.raises(ValueError, match="lora_unet_no_such_block.hada_w1_a.*no module named like"):
        pipe.load_lora_weights(tmp_path / "bad.safetensors")


def test_dora_file_equals_its_update_applied_by_hand(sd_folder, tmp_path):
    """kohya DoRA: W' = m ⊙ (W + (α/r)·up·down) / ‖W + (α/r)·up·down‖ per output row, m = dora_scale."""
    pipe = LatentDiffusionPipeline.from_pretrained(sd_folder)
    torch.manual_seed(3)
    down, up = torch.randn(2, 16) * 0.5, torch.randn(16, 2) * 0.5
    weight = pipe.unet.get_submodule(ATTN).weight.detach()
    updated = weight + 0.5 * up @ down
    magnitude = updated.norm(dim=1, keepdim=True) * (1 + torch.rand(16, 1))  # LyCORIS' (out, 1) dora_scale
    save_file({f"{kohya(ATTN)}.lora_down.weight": down, f"{kohya(ATTN)}.lora_up.weight": up,
               f"{kohya(ATTN)}.alpha": torch.tensor(1.0), f"{kohya(ATTN)}.dora_scale": magnitude},
              str(tmp_path / "dora.safetensors"))
    reference = by_hand(pipe, {ATTN: magnitude * updated / updated.norm(dim=1, keepdim=True) - weight})
    pipe.load_lora_weights(tmp_path / "dora.safetensors")
    assert np.abs(generate(pipe) - generate(reference)).max() <= 1 / 255
    latents = generate(pipe, "latent")
    assert np.abs(latents - generate(reference, "latent")).max() <= 1e-4 * np.abs(latents).max()
