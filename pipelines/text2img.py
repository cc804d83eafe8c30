"""`LatentDiffusionPipeline`: prompt -> text encoder -> guided latent denoising -> VAE decoder -> image.

A `diffusers.DiffusionPipeline` subclass, so loading, saving, devices and
`push_to_hub` come from diffusers; the call itself (conditioning, guidance,
samplers, decoding) is ours, built on the `latent_diffusion` library. The
scheduler component only carries the noise-schedule config: our samplers read
it, so any Stable Diffusion folder brings its own schedule.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from latent_diffusion.formats.assets import generation_default_path, resolve_model_name
from latent_diffusion.limits import check_pipeline_call
from latent_diffusion.checks import check_all_finite, check_choice, check_finite, check_image_side, check_int
from latent_diffusion.vae import decode_latents, is_half, latent_size_multiple, upcast_half_vae, vae_scale_factor
from latent_diffusion.diffusion.guidance import guidance_scale_embedding, guide
from latent_diffusion.formats.model_files import check_model_path
from latent_diffusion.formats.single_file import is_single_file, load_single_file, write_single_file
from latent_diffusion.text.conditioners import Conditioning, conditioner_for
from latent_diffusion.diffusion.samplers import (ETA_SAMPLERS, SAMPLER_NAMES, Denoiser, check_sigma_schedule, get_sampler,
                                                 robust_settings)
from latent_diffusion.diffusion.schedules import NoiseSchedule
from latent_diffusion.tensors import carries_hooks, module_device, module_dtype
from latent_diffusion.pipelines.tracing import TracedUNet
from latent_diffusion.settings import FALLBACK_DEFAULTS
from latent_diffusion.text.vocabulary import warn_about_request
from latent_diffusion.tensors import randn

from latent_diffusion.pipelines.controlnet import PerNet, call_size, load_controlnet, prepare_control
from latent_diffusion.pipelines.image_inputs import check_image_arguments, prepare_image_edit
from latent_diffusion.pipelines.lora import LatentDiffusionLoraMixin
from latent_diffusion.pipelines.textual_inversion import LatentDiffusionTextualInversionMixin

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
TRACE_MAX_PARAMETERS = 50_000_000  # the embedded model is ~4M; SD 1.5's UNet is 860M
# Automatic tracing buys a signature's trace after this many eager calls: the embedded model's trace costs
# 0.53 s and saves 3.5 ms a call (18.1 against 14.7 ms, batch 2, 2 threads), so it breaks even at ~150 calls
# (benchmarks/RESULTS.md, "Inference"). One image of 20-50 steps never pays for it; a session of many does.
TRACE_AFTER_CALLS = 150
GENERATION_CONFIG = "generation_config.json"
SDXL_GUIDANCE_SCALE = 5.0  # StableDiffusionXLPipeline's default, for SDXL folders without generation_config.json

NON_FINITE_HINT = ("the model or the settings diverged; try float32 instead of float16, another sampler, "
                   "fewer steps or a lower guidance_scale")

Prompt = Union[str, Sequence[str]]
Generator = Union[torch.Generator, Sequence[torch.Generator], None]


@dataclass
class LatentDiffusionPipelineOutput(BaseOutput):
    """`images`: a list of PIL images, a (B, H, W, 3) array in [0, 1], a (B, 3, H, W) tensor, or latents."""

    images: Union[list[PIL.Image.Image], np.ndarray, torch.Tensor]


class LatentDiffusionPipeline(LatentDiffusionLoraMixin, LatentDiffusionTextualInversionMixin, DiffusionPipeline):
    """Text-to-image generation with a latent diffusion model (Rombach et al. 2022).

    LoRA adapters: `load_lora_weights`, `set_adapters`, `fuse_lora`, ... (diffusers' loader, see `pipelines/lora.py`).
    Embeddings: `load_textual_inversion` (`pipelines/textual_inversion.py`). Single files: `from_single_file`,
    `save_single_file` (`latent_diffusion/formats/single_file.py`).

    >>> pipe = LatentDiffusionPipeline.from_pretrained()            # the embedded Shapes model
    >>> pipe("a red circle above a blue square").images[0]
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components = ["text_encoder_2", "tokenizer_2", "controlnet"]

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, text_encoder_2=None, tokenizer_2=None,
                 force_zeros_for_empty_prompt: Optional[bool] = None, controlnet=None):
        """With `text_encoder_2` and `tokenizer_2` this is an SDXL model (`latent_diffusion.text.conditioners`);
        `controlnet`: a ControlNetModel, a folder, or a list of these (`pipelines/controlnet.py`)."""
        super().__init__()
        self.register_modules(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.register_modules(text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        self.register_modules(controlnet=load_controlnet(controlnet))
        self.generation_defaults = dict(FALLBACK_DEFAULTS)
        if text_encoder_2 is not None:  # saved to model_index.json, as StableDiffusionXLPipeline does (default True)
            force_zeros = True if force_zeros_for_empty_prompt is None else bool(force_zeros_for_empty_prompt)
            self.register_to_config(force_zeros_for_empty_prompt=force_zeros)
            self.generation_defaults["guidance_scale"] = SDXL_GUIDANCE_SCALE
        self.trace_unet: Optional[bool] = _trace_setting()  # None: automatic, by UNet size
        self._traced_unet: Optional[TracedUNet] = None

    # ----- loading and saving -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Optional[Union[str, os.PathLike]] = None, **kwargs):
        """Load a diffusers SD- or SDXL-format folder or Hub id; with no argument, the embedded default model
        (`assets.GENERATION_DEFAULT`); "default-lcm" is its few-step distillation and "default-20-step" the 20-step model.

        safety_checker and feature_extractor entries, if the folder has them, are ignored. Weights are read
        from safetensors only: a folder with only pickle (.bin) weights or a truncated file is refused.
        """
        path = generation_default_path() if pretrained_model_name_or_path is None else pretrained_model_name_or_path
        path = resolve_model_name(path)  # "default-lcm", "default-20-step": the embedded folders
        if is_single_file(path):  # a .safetensors checkpoint in the original layout works like a folder
            return cls.from_single_file(path, **kwargs)
        local = Path(path)
        check_model_path(path)  # before diffusers could fall back to torch.load
        kwargs.setdefault("use_safetensors", True)
        pipe = super().from_pretrained(path, **kwargs)
        if "dtype" not in kwargs and "torch_dtype" not in kwargs:
            pipe.upcast_half_components()
        pipe.generation_defaults.update(_read_generation_config(local))
        return pipe

    @classmethod
    def from_single_file(cls, path: Union[str, os.PathLike], **kwargs):
        """Load one .safetensors checkpoint in the original SD 1.x / 2.x / SDXL layout (see
        `latent_diffusion.formats.single_file`): `config=` a diffusers folder, `tokenizer=`/`tokenizer_2=`,
        `prediction_type=`, `image_size=`, any component to use as given, and `torch_dtype`/`dtype`."""
        dtype = kwargs.pop("torch_dtype", None) or kwargs.pop("dtype", None)
        parts = load_single_file(path, **kwargs)
        parts.pop("family")
        pipe = cls(**parts)
        return pipe.to(dtype) if dtype is not None else pipe

    def save_single_file(self, path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = torch.float16,
                         metadata: Optional[dict[str, str]] = None) -> Path:
        """Write the model as one .safetensors file in the original layout that AUTOMATIC1111/Forge, ComfyUI and
        kohya load (UNet, VAE, text encoders; `dtype` None keeps the weights' own); it reads back alone here."""
        return write_single_file(self.components, path, dtype=dtype, metadata=metadata)

    @classmethod
    def extract_init_dict(cls, config_dict: dict, **kwargs):
        """diffusers' config filtering, without the import of the folder's own pipeline class.

        For a folder saved by StableDiffusionPipeline, diffusers would import that pipeline's module just to
        learn which of its keys (safety_checker, feature_extractor, ...) our __init__ lacks; the import pulls in
        transformers' CLIP image processors and warns about torchvision on every load. Our own signature
        says the same: keys it lacks are dropped here, private ones (`_diffusers_version`, ...) kept.
        """
        expected = cls._get_init_keys(cls)
        config_dict = {key: value for key, value in config_dict.items()
                       if key in expected or (key.startswith("_") and key != "_class_name")}
        return super().extract_init_dict(config_dict, **kwargs)

    def upcast_half_components(self) -> None:
        """Bring fp16/bf16-stored weights to float32 (the default dtype unless the caller asks for another).

        diffusers upcasts its models on load but transformers keeps a checkpoint's own dtype, so a
        half-precision folder would otherwise run with a float16 text encoder on the CPU.
        """
        for module in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if module is not None and is_half(module):
                module.to(torch.float32)

    def save_pretrained(self, save_directory: Union[str, os.PathLike], **kwargs):
        """Save as a standard StableDiffusionPipeline (or, with text_encoder_2, StableDiffusionXLPipeline) folder
        that diffusers loads, plus our generation defaults."""
        super().save_pretrained(save_directory, **kwargs)
        index_path = Path(save_directory) / "model_index.json"
        index = _diffusers_model_index(json.loads(index_path.read_text()), sdxl=self.text_encoder_2 is not None)
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (Path(save_directory) / GENERATION_CONFIG).write_text(json.dumps(self.generation_defaults, indent=2) + "\n")

    # ----- the call -----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(
        self, prompt: Prompt, negative_prompt: Optional[Prompt] = None, num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None, guidance_rescale: float = 0.0, num_images_per_prompt: int = 1,
        height: Optional[int] = None, width: Optional[int] = None, generator: Generator = None,
        latents: Optional[torch.Tensor] = None, image: Optional[Any] = None, mask_image: Optional[Any] = None,
        strength: Optional[float] = None, sampler: Optional[str] = None, sigma_schedule: Optional[str] = None,
        eta: float = 0.0, output_type: str = "pil", callback_on_step_end: Optional[Callable[..., dict]] = None,
        return_dict: bool = True, prompt_2: Optional[Prompt] = None, negative_prompt_2: Optional[Prompt] = None,
        original_size: Optional[tuple[int, int]] = None, crops_coords_top_left: Optional[tuple[int, int]] = None,
        target_size: Optional[tuple[int, int]] = None, clip_skip: Optional[int] = None, prompt_syntax: str = "a1111",
        control_image: Optional[Any] = None, controlnet_conditioning_scale: PerNet = 1.0,
        control_guidance_start: PerNet = 0.0, control_guidance_end: PerNet = 1.0, guess_mode: bool = False,
    ):
        """Generate images for `prompt` (a string or a list).

        Unset `num_inference_steps`, `guidance_scale` and `sampler` take the model's defaults
        (its generation_config.json; otherwise FALLBACK_DEFAULTS). `sigma_schedule` ("default", "karras",
        "exponential"; unset: the scheduler config's use_karras_sigmas / use_exponential_sigmas) applies to
        euler, heun, dpm++, dpm++_sde and unipc, as in diffusers. `guidance_scale` = 1 runs the
        conditional model alone; any other value runs both branches in one batched UNet call.
        `callback_on_step_end(pipe, i, t, {"latents": x})` may return {"latents": new_x}.

        `image` (PIL, array or tensor in [0, 1], or a list: one, or one per prompt) turns the call into
        img2img (SDEdit): the last ⌊steps·strength⌋ steps run from the image's noised latent (strength
        default 0.8); the size defaults to the image's. With `mask_image` (white: repaint) it inpaints:
        an inpainting UNet (9 channels) is conditioned on the mask and masked image, an ordinary UNet keeps
        the unmasked region by re-noising it at every step (strength default 1.0).

        SDXL's `prompt_2`, `negative_prompt_2`, `original_size`, `target_size`, `crops_coords_top_left` are
        diffusers' (docs/generation.md). `clip_skip` k conditions on the text encoder's states k layers back
        (A1111's "Clip skip: k + 1"), prompt and negative alike. `prompt_syntax` "a1111" reads A1111's emphasis
        and BREAK (latent_diffusion.text.prompt_syntax), "plain" the text as is. Control: docs/controlnet.md.
        """
        steps, scale, sampler = self._resolve_defaults(num_inference_steps, guidance_scale, sampler)
        prompts, negatives = _check_prompts(prompt, negative_prompt)
        strength = check_image_arguments(self, image, mask_image, strength, latents)
        height, width = call_size(self, image, control_image, height, width)
        height, width = self._check_call(steps, scale, sampler, output_type, num_images_per_prompt, height, width,
                                         sigma_schedule=sigma_schedule, guidance_rescale=guidance_rescale, eta=eta)
        warn_about_request(self, prompts, height, width)
        check_pipeline_call(self, prompts, negatives, num_images_per_prompt, height, width, guided=self.runs_cfg(scale))
        second = _check_second_prompts(len(prompts), prompt_2, negative_prompt, negative_prompt_2)
        cond = self.encode_prompt(prompts, negatives if self.runs_cfg(scale) else None, num_images_per_prompt, **second,
                                  size=(height, width), original_size=original_size,
                                  crops_coords_top_left=crops_coords_top_left, target_size=target_size,
                                  clip_skip=clip_skip, prompt_syntax=prompt_syntax)
        schedule = NoiseSchedule.from_config(self.scheduler.config)
        solver = self._solver(sampler, schedule, sigma_schedule, eta)
        batch, guided = (len(prompts), num_images_per_prompt, height, width), self.runs_cfg(scale)
        edit = None if image is None else prepare_image_edit(self, solver, solver.timesteps(steps), image, mask_image,
                                                             strength, *batch, generator, torch.float32, guided=guided)
        timesteps, x = self._start(solver, solver.timesteps(steps), edit, batch, generator, latents)
        control = prepare_control(self, control_image, controlnet_conditioning_scale, control_guidance_start,
                                  control_guidance_end, guess_mode, *batch, guided=guided)
        denoiser = Denoiser(self._guided_unet(cond, scale, guidance_rescale, edit and edit.unet_extra, control), schedule)
        x = self._sample(solver, denoiser, x, timesteps, generator, callback_on_step_end, edit, control)
        images = self.decode(x, output_type)
        self.maybe_free_model_hooks()
        return LatentDiffusionPipelineOutput(images=images) if return_dict else (images,)

    @staticmethod
    def _solver(sampler: str, schedule: NoiseSchedule, sigma_schedule: Optional[str], eta: float):
        """The named sampler with diffusers' settings, plus `robust_settings` (the σ limit of the Euler family)."""
        return get_sampler(sampler, schedule, sigma_schedule=sigma_schedule, **robust_settings(sampler),
                           **({"eta": eta} if sampler in ETA_SAMPLERS else {}))

    def _start(self, solver, timesteps: torch.Tensor, edit, batch: tuple[int, int, int, int], generator: Generator,
               latents: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The timesteps to run and the latents they start from: an image edit's, or noise (`latents` if given)
        for a (prompts, images per prompt, height, width) text-to-image call."""
        if edit is not None:
            return edit.timesteps, edit.x
        prompts, per_prompt, height, width = batch
        x = self.prepare_latents(prompts * per_prompt, height, width, torch.float32, generator, latents)  # fp32 math
        return timesteps, solver.start_from_noise(x, timesteps)  # diffusers' init_noise_sigma, in VP form

    def _sample(self, solver, denoiser: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, generator: Generator,
                callback_on_step_end: Optional[Callable[..., dict]], edit, control=None) -> torch.Tensor:
        """The sampling loop under the progress bar; its final latents, checked finite."""
        with self.progress_bar(total=len(timesteps)) as bar:
            step_callback = self._step_callback(bar, callback_on_step_end, edit)
            if control is not None:  # the ControlNets' step window follows the sampler's steps
                control.start(len(timesteps))
                step_callback = control.step_callback(step_callback)
            x = solver(denoiser, x, timesteps, generator=generator, callback=step_callback)
        check_all_finite("latents", x, NON_FINITE_HINT)  # once, after the loop: NaN/inf never heal, so none is missed
        return x

    def encode_prompt(
        self, prompts: list[str], negatives: Optional[list[str]], num_images_per_prompt: int = 1, **sdxl: Any
    ) -> Conditioning:
        """The UNet's conditioning for B·n images: `.context` (B·n, L, D), and for SDXL the pooled `.text_embeds`
        and `.time_ids`; twice the batch, as [unconditional; conditional], when negatives are given.

        `sdxl`: prompts_2, negatives_2, negative_prompt_given, size, original_size, crops_coords_top_left,
        target_size (see `SDXLConditioner.encode`); a single-encoder model takes only `size` of them. Both
        take `clip_skip` and `prompt_syntax`.
        """
        prompts, negatives = self.expand_embedding_tokens(prompts), self.expand_embedding_tokens(negatives)
        sdxl.update({key: self.expand_embedding_tokens(sdxl[key]) for key in ("prompts_2", "negatives_2") if key in sdxl})
        cond = self.conditioner().encode(prompts, negatives, num_images_per_prompt, **sdxl)
        return cond.to(dtype=module_dtype(self.unet))

    def conditioner(self):
        """What turns prompts into conditioning for this model: SD's one text encoder, or SDXL's two."""
        return conditioner_for(self.tokenizer, self.text_encoder, self.tokenizer_2, self.text_encoder_2,
                               self.config.get("force_zeros_for_empty_prompt"), unet=self.unet)

    def prepare_latents(
        self, batch: int, height: int, width: int, dtype: torch.dtype, generator: Generator, latents: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """x_T ~ N(0, I) in latent space, (B, C, H/f, W/f); given `latents` are checked and used as they are."""
        factor = vae_scale_factor(self.vae)
        shape = (batch, self.unet.config.in_channels, height // factor, width // factor)
        if latents is None:
            return randn(shape, generator, dtype, self._execution_device)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for this prompt batch and size, got {tuple(latents.shape)}")
        return latents.to(device=self._execution_device, dtype=dtype)

    def decode(self, latents: torch.Tensor, output_type: str):
        """Latents -> images of the requested type; pixels mapped from [-1, 1] to [0, 1]."""
        if output_type == "latent":
            return latents
        with upcast_half_vae(self.vae, enabled=self.text_encoder_2 is not None):  # SDXL's VAE overflows in fp16
            pixels = (decode_latents(self.vae, latents) / 2 + 0.5).clamp(0, 1)  # (B, 3, H, W)
        if output_type == "pt":
            return pixels
        array = pixels.permute(0, 2, 3, 1).float().cpu().numpy()  # (B, H, W, 3)
        if output_type == "np":
            return array
        return [PIL.Image.fromarray(image) for image in (array * 255).round().astype(np.uint8)]

    # ----- pieces of the call -------------------------------------------------------------------------------

    @property
    def _execution_device(self) -> torch.device:
        """Where a call's tensors go: diffusers' answer (an offload hook's device) when a component carries an accelerate
        or diffusers hook, else the UNet's device, which is diffusers' answer then too, found without its walks over
        every submodule (5 ms per call on the default model, a twentieth of a few-step image)."""
        if any(carries_hooks(m) for m in self.components.values() if isinstance(m, torch.nn.Module)):
            return super()._execution_device
        return module_device(self.unet)

    def traced_unet(self) -> TracedUNet:
        """The UNet runner of this pipeline: a replayed trace per input signature, or the module itself.

        `pipe.trace_unet`: True traces every input signature at its first call, False never traces
        (LATENT_DIFFUSION_TRACE=1/0 sets the default); None, the default, traces UNets under
        TRACE_MAX_PARAMETERS parameters, whose time goes to per-module Python overhead, once a signature
        has run TRACE_AFTER_CALLS eager calls (so the first images are not slowed by the trace). Large
        UNets are kernel-bound, gain little, and a trace keeps every intermediate of a forward alive
        (measured: 2.6× the extra memory of an eager forward), so they run eagerly.
        Call `pipe.traced_unet().clear()` after changing the UNet's structure.
        """
        if self._traced_unet is None or self._traced_unet.unet is not self.unet:
            self._traced_unet = TracedUNet(self.unet)
        small = sum(p.numel() for p in self.unet.parameters()) < TRACE_MAX_PARAMETERS
        self._traced_unet.enabled = small if self.trace_unet is None else self.trace_unet
        self._traced_unet.trace_after = TRACE_AFTER_CALLS if self.trace_unet is None else 0
        return self._traced_unet

    def _guided_unet(
        self, cond: Conditioning, scale: float, rescale: float, extra: Optional[torch.Tensor] = None, control=None
    ) -> Callable:
        """model_fn(x_t, t) for the Denoiser: one UNet call on [x_t; x_t] and CFG when guiding, else one plain call.

        `extra` (inpainting UNets: mask and masked-image latents, already doubled for CFG) is appended to the
        UNet input's channels. `control` (a `pipelines.controlnet.Control`) adds its ControlNets' residuals.
        """
        unet, dtype = self.traced_unet(), module_dtype(self.unet)
        if control is not None:
            unet = control.unet_runner(self.unet, int(self.vae.config.latent_channels))
        guided = self.runs_cfg(scale)  # encode_prompt added the unconditional half exactly then
        added = cond.added_cond_kwargs()  # SDXL's pooled text and size ids, else None
        w_dim = self.unet.config.get("time_cond_proj_dim")  # a guidance-distilled (LCM) UNet embeds w instead
        w_cond = None if w_dim is None else guidance_scale_embedding(scale, cond.context.shape[0], w_dim).to(
            cond.context.device, dtype)

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x_in = torch.cat([x, x]) if guided else x  # (2B or B, C, h, w)
            if extra is not None:
                x_in = torch.cat([x_in, extra.to(x_in.dtype)], dim=1)  # (2B or B, C + 1 + C, h, w)
            out = unet(x_in.to(dtype), t, cond.context, added, timestep_cond=w_cond)
            return guide(out, scale, rescale).to(x.dtype) if guided else out.to(x.dtype)

        return model_fn

    def runs_cfg(self, scale: float) -> bool:
        """Whether a call at guidance `scale` runs classifier-free guidance: scale ≠ 1 and a UNet that does not take
        the scale as an embedding (`time_cond_proj_dim`, LCM), as diffusers' StableDiffusionPipeline decides."""
        return scale != 1.0 and self.unet.config.get("time_cond_proj_dim") is None

    def _step_callback(self, bar, user_callback: Optional[Callable], edit=None) -> Callable:
        """The sampler's per-step callback: the progress bar, the user's callback, and an image edit's blend."""

        def callback(i: int, t: torch.Tensor, x: torch.Tensor) -> Optional[torch.Tensor]:
            bar.update()
            if user_callback is None:
                return None
            returned = user_callback(self, i, t, {"latents": x}) or {}
            return returned.get("latents")

        return callback if edit is None else edit.step_callback(callback)

    def _resolve_defaults(self, steps, scale, sampler) -> tuple[int, float, str]:
        d = self.generation_defaults
        return (
            d["num_inference_steps"] if steps is None else steps,
            d["guidance_scale"] if scale is None else scale,
            d["sampler"] if sampler is None else sampler,
        )

    def _check_call(self, steps, scale, sampler, output_type, num_images_per_prompt, height, width,
                    sigma_schedule=None, guidance_rescale=0.0, eta=0.0) -> tuple[int, int]:
        """Validate scalar arguments, with errors naming the argument; return the checked (height, width)."""
        check_int("num_inference_steps", steps, 1)
        check_finite("guidance_scale", scale, 0)
        check_finite("guidance_rescale", guidance_rescale, 0, 1)
        check_finite("eta", eta, 0)
        check_choice("sampler", sampler, SAMPLER_NAMES)
        check_choice("output_type", output_type, OUTPUT_TYPES)
        check_int("num_images_per_prompt", num_images_per_prompt, 1)
        check_sigma_schedule(sampler, sigma_schedule)
        return self.resolve_size(height, width)

    def resolve_size(self, height: Optional[int] = None, width: Optional[int] = None) -> tuple[int, int]:
        """The (height, width) a call with these sizes makes: the model's native size where None.

        ValueError, naming the argument, for a size the VAE and UNet cannot take.
        """
        return self._check_size("height", height), self._check_size("width", width)

    def _check_size(self, name: str, value: Optional[int]) -> int:
        """Sizes must be multiples of the VAE factor times the UNet's total downsampling."""
        vae_factor = vae_scale_factor(self.vae)
        if value is None:
            return int(self.unet.config.sample_size) * vae_factor
        return check_image_side(name, value, latent_size_multiple(self.vae, self.unet))


def _check_prompts(prompt: Prompt, negative_prompt: Optional[Prompt]) -> tuple[list[str], list[str]]:
    """Prompts and negative prompts as equal-length lists of strings."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else []
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    if negative_prompt is None:
        return prompts, [""] * len(prompts)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != len(prompts):
        raise ValueError(
            f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}; give one per prompt or a single string"
        )
    return prompts, negatives


def _diffusers_model_index(index: dict[str, Any], sdxl: bool) -> dict[str, Any]:
    """model_index.json as diffusers' own SD or SDXL (ControlNet) pipeline class expects it (no entries it would
    not take)."""
    control = "ControlNet" if index.get("controlnet", [None])[0] is not None else ""
    index = {k: v for k, v in index.items() if k != "controlnet" or control}
    if sdxl:
        return {**index, "_class_name": f"StableDiffusionXL{control}Pipeline", "image_encoder": [None, None],
                "feature_extractor": [None, None]}
    sdxl_only = ("text_encoder_2", "tokenizer_2", "force_zeros_for_empty_prompt")
    index = {k: v for k, v in index.items() if k not in sdxl_only}
    return {**index, "_class_name": f"StableDiffusion{control}Pipeline", "safety_checker": [None, None],
            "feature_extractor": [None, None], "requires_safety_checker": False}


def _check_second_prompts(batch: int, prompt_2: Optional[Prompt], negative_prompt: Optional[Prompt],
                          negative_prompt_2: Optional[Prompt]) -> dict[str, Any]:
    """SDXL's second-encoder prompts as lists of `batch` strings (None when not given), and whether a negative was."""
    def as_list(name: str, value: Optional[Prompt]) -> Optional[list[str]]:
        if value is None:
            return None
        values = [value] * batch if isinstance(value, str) else list(value)
        if len(values) != batch or not all(isinstance(v, str) for v in values):
            raise ValueError(f"{name} must be a string or a list of {batch} strings (one per prompt), got {value!r}")
        return values

    return dict(prompts_2=as_list("prompt_2", prompt_2), negatives_2=as_list("negative_prompt_2", negative_prompt_2),
                negative_prompt_given=negative_prompt is not None or negative_prompt_2 is not None)


def _trace_setting() -> Optional[bool]:
    """LATENT_DIFFUSION_TRACE: "0" never traces, "1" traces at once, unset leaves it to the UNet's size and use."""
    value = os.environ.get("LATENT_DIFFUSION_TRACE")
    return None if value is None else value != "0"


def _read_generation_config(folder: Path) -> dict[str, Any]:
    """The model's recommended steps, guidance and sampler, if its folder has them."""
    path = folder / GENERATION_CONFIG
    if not path.is_file():
        return {}
    stored = json.loads(path.read_text())
    return {k: stored[k] for k in FALLBACK_DEFAULTS if k in stored}
