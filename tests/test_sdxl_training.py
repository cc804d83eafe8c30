"""Training an SDXL UNet: the cache holds both encoders' embeddings and each image's size and crop; 2 steps end to end."""
import json

import pytest
import torch

from latent_diffusion.training.cache import build_or_load_cache, cache_key
from latent_diffusion.training.data import ImageTransform, load_caption_dataset
from latent_diffusion.text.conditioners import SDXLConditioner
from latent_diffusion.tiny import tiny_sdxl_components
from latent_diffusion.training.sdxl import SizedCaptionImageDataset, batch_time_ids
from test_data import make_imagefolder
from test_training import train


@pytest.fixture(scope="module")
def parts():
    return tiny_sdxl_components()


@pytest.fixture(scope="module")
def sdxl_data_dir(tmp_path_factory):
    captions = ["a red circle above a blue square", "a cat on a sofa"]
    return str(make_imagefolder(tmp_path_factory.mktemp("sdxl-data") / "images", 4, captions=captions))


def test_cache_holds_pooled_embeddings_sizes_and_crops(parts, sdxl_data_dir, tmp_path):
    dataset = load_caption_dataset(train_data_dir=sdxl_data_dir)  # 40×36 images
    encoders = {k: parts[k] for k in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}
    cache, hit = build_or_load_cache(str(tmp_path), "k", dataset, vae=parts["vae"], **encoders,
                                     transform=ImageTransform(32, center_crop=False, random_flip=True),
                                     image_column="image", caption_column="text", batch_size=2)
    assert not hit
    expected = SDXLConditioner(parts["tokenizer"], parts["text_encoder"], parts["tokenizer_2"],
                               parts["text_encoder_2"]).encode_texts([dataset[1]["text"]], num_chunks=1)
    torch.testing.assert_close(cache.text_embeds[1], expected.context[0])
    torch.testing.assert_close(cache.pooled_embeds[1], expected.text_embeds[0])
    assert cache.text_embeds.shape[-1] == 64 and cache.empty_pooled.shape == (16,)
    assert cache.original_size.tolist() == [[36, 40]] * 4  # (height, width) before resizing
    # resized to 36×32 (w×h): the crop's left is in 0..4, top 0; mirrored left = 36 − left − 32
    lefts = cache.crop_top_left[:, 0, 1]
    assert cache.crop_top_left[:, :, 0].eq(0).all() and lefts.ge(0).all() and lefts.le(4).all()
    assert torch.equal(cache.crop_top_left[:, 1, 1], 4 - lefts)


def test_cache_key_changes_with_the_second_encoder(parts):
    base = dict(resolution=32, center_crop=True, dataset_fingerprint="d")
    plain = cache_key(parts["vae"], parts["text_encoder"], parts["tokenizer"], **base)
    sdxl = cache_key(parts["vae"], parts["text_encoder"], parts["tokenizer"], **base,
                     text_encoder_2=parts["text_encoder_2"], tokenizer_2=parts["tokenizer_2"])
    other = tiny_sdxl_components(seed=1)["text_encoder_2"]
    changed = cache_key(parts["vae"], parts["text_encoder"], parts["tokenizer"], **base,
                        text_encoder_2=other, tokenizer_2=parts["tokenizer_2"])
    assert len({plain, sdxl, changed}) == 3


def test_time_ids_are_original_size_crop_and_target():
    ids = batch_time_ids(torch.tensor([[36, 40]]), torch.tensor([[0, 3]]), resolution=32)
    assert ids.tolist() == [[36.0, 40.0, 0.0, 3.0, 32.0, 32.0]]


def test_sdxl_training_two_steps_loads_in_diffusers(sdxl_folder, sdxl_data_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from latent_diffusion.pipelines import LatentDiffusionPipeline

    out = tmp_path / "out"
    train(sdxl_folder, sdxl_data_dir, out, "--max_train_steps", 2, "--checkpointing_steps", 2, "--random_flip",
          "--caption_dropout", "0.5", "--validation_prompts", "a cat on a sofa", "--validation_steps", 2,
          "--num_validation_inference_steps", 1, "--validation_metrics", "pixel_std", cache_dir=str(tmp_path / "cache"))
    assert (out / "validation" / "step-000002.png").is_file()  # sampled with the SDXL pipeline during training
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    before = StableDiffusionXLPipeline.from_pretrained(sdxl_folder).unet.state_dict()
    theirs = StableDiffusionXLPipeline.from_pretrained(out)
    after = theirs.unet.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the UNet learned
    assert not torch.equal(before["add_embedding.linear_1.weight"], after["add_embedding.linear_1.weight"])
    theirs.set_progress_bar_config(disable=True)
    assert theirs("a cat", num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)
    ours = LatentDiffusionPipeline.from_pretrained(str(out))
    assert ours.text_encoder_2 is not None


def test_on_the_fly_samples_carry_size_and_crop(sdxl_data_dir):
    """--no_cache: each sample's (top, left) is where its pixels were cut from the resized (mirrored) image."""
    from PIL import Image

    from latent_diffusion.training.data import decode_image, to_tensor

    dataset = load_caption_dataset(train_data_dir=sdxl_data_dir)
    samples = SizedCaptionImageDataset(dataset, "image", "text", ImageTransform(32, random_flip=True), seed=0)
    resized = decode_image(dataset[0]["image"]).resize((36, 32), Image.BILINEAR)  # 40×36 -> shorter side 32
    sides = set()
    for epoch in range(8):
        sample = samples[(0, epoch)]
        assert sample["original_size"].tolist() == [36, 40]
        top, left = sample["crop_top_left"].tolist()
        box = (left, top, left + 32, top + 32)
        plain = torch.equal(sample["pixels"], to_tensor(resized.crop(box)))
        mirrored = torch.equal(sample["pixels"], to_tensor(resized.transpose(Image.FLIP_LEFT_RIGHT).crop(box)))
        assert plain or mirrored
        sides.add(mirrored)
    assert sides == {False, True}


def test_sdxl_training_without_cache(sdxl_folder, sdxl_data_dir, tmp_path):
    out = tmp_path / "out"
    train(sdxl_folder, sdxl_data_dir, out, "--max_train_steps", 1, "--checkpointing_steps", 1, "--no_cache",
          "--random_flip")
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
