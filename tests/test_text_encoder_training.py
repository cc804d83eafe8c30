"""--train_text_encoder (full fine-tuning, SD and SDXL), --text_encoder_lr, and SDXL's text-encoder LoRA: each mode
trains (encoder and UNet weights change), is checkpointed (exact resume in full mode), saves, and loads back in our
pipeline (and diffusers') with the trained effect; the combinations that cannot work stop in one line."""
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from test_data import make_imagefolder
from test_pipeline import generate, load_ours
from test_training import data_dir, train, weights  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def sdxl_data_dir(tmp_path_factory):
    return str(make_imagefolder(tmp_path_factory.mktemp("sdxl-data") / "images", 4,
                                captions=["a red circle", "a cat on a sofa"]))


def folder_weights(folder, component):
    """{name: tensor} of one component of a diffusers folder (safetensors)."""
    return load_file(os.path.join(folder, component, "model.safetensors" if component.startswith("text")
                                  else "diffusion_pytorch_model.safetensors"))


def changed(before, after):
    """Whether any shared tensor differs."""
    return any(not torch.equal(before[k], after[k]) for k in before if k in after)


def sdxl_images(pipe, **kwargs):
    """Our pipeline's (or, without `sampler`, diffusers' scheduler's) images of a fixed prompt and seed."""
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle", num_inference_steps=3, guidance_scale=3.0, output_type="np",
                generator=torch.Generator().manual_seed(0), **kwargs).images


def test_full_text_encoder_trains_saves_and_loads(sd_folder, data_dir, tmp_path):  # noqa: F811
    from latent_diffusion.pipelines import LatentDiffusionPipeline

    out = tmp_path / "out"
    train(sd_folder, data_dir, out, "--train_text_encoder", "--text_encoder_lr", "5e-2", "--no_cache",
          "--max_train_steps", 2, "--checkpointing_steps", 2, "--save_single_file", "--gradient_checkpointing")
    base_te, te = folder_weights(sd_folder, "text_encoder"), folder_weights(out, "text_encoder")
    assert changed(base_te, te) and changed(folder_weights(sd_folder, "unet"), folder_weights(out, "unet"))
    checkpoint = load_file(str(out / "checkpoint-2" / "text_encoder.safetensors"))
    assert all(torch.equal(checkpoint[k], te[k]) for k in te)  # the checkpoint holds the encoder that was saved
    single = load_file(str(out / "model.safetensors"))  # the single file holds the trained encoder (float16)
    key = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    q_proj = te[next(k for k in te if k.endswith("encoder.layers.0.self_attn.q_proj.weight"))]
    assert torch.equal(single[key], q_proj.half())
    trained = load_ours(str(out))
    base_encoder = LatentDiffusionPipeline.from_pretrained(str(sd_folder)).text_encoder
    with_base = LatentDiffusionPipeline(**{**trained.components, "text_encoder": base_encoder})
    with_base.set_progress_bar_config(disable=True)
    a, b = generate(trained, guidance_scale=3.0), generate(with_base, guidance_scale=3.0)
    assert np.abs(a - b).max() > 1 / 255  # the folder's encoder is the trained one, and it changes the image
    again = LatentDiffusionPipeline.from_single_file(out / "model.safetensors")
    again.set_progress_bar_config(disable=True)
    assert np.abs(generate(again, guidance_scale=3.0) - a).max() <= 2 / 255  # the file is float16


def test_mixed_precision_trains_a_float32_encoder_and_validates_with_it(sd_folder, data_dir, tmp_path):  # noqa: F811
    """bf16 with gradient checkpointing: the encoder trains in float32 (the frozen VAE is cast), is saved in
    float32, and the validation images are drawn during training."""
    out = tmp_path / "out"
    train(sd_folder, data_dir, out, "--train_text_encoder", "--text_encoder_lr", "5e-2", "--no_cache",
          "--max_train_steps", 2, "--checkpointing_steps", 2, "--mixed_precision", "bf16", "--gradient_checkpointing",
          "--validation_prompts", "a cat", "--validation_steps", 2, "--num_validation_inference_steps", 1)
    te = folder_weights(out, "text_encoder")
    assert {t.dtype for t in te.values()} == {torch.float32}
    assert changed(folder_weights(sd_folder, "text_encoder"), te)
    assert (out / "validation" / "step-000002.png").is_file()


def test_text_encoder_lr_is_its_own_parameter_group(sd_folder, data_dir, tmp_path):  # noqa: F811
    """One AdamW step moves each weight by about its group's learning rate: 1e-12 for the encoder, 1e-3 (the
    run's --learning_rate) for the UNet."""
    out = tmp_path / "out"
    train(sd_folder, data_dir, out, "--train_text_encoder", "--text_encoder_lr", "1e-12", "--adam_weight_decay", "0",
          "--no_cache", "--max_train_steps", 1, "--checkpointing_steps", 1)

    def largest_change(component):
        before, after = folder_weights(sd_folder, component), folder_weights(out, component)
        return max(float((after[k] - before[k]).abs().max()) for k in before)

    assert 0 < largest_change("text_encoder") < 1e-9
    assert largest_change("unet") > 1e-4
    assert "| text_encoder_lr | 1e-12 |" in (out / "README.md").read_text()


@pytest.mark.parametrize("cached", [True, False], ids=["cached_latents", "no_cache"])
def test_full_text_encoder_resume_is_exact(sd_folder, data_dir, tmp_path, cached):  # noqa: F811
    """4 steps straight == 2 steps, stop, resume 2 more (mid-epoch, EMA on): the UNet, its EMA and the encoder;
    with cached latents (captions encoded every step) and without the cache."""
    flags = ["--train_text_encoder", "--text_encoder_lr", "1e-2", "--use_ema", "--random_flip",
             "--caption_dropout", "0.3", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "3",
             "--checkpointing_steps", 2, "--cache_dir", tmp_path / "cache"] + ([] if cached else ["--no_cache"])
    train(sd_folder, data_dir, tmp_path / "straight", "--max_train_steps", 4, *flags)
    train(sd_folder, data_dir, tmp_path / "split", "--max_train_steps", 2, *flags)
    train(sd_folder, data_dir, tmp_path / "split", "--max_train_steps", 4, "--resume_from_checkpoint", "latest", *flags)
    for name in ("checkpoint-2", "checkpoint-4"):
        assert (tmp_path / "split" / name / "text_encoder.safetensors").is_file()
    straight, split = weights(tmp_path / "straight" / "checkpoint-4"), weights(tmp_path / "split" / "checkpoint-4")
    straight_te = load_file(str(tmp_path / "straight" / "checkpoint-4" / "text_encoder.safetensors"))
    split_te = load_file(str(tmp_path / "split" / "checkpoint-4" / "text_encoder.safetensors"))
    assert straight.keys() == split.keys() and straight_te.keys() == split_te.keys()
    for mine, theirs in ((split, straight), (split_te, straight_te)):
        for name in theirs:
            torch.testing.assert_close(mine[name], theirs[name], atol=1e-6, rtol=0)
    assert changed(load_file(str(tmp_path / "split" / "checkpoint-2" / "text_encoder.safetensors")), split_te)


def test_sdxl_full_text_encoders_train_and_load(sdxl_folder, sdxl_data_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from latent_diffusion.pipelines import LatentDiffusionPipeline

    out = tmp_path / "out"
    train(sdxl_folder, sdxl_data_dir, out, "--train_text_encoder", "--text_encoder_lr", "5e-2",  # latents cached
          "--max_train_steps", 2, "--checkpointing_steps", 2, "--cache_dir", tmp_path / "cache")
    for component in ("text_encoder", "text_encoder_2", "unet"):  # kohya's --train_text_encoder trains both
        assert changed(folder_weights(sdxl_folder, component), folder_weights(out, component)), component
    assert {"text_encoder.safetensors", "text_encoder_2.safetensors"} <= set(os.listdir(out / "checkpoint-2"))
    theirs = StableDiffusionXLPipeline.from_pretrained(str(out))
    ours = LatentDiffusionPipeline.from_pretrained(str(out))
    base = LatentDiffusionPipeline.from_pretrained(str(sdxl_folder))
    with_base = LatentDiffusionPipeline(**{**ours.components, "text_encoder": base.text_encoder,
                                           "text_encoder_2": base.text_encoder_2})
    a, b = sdxl_images(ours, sampler="euler"), sdxl_images(with_base, sampler="euler")
    assert np.abs(a - b).max() > 1 / 255  # the trained encoders change the image
    assert sdxl_images(theirs).shape == a.shape


@pytest.mark.slow  # per layout, an SDXL LoRA run and five pipelines: 15-18 s on an idle moment of the shared box
@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_sdxl_text_encoder_lora_trains_saves_and_loads(sdxl_folder, sdxl_data_dir, tmp_path, layout):
    from diffusers import StableDiffusionXLPipeline

    from latent_diffusion.pipelines import LatentDiffusionPipeline

    out = tmp_path / "out"
    caching = ["--no_cache"] if layout == "diffusers" else ["--cache_dir", tmp_path / "cache"]  # both data paths
    train(sdxl_folder, sdxl_data_dir, out, "--lora_rank", "4", "--learning_rate", "5e-2", "--train_text_encoder_lora",
          *caching, "--lora_save_format", layout, "--max_train_steps", 3, "--checkpointing_steps", 3)
    for name in ("lora_text_encoder.safetensors", "lora_text_encoder_2.safetensors"):
        checkpoint = load_file(str(out / "checkpoint-3" / name))
        assert checkpoint and all("lora" in k for k in checkpoint)
    lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
    prefixes = ("text_encoder.", "text_encoder_2.") if layout == "diffusers" else ("lora_te1_", "lora_te2_")
    for prefix in prefixes:
        ups = [v for k, v in lora.items() if k.startswith(prefix) and ("up.weight" in k or "lora_B" in k)]
        assert ups and any(float(v.abs().max()) > 0 for v in ups), prefix  # B started at zero: training moved it
    ours = LatentDiffusionPipeline.from_pretrained(str(sdxl_folder))
    theirs = StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder))
    base = sdxl_images(ours, sampler="euler")  # the folder's scheduler is diffusers' Euler
    ours.load_lora_weights(str(out))
    theirs.load_lora_weights(str(out))
    assert {"text_encoder", "text_encoder_2", "unet"} <= set(ours.get_list_adapters())
    a = sdxl_images(ours, sampler="euler")
    assert np.abs(a - base).max() > 1 / 255
    assert np.abs(a - sdxl_images(theirs)).max() <= 1 / 255
    for prefix in prefixes:  # each encoder's adapter is loaded and acts
        without = LatentDiffusionPipeline.from_pretrained(str(sdxl_folder))
        without.load_lora_weights({k: v for k, v in lora.items() if not k.startswith(prefix)})
        assert np.abs(sdxl_images(without, sampler="euler") - a).max() > 1 / 255, prefix
    ours.fuse_lora()  # by default every adapted component, text_encoder_2 included: unloading keeps them all
    ours.unload_lora_weights()
    assert not ours.get_list_adapters()
    assert np.abs(sdxl_images(ours, sampler="euler") - a).max() <= 1 / 255


@pytest.mark.parametrize("flags, message", [
    (["--train_text_encoder", "--no_cache", "--lora_rank", "4"], "--train_text_encoder fine-tunes the whole text "
                                                                  "encoder and --lora_rank trains adapters only"),
    (["--text_encoder_lr", "1e-5"], "--text_encoder_lr needs --train_text_encoder or --train_text_encoder_lora"),
    (["--train_text_encoder", "--no_cache", "--text_encoder_lr", "-1"], "--text_encoder_lr"),
])
def test_bad_combinations_are_one_line(sd_folder, data_dir, tmp_path, capsys, flags, message):  # noqa: F811
    from latent_diffusion.training.train_text2img import cli

    argv = ["--pretrained_model_name_or_path", str(sd_folder), "--train_data_dir", data_dir,
            "--output_dir", str(tmp_path / "out"), *flags]
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error and "Traceback" not in capsys.readouterr().err


def test_sharded_training_is_refused_with_a_training_text_encoder():
    from accelerate.utils import DistributedType

    from latent_diffusion.training.text_encoders import check_distributed_type

    check_distributed_type(DistributedType.MULTI_GPU)  # DDP: the encoders' gradients are averaged by a hook
    for sharded in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(ValueError, match="--train_text_encoder / --train_text_encoder_lora cannot be combined"):
            check_distributed_type(sharded)


def test_kohya_keys_of_sdxl_text_encoders_round_trip():
    from latent_diffusion.formats.lora_keys import diffusers_to_kohya, kohya_to_diffusers

    module = "text_model.encoder.layers.0.self_attn.q_proj"
    state = {f"{te}.{module}.lora.{part}.weight": torch.full((2, 2), float(i))
             for i, te in enumerate(("text_encoder", "text_encoder_2")) for part in ("down", "up")}
    kohya = diffusers_to_kohya(state, alphas={"text_encoder": 1.0, "text_encoder_2": 4.0})
    flat = module.replace(".", "_")
    assert float(kohya[f"lora_te1_{flat}.alpha"]) == 1.0 and float(kohya[f"lora_te2_{flat}.alpha"]) == 4.0
    assert torch.equal(kohya[f"lora_te2_{flat}.lora_up.weight"], state[f"text_encoder_2.{module}.lora.up.weight"])
    back, alphas = kohya_to_diffusers(kohya, {"text_encoder": [module], "text_encoder_2": [module]})
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    assert alphas == {"text_encoder": 1.0, "text_encoder_2": 4.0}


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_train_the_same_text_encoder(sd_folder, data_dir, tmp_path):  # noqa: F811
    """accelerate launch, two CPU processes: the encoder's gradients are averaged, so both ranks end with the same
    encoder (and UNet), which differs from the base."""
    import subprocess

    from conftest import two_cpu_processes
    from test_training import ROOT, SCRIPT

    launch, env = two_cpu_processes(SCRIPT)
    command = launch + ["--pretrained_model_name_or_path", str(sd_folder), "--train_data_dir", data_dir,
                        "--output_dir", str(tmp_path / "out"), "--resolution", "32", "--train_batch_size", "1",
                        "--max_train_steps", "2", "--checkpointing_steps", "2", "--report_to", "none",  # latents cached
                        "--train_text_encoder", "--text_encoder_lr", "1e-2",
                        "--sample_index_log", str(tmp_path / "rows")]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    logs = [(tmp_path / f"rows.rank{r}").read_text().splitlines() for r in range(2)]  # world size 2: ranks 0 and 1
    steps = [[line.split() for line in log if not line.startswith("weights")] for log in logs]
    assert len(steps[0]) == len(steps[1]) == 2
    assert all(not set(a[1:]) & set(b[1:]) for a, b in zip(*steps))  # distinct ranks: disjoint rows
    final = [log[-1].split() for log in logs]
    assert final[0][0] == "weights" and final[0][2] == "text_encoder" and final[0] == final[1]
    assert changed(folder_weights(sd_folder, "text_encoder"), folder_weights(tmp_path / "out", "text_encoder"))


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_push_to_hub_uploads_the_trained_encoder(sd_folder, data_dir, tmp_path, monkeypatch):  # noqa: F811
    """--push_to_hub and --push_checkpoints_to_hub, to a local stand-in Hub: the folder's trained encoder and the
    checkpoint's encoder file go up."""
    from huggingface_hub import constants
    from hub_server import FakeHub

    repo = "someone/trained-text-encoder"
    with FakeHub() as fake:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest's offline mode blocks local calls too
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.setattr(constants, "ENDPOINT", fake.url)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        train(sd_folder, data_dir, tmp_path / "out", "--train_text_encoder", "--no_cache", "--max_train_steps", 1,
              "--checkpointing_steps", 1, "--push_to_hub", "--push_checkpoints_to_hub", "--hub_model_id", repo,
              "--hub_token", "hf_fake")
        pushed = fake.files(repo)
        assert fake.unhandled == [] and fake.errors == []
    local = (tmp_path / "out" / "text_encoder" / "model.safetensors").read_bytes()
    assert pushed["text_encoder/model.safetensors"] == local
    assert "checkpoints/step-1/text_encoder.safetensors" in pushed
    assert changed(folder_weights(sd_folder, "text_encoder"), folder_weights(tmp_path / "out", "text_encoder"))


def test_cached_latents_carry_the_caption_variant_the_cache_would_have_embedded(tmp_path):
    """CaptionedCachedSamples: the same latents, flips and caption draws as CachedSamples, as text (so a training
    encoder encodes it); a dropped caption is ""."""
    from latent_diffusion.tiny import tiny_components
    from latent_diffusion.training.cache import CachedSamples, CaptionedCachedSamples, build_or_load_cache
    from latent_diffusion.training.data import ImageTransform, load_caption_dataset

    parts = tiny_components()
    variants = ["a red circle", "a blue square", "a cat on a sofa"]
    dataset = load_caption_dataset(train_data_dir=str(make_imagefolder(tmp_path / "d", 3)))
    dataset = dataset.remove_columns("text").add_column("text", [variants] * len(dataset))  # 3 variants per row
    cache, _ = build_or_load_cache(str(tmp_path / "c"), "k", dataset, vae=parts["vae"],
                                   text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                                   transform=ImageTransform(32, center_crop=True, random_flip=True),
                                   image_column="image", caption_column="text", batch_size=2)
    items = [(row, epoch) for row in range(3) for epoch in range(6)]
    captions = {row: variants for row in range(3)}
    embedded = CachedSamples(cache, random_flip=True, caption_dropout=0.3).__getitems__(items)
    text = CaptionedCachedSamples(cache, captions, random_flip=True, caption_dropout=0.3).__getitems__(items)
    assert "text_embeds" not in text and torch.equal(text["latent_mean"], embedded["latent_mean"])
    offsets = cache.caption_offsets.tolist()
    for (row, _), caption, embed in zip(items, text["caption"], embedded["text_embeds"]):
        expected = cache.empty_embed if caption == "" else cache.text_embeds[offsets[row] + variants.index(caption)]
        assert torch.equal(embed, expected)
    assert "" in text["caption"] and len(set(text["caption"]) - {""}) > 1
