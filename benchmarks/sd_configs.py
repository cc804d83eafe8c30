"""Stable Diffusion 1.5's component configs, written out, for benchmarks on random weights of the real sizes.

The numbers are those of the `unet/config.json` and `vae/config.json` of the SD 1.5 checkpoint (UNet:
859.5M parameters; VAE: 83.7M). Nothing is downloaded: the benchmarks build the models from these
configs with random weights, which is enough to measure time and memory.
"""
from __future__ import annotations

from typing import Any


def sd15_unet_config(cross_attention_dim: int = 768, sample_size: int = 64) -> dict[str, Any]:
    """UNet2DConditionModel keyword arguments of SD 1.5 (cross_attention_dim 768: CLIP ViT-L/14's width)."""
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        center_input_sample=False,
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        downsample_padding=1,
        mid_block_scale_factor=1,
        act_fn="silu",
        norm_num_groups=32,
        norm_eps=1e-5,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
    )


def sd15_vae_config() -> dict[str, Any]:
    """AutoencoderKL keyword arguments of SD 1.5's VAE (factor 8, 4 latent channels)."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    )


def narrow(config: dict[str, Any], divisor: int) -> dict[str, Any]:
    """The same layout with every block `divisor` times narrower (2 norm groups), for dry runs."""
    if divisor <= 1:
        return config
    return dict(config, block_out_channels=tuple(c // divisor for c in config["block_out_channels"]), norm_num_groups=2)


def sd15_folder(folder: str, text_layers: int = 2, width_divisor: int = 1) -> str:
    """Save an SD-1.5-sized diffusers folder with random weights.

    UNet and VAE at SD 1.5's configs (`width_divisor` > 1 narrows every block of them and the text encoder,
    for dry runs);
    the text encoder has CLIP ViT-L's width (768) but `text_layers` layers (its cost is one forward per
    prompt) and the tiny tokenizer of latent_diffusion.tiny.
    """
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from latent_diffusion.tiny import tiny_components

    tiny = tiny_components()
    torch.manual_seed(0)
    tokenizer, width = tiny["tokenizer"], 768 // width_divisor
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=text_layers,
        num_attention_heads=12, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(**narrow(sd15_unet_config(cross_attention_dim=width), width_divisor))
    vae = AutoencoderKL(**narrow(sd15_vae_config(), width_divisor))
    StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                            scheduler=tiny["scheduler"], safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder
