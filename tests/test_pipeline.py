"""LatentDiffusionPipeline: interop with diffusers, reproducibility, outputs and input checks."""
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
)

from latent_diffusion import LatentDiffusionPipeline

DIFFUSERS_SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}
PROMPTS = ["a red circle above a blue square", "a cat on a sofa"]


def load_ours(folder):
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_theirs(folder, sampler):
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DIFFUSERS_SCHEDULERS[sampler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 8, "guidance_scale": 7.5, "output_type": "np", **kwargs}
    return pipe(kwargs.pop("prompt", PROMPTS[0]), generator=torch.Generator().manual_seed(seed), **kwargs).images


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
def test_matches_diffusers_stable_diffusion(sd_folder, sampler):
    ours, theirs = load_ours(sd_folder), load_theirs(sd_folder, sampler)
    kwargs = dict(prompt=PROMPTS, negative_prompt=["", "blurry"], num_images_per_prompt=2)
    a = generate(ours, sampler=sampler, **kwargs)
    b = generate(theirs, **kwargs)
    assert a.shape == b.shape == (4, 32, 32, 3)
    assert np.abs(a - b).max() <= 1 / 255


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_matches_diffusers_v_prediction_with_rescale(sd_folder_v, sampler):
    ours, theirs = load_ours(sd_folder_v), load_theirs(sd_folder_v, sampler)
    a = generate(ours, sampler=sampler, guidance_rescale=0.7)
    b = generate(theirs, guidance_rescale=0.7)
    assert np.abs(a - b).max() <= 1 / 255


def test_ddim_eta_matches_diffusers(sd_folder):
    ours, theirs = load_ours(sd_folder), load_theirs(sd_folder, "ddim")
    assert np.abs(generate(ours, sampler="ddim", eta=0.5) - generate(theirs, eta=0.5)).max() <= 1 / 255


def test_saved_folder_loads_in_diffusers(sd_folder, tmp_path):
    ours = load_ours(sd_folder)
    ours.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for loader in (StableDiffusionPipeline, DiffusionPipeline):
        theirs = loader.from_pretrained(tmp_path)
        assert isinstance(theirs, StableDiffusionPipeline)
    theirs.scheduler = DDIMScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    assert np.abs(generate(ours, sampler="ddim") - generate(theirs)).max() <= 1 / 255
    again = load_ours(tmp_path)
    assert again.generation_defaults == ours.generation_defaults


def test_seed_reproduces_exactly(sd_folder):
    pipe = load_ours(sd_folder)
    first, second = generate(pipe, seed=3), generate(pipe, seed=3)
    assert np.array_equal(first, second)
    assert not np.array_equal(first, generate(pipe, seed=4))


def test_list_of_generators_gives_each_image_its_own_seed(sd_folder):
    pipe = load_ours(sd_folder)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    pair = pipe([PROMPTS[0]] * 2, num_inference_steps=4, generator=gens, output_type="np").images
    single = generate(pipe, seed=6, num_inference_steps=4)
    assert np.abs(pair[1] - single[0]).max() < 1e-5


def test_output_types(sd_folder):
    pipe = load_ours(sd_folder)
    kw = dict(num_inference_steps=2)
    assert generate(pipe, output_type="pil", **kw)[0].size == (32, 32)
    assert generate(pipe, output_type="pt", **kw).shape == (1, 3, 32, 32)
    assert generate(pipe, output_type="latent", **kw).shape == (1, 4, 16, 16)
    images = generate(pipe, height=48, width=64, **kw)
    assert images.shape == (1, 48, 64, 3) and images.min() >= 0 and images.max() <= 1


def test_guidance_one_runs_conditional_branch_only(sd_folder):
    pipe = load_ours(sd_folder)
    pipe.trace_unet = False  # module hooks see eager calls only
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        generate(pipe, guidance_scale=1.0, num_inference_steps=3)
        generate(pipe, guidance_scale=3.0, num_inference_steps=3)
    finally:
        hook.remove()
    assert calls == [1, 1, 1, 2, 2, 2]


def test_fast_dtype_device_and_execution_device_agree_with_diffusers(sd_folder):
    """module_dtype / module_device and the pipeline's hook-free _execution_device answer as diffusers' walks do;
    a component carrying an offload hook hands the question back to diffusers."""
    from diffusers import DiffusionPipeline
    from latent_diffusion.tensors import carries_hooks, module_device, module_dtype

    pipe = load_ours(sd_folder)
    pipe.vae.to(torch.float16)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert (module_dtype(module), module_device(module)) == (module.dtype, module.device)
    assert module_dtype(torch.nn.ReLU()) == torch.float32 and module_device(torch.nn.ReLU()) == torch.device("cpu")
    diffusers_answer = DiffusionPipeline._execution_device.fget
    assert not carries_hooks(pipe.unet) and pipe._execution_device == diffusers_answer(pipe) == torch.device("cpu")

    class Hook:  # what accelerate's offloading leaves on a module: an execution device
        execution_device = torch.device("meta")

    for component in pipe.components.values():  # as enable_model_cpu_offload hooks every model
        if isinstance(component, torch.nn.Module):
            component._hf_hook = Hook()
    assert carries_hooks(pipe.unet)
    assert pipe._execution_device == diffusers_answer(pipe) == torch.device("meta")  # not the UNet's parameters'


def test_traced_unet_gives_the_eager_image_and_is_reused(sd_folder):
    pipe = load_ours(sd_folder)
    pipe.trace_unet = False
    eager = generate(pipe, sampler="dpm++")
    pipe.trace_unet = True
    traced = generate(pipe, sampler="dpm++")
    traced_again = generate(pipe, sampler="dpm++", seed=1)
    assert np.array_equal(eager, traced)
    assert pipe.traced_unet().num_traces == 1  # one input signature, traced once
    assert not np.array_equal(traced, traced_again)
    generate(pipe, height=48)
    assert pipe.traced_unet().num_traces == 2


def test_automatic_tracing_runs_eagerly_until_trace_after_calls(sd_folder, monkeypatch):
    import latent_diffusion.pipelines.text2img as text2img

    monkeypatch.setattr(text2img, "TRACE_AFTER_CALLS", 5)
    pipe = load_ours(sd_folder)
    eager = generate(pipe, sampler="ddim", num_inference_steps=3)  # UNet calls 1-3: eager
    assert pipe.traced_unet().num_traces == 0
    second = generate(pipe, sampler="ddim", num_inference_steps=3)  # calls 4, 5 eager; call 6 traces
    assert pipe.traced_unet().num_traces == 1
    assert np.array_equal(eager, second)
    pipe.trace_unet = True  # forced: a new signature is traced at its first call
    generate(pipe, sampler="ddim", num_inference_steps=1, height=48)
    assert pipe.traced_unet().num_traces == 2


def test_tracing_is_automatic_by_unet_size(sd_folder, monkeypatch):
    import latent_diffusion.pipelines.text2img as text2img

    pipe = load_ours(sd_folder)
    assert pipe.trace_unet is None and pipe.traced_unet().enabled  # a tiny UNet is traced
    monkeypatch.setattr(text2img, "TRACE_MAX_PARAMETERS", 1000)
    assert not pipe.traced_unet().enabled  # a "large" one runs eagerly
    pipe.trace_unet = True
    assert pipe.traced_unet().enabled


def test_callback_sees_every_step_and_can_replace_latents(sd_folder):
    pipe = load_ours(sd_folder)
    seen = []

    def callback(p, i, t, kwargs):
        seen.append((i, int(t)))
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == 4 else {}

    zeroed = generate(pipe, num_inference_steps=5, sampler="ddim", callback_on_step_end=callback, output_type="latent")
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4]
    assert torch.count_nonzero(zeroed) == 0


def test_progress_bar_shows_and_can_be_disabled(sd_folder, capfd):
    pipe = LatentDiffusionPipeline.from_pretrained(sd_folder)
    generate(pipe, num_inference_steps=3)
    assert "3/3" in capfd.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    generate(pipe, num_inference_steps=3)
    assert "3/3" not in capfd.readouterr().err


def test_long_prompt_is_encoded_in_chunks(sd_folder):
    pipe = load_ours(sd_folder)
    long_prompt = " ".join(["a red circle above a blue square on a gray background"] * 12)
    embeds = pipe.encode_prompt([long_prompt], [""]).context
    assert embeds.shape[1] == 2 * 77  # both halves padded to the longer prompt's chunk count
    images = generate(pipe, prompt=long_prompt, num_inference_steps=2)
    assert np.isfinite(images).all()


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(height=30), "height"),
        (dict(width=10), "width"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(sampler="lms"), "sampler"),
        (dict(output_type="jpeg"), "output_type"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), "negative_prompt"),
        (dict(prompt=[]), "prompt"),
        (dict(latents=torch.zeros(1, 4, 8, 8)), "latents"),
    ],
)
def test_bad_input_names_the_argument(sd_folder, kwargs, argument):
    pipe = load_ours(sd_folder)
    with pytest.raises(ValueError, match=argument):
        generate(pipe, **kwargs)


def test_folder_missing_a_component_is_named(sd_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sd_folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ValueError, match="vae"):
        LatentDiffusionPipeline.from_pretrained(broken)


def test_t5_text_encoder_folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    from latent_diffusion.tiny import tiny_components

    words = sorted({w for p in PROMPTS for w in p.split()})
    tok = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                        model_max_length=16)
    torch.manual_seed(0)
    encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                      num_heads=4, pad_token_id=0, eos_token_id=1))
    parts = {k: v for k, v in tiny_components().items() if k in ("unet", "vae", "scheduler")}
    LatentDiffusionPipeline(text_encoder=encoder, tokenizer=tokenizer, **parts).save_pretrained(tmp_path)
    pipe = load_ours(tmp_path)
    assert type(pipe.text_encoder).__name__ == "T5EncoderModel"
    with pytest.warns(UserWarning, match="truncated"):
        images = generate(pipe, prompt=" ".join(["a cat on a sofa"] * 8), num_inference_steps=2)
    assert images.shape == (1, 32, 32, 3)


def test_loading_an_sd_folder_skips_diffusers_sd_pipeline_module(sd_folder):
    """The folder's `_class_name` (StableDiffusionPipeline) is not imported to filter the config: our own
    signature drops safety_checker/feature_extractor, and transformers' torchvision warnings stay away."""
    import subprocess
    import sys

    index = json.loads((sd_folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and "safety_checker" in index
    code = ("import sys; from latent_diffusion.pipelines import LatentDiffusionPipeline as P; "
            f"p = P.from_pretrained({str(sd_folder)!r}); "
            "print(sorted(p.components)); "
            "print('diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    components, imported = done.stdout.strip().splitlines()[-2:]
    assert "safety_checker" not in components and "unet" in components
    assert imported == "False"
    assert "requires torchvision" not in done.stderr and "are not expected" not in done.stderr


def clip_skipped_embeds(pipe, texts, clip_skip):
    """diffusers' clip_skip formula (StableDiffusionPipeline.encode_prompt): hidden_states[-(k + 1)] through the
    final LayerNorm. Written out here because diffusers 0.42.1 reaches for `text_encoder.text_model`, which
    transformers 5's CLIPTextModel no longer has (its own clip_skip path raises AttributeError)."""
    ids = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    return pipe.text_encoder.final_layer_norm(hidden)


def test_clip_skip_matches_diffusers_for_prompt_and_negative_prompt(sd_folder):
    ours, theirs = load_ours(sd_folder), load_theirs(sd_folder, "ddim")
    negatives = ["", "blurry"]
    a = generate(ours, sampler="ddim", prompt=PROMPTS, negative_prompt=negatives, clip_skip=1)
    with torch.no_grad():
        embeds = dict(prompt_embeds=clip_skipped_embeds(theirs, PROMPTS, 1),
                      negative_prompt_embeds=clip_skipped_embeds(theirs, negatives, 1))
    b = theirs(None, generator=torch.Generator().manual_seed(0), num_inference_steps=8, guidance_scale=7.5,
               output_type="np", **embeds).images
    assert np.abs(a - b).max() <= 1 / 255  # both branches one layer back, as A1111 does
    plain = generate(ours, sampler="ddim", prompt=PROMPTS, negative_prompt=negatives)
    assert np.abs(a - plain).max() > 2 / 255


@pytest.mark.parametrize("value", [0, 3, 1.5, True])
def test_bad_clip_skip_is_an_error_naming_it(sd_folder, value):
    with pytest.raises(ValueError, match=r"clip_skip must be an integer from 1 to 2 \(this text encoder has 2"):
        generate(load_ours(sd_folder), clip_skip=value, num_inference_steps=1)
