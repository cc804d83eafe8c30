"""What training an SDXL UNet adds to the SD loop: the second text encoder's pieces and the size/crop ids.

An SDXL UNet (`addition_embed_type="text_time"`) takes, besides the
cross-attention context, the pooled projection of the second text encoder and
six micro-conditioning ids per image (Podell et al. 2023, §2.2): the image's
original (height, width) before resizing, the (top, left) of the training crop
in the resized image, and the target (height, width) = (resolution, resolution).
The cache stores the first two per image (and per flipped side), and with
`--no_cache` `SizedCaptionImageDataset` returns them per sample; the ids are
assembled here for each batch, as diffusers' `train_text_to_image_sdxl.py` does.
"""
from __future__ import annotations

from typing import Optional

import torch

from latent_diffusion.training.data import CaptionImageDataset, crop_box, decode_image, draw_flip, sample_generator
from latent_diffusion.text.conditioners import Conditioning, check_added_embedding, is_sdxl_unet


def batch_time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, resolution: int) -> torch.Tensor:
    """(B, 6) ids: original (h, w), crop (top, left), target (resolution, resolution), from (B, 2) and (B, 2)."""
    target = torch.full_like(original_size, int(resolution))  # (B, 2)
    return torch.cat([original_size, crop_top_left, target], dim=1).float()


def batch_conditioning(batch: dict, context: torch.Tensor, resolution: int, device) -> Conditioning:
    """The UNet's conditioning for a batch: the context, for SDXL its pooled text and size ids, and for ControlNet
    training the control images."""
    cond = Conditioning(context.to(device, torch.float32))
    if "pooled_embeds" in batch:
        cond.text_embeds = batch["pooled_embeds"].to(device, torch.float32)  # (B, P)
        cond.time_ids = batch_time_ids(batch["original_size"], batch["crop_top_left"], resolution).to(device)
    if "control_pixels" in batch:  # ControlNet training (training/train_controlnet.py)
        cond.control = batch["control_pixels"].to(device, torch.float32)  # (B, 3, H, W) in [0, 1]
    return cond


def context_dim(text_encoder, text_encoder_2=None) -> int:
    """Features of the context the UNet cross-attends to: SDXL concatenates both encoders' hidden states."""
    dims = [enc.config.hidden_size for enc in (text_encoder, text_encoder_2) if enc is not None]
    return sum(dims)


def check_sdxl_parts(unet, text_encoder_2) -> None:
    """An SDXL UNet needs the second encoder and an added embedding that fits it; errors name the flag or folder."""
    if not is_sdxl_unet(unet):
        if text_encoder_2 is not None:
            raise ValueError("--pretrained_model_name_or_path has text_encoder_2 (SDXL) but the UNet takes no "
                             "added embeddings (addition_embed_type 'text_time'); use an SDXL UNet config")
        return
    if text_encoder_2 is None:
        raise ValueError("--pretrained_model_name_or_path: the UNet is an SDXL UNet but the folder has no "
                         "text_encoder_2 / tokenizer_2")
    check_added_embedding(unet, text_encoder_2.config.projection_dim)


class SizedCaptionImageDataset(CaptionImageDataset):
    """`CaptionImageDataset` samples plus each image's original (height, width) and crop (top, left), for SDXL.

    The crop and flip are those the transform drew: the same (seed, epoch, index) generator replayed
    (crop offsets first, then the flip coin, as `ImageTransform` draws them).
    """

    def __getitem__(self, item: tuple[int, int]) -> dict:
        sample = super().__getitem__(item)
        index, epoch = item
        image = decode_image(self.dataset[int(index)][self.image_column])
        replay = sample_generator(self.seed, index, epoch)
        resized_w, _, left, top = crop_box(image.size, self.transform.resolution, self.transform.center_crop, replay)
        if draw_flip(replay, self.transform.random_flip):
            left = resized_w - left - self.transform.resolution  # the mirrored image's crop
        sample["original_size"] = torch.tensor([image.height, image.width])
        sample["crop_top_left"] = torch.tensor([top, left])
        return sample


def read_force_zeros(path: str, revision: Optional[str] = None, cache_dir: Optional[str] = None) -> Optional[bool]:
    """The folder's `force_zeros_for_empty_prompt` (model_index.json), kept in the trained pipeline."""
    from diffusers import DiffusionPipeline

    from latent_diffusion.formats.single_file import is_single_file

    if is_single_file(path):  # a single file has no model_index.json: the pipeline's default (True for SDXL)
        return None
    index = DiffusionPipeline.load_config(path, revision=revision, cache_dir=cache_dir)
    return index.get("force_zeros_for_empty_prompt")
