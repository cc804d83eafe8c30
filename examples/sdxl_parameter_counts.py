"""Parameter counts and weight sizes of SDXL base 1.0's components, from its published configs, built on the meta device.

Nothing is downloaded or allocated: `python examples/sdxl_parameter_counts.py` prints the table in the
README's "SDXL models" section.
"""
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

with torch.device("meta"):
    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816)
    te1 = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                       num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu"))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                                                     num_hidden_layers=32, num_attention_heads=20,
                                                     projection_dim=1280, hidden_act="gelu"))
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
total = 0
for name, m in [("unet", unet), ("text_encoder", te1), ("text_encoder_2", te2), ("vae", vae)]:
    n = sum(p.numel() for p in m.parameters())
    total += n
    print(f"{name:15s} {n/1e6:8.1f} M params  fp16 {2*n/2**30:5.2f} GiB  fp32 {4*n/2**30:5.2f} GiB")
print(f"{'total':15s} {total/1e6:8.1f} M params  fp16 {2*total/2**30:5.2f} GiB ({2*total/1e9:.2f} GB)  fp32 {4*total/2**30:5.2f} GiB")
