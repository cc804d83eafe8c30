"""ControlNet (Zhang et al. 2023) for `LatentDiffusionPipeline`: control images in, residuals added to every UNet call.

A ControlNet is a trainable copy of the UNet's encoder that reads a control
image (edges, depth, an outline, ...) and returns one residual per skip
connection plus one for the middle block; the frozen UNet adds them to its own
features. The networks are diffusers' `ControlNetModel` (several at once:
`MultiControlNetModel`, whose residuals are summed), and this module prepares
their inputs as diffusers' ControlNet pipelines do, so the same seed gives the
same image:

* control images go through `VaeImageProcessor` (RGB, resized to the output
  size, kept in [0, 1]); one image, or one per prompt, used for all of that
  prompt's images (`image_inputs.batch_rows`);
* `controlnet_conditioning_scale` multiplies each net's residuals; a net only
  runs on the sampler steps i of n with i/n ≥ start and (i + 1)/n ≤ end
  (`control_guidance_start` / `_end`), elsewhere its scale is 0;
* `guess_mode` (also forced by a net's `global_pool_conditions`) runs the nets
  on the conditional half of the CFG batch only, the unconditional half gets
  zero residuals, and the nets scale their residuals from 0.1 (shallow) to 1
  (deepest), as in the ControlNet paper's "guess mode".

The UNet runs eagerly with a ControlNet (the trace replays plain UNet calls only).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from diffusers import ControlNetModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.models import MultiControlNetModel

from latent_diffusion.checks import check_finite
from latent_diffusion.formats.assets import resolve_controlnet_name
from latent_diffusion.formats.model_files import check_weights_folder, looks_like_local_path
from latent_diffusion.vae import vae_scale_factor

from latent_diffusion.pipelines.image_inputs import _check_image_type, batch_rows, default_size

ControlNetInput = Union[ControlNetModel, MultiControlNetModel, str, os.PathLike,
                        Sequence[Union[ControlNetModel, str, os.PathLike]], None]
PerNet = Union[float, Sequence[float]]


# ----- loading ----------------------------------------------------------------------------------------------

def load_controlnet(controlnet: ControlNetInput, **kwargs: Any) -> Union[ControlNetModel, MultiControlNetModel, None]:
    """None, a ControlNetModel, a diffusers ControlNet folder / Hub id, or a list of these -> the pipeline's
    `controlnet` component: one ControlNetModel, or a MultiControlNetModel for a list of two or more.

    `kwargs` (torch_dtype, ...) go to `ControlNetModel.from_pretrained` for folders. Weights: safetensors only.
    """
    if controlnet is None or isinstance(controlnet, (ControlNetModel, MultiControlNetModel)):
        return controlnet
    if isinstance(controlnet, (str, os.PathLike)):
        return _load_folder(controlnet, **kwargs)
    nets = [load_controlnet(net, **kwargs) for net in controlnet]
    if not nets or not all(isinstance(net, ControlNetModel) for net in nets):
        raise ValueError("controlnet must be a ControlNetModel, a ControlNet folder, or a non-empty list of these")
    return nets[0] if len(nets) == 1 else MultiControlNetModel(nets)


def _load_folder(path: Union[str, os.PathLike], **kwargs: Any) -> ControlNetModel:
    """A diffusers ControlNet folder (config.json + safetensors weights), Hub id or shipped name ("default-outline",
    `formats.assets.DEFAULT_CONTROLNETS`), checked before loading."""
    text = resolve_controlnet_name(os.fspath(path))
    folder = os.path.expanduser(text)
    if os.path.isdir(folder):
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ValueError(f"controlnet {text!r} has no config.json; give a diffusers ControlNet folder")
        check_weights_folder(Path(folder), f"controlnet {text!r}")
    elif os.path.exists(folder):
        raise ValueError(f"controlnet {text!r} is a file; give a diffusers ControlNet folder (config.json and "
                         "diffusion_pytorch_model.safetensors) or a loaded ControlNetModel")
    elif looks_like_local_path(text):
        raise ValueError(f"controlnet {text!r} does not exist (give a diffusers ControlNet folder or a Hub id)")
    return ControlNetModel.from_pretrained(folder, use_safetensors=True, **kwargs)


def controlnet_nets(controlnet) -> list[ControlNetModel]:
    """The ControlNetModels of the pipeline's `controlnet` component (none, one, or a MultiControlNetModel's)."""
    if controlnet is None:
        return []
    return list(controlnet.nets) if isinstance(controlnet, MultiControlNetModel) else [controlnet]


# ----- one call's control -----------------------------------------------------------------------------------

class Control:
    """The ControlNet side of one call: prepared control images, per-net scales and step windows, and the step
    the sampler is at (advanced by `step_callback`)."""

    def __init__(self, controlnet, images: list[torch.Tensor], scales: list[float], starts: list[float],
                 ends: list[float], guess_mode: bool, guided: bool):
        self.controlnet, self.images, self.scales = controlnet, images, scales
        self.starts, self.ends = starts, ends
        self.guess_mode, self.guided = guess_mode, guided
        self.num_steps, self.step = 1, 0

    def start(self, num_steps: int) -> None:
        """Begin a run of `num_steps` sampler steps (the tail that img2img runs, as diffusers counts them)."""
        self.num_steps, self.step = num_steps, 0

    def step_callback(self, callback: Callable) -> Callable:
        """The sampler's per-step callback, which first moves the control window on to the next step."""

        def advance(i: int, t: torch.Tensor, x: torch.Tensor):
            self.step = i + 1
            return callback(i, t, x)

        return advance

    def step_scales(self) -> list[float]:
        """Each net's scale at the current step: its scale inside [start, end] of the run, else 0 (diffusers' keep)."""
        i, n = self.step, self.num_steps
        return [scale * (1.0 - float(i / n < start or (i + 1) / n > end))
                for scale, start, end in zip(self.scales, self.starts, self.ends)]

    def residuals(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                  added: Optional[dict[str, torch.Tensor]]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The summed, scaled ControlNet residuals for a UNet input x (B or 2B, C, h, w): (down, mid)."""
        cond_only = self.guess_mode and self.guided  # the nets see the conditional half only
        if cond_only:
            x, context = x.chunk(2)[1], context.chunk(2)[1]
            added = None if added is None else {k: v.chunk(2)[1] for k, v in added.items()}
        scales = self.step_scales()
        multi = isinstance(self.controlnet, MultiControlNetModel)
        dtype = self.controlnet.dtype
        down, mid = self.controlnet(
            x.to(dtype), t, encoder_hidden_states=context.to(dtype),
            controlnet_cond=self.images if multi else self.images[0],
            conditioning_scale=scales if multi else scales[0], added_cond_kwargs=added,
            guess_mode=self.guess_mode, return_dict=False)
        if cond_only:  # zero residuals leave the unconditional half as the plain UNet's
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return down, mid

    def unet_runner(self, unet, latent_channels: int) -> Callable:
        """`run(x, t, context, added)` like `TracedUNet`, with this call's residuals added to the UNet's features.

        The nets read the latent channels only (an inpainting UNet's input also holds mask and masked image).
        """

        def run(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                added: Optional[dict[str, torch.Tensor]] = None, timestep_cond: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
            down, mid = self.residuals(x[:, :latent_channels], t, context, added)
            return unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added, timestep_cond=timestep_cond,
                        down_block_additional_residuals=[d.to(x.dtype) for d in down],
                        mid_block_additional_residual=mid.to(x.dtype), return_dict=False)[0]

        return run


def prepare_control(pipe, control_image, conditioning_scale: PerNet, guidance_start: PerNet, guidance_end: PerNet,
                    guess_mode: bool, num_prompts: int, num_images_per_prompt: int, height: int, width: int,
                    guided: bool) -> Optional[Control]:
    """Check the ControlNet arguments (errors name them) and prepare the control images; None without ControlNet."""
    nets = controlnet_nets(getattr(pipe, "controlnet", None))
    if not nets:
        if control_image is not None:
            raise ValueError("control_image needs a ControlNet: load one with "
                             "LatentDiffusionPipeline.from_pretrained(path, controlnet=...)")
        return None
    if control_image is None:
        raise ValueError(f"this pipeline has {len(nets)} ControlNet(s): give control_image= (one per ControlNet)")
    per_net = split_control_images(control_image, len(nets))
    scales = per_net_values("controlnet_conditioning_scale", conditioning_scale, len(nets))
    starts = per_net_values("control_guidance_start", guidance_start, len(nets), 0, 1)
    ends = per_net_values("control_guidance_end", guidance_end, len(nets), 0, 1)
    for start, end in zip(starts, ends):
        if start >= end:
            raise ValueError(f"control_guidance_start ({start}) must be below control_guidance_end ({end})")
    guess_mode = bool(guess_mode) or bool(nets[0].config.global_pool_conditions)
    check_control_factor(nets, vae_scale_factor(pipe.vae))
    factor, double = vae_scale_factor(pipe.vae), guided and not guess_mode
    images = [control_pixels(image, height, width, factor, num_prompts, num_images_per_prompt, double)
              .to(pipe._execution_device, nets[0].dtype) for image in per_net]
    return Control(pipe.controlnet, images, scales, starts, ends, guess_mode, guided)


def check_control_factor(nets: list[ControlNetModel], vae_factor: int) -> None:
    """Each net's control-image encoder must downsample by the VAE's factor, so its features fit the latents."""
    for index, net in enumerate(nets):
        factor = 2 ** (len(net.config.conditioning_embedding_out_channels) - 1)  # one stride-2 layer per step
        if factor != vae_factor:
            raise ValueError(f"controlnet {index} downsamples control images by {factor} but this model's VAE by "
                             f"{vae_factor}; use a ControlNet made for this model")


def split_control_images(control_image, num_nets: int) -> list[Any]:
    """One entry (an image, or a list with one per prompt) per ControlNet."""
    if num_nets == 1:
        _check_image_type("control_image", control_image)
        return [control_image]
    if not isinstance(control_image, (list, tuple)) or len(control_image) != num_nets:
        raise ValueError(f"control_image must be a list of {num_nets} entries, one per ControlNet "
                         "(each an image or a list of one per prompt)")
    for entry in control_image:
        _check_image_type("control_image", entry)
    return list(control_image)


def call_size(pipe, image, control_image, height: Optional[int], width: Optional[int]) -> tuple:
    """Unset height / width from the call's input image, else from its first control image (`default_size`)."""
    source = image if image is not None or control_image is None else first_control_image(pipe.controlnet, control_image)
    return (height, width) if source is None else default_size(pipe, source, height, width)


def first_control_image(controlnet, control_image) -> Any:
    """The control image that sets the default output size (the first one of the first ControlNet), checked."""
    entry = split_control_images(control_image, max(1, len(controlnet_nets(controlnet))))[0]
    return entry[0] if isinstance(entry, (list, tuple)) else entry


def control_pixels(image, height: int, width: int, vae_factor: int, num_prompts: int, num_images_per_prompt: int,
                   double: bool) -> torch.Tensor:
    """Control images -> (B or 2B, 3, height, width) in [0, 1], as diffusers' ControlNet pipelines' prepare_image."""
    processor = VaeImageProcessor(vae_scale_factor=vae_factor, do_convert_rgb=True, do_normalize=False)
    pixels = processor.preprocess(image, height=height, width=width).float()  # (N, C, H, W)
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"control_image must be RGB or grayscale images, got a batch of shape {tuple(pixels.shape)}")
    pixels = pixels[batch_rows(pixels.shape[0], num_prompts, num_images_per_prompt, "control_image")]
    return torch.cat([pixels, pixels]) if double else pixels  # the same control for both CFG halves


def per_net_values(name: str, value: PerNet, num_nets: int, low: Optional[float] = None,
                   high: Optional[float] = None) -> list[float]:
    """A number for all ControlNets, or a list of one per ControlNet; each finite and inside [low, high]."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * num_nets
    if len(values) != num_nets:
        raise ValueError(f"{name} holds {len(values)} values for {num_nets} ControlNet(s); give one, or one per ControlNet")
    for item in values:
        check_finite(name, item, low, high)
    return [float(item) for item in values]
