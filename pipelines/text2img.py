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

from latent_diffusion.assets import default_model_path
from latent_diffusion.checks import check_all_finite, check_choice, check_finite, check_image_side, check_int
from latent_diffusion.conditioning import count_chunks, decode_latents, encode_prompts, vae_scale_factor
from latent_diffusion.guidance import guide
from latent_diffusion.model_files import check_model_path
from latent_diffusion.samplers import SAMPLER_NAMES, Denoiser, get_sampler
from latent_diffusion.schedules import NoiseSchedule
from latent_diffusion.tracing import TracedUNet
from latent_diffusion.utils import randn

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
TRACE_MAX_PARAMETERS = 50_000_000  # the embedded model is ~4M; SD 1.5's UNet is 860M
GENERATION_CONFIG = "generation_config.json"
FALLBACK_DEFAULTS = {"num_inference_steps": 25, "guidance_scale": 7.5, "sampler": "dpm++"}

NON_FINITE_HINT = ("the model or the settings diverged; try float32 instead of float16, another sampler, "
                   "fewer steps or a lower guidance_scale")

Prompt = Union[str, Sequence[str]]
Generator = Union[torch.Generator, Sequence[torch.Generator], None]


@dataclass
class LatentDiffusionPipelineOutput(BaseOutput):
    """`images`: a list of PIL images, a (B, H, W, 3) array in [0, 1], a (B, 3, H, W) tensor, or latents."""

    images: Union[list[PIL.Image.Image], np.ndarray, torch.Tensor]


class LatentDiffusionPipeline(DiffusionPipeline):
    """Text-to-image generation with a latent diffusion model (Rombach et al. 2022).

    >>> pipe = LatentDiffusionPipeline.from_pretrained()            # the embedded Shapes model
    >>> pipe("a red circle above a blue square").images[0]
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.register_modules(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.generation_defaults = dict(FALLBACK_DEFAULTS)
        self.trace_unet: Optional[bool] = _trace_setting()  # None: automatic, by UNet size
        self._traced_unet: Optional[TracedUNet] = None

    # ----- loading and saving -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Optional[Union[str, os.PathLike]] = None, **kwargs):
        """Load a diffusers SD-format folder or Hub id; with no argument, the embedded default model.

        safety_checker and feature_extractor entries, if the folder has them, are ignored. Weights are read
        from safetensors only: a folder with only pickle (.bin) weights or a truncated file is refused.
        """
        path = default_model_path() if pretrained_model_name_or_path is None else pretrained_model_name_or_path
        local = Path(path)
        check_model_path(path)  # before diffusers could fall back to torch.load
        kwargs.setdefault("use_safetensors", True)
        pipe = super().from_pretrained(path, **kwargs)
        if "dtype" not in kwargs and "torch_dtype" not in kwargs:
            pipe.upcast_half_components()
        pipe.generation_defaults.update(_read_generation_config(local))
        return pipe

    def upcast_half_components(self) -> None:
        """Bring fp16/bf16-stored weights to float32 (the default dtype unless the caller asks for another).

        diffusers upcasts its models on load but transformers keeps a checkpoint's own dtype, so a
        half-precision folder would otherwise run with a float16 text encoder on the CPU.
        """
        for module in (self.unet, self.vae, self.text_encoder):
            if module.dtype in (torch.float16, torch.bfloat16):
                module.to(torch.float32)

    def save_pretrained(self, save_directory: Union[str, os.PathLike], **kwargs):
        """Save as a standard StableDiffusionPipeline folder (loadable by diffusers), plus our generation defaults."""
        super().save_pretrained(save_directory, **kwargs)
        index_path = Path(save_directory) / "model_index.json"
        index = json.loads(index_path.read_text())
        index.update(
            _class_name="StableDiffusionPipeline",
            safety_checker=[None, None],
            feature_extractor=[None, None],
            requires_safety_checker=False,
        )
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (Path(save_directory) / GENERATION_CONFIG).write_text(json.dumps(self.generation_defaults, indent=2) + "\n")

    # ----- the call -----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(
        self,
        prompt: Prompt,
        negative_prompt: Optional[Prompt] = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        guidance_rescale: float = 0.0,
        num_images_per_prompt: int = 1,
        height: Optional[int] = None,
        width: Optional[int] = None,
        generator: Generator = None,
        latents: Optional[torch.Tensor] = None,
        sampler: Optional[str] = None,
        eta: float = 0.0,
        output_type: str = "pil",
        callback_on_step_end: Optional[Callable[..., dict]] = None,
        return_dict: bool = True,
    ):
        """Generate images for `prompt` (a string or a list).

        Unset `num_inference_steps`, `guidance_scale` and `sampler` take the model's defaults
        (its generation_config.json; otherwise 25 steps, 7.5, "dpm++"). `guidance_scale` = 1 runs the
        conditional model alone; any other value runs both branches in one batched UNet call.
        `callback_on_step_end(pipe, i, t, {"latents": x})` may return {"latents": new_x}.
        """
        steps, scale, sampler = self._resolve_defaults(num_inference_steps, guidance_scale, sampler)
        prompts, negatives = _check_prompts(prompt, negative_prompt)
        height, width = self._check_call(steps, scale, sampler, output_type, num_images_per_prompt, height, width)
        check_finite("guidance_rescale", guidance_rescale, 0, 1)
        check_finite("eta", eta, 0)
        batch = len(prompts) * num_images_per_prompt
        context = self.encode_prompt(prompts, negatives if scale != 1.0 else None, num_images_per_prompt)
        schedule = NoiseSchedule.from_config(self.scheduler.config)
        solver = get_sampler(sampler, schedule, **({"eta": eta} if sampler == "ddim" else {}))
        timesteps = solver.timesteps(steps)
        x = self.prepare_latents(batch, height, width, torch.float32, generator, latents)  # sampler math in fp32
        denoiser = Denoiser(self._guided_unet(context, scale, guidance_rescale), schedule)
        with self.progress_bar(total=len(timesteps)) as bar:
            step_callback = self._step_callback(bar, callback_on_step_end)
            x = solver(denoiser, x, timesteps, generator=generator, callback=step_callback)
        check_all_finite("latents", x, NON_FINITE_HINT)  # once, after the loop: NaN/inf never heal, so none is missed
        images = self.decode(x, output_type)
        self.maybe_free_model_hooks()
        return LatentDiffusionPipelineOutput(images=images) if return_dict else (images,)

    def encode_prompt(
        self, prompts: list[str], negatives: Optional[list[str]], num_images_per_prompt: int = 1
    ) -> torch.Tensor:
        """(B·n, L, D) embeddings, or (2·B·n, L, D) as [unconditional; conditional] when negatives are given.

        Both halves use the same number of chunks so they batch together.
        """
        texts = prompts if negatives is None else negatives + prompts
        chunks = count_chunks(self.tokenizer, texts)
        embeds = encode_prompts(self.tokenizer, self.text_encoder, texts, chunks)  # (B or 2B, L, D)
        return embeds.repeat_interleave(num_images_per_prompt, dim=0).to(self.unet.dtype)

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
        pixels = (decode_latents(self.vae, latents) / 2 + 0.5).clamp(0, 1)  # (B, 3, H, W)
        if output_type == "pt":
            return pixels
        array = pixels.permute(0, 2, 3, 1).float().cpu().numpy()  # (B, H, W, 3)
        if output_type == "np":
            return array
        return [PIL.Image.fromarray(image) for image in (array * 255).round().astype(np.uint8)]

    # ----- pieces of the call -------------------------------------------------------------------------------

    def traced_unet(self) -> TracedUNet:
        """The UNet runner of this pipeline: a replayed trace per input signature, or the module itself.

        `pipe.trace_unet`: True or False forces it (LATENT_DIFFUSION_TRACE=1/0 sets the default); None,
        the default, traces UNets under TRACE_MAX_PARAMETERS parameters, whose time goes to per-module
        Python overhead. Large UNets are kernel-bound, gain little, and a trace keeps every intermediate
        of a forward alive (measured: 2.6× the extra memory of an eager forward), so they run eagerly.
        Call `pipe.traced_unet().clear()` after changing the UNet's structure.
        """
        if self._traced_unet is None or self._traced_unet.unet is not self.unet:
            self._traced_unet = TracedUNet(self.unet)
        small = sum(p.numel() for p in self.unet.parameters()) < TRACE_MAX_PARAMETERS
        self._traced_unet.enabled = small if self.trace_unet is None else self.trace_unet
        return self._traced_unet

    def _guided_unet(self, context: torch.Tensor, scale: float, rescale: float) -> Callable:
        """model_fn(x_t, t) for the Denoiser: one UNet call on [x_t; x_t] and CFG when guiding, else one plain call."""
        unet, dtype = self.traced_unet(), self.unet.dtype
        guided = scale != 1.0  # encode_prompt added the unconditional half exactly then

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x_in = torch.cat([x, x]) if guided else x  # (2B or B, C, h, w)
            out = unet(x_in.to(dtype), t, context)
            return guide(out, scale, rescale).to(x.dtype) if guided else out.to(x.dtype)

        return model_fn

    def _step_callback(self, bar, user_callback: Optional[Callable]) -> Callable:
        def callback(i: int, t: torch.Tensor, x: torch.Tensor) -> Optional[torch.Tensor]:
            bar.update()
            if user_callback is None:
                return None
            returned = user_callback(self, i, t, {"latents": x}) or {}
            return returned.get("latents")

        return callback

    def _resolve_defaults(self, steps, scale, sampler) -> tuple[int, float, str]:
        d = self.generation_defaults
        return (
            d["num_inference_steps"] if steps is None else steps,
            d["guidance_scale"] if scale is None else scale,
            d["sampler"] if sampler is None else sampler,
        )

    def _check_call(self, steps, scale, sampler, output_type, num_images_per_prompt, height, width) -> tuple[int, int]:
        """Validate scalar arguments, with errors naming the argument; return the checked (height, width)."""
        check_int("num_inference_steps", steps, 1)
        check_finite("guidance_scale", scale, 0)
        check_choice("sampler", sampler, SAMPLER_NAMES)
        check_choice("output_type", output_type, OUTPUT_TYPES)
        check_int("num_images_per_prompt", num_images_per_prompt, 1)
        return self.resolve_size(height, width)

    def resolve_size(self, height: Optional[int] = None, width: Optional[int] = None) -> tuple[int, int]:
        """The (height, width) a call with these sizes makes: the model's native size where None.

        ValueError, naming the argument, for a size the VAE and UNet cannot take.
        """
        return self._check_size("height", height), self._check_size("width", width)

    def _check_size(self, name: str, value: Optional[int]) -> int:
        """Sizes must be multiples of the VAE factor times the UNet's total downsampling."""
        vae_factor = vae_scale_factor(self.vae)
        multiple = vae_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if value is None:
            return int(self.unet.config.sample_size) * vae_factor
        return check_image_side(name, value, multiple)


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


def _trace_setting() -> Optional[bool]:
    """LATENT_DIFFUSION_TRACE: "0" never traces, "1" always does, unset leaves it to the UNet's size."""
    value = os.environ.get("LATENT_DIFFUSION_TRACE")
    return None if value is None else value != "0"


def _read_generation_config(folder: Path) -> dict[str, Any]:
    """The model's recommended steps, guidance and sampler, if its folder has them."""
    path = folder / GENERATION_CONFIG
    if not path.is_file():
        return {}
    stored = json.loads(path.read_text())
    return {k: stored[k] for k in FALLBACK_DEFAULTS if k in stored}
