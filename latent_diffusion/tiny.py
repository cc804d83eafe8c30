"""Tiny Stable-Diffusion components built from config, for tests, benchmarks and examples.

Everything here is random-initialised and offline: a UNet of a few thousand
parameters runs a whole sampling loop in well under a second on a CPU.
"""
from __future__ import annotations

from typing import Any

import torch

from latent_diffusion.text.tokenizers import train_clip_tokenizer

TINY_CORPUS = (
    "a red circle above a blue square",
    "an orange triangle on the left on a gray background",
    "a small green square at the top",
    "a large purple circle in the center on a white background",
    "a yellow triangle to the right of a red circle",
    "a blue square below a green triangle on a black background",
    "a cat on a sofa",
)


def tiny_unet_config(cross_attention_dim: int = 32, sample_size: int = 16) -> dict[str, Any]:
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=4,
    )


def tiny_components(seed: int = 0, prediction_type: str = "epsilon", scheduler: str = "ddim") -> dict[str, Any]:
    """unet, vae, text_encoder, tokenizer and scheduler of a tiny SD model (VAE factor 2, 32×32 images)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = train_clip_tokenizer(TINY_CORPUS * 4, vocab_size=120)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config())
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(text_config)
    scheduler_cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "pndm": PNDMScheduler}[scheduler]
    # from_config drops the keys a scheduler class does not take, as an SD folder's config does.
    sched = scheduler_cls.from_config(dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    ))
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, scheduler=sched)


def tiny_sdxl_unet_config(cross_attention_dim: int = 64, projection_dim: int = 16, time_embed_dim: int = 8,
                          sample_size: int = 16) -> dict[str, Any]:
    """An SDXL-style UNet: pooled text + 6 size/crop ids through `addition_embed_type="text_time"`.

    The added embedding takes 6·`time_embed_dim` + `projection_dim` inputs
    (original size, crop top-left and target size, each (h, w), plus the pooled projection).
    """
    return dict(
        tiny_unet_config(cross_attention_dim, sample_size),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + projection_dim,
        transformer_layers_per_block=(1, 2),
    )


def tiny_sdxl_components(seed: int = 0, scheduler: str = "euler") -> dict[str, Any]:
    """The parts of a tiny SDXL model: two CLIP text encoders (the second with a projection), two tokenizers.

    As in SDXL, the UNet cross-attends to both encoders' penultimate hidden
    states concatenated (32 + 32 features) and its added embedding takes the
    second encoder's pooled projection (16) and the micro-conditioning ids.
    """
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    base = tiny_components(seed=seed, scheduler="ddim" if scheduler == "euler" else scheduler)
    tokenizer = base["tokenizer"]
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**tiny_sdxl_unet_config())
    config_2 = CLIPTextConfig(**{**base["text_encoder"].config.to_dict(), "projection_dim": 16, "num_hidden_layers": 3})
    text_encoder_2 = CLIPTextModelWithProjection(config_2)
    sched = base["scheduler"]
    if scheduler == "euler":  # SDXL base ships EulerDiscreteScheduler with the "leading" spacing of SD
        sched = EulerDiscreteScheduler.from_config(dict(sched.config, timestep_spacing="leading"))
    return dict(unet=unet.eval(), vae=base["vae"], text_encoder=base["text_encoder"], tokenizer=tokenizer,
                text_encoder_2=text_encoder_2.eval(), tokenizer_2=tokenizer, scheduler=sched)


def tiny_controlnet(unet, seed: int = 0):
    """A ControlNet copied from a tiny UNet (diffusers' `ControlNetModel.from_unet`), for tests and examples.

    Its control-image encoder downsamples by the tiny VAE's factor 2 (one stride-2 layer), and its zero-initialised
    output convolutions get small random weights so that the control image visibly changes the output.
    """
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8))
    with torch.no_grad():
        for module in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            torch.nn.init.normal_(module.weight, std=0.1)
    return net.eval()
