"""Train a ControlNet (Zhang et al. 2023) for a latent text-to-image model; the base model stays frozen.

One process, or any number with accelerate (as training/train_text2img.py):

    accelerate launch training/train_controlnet.py --pretrained_model_name_or_path PATH \\
        --train_data_dir DIR --conditioning_image_column conditioning_image --resolution 512 \\
        --train_batch_size 4 --max_train_steps 1000 --output_dir OUT

The data is train_text2img's (an imagefolder or a datasets dataset) with one more image column, the control
image of each row (`--conditioning_image_column`, diffusers' name and default "conditioning_image"; an
imagefolder names it in metadata.jsonl as "conditioning_image_file_name"). Shapes data with outlines:
`latent_diffusion.shapes.export_imagefolder(DIR, n, outline=True)`.

The ControlNet starts from `--controlnet_model_name_or_path` (a diffusers ControlNet folder) or, by default,
from the UNet (diffusers' `ControlNetModel.from_unet`: a copy of its encoder and middle block, zero
convolutions on every residual, so training starts from the base model's own images). Each step is the
denoising loss of train_text2img (DDPM Algorithm 1, min-SNR-γ, offset noise) with the frozen UNet's skip
connections and middle block receiving the ControlNet's residuals. Everything else is train_text2img's: its
flags, latent/text cache, checkpoints with exact resume (`--resume_from_checkpoint latest`), EMA, mixed
precision, validation images (`--validation_prompts` with one `--validation_image` each, or one for all),
`--push_to_hub`. OUT is a diffusers ControlNet folder (config.json, diffusion_pytorch_model.safetensors,
README.md) that `ControlNetModel.from_pretrained(OUT)` and `LatentDiffusionPipeline.from_pretrained(base,
controlnet=OUT)` load.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from typing import Optional

import torch
from accelerate.logging import get_logger

from latent_diffusion.diffusion.losses import DenoisingLoss
from latent_diffusion.text.conditioners import Conditioning
from latent_diffusion.training import train_text2img as base
from latent_diffusion.training.args import build_parser, check_args
from latent_diffusion.training.data import ImageTransform, decode_image, load_caption_dataset, sample_generator
from latent_diffusion.training.ema import EMA
from latent_diffusion.training.folders import ExtraFields
from latent_diffusion.training.generation_defaults import resolve_model_name
from latent_diffusion.training.settings import training_settings

logger = get_logger(__name__)
CONDITIONING_COLUMN = "conditioning_image"  # diffusers' train_controlnet.py default
UNSUPPORTED = {  # train_text2img flags that have no meaning here (yet), with why
    "lora_rank": "a ControlNet trains whole (LoRA adapters of the base UNet are train_text2img.py's)",
    "train_text_encoder_lora": "the text encoder stays frozen",
    "unet_config": "the base UNet is frozen, so it must be pretrained",
    "random_flip": "a flipped image would need its control image flipped too; flip the data beforehand",
    "enable_bucket": "control images are cropped at the square --resolution only",
    "instance_data_dir": "DreamBooth folders have no control images; use --train_data_dir or --dataset_name",
    "masked_loss": "not supported with a ControlNet",
    "validation_split": "the held-out loss is not computed for ControlNets",
    "save_single_file": "a ControlNet is saved as a diffusers folder",
    "train_text_encoder": "the base model, text encoder included, stays frozen",
    "text_encoder_lr": "the base model, text encoder included, stays frozen",
}


def build_controlnet_parser():
    """train_text2img's flags, diffusers' train_controlnet.py flags where the feature is the same, and defaults."""
    parser = build_parser()
    parser.prog = "train_controlnet.py"
    parser.description = "Train a ControlNet for a frozen latent text-to-image model."
    g = parser.add_argument_group("ControlNet")
    g.add_argument("--controlnet_model_name_or_path", default=None,
                   help="a diffusers ControlNet folder to start from (default: ControlNetModel.from_unet of the base)")
    g.add_argument("--conditioning_image_column", default=CONDITIONING_COLUMN,
                   help="the dataset column of the control images (default: %(default)s)")
    g.add_argument("--validation_image", nargs="+", default=None,
                   help="control image files for --validation_prompts: one for all, or one per prompt")
    g.add_argument("--conditioning_embedding_out_channels", type=int, nargs="+", default=None,
                   help="channels of the control-image encoder's stages, one stride-2 step between stages; "
                        "default: diffusers' (16, 32, 96, 256), cut to the VAE's factor (3 stages for factor 4)")
    parser.set_defaults(output_dir="controlnet-model", tracker_project_name="train_controlnet", learning_rate=1e-5,
                        lr_warmup_steps=0)
    return parser


def parse_controlnet_args(argv: Optional[list[str]] = None):
    """Checked flags: train_text2img's checks, the flags a ControlNet run refuses, the validation images."""
    parser = build_controlnet_parser()
    args = parser.parse_args(argv)
    args.pretrained_model_name_or_path = resolve_model_name(args.pretrained_model_name_or_path)
    problems = check_args(args)
    problems += [f"--{flag} is not supported by train_controlnet.py: {why}" for flag, why in UNSUPPORTED.items()
                 if getattr(args, flag, None) not in (None, False, 0, 0.0)]
    problems += check_validation_images(args.validation_prompts, args.validation_image)
    path = args.controlnet_model_name_or_path
    if path is not None and not os.path.isfile(os.path.join(os.path.expanduser(path), "config.json")):
        problems.append(f"--controlnet_model_name_or_path {path!r} is not a diffusers ControlNet folder "
                        "(no config.json)")
    channels = args.conditioning_embedding_out_channels
    if channels is not None and (not channels or min(channels) < 1):
        problems.append("--conditioning_embedding_out_channels must be positive channel counts")
    if problems:
        parser.error("; ".join(problems))
    return args


def check_validation_images(prompts: Optional[list[str]], images: Optional[list[str]]) -> list[str]:
    """--validation_image: needed with --validation_prompts, one for all or one per prompt, existing files."""
    if not prompts:
        return ["--validation_image needs --validation_prompts"] if images else []
    if not images:
        return ["--validation_prompts needs --validation_image (the control images to sample them with)"]
    problems = [f"--validation_image {path!r} is not a file" for path in images if not os.path.isfile(path)]
    if len(images) not in (1, len(prompts)):
        problems.append(f"--validation_image given {len(images)} images for {len(prompts)} --validation_prompts; "
                        "give one for all or one per prompt")
    return problems


# ----------------------------------------------------------------------------- the model


def make_controlnet(args, unet, vae_factor: int):
    """The trained network: --controlnet_model_name_or_path, or `ControlNetModel.from_unet` of the base UNet
    with a control-image encoder that downsamples by the VAE's factor (one stride-2 step per extra stage)."""
    from diffusers import ControlNetModel

    if args.controlnet_model_name_or_path is not None:
        net = ControlNetModel.from_pretrained(os.path.expanduser(args.controlnet_model_name_or_path),
                                              use_safetensors=True)
    else:
        stages = vae_factor.bit_length()  # factor 2^k: k + 1 stages
        channels = tuple(args.conditioning_embedding_out_channels or (16, 32, 96, 256)[:stages])
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    from latent_diffusion.pipelines.controlnet import check_control_factor

    check_control_factor([net], vae_factor)
    return net.to(dtype=torch.float32).train().requires_grad_(True)


def freeze_base_unet(unet, device, dtype) -> None:
    """The base UNet (load_models made it trainable) frozen, in eval mode, in the frozen parts' dtype."""
    unet.requires_grad_(False).eval().to(device, dtype=dtype)


class ControlNetLoss:
    """The loop's loss for a ControlNet: `DenoisingLoss` of the frozen UNet with the ControlNet's residuals added.

    `loss(model_fn, z0, cond, generator, **options)` is the loop's interface; `model_fn` (the trained module
    called as a UNet) is not used, the prediction is `controlled_prediction` with the prepared (DDP) ControlNet.
    """

    def __init__(self, denoising: DenoisingLoss, unet, controlnet):
        self.denoising, self.unet, self.controlnet = denoising, unet, controlnet

    def __call__(self, model_fn, z0: torch.Tensor, cond: Conditioning, generator: torch.Generator,
                 **options) -> torch.Tensor:
        return self.denoising(self.prediction, z0, cond, generator, **options)

    def prediction(self, z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return controlled_prediction(self.unet, self.controlnet, z_t, t, cond)


def controlled_prediction(unet, controlnet, z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """The UNet's prediction at (z_t, t) with the ControlNet's residuals for `cond.control` added to its skip
    connections and middle block (the frozen UNet runs in its own dtype; gradients reach the ControlNet)."""
    if cond.control is None:
        raise ValueError("the batch has no control images (conditioning column)")
    added = cond.added_cond_kwargs()
    down, mid = controlnet(z_t, t, encoder_hidden_states=cond.context, controlnet_cond=cond.control,
                           added_cond_kwargs=added, return_dict=False)
    dtype = unet.dtype
    frozen = cond.to(dtype=dtype)
    return unet(z_t.to(dtype), t, encoder_hidden_states=frozen.context, added_cond_kwargs=frozen.added_cond_kwargs(),
                down_block_additional_residuals=[d.to(dtype) for d in down],
                mid_block_additional_residual=mid.to(dtype)).sample.float()


# ----------------------------------------------------------------------------- the data


class ControlImages:
    """Per training item (index, epoch): the row's control image as (3, R, R) in [0, 1], cropped as its image.

    The crop is the image's: with the cache, the cache's fixed crop of the row (its generator, as
    masked_loss replays it); without, the sample's own generator. Flips are refused (--random_flip).
    """

    def __init__(self, dataset, column: str, transform: ImageTransform, seed: int, cached: bool):
        self.dataset, self.column, self.transform = dataset, column, transform
        self.seed, self.cached = seed, cached

    def __call__(self, items) -> dict[str, torch.Tensor]:
        return {"control_pixels": torch.stack([self.pixels(int(index), int(epoch)) for index, epoch in items])}

    def pixels(self, index: int, epoch: int) -> torch.Tensor:
        generator = sample_generator(0, index, -1) if self.cached else sample_generator(self.seed, index, epoch)
        image = decode_image(self.dataset[index][self.column])
        if image is None:
            raise ValueError(f"--conditioning_image_column: the control image of row {index} could not be read")
        return (self.transform(image.convert("RGB"), generator) + 1) / 2  # the transform gives [-1, 1]


def conditioning_dataset(settings, column: str):
    """The dataset's control-image column next to its captions, rows in the training dataset's order."""
    data = settings.data
    try:
        return load_caption_dataset(data.dataset_name, data.dataset_config_name, data.train_data_dir, column,
                                    data.caption_column, data.max_train_samples, data.cache_dir)
    except ValueError as error:
        raise ValueError(f"--conditioning_image_column {column!r}: {error}") from None


def with_control_images(settings, data: base.TrainingData, column: str) -> base.TrainingData:
    """The training data with each sample's control image added as 'control_pixels'."""
    transform = ImageTransform(settings.data.resolution, settings.data.center_crop, random_flip=False)
    images = ControlImages(conditioning_dataset(settings, column), column, transform, settings.optim.seed,
                           cached=not settings.data.no_cache)
    return dataclasses.replace(data, samples=ExtraFields(data.samples, images))


# ----------------------------------------------------------------------------- the run


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_controlnet_args(argv)
    settings = training_settings(args)
    accelerator = base.make_accelerator(settings)
    models = base.load_models(settings, accelerator)
    from latent_diffusion.vae import vae_scale_factor

    controlnet = make_controlnet(args, models.unet, vae_scale_factor(models.vae))
    freeze_base_unet(models.unet, accelerator.device, models.weight_dtype)
    if settings.optim.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
    data = with_control_images(settings, base.load_training_data(settings, accelerator, models),
                               args.conditioning_image_column)
    max_steps = settings.optim.max_train_steps or settings.optim.num_train_epochs * data.steps_per_epoch
    optimizer, lr_scheduler = base.make_optimizer(settings, accelerator, controlnet, max_steps)
    controlnet, optimizer, lr_scheduler = accelerator.prepare(controlnet, optimizer, lr_scheduler)
    ema = EMA(accelerator.unwrap_model(controlnet), settings.optim.ema_decay) if settings.optim.use_ema else None
    state = base.resume(settings.output, accelerator, ema)
    state = base.align_data_position(settings, accelerator, data, state)
    base.start_trackers(settings, accelerator)
    opt = settings.optim
    loss_fn = ControlNetLoss(DenoisingLoss(models.schedule, opt.snr_gamma, opt.noise_offset), models.unet, controlnet)
    trainee = base.Trainee(controlnet, optimizer, lr_scheduler, ema)
    validate_fn = ControlValidation(args.validation_image)
    state = base.train(settings, accelerator, models, data, trainee, state, max_steps, loss_fn=loss_fn,
                       validate_fn=validate_fn)
    save(settings, accelerator, models, controlnet, ema, state.global_step, validate_fn)
    accelerator.end_training()


class ControlValidation:
    """train()'s validation hook: the validation prompts sampled with the (EMA) ControlNet and their control images."""

    def __init__(self, image_paths: Optional[list[str]]):
        self.image_paths = image_paths or []

    def call_kwargs(self, num_prompts: int) -> list[dict]:
        from PIL import Image

        paths = self.image_paths * num_prompts if len(self.image_paths) == 1 else self.image_paths
        return [{"control_image": Image.open(path).convert("RGB")} for path in paths]

    def grid(self, settings, models, controlnet, step: int, trackers=()) -> tuple[str, dict]:
        """Sample the prompts with `controlnet` (weights as they are); OUT/validation/step-N.png and metrics."""
        from latent_diffusion.training.validation import run_validation

        val = settings.validation
        pipe = base.make_pipeline(models, models.unet)
        pipe.register_modules(controlnet=controlnet)
        return run_validation(pipe, val.validation_prompts, step=step, output_dir=settings.output.output_dir,
                              seed=settings.optim.seed, num_inference_steps=val.num_validation_inference_steps,
                              guidance_scale=val.validation_guidance_scale, resolution=settings.data.resolution,
                              metric_names=val.validation_metrics, trackers=trackers,
                              call_kwargs=self.call_kwargs(len(val.validation_prompts)))

    def __call__(self, settings, accelerator, models, controlnet, ema: Optional[EMA], step: int) -> None:
        if accelerator.is_main_process:
            model = accelerator.unwrap_model(controlnet)
            model.eval()
            with ema.swapped_into(model) if ema is not None else contextlib.nullcontext():
                path, metrics = self.grid(settings, models, model, step, accelerator.trackers)
            model.train()
            logger.info(f"validation grid {path} {metrics}")
        accelerator.wait_for_everyone()


def save(settings, accelerator, models, controlnet, ema: Optional[EMA], step: int,
         validation: ControlValidation) -> None:
    """OUT/ as a diffusers ControlNet folder holding the (EMA) weights in float32, a model card, an upload."""
    accelerator.wait_for_everyone()
    weights = accelerator.get_state_dict(controlnet)  # collective: gathers sharded weights on the main process
    if not accelerator.is_main_process:
        return
    trained = accelerator.unwrap_model(controlnet)
    final = type(trained).from_config(trained.config)
    final.load_state_dict(weights)
    if ema is not None:
        ema.copy_to(final)
    final.eval()
    out = settings.output.output_dir
    final.save_pretrained(out, safe_serialization=True)
    grid, metrics = (None, {})
    if settings.validation.validation_prompts:
        grid, metrics = validation.grid(settings, models, final.to(accelerator.device), step)
    write_controlnet_card(settings, step, grid, metrics)
    logger.info(f"saved the ControlNet to {out}" + (f" (validation grid {grid})" if grid else ""))
    if settings.output.push_to_hub:
        from latent_diffusion.formats.hub import push_folder

        push_folder(out, settings.output.hub_model_id, token=settings.output.hub_token,
                    commit_message="End of ControlNet training")


def write_controlnet_card(settings, step: int, grid: Optional[str], metrics: dict) -> str:
    """OUT/README.md: Hub metadata, what the ControlNet is for, how to load it, its settings and last grid."""
    from latent_diffusion.formats.hub import card_metadata

    out, base_model = settings.output.output_dir, settings.model.pretrained_model_name_or_path
    hyper = settings.record(("controlnet_model_name_or_path", "conditioning_image_column", "resolution",
                             "train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler",
                             "max_train_steps", "mixed_precision", "use_ema", "snr_gamma", "caption_dropout", "seed"))
    rows = "\n".join(f"| {k} | {v} |" for k, v in {**hyper, "steps trained": step, **metrics}.items())
    image = f"\n![validation]({os.path.relpath(grid, out)})\n" if grid else ""
    meta = card_metadata(base_model=base_model, dataset=settings.data.source, tags=["controlnet"], license="apache-2.0")
    text = (f"---\n{meta.to_yaml()}\n---\n\n# ControlNet for `{base_model}`\n\nA diffusers `ControlNetModel` trained "
            f"with latent_diffusion's `training/train_controlnet.py` on `{settings.data.source}` (control images: "
            f"column `{settings.flags['conditioning_image_column']}`); the base model was frozen.\n\n```python\n"
            "from latent_diffusion import LatentDiffusionPipeline\n"
            f"pipe = LatentDiffusionPipeline.from_pretrained({base_model!r}, controlnet=\"path/to/this/folder\")\n"
            "image = pipe(prompt, control_image=control).images[0]\n```\n\n| Setting | Value |\n|---|---|\n"
            f"{rows}\n{image}")
    path = os.path.join(out, "README.md")
    with open(path, "w") as f:
        f.write(text)
    return path


def cli(argv: Optional[list[str]] = None) -> int:
    """main() as a command: one line and status 2 for a bad flag, data or model; 1 for a failed run."""
    return base.run_as_command(main, "train_controlnet.py", argv)


if __name__ == "__main__":
    sys.exit(cli())
