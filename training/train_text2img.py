"""Train the UNet of a latent text-to-image model (DDPM Algorithm 1 in a VAE's latent space, text-conditioned).

One process (CPU or one GPU):

    python training/train_text2img.py --pretrained_model_name_or_path PATH \\
        --train_data_dir DIR --resolution 512 --train_batch_size 4 --max_train_steps 1000 --output_dir OUT

Any number of GPUs or nodes (see training/README.md and training/configs/):

    accelerate launch --config_file training/configs/multi_gpu.yaml training/train_text2img.py ...

The UNet learns and the VAE is frozen; the text encoder(s) are frozen too unless `--train_text_encoder`
fine-tunes them (or `--train_text_encoder_lora` adapts them; training/text_encoders.py). SDXL folders (text_encoder_2,
an SDXL UNet) train the same way, with both encoders cached and each image's
original size and crop as micro-conditioning (training/sdxl.py). By default the
VAE latents and text embeddings of the whole dataset are computed once and
cached (`--no_cache` encodes every step instead). Checkpoints go to
OUT/checkpoint-N and `--resume_from_checkpoint latest` continues exactly where
a run stopped; the trained pipeline is saved to OUT in diffusers format.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Any, Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, gather_object
from tqdm.auto import tqdm

from latent_diffusion.checks import NonFiniteError, one_line
from latent_diffusion.training.cache import (CachedSamples, CaptionedCachedSamples, build_or_load_cache, cache_key,
                                             caption_tensors, encode_caption_tensors, encode_latent_moments, identity,
                                             sample_latents)
from latent_diffusion.vae import latent_size_multiple, vae_scale_factor
from latent_diffusion.training.data import CaptionImageDataset, ImageTransform, caption_variants, readable_indices
from latent_diffusion.diffusion.losses import DenoisingLoss
from latent_diffusion.text.conditioners import Conditioning
from latent_diffusion.diffusion.schedules import NoiseSchedule
from latent_diffusion.tensors import randn
from latent_diffusion.training.args import parse_args
from latent_diffusion.training.generation_defaults import output_generation_defaults
from latent_diffusion.training.settings import OutputSettings, TrainingSettings, training_settings
from latent_diffusion.training.batches import epoch_batches, step_groups, steps_per_epoch
from latent_diffusion.training.components import load_components
from latent_diffusion.training.checkpointing import (DataOrder, TrainingState, checkpoint_weights, continue_position,
                                                     discard_partial_checkpoints, load_checkpoint, resolve_checkpoint,
                                                     save_checkpoint)
from latent_diffusion.training.stopping import StopRequest, TrainingStopped
from latent_diffusion.training.ema import EMA
from latent_diffusion.training import bucketing, folders, lora, text_encoders, validation_loss
from latent_diffusion.training.captions import caption_rewriter
from latent_diffusion.training.masked_loss import latent_mask, masked_samples
from latent_diffusion.training.bounds import (build_unet, check_model_dependent_flags, check_step_memory,
                                             naming_output_dir)
from latent_diffusion.training.launch_checks import check_fsdp_is_active
from latent_diffusion.training.lora_run import save_lora_run
from latent_diffusion.training.lora_weights import register_checkpoint_hooks
from latent_diffusion.training.sdxl import (SizedCaptionImageDataset, batch_conditioning, check_sdxl_parts, context_dim,
                                            read_force_zeros)
from latent_diffusion.training.speed import LossMeter, adamw_options, speed_up_unet
from latent_diffusion.training.validation import run_validation

logger = get_logger(__name__)
SINGLE_FILE = "model.safetensors"  # --save_single_file: OUT/model.safetensors


def main(argv: Optional[list[str]] = None) -> None:
    settings = training_settings(parse_args(argv))  # flags parsed and checked, then typed once
    opt = settings.optim
    accelerator = make_accelerator(settings)
    models = load_models(settings, accelerator)  # the UNet learns; VAE frozen; text encoders per --train_text_encoder*
    data = load_training_data(settings, accelerator, models)  # cached latents, or images encoded on the fly
    max_steps = opt.max_train_steps or opt.num_train_epochs * data.steps_per_epoch
    encoders = training_encoders(settings, models)  # {} unless the text encoder(s) train (in full or LoRA)
    optimizer, lr_scheduler = make_optimizer(settings, accelerator, models.unet, max_steps,
                                             text_encoders.trainable_parameters(encoders))
    unet, optimizer, lr_scheduler = accelerator.prepare(models.unet, optimizer, lr_scheduler)
    register_checkpoint_hooks_of(settings, accelerator, encoders)
    ema = EMA(accelerator.unwrap_model(unet), opt.ema_decay) if opt.use_ema else None
    state = resume(settings.output, accelerator, ema)  # a fresh TrainingState when not resuming
    state = align_data_position(settings, accelerator, data, state)  # a changed batch size maps the saved position
    start_trackers(settings, accelerator)
    trainee = Trainee(unet, optimizer, lr_scheduler, ema, encoders)
    state = train(settings, accelerator, models, data, trainee, state, max_steps)
    save_pipeline(settings, accelerator, models, unet, ema, state.global_step)  # diffusers folder, model card, upload
    accelerator.end_training()


# ----------------------------------------------------------------------------- setup


def training_encoders(settings: TrainingSettings, models: "Models") -> dict:
    """The text encoders that train ({"text_encoder", SDXL "text_encoder_2"}), or {} when they are frozen."""
    if not settings.text_encoder_trains:
        return {}
    return text_encoders.encoders_of(models.text_encoder, models.text_encoder_2)


def register_checkpoint_hooks_of(settings: TrainingSettings, accelerator: Accelerator, encoders: dict) -> None:
    """Checkpoint hooks: LoRA writes the adapters only, not the frozen base; --train_text_encoder adds the
    encoders' weights beside the UNet's."""
    if settings.lora is not None:
        register_checkpoint_hooks(accelerator, encoders or None)
    elif settings.text_encoder_full:
        text_encoders.register_checkpoint_hooks(accelerator, encoders)


def make_accelerator(settings: TrainingSettings) -> Accelerator:
    """The Accelerator: mixed precision, accumulation, trackers; the LR schedule steps once per optimizer step."""
    opt, out = settings.optim, settings.output
    project = ProjectConfiguration(project_dir=out.output_dir,
                                    logging_dir=os.path.join(out.output_dir, out.logging_dir))
    accelerator = Accelerator(
        gradient_accumulation_steps=opt.gradient_accumulation_steps,
        mixed_precision=opt.mixed_precision,
        log_with=None if out.report_to == "none" else out.report_to,
        project_config=project,
        step_scheduler_with_optimizer=False,
    )
    check_fsdp_is_active(accelerator.distributed_type)  # accelerate drops --use_fsdp on CPU without a word
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if opt.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(opt.seed)
    if accelerator.is_main_process:
        with naming_output_dir(out.output_dir):
            os.makedirs(out.output_dir, exist_ok=True)
    return accelerator


@dataclass
class Models:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any  # the diffusers scheduler config that will be saved with the pipeline
    weight_dtype: torch.dtype
    text_encoder_2: Any = None  # SDXL: the second (projection) text encoder and its tokenizer, frozen
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: Optional[bool] = None  # SDXL: kept from the base folder
    text_encoder_trains: bool = False  # it trains (full or LoRA): captions are encoded with gradients every step

    @cached_property
    def schedule(self) -> NoiseSchedule:
        """ᾱ_t and the prediction type the loss uses, derived once from the scheduler config (not a second copy)."""
        return NoiseSchedule.from_config(self.scheduler.config)


@dataclass
class Trainee:
    """What training changes: the prepared UNet, its optimizer and LR schedule, the EMA of its weights, and the
    text encoders that train with it (by component name; {} when they are frozen)."""

    unet: Any
    optimizer: Any
    lr_scheduler: Any
    ema: Optional[EMA]
    text_encoders: dict = field(default_factory=dict)


def load_models(settings: TrainingSettings, accelerator: Accelerator) -> Models:
    """Components from --pretrained_model_name_or_path; a fresh UNet from --unet_config if given."""
    model_cfg, data_cfg, speed = settings.model, settings.data, settings.speed
    parts = load_components(model_cfg.pretrained_model_name_or_path, revision=model_cfg.revision,
                            variant=model_cfg.variant, cache_dir=data_cfg.cache_dir,
                            skip=("unet",) if model_cfg.unet_config else (),
                            single_file_config=model_cfg.single_file_config)
    if model_cfg.unet_config is not None:
        parts["unet"] = build_unet(model_cfg.unet_config)  # errors name --unet_config
    unet, vae, text_encoder = parts["unet"], parts["vae"], parts["text_encoder"]
    scheduler = parts["scheduler"]
    if model_cfg.prediction_type is not None:  # the saved scheduler carries the trained prediction type
        scheduler = type(scheduler).from_config(scheduler.config, prediction_type=model_cfg.prediction_type)
    text_encoder_2 = parts["text_encoder_2"]
    check_model_fits(settings, unet, vae, text_encoder, text_encoder_2)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    check_step_memory(settings, unet.config, vae.config, vae_scale_factor(vae), weight_dtype, accelerator.device)
    check_model_dependent_flags(settings, unet.config, scheduler.config)  # --lora_rank, validation steps
    prepare_frozen_and_text_encoders(settings, accelerator, weight_dtype, vae, text_encoder, text_encoder_2)
    if unet.dtype != torch.float32:  # trained weights stay fp32, also from an fp16 folder like the embedded default
        unet.to(dtype=torch.float32)
    unet.requires_grad_(True)
    unet.train()
    if settings.lora is not None:  # freezes the UNet and adds trainable peft adapters (training/lora.py)
        lora.add_adapters(settings.lora, unet, text_encoder, text_encoder_2)
        logger.info("LoRA: %d of %d UNet parameters train", *lora.count_parameters(unet))
    if settings.optim.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if settings.text_encoder_trains:  # as diffusers' DreamBooth scripts do for a training text encoder
            text_encoders.enable_gradient_checkpointing(text_encoders.encoders_of(text_encoder, text_encoder_2))
    speed_up_unet(unet, speed.channels_last, speed.compile, speed.compile_mode)  # --channels_last, --compile
    force_zeros = read_force_zeros(model_cfg.pretrained_model_name_or_path, model_cfg.revision, data_cfg.cache_dir)
    return Models(unet, vae, text_encoder, parts["tokenizer"], scheduler,
                  weight_dtype, text_encoder_2, parts["tokenizer_2"], force_zeros, settings.text_encoder_trains)


def prepare_frozen_and_text_encoders(settings: TrainingSettings, accelerator: Accelerator, weight_dtype: torch.dtype,
                                     vae, text_encoder, text_encoder_2=None) -> None:
    """Freeze the VAE (and the text encoders unless --train_text_encoder) in `weight_dtype`, in eval mode; with
    --train_text_encoder the encoders train in float32 (training/text_encoders.py)."""
    encoders = text_encoders.encoders_of(text_encoder, text_encoder_2)
    if settings.text_encoder_trains:
        text_encoders.check_distributed_type(accelerator.distributed_type)
    frozen = [vae] + ([] if settings.text_encoder_full else list(encoders.values()))
    for part in frozen:
        part.requires_grad_(False)
        part.eval()
        part.to(accelerator.device, dtype=weight_dtype)
    if settings.text_encoder_full:
        text_encoders.unfreeze(encoders, accelerator.device)


def check_model_fits(settings: TrainingSettings, unet, vae, text_encoder, text_encoder_2=None) -> None:
    """The resolution and the UNet must fit the VAE and the text encoder (errors name the flag)."""
    data_cfg = settings.data
    multiple = latent_size_multiple(vae, unet)
    if data_cfg.resolution % multiple:
        raise ValueError(f"--resolution {data_cfg.resolution} must be a multiple of {multiple} "
                         f"(VAE factor {vae_scale_factor(vae)} × the UNet's downsampling)")
    check_sdxl_parts(unet, text_encoder_2)
    if text_encoder_2 is not None and settings.bucket is not None:
        raise ValueError("--enable_bucket is not supported for SDXL models yet "
                         "(the size ids assume square --resolution crops)")
    if unet.config.cross_attention_dim != context_dim(text_encoder, text_encoder_2):
        raise ValueError(f"--unet_config: cross_attention_dim {unet.config.cross_attention_dim} differs from the "
                         f"text encoder(s)' hidden size {context_dim(text_encoder, text_encoder_2)}")
    if unet.config.in_channels != vae.config.latent_channels:
        raise ValueError(f"--unet_config: in_channels {unet.config.in_channels} differs from the VAE's "
                         f"{vae.config.latent_channels} latent channels")


@dataclass
class TrainingData:
    samples: torch.utils.data.Dataset  # items (row, epoch) -> a training sample
    rows: list[int]  # usable dataset rows (readable images)
    steps_per_epoch: int
    collate_fn: Any
    num_workers: int
    buckets: Optional[dict] = None  # --enable_bucket: row -> (width, height) of its bucket
    held_out: list = field(default_factory=list)  # --validation_split: rows kept out of training for val/loss


def load_training_data(settings: TrainingSettings, accelerator: Accelerator, models: Models) -> TrainingData:
    """The dataset, its unreadable images skipped (and counted), served from the cache or decoded on the fly."""
    data_cfg, opt = settings.data, settings.optim
    with accelerator.main_process_first():  # DreamBooth's missing class images are generated here, once
        dataset, loss_weights = folders.training_dataset(settings, partial(make_pipeline, models, models.unet))
    transform = ImageTransform(data_cfg.resolution, data_cfg.center_crop, data_cfg.random_flip)
    if settings.bucket is not None:  # each image at its bucket's size, centre-cropped (training/bucketing.py)
        transform = bucketing.bucket_transform(settings.bucket, data_cfg.resolution, data_cfg.random_flip,
                                               models.vae, models.unet)
    cache = None
    if data_cfg.no_cache:
        rows, unreadable = find_readable_rows(accelerator, dataset, data_cfg.image_column)
        dataset_cls = SizedCaptionImageDataset if models.text_encoder_2 is not None else CaptionImageDataset
        samples = dataset_cls(dataset, data_cfg.image_column, data_cfg.caption_column, transform,
                              data_cfg.caption_dropout, opt.seed, caption_rewriter(settings.captions))
        collate_fn, workers = None, data_cfg.dataloader_num_workers
    else:
        cache = build_cache(settings, accelerator, models, dataset, transform)
        rows, unreadable = cache.indices.tolist(), cache.unreadable.tolist()
        samples = cached_samples(settings, cache, dataset)
        collate_fn, workers = identity, 0  # tensors in memory: worker processes would only add overhead
    if loss_weights is not None:  # prior preservation: class rows weigh --prior_loss_weight (training/folders.py)
        samples = folders.weighted_samples(samples, loss_weights)
    if not rows:
        source = (f"--dataset_name {data_cfg.dataset_name!r}" if data_cfg.dataset_name
                  else f"--train_data_dir {data_cfg.train_data_dir!r}")
        raise ValueError(f"{source}: none of its {len(dataset)} image(s) could be read (column "
                         f"--image_column {data_cfg.image_column!r}); give a dataset with readable images")
    if unreadable:
        logger.warning(f"skipped {len(unreadable)} unreadable image(s) of {len(dataset)}: rows {unreadable[:20]}")
    if settings.mask is not None:  # each sample's mask, through its crop and flip (training/masked_loss.py)
        samples = masked_samples(samples, dataset, data_cfg.image_column, settings.mask.mask_dir, transform, opt.seed,
                                 rows, cached=cache is not None, latent_factor=vae_scale_factor(models.vae))
    rows, held_out = validation_loss.split_rows(rows, settings.validation.validation_split, opt.seed)
    steps = steps_per_epoch(len(rows), world_size=accelerator.num_processes, batch_size=opt.train_batch_size,
                            accumulation=opt.gradient_accumulation_steps)
    buckets = None
    if settings.bucket is not None:
        buckets = bucketing.row_buckets_for(cache, dataset, data_cfg.image_column, rows, transform, models.vae)
        steps = bucketing.bucket_steps_per_epoch(buckets, world_size=accelerator.num_processes,
                                                 batch_size=opt.train_batch_size,
                                                 accumulation=opt.gradient_accumulation_steps)
        logger.info(f"{len(transform.buckets)} buckets; images per bucket (width×height): "
                    f"{bucketing.describe_buckets(buckets)}")
    if steps < 1:
        raise ValueError(f"{len(rows)} usable images cannot fill one step of --train_batch_size "
                         f"{opt.train_batch_size} × --gradient_accumulation_steps {opt.gradient_accumulation_steps} "
                         f"× {accelerator.num_processes} process(es)" + (" within one bucket" if buckets else ""))
    logger.info(f"{len(rows)} images, {steps} steps per epoch, {len(unreadable)} unreadable skipped")
    return TrainingData(samples, rows, steps, collate_fn, workers, buckets, held_out)


def cached_samples(settings: TrainingSettings, cache, dataset) -> CachedSamples:
    """Samples from the cache: latents and text embeddings, or, when the text encoders train, latents and the
    caption text (encoded with gradients every step; the cached embeddings would be stale)."""
    data_cfg, seed = settings.data, settings.optim.seed
    if not settings.text_encoder_trains:
        return CachedSamples(cache, data_cfg.random_flip, data_cfg.caption_dropout, seed)
    cells = dataset[data_cfg.caption_column]  # the cache's variants: rewritten captions are expanded in the dataset
    captions = {int(row): caption_variants(cells[int(row)]) for row in cache.indices.tolist()}
    return CaptionedCachedSamples(cache, captions, data_cfg.random_flip, data_cfg.caption_dropout, seed)


def find_readable_rows(accelerator: Accelerator, dataset, image_column: str) -> tuple[list[int], list[int]]:
    """Decode every image once, split across processes: (readable rows, unreadable rows)."""
    mine = range(accelerator.process_index, len(dataset), accelerator.num_processes)
    readable, unreadable = readable_indices(dataset, image_column, mine)
    everyone = gather_object([(readable, unreadable)])
    return sorted(r for ok, _ in everyone for r in ok), sorted(r for _, bad in everyone for r in bad)


def build_cache(settings: TrainingSettings, accelerator: Accelerator, models: Models, dataset, transform):
    """Latents and embeddings of every row, computed once (rows split across processes), then loaded everywhere."""
    data_cfg = settings.data
    key = cache_key(models.vae, models.text_encoder, models.tokenizer, resolution=data_cfg.resolution,
                    center_crop=data_cfg.center_crop, dataset_fingerprint=dataset._fingerprint,
                    image_column=data_cfg.image_column, caption_column=data_cfg.caption_column,
                    random_flip=data_cfg.random_flip, text_encoder_2=models.text_encoder_2,
                    tokenizer_2=models.tokenizer_2,
                    buckets=bucketing.cache_setting(settings.bucket, data_cfg.resolution))
    root = os.path.join(data_cfg.cache_dir or settings.output.output_dir, "latent_cache")
    bar = tqdm(total=math.ceil(len(dataset) / accelerator.num_processes), desc="caching latents",
               disable=not accelerator.is_local_main_process)
    cache, hit = build_or_load_cache(
        root, key, dataset, vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
        transform=transform, image_column=data_cfg.image_column, caption_column=data_cfg.caption_column,
        batch_size=settings.optim.train_batch_size, rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        barrier=accelerator.wait_for_everyone, progress=bar.update,
        text_encoder_2=models.text_encoder_2, tokenizer_2=models.tokenizer_2,
    )
    bar.close()
    logger.info(f"latent cache {'hit' if hit else 'built'}: {os.path.join(root, key)}")
    return cache


def make_optimizer(settings: TrainingSettings, accelerator: Accelerator, unet, max_steps: int,
                   text_encoder_params=()):
    """AdamW (8-bit with --use_8bit_adam) and the LR schedule, counted in optimizer steps; `text_encoder_params`
    (training text encoders) are a second parameter group at --text_encoder_lr."""
    opt = settings.optim
    from diffusers.optimization import get_scheduler

    lr = opt.learning_rate
    if opt.scale_lr:
        lr *= opt.gradient_accumulation_steps * opt.train_batch_size * accelerator.num_processes
    adamw, kernel = torch.optim.AdamW, adamw_options(settings.speed.adamw_implementation, accelerator.device)
    if opt.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ValueError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from err
        adamw, kernel = bnb.optim.AdamW8bit, {}
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": lr}]
    if text_encoder_params:
        groups.append({"params": list(text_encoder_params), "lr": text_encoders.learning_rate(settings, lr)})
    optimizer = adamw(groups, lr=lr,
                      betas=(opt.adam_beta1, opt.adam_beta2), weight_decay=opt.adam_weight_decay,
                      eps=opt.adam_epsilon, **kernel)
    lr_scheduler = get_scheduler(opt.lr_scheduler, optimizer=optimizer, num_warmup_steps=opt.lr_warmup_steps,
                                 num_training_steps=max_steps)
    return optimizer, lr_scheduler


def resume(out: OutputSettings, accelerator: Accelerator, ema: Optional[EMA]) -> TrainingState:
    """Load the checkpoint named by --resume_from_checkpoint (weights, optimizer, LR, EMA, data position)."""
    if accelerator.is_main_process:  # a killed save's .checkpoint-N.tmp is never resumed from: clear it
        for leftover in discard_partial_checkpoints(out.output_dir):
            logger.info(f"cleared {leftover}, left by an interrupted checkpoint save")
    accelerator.wait_for_everyone()
    path = resolve_checkpoint(out.output_dir, out.resume_from_checkpoint)
    if path is None:
        if out.resume_from_checkpoint == "latest":
            logger.info("--resume_from_checkpoint latest: no checkpoint yet, starting fresh")
        return TrainingState()
    state = load_checkpoint(accelerator, path, ema)
    logger.info(f"resumed from {path} at step {state.global_step} (epoch {state.epoch}, step {state.step_in_epoch})")
    return state


def align_data_position(settings: TrainingSettings, accelerator: Accelerator, data: TrainingData,
                        state: TrainingState) -> TrainingState:
    """The resumed data position under this run's batch layout (checkpointing.continue_position), noted in the log."""
    opt = settings.optim
    order = DataOrder(seed=opt.seed, rows=len(data.rows), train_batch_size=opt.train_batch_size,
                      gradient_accumulation_steps=opt.gradient_accumulation_steps,
                      num_processes=accelerator.num_processes, bucketed=data.buckets is not None)
    state, note = continue_position(state, order, data.steps_per_epoch)
    if note:
        logger.warning(f"resuming: {note}", main_process_only=True)
    return state


def start_trackers(settings: TrainingSettings, accelerator: Accelerator) -> None:
    accelerator.init_trackers(settings.output.tracker_project_name, config=settings.tracker_config())


# ----------------------------------------------------------------------------- training


def train(settings: TrainingSettings, accelerator: Accelerator, models: Models, data: TrainingData, trainee: Trainee,
          state: TrainingState, max_steps: int, loss_fn=None, validate_fn=None) -> TrainingState:
    """Run optimizer steps until `max_steps`, checkpointing and validating on the way; Ctrl-C/SIGTERM stop cleanly.

    `loss_fn(model_fn, z0, cond, generator)` (default: `DenoisingLoss`) and `validate_fn` (default: `validate`)
    let another objective (training/distill_lcm.py) reuse the loop, its data order, checkpoints and resume."""
    out, unet = settings.output, trainee.unet
    with StopRequest() as stop:
        state = train_steps(settings, accelerator, models, data, trainee, state, max_steps, stop, loss_fn, validate_fn)
    if out.sample_index_log:  # lets a test check that every rank ends with the same weights (UNet, text encoders)
        from latent_diffusion.training.cache import fingerprint_module

        encoders = "".join(f" {name} {fingerprint_module(e)}" for name, e in trainee.text_encoders.items())
        with open(f"{out.sample_index_log}.rank{accelerator.process_index}", "a") as f:
            f.write(f"weights {fingerprint_module(accelerator.unwrap_model(unet))}{encoders}\n")
    return state


def train_steps(settings: TrainingSettings, accelerator: Accelerator, models: Models, data: TrainingData,
                trainee: Trainee, state: TrainingState, max_steps: int, stop: StopRequest, loss_fn=None,
                validate_fn=None) -> TrainingState:
    """The loop of train(): steps, logs, checkpoints and validation until `max_steps` or a stop request."""
    opt, out, val = settings.optim, settings.output, settings.validation
    unet, ema = trainee.unet, trainee.ema
    loss_fn = loss_fn or DenoisingLoss(models.schedule, opt.snr_gamma, opt.noise_offset)
    validate_fn = validate_fn or validate
    bar = tqdm(total=max_steps, initial=state.global_step, desc="steps", disable=not accelerator.is_local_main_process)
    losses = LossMeter(settings.speed.loss_log_steps)  # the loss is read back from the device every N steps
    while state.global_step < max_steps:
        last = time.perf_counter()
        batches = epoch_loader(settings, accelerator, data, state)
        for micro_batches in step_groups(batches, opt.gradient_accumulation_steps):
            generator = step_generator(opt.seed, state.global_step, accelerator.process_index)
            loss = train_step(settings, accelerator, models, trainee, loss_fn, micro_batches, generator)
            if ema is not None:
                ema.update(accelerator.unwrap_model(unet))
            state.global_step += 1
            state.step_in_epoch += 1
            losses.add(loss)
            mean_loss = losses.read() if losses.due(state.global_step, max_steps) else None
            if mean_loss is not None:  # a NaN anywhere in the window makes its mean NaN
                check_loss(mean_loss, state.global_step)
            log_step(out, accelerator, state, mean_loss, trainee.lr_scheduler, micro_batches,
                     time.perf_counter() - last)
            bar.update(1)
            if mean_loss is not None:
                bar.set_postfix(loss=f"{mean_loss:.4f}")
            if state.step_in_epoch == data.steps_per_epoch:
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
            saved = state.global_step % out.checkpointing_steps == 0 or state.global_step == max_steps
            stopping = stop.requested(accelerator)  # one reduction per step when there are several ranks
            if saved or (stopping and out.checkpoint_on_stop):
                check_pending_loss(losses, state.global_step)  # never save weights a NaN/inf loss went into
                checkpoint(out, accelerator, state, ema)
            if stopping:
                bar.close()
                raise stop.stopped(state.global_step, os.path.join(out.output_dir, f"checkpoint-{state.global_step}")
                                   if saved or out.checkpoint_on_stop else None)
            if val.validation_prompts and state.global_step % val.validation_steps == 0:
                validate_fn(settings, accelerator, models, unet, ema, state.global_step)
            if data.held_out and state.global_step % val.validation_steps == 0:
                log_held_out_loss(settings, accelerator, models, data, trainee, loss_fn, state.global_step)
            if state.global_step >= max_steps:
                break
            last = time.perf_counter()  # samples/s counts data loading and the step, not checkpoints or validation
    bar.close()
    return state


def check_loss(loss: float, step: int) -> None:
    """Stop on a NaN/inf loss (gathered, so the same on every rank: all ranks stop together).

    Checked where the loss is read back anyway (every --loss_log_steps) and before each checkpoint, so
    there is no extra host sync per step and no checkpoint holds weights a non-finite loss went into.
    """
    if not math.isfinite(loss):
        raise NonFiniteError(f"the training loss became {loss} at step {step}; stopped without saving it (the last "
                             "checkpoint is intact). Lower --learning_rate, set --max_grad_norm, or use bf16/fp32")


def check_pending_loss(losses, step: int) -> None:
    """check_loss on the losses summed since the last read (one host sync per checkpoint)."""
    if losses.total is not None:
        check_loss(float(losses.total), step)


def epoch_loader(settings: TrainingSettings, accelerator: Accelerator, data: TrainingData, state: TrainingState):
    """The rest of the current epoch's batches for this process, from the saved position on."""
    opt = settings.optim
    plan = epoch_batches if data.buckets is None else partial(bucketing.bucket_epoch_batches, data.buckets)
    batches = plan(data.rows, epoch=state.epoch, seed=opt.seed, rank=accelerator.process_index,
                   world_size=accelerator.num_processes, batch_size=opt.train_batch_size,
                   accumulation=opt.gradient_accumulation_steps)
    remaining = batches[state.step_in_epoch * opt.gradient_accumulation_steps :]
    return torch.utils.data.DataLoader(data.samples, batch_sampler=remaining, collate_fn=data.collate_fn,
                                       num_workers=data.num_workers)


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator of one optimizer step on one process: timesteps, noise and latent samples come from it."""
    return torch.Generator().manual_seed(hash((int(seed), int(step), int(rank), 7)) & 0x7FFF_FFFF_FFFF_FFFF)


def train_step(settings: TrainingSettings, accelerator: Accelerator, models: Models, trainee: Trainee, loss_fn,
               micro_batches: list, generator: torch.Generator) -> torch.Tensor:
    """One optimizer step over the accumulated micro-batches; the mean loss over processes (0-d, on the device)."""
    unet, optimizer, lr_scheduler = trainee.unet, trainee.optimizer, trainee.lr_scheduler
    # a training text encoder is not prepared by accelerate: its forward gets the autocast a prepared model has
    autocast = accelerator.autocast if trainee.text_encoders else contextlib.nullcontext
    losses = []
    for batch in micro_batches:
        with accelerator.accumulate(unet):
            with autocast():
                latents, cond = batch_inputs(batch, models, accelerator.device, generator, settings.data.resolution)
            loss = denoising_loss(unet, latents, cond, loss_fn, generator, batch.get("loss_weight"),
                                  batch.get("loss_mask"))
            accelerator.backward(loss)
            if accelerator.sync_gradients:  # the text encoders are not in DDP: average theirs here, before clipping
                text_encoders.average_gradients(accelerator, trainee.text_encoders)
            if accelerator.sync_gradients and settings.optim.max_grad_norm > 0:
                accelerator.clip_grad_norm_(text_encoders.clipped_parameters(unet, trainee.text_encoders),
                                            settings.optim.max_grad_norm)
            optimizer.step()
            if accelerator.sync_gradients:
                lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return accelerator.gather(torch.stack(losses).mean()[None]).mean()  # no .item(): no host sync per step


def batch_inputs(batch: dict, models: Models, device, generator: torch.Generator,
                 resolution: Optional[int] = None) -> tuple[torch.Tensor, Conditioning]:
    """z_0 (B, C, h, w), drawn from the VAE posterior, and the conditioning: text embeddings (B, L, D), from the
    cache or encoded now, and for SDXL the pooled embeddings and size ids (`resolution` is the target size)."""
    if "latent_mean" in batch:
        mean, std = batch["latent_mean"], batch["latent_std"]
    else:
        mean, std = encode_latent_moments(models.vae, batch["pixels"])
    if "text_embeds" in batch:
        context = batch["text_embeds"]
    else:  # captions, not cached embeddings: on the fly, or the text encoders train (with or without the cache)
        encode = caption_tensors if models.text_encoder_trains else encode_caption_tensors  # with gradients or not
        texts = encode(models.tokenizer, models.text_encoder, batch["caption"], models.tokenizer_2,
                       models.text_encoder_2)  # and SDXL's pooled embeddings
        batch, context = {**batch, **texts}, texts["text_embeds"]
    mean, std = mean.to(device, torch.float32), std.to(device, torch.float32)
    z0 = sample_latents(mean, std, randn(tuple(mean.shape), generator, torch.float32, device))
    return z0, batch_conditioning(batch, context, resolution, device)


def denoising_loss(unet, z0: torch.Tensor, cond: Conditioning, loss_fn: DenoisingLoss, generator: torch.Generator,
                   weights: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Algorithm 1 of DDPM in latent space (`DenoisingLoss`), with the UNet called on z_t, t and the conditioning;
    with per-sample `weights` (B,) (prior preservation) the mean of w_i · l_i, as kohya weighs them; with
    `mask` (B, 1, H, W) (--masked_loss) each latent pixel's error weighted by the mask's mean over its area."""
    options = {}  # only what is used: a loss without masks or weights (LCM distillation's) takes none
    if mask is not None:
        options["weight_map"] = latent_mask(mask.to(z0.device, torch.float32), tuple(z0.shape[-2:]))
    if weights is None:
        return loss_fn(partial(unet_prediction, unet), z0, cond, generator, **options)
    per_sample = loss_fn(partial(unet_prediction, unet), z0, cond, generator, reduce=False, **options)  # (B,)
    return (per_sample * weights.to(per_sample)).mean()


def unet_prediction(unet, z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """The UNet's ε, v or x_0 prediction at (z_t, t) given the text (and SDXL's added) conditioning, (B, C, h, w)."""
    return unet(z_t, t, encoder_hidden_states=cond.context, added_cond_kwargs=cond.added_cond_kwargs()).sample


def log_step(out: OutputSettings, accelerator: Accelerator, state: TrainingState, loss: Optional[float], lr_scheduler,
             micro_batches, seconds: float) -> None:
    """Loss (on the steps it is read back), learning rate, throughput to the trackers; rows to --sample_index_log."""
    samples = sum(len(b["index"]) for b in micro_batches) * accelerator.num_processes
    metrics = {"train/lr": lr_scheduler.get_last_lr()[0], "train/samples_per_second": samples / max(seconds, 1e-9)}
    if loss is not None:
        metrics["train/loss"] = loss
    accelerator.log(metrics, step=state.global_step)
    if out.sample_index_log:
        rows = [int(i) for b in micro_batches for i in b["index"]]
        with open(f"{out.sample_index_log}.rank{accelerator.process_index}", "a") as f:
            f.write(f"{state.global_step} {' '.join(map(str, rows))}\n")


def checkpoint(out: OutputSettings, accelerator: Accelerator, state: TrainingState, ema: Optional[EMA]) -> None:
    """Write checkpoint-N (atomically, pruned to --checkpoints_total_limit) and optionally upload its weights."""
    path = save_checkpoint(accelerator, out.output_dir, state, ema, out.checkpoints_total_limit)
    logger.info(f"saved {path}")
    if out.push_checkpoints_to_hub and accelerator.is_main_process:
        from latent_diffusion.formats.hub import push_checkpoint_weights

        push_checkpoint_weights(path, out.hub_model_id, state.global_step, token=out.hub_token)
        logger.info(f"uploaded {checkpoint_weights(path)} of {path}")


def validate(settings: TrainingSettings, accelerator: Accelerator, models: Models, unet, ema: Optional[EMA],
             step: int) -> Optional[str]:
    """Sample the validation prompts with the current (EMA, if on) UNet on the main process; log grid and metrics."""
    val = settings.validation
    path = None
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(unet)
        model.eval()
        with ema.swapped_into(model) if ema is not None else contextlib.nullcontext():
            pipe = make_pipeline(models, model)
            path, metrics = run_validation(
                pipe, val.validation_prompts, step=step, output_dir=settings.output.output_dir,
                seed=settings.optim.seed,
                num_inference_steps=val.num_validation_inference_steps,
                guidance_scale=val.validation_guidance_scale, resolution=settings.data.resolution,
                metric_names=val.validation_metrics, trackers=accelerator.trackers,
            )
        model.train()
        logger.info(f"validation grid {path} {metrics}")
    accelerator.wait_for_everyone()
    return path


def log_held_out_loss(settings: TrainingSettings, accelerator: Accelerator, models: Models, data: TrainingData,
                      trainee: Trainee, loss_fn: DenoisingLoss, step: int) -> Optional[float]:
    """val/loss over the held-out rows (training/validation_loss.py) with the current (EMA) UNet, on the main process."""
    loss = None
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(trainee.unet)
        model.eval()
        with trainee.ema.swapped_into(model) if trainee.ema is not None else contextlib.nullcontext():
            loss_of_batch = validation_loss.bind(batch_inputs, denoising_loss, model, models, loss_fn,
                                                 accelerator.device, settings.data.resolution)
            batch_size = 1 if data.buckets else settings.optim.train_batch_size  # buckets: sizes differ
            loss = validation_loss.held_out_loss(loss_of_batch, data.samples, data.held_out, batch_size,
                                                 data.collate_fn, settings.optim.seed)
        model.train()
        accelerator.log({"val/loss": loss}, step=step)
        logger.info(f"step {step}: held-out loss {loss:.5f} over {len(data.held_out)} images")
    accelerator.wait_for_everyone()
    return loss


def make_pipeline(models: Models, unet):
    from latent_diffusion.pipelines import LatentDiffusionPipeline

    return LatentDiffusionPipeline(unet=unet, vae=models.vae, text_encoder=models.text_encoder,
                                   tokenizer=models.tokenizer, scheduler=models.scheduler,
                                   text_encoder_2=models.text_encoder_2, tokenizer_2=models.tokenizer_2,
                                   force_zeros_for_empty_prompt=models.force_zeros_for_empty_prompt)


# ----------------------------------------------------------------------------- output


def save_pipeline(settings: TrainingSettings, accelerator: Accelerator, models: Models, unet, ema: Optional[EMA],
                  step: int) -> None:
    """OUT/ as a diffusers folder holding the (EMA) UNet in float32 (and the trained text encoders with
    --train_text_encoder), a model card, and optionally upload it."""
    model_cfg, out = settings.model, settings.output
    if settings.lora is not None:  # OUT/pytorch_lora_weights.safetensors and its card instead (training/lora_run.py)
        return save_lora_run(settings, accelerator, models, unet, ema, step, make_pipeline)
    accelerator.wait_for_everyone()
    weights = accelerator.get_state_dict(unet)  # collective: gathers sharded (FSDP, ZeRO) weights on the main process
    if not accelerator.is_main_process:
        return
    trained = accelerator.unwrap_model(unet)
    final_unet = type(trained).from_config(trained.config)
    final_unet.load_state_dict(weights)
    final_unet.eval()
    if ema is not None:
        ema.copy_to(final_unet)
    vae, text_encoder, text_encoder_2 = models.vae, models.text_encoder, models.text_encoder_2
    if models.weight_dtype != torch.float32:  # the frozen parts were cast for speed: save the originals
        parts = load_components(model_cfg.pretrained_model_name_or_path, revision=model_cfg.revision,
                                variant=model_cfg.variant, cache_dir=settings.data.cache_dir,
                                skip=("unet", "tokenizer", "scheduler", "tokenizer_2"),
                                single_file_config=model_cfg.single_file_config)
        vae, text_encoder, text_encoder_2 = parts["vae"], parts["text_encoder"], parts["text_encoder_2"]
    if settings.text_encoder_full:  # --train_text_encoder: the trained encoders (float32), not the base's
        text_encoder, text_encoder_2 = (e.eval() if e is not None else None
                                        for e in (models.text_encoder, models.text_encoder_2))
    pipe = make_pipeline(Models(final_unet, vae, text_encoder, models.tokenizer, models.scheduler,
                                torch.float32, text_encoder_2, models.tokenizer_2,
                                models.force_zeros_for_empty_prompt), final_unet)
    pipe.generation_defaults = output_generation_defaults(model_cfg.pretrained_model_name_or_path, out.generation_defaults)
    with naming_output_dir(out.output_dir):  # a write error names the flag, not a temporary file
        pipe.save_pretrained(out.output_dir)
        if out.save_single_file:  # one file for AUTOMATIC1111 / ComfyUI / kohya (formats/single_file.py)
            pipe.save_single_file(os.path.join(out.output_dir, SINGLE_FILE))
    grid = write_card(settings, pipe, step)
    logger.info(f"saved the pipeline to {out.output_dir}" + (f" (validation grid {grid})" if grid else ""))
    if out.push_to_hub:
        from latent_diffusion.formats.hub import push_folder

        push_folder(out.output_dir, out.hub_model_id, token=out.hub_token,
                    commit_message="End of training")


def write_card(settings: TrainingSettings, pipe, step: int) -> Optional[str]:
    """README.md model card: base model, dataset, hyperparameters and a final validation grid."""
    model_cfg, data_cfg, out, val = settings.model, settings.data, settings.output, settings.validation
    from latent_diffusion.formats import hub

    grid, metrics = None, {}
    if val.validation_prompts:  # the final grid; write_model_card copies it next to the card
        grid, metrics = run_validation(pipe, val.validation_prompts, step=step,
                                       output_dir=out.output_dir, seed=settings.optim.seed,
                                       num_inference_steps=val.num_validation_inference_steps,
                                       guidance_scale=val.validation_guidance_scale, resolution=data_cfg.resolution,
                                       metric_names=val.validation_metrics)
    hyper = settings.record((
        "resolution", "train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler",
        "max_train_steps", "mixed_precision", "use_ema", "snr_gamma", "prediction_type", "caption_dropout",
        "noise_offset", "seed", "train_text_encoder", "text_encoder_lr"))
    hyper["prediction_type"] = pipe.scheduler.config.prediction_type
    hub.write_model_card(
        out.output_dir, base_model=None if model_cfg.unet_config else model_cfg.pretrained_model_name_or_path,
        dataset=data_cfg.source, tags=["text-to-image", "latent-diffusion", "diffusers"],
        hyperparameters=hyper, metrics=metrics, validation_grid=grid, prompts=val.validation_prompts or [],
        description=("UNet trained from scratch" if model_cfg.unet_config else "Fine-tuned") +
                    " with latent_diffusion's training/train_text2img.py.",
    )
    return grid


def cli(argv: Optional[list[str]] = None) -> int:
    """main() as a command (see `run_as_command`)."""
    return run_as_command(main, "train_text2img.py", argv)


def run_as_command(main_fn: Callable, name: str, argv: Optional[list[str]] = None) -> int:
    """A training script's main() as a command: a usage error (bad flag, data or model) prints one line and
    exits 2, a diverged or failed run 1 (any other exception too, as `ErrorType: first line`; set
    LATENT_DIFFUSION_TRACEBACK=1 for the traceback), a clean stop its signal's status."""
    try:
        main_fn(argv)
    except ValueError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return 2
    except TrainingStopped as stopped:
        print(f"{name}: {stopped}", file=sys.stderr)
        return stopped.status
    except KeyboardInterrupt:  # before the training loop (loading, caching) or a second Ctrl-C
        print(f"{name}: interrupted; checkpoints already written are whole", file=sys.stderr)
        return 130
    except Exception as error:  # the run failed, not its arguments: one line (the traceback on request)
        if os.environ.get("LATENT_DIFFUSION_TRACEBACK"):
            raise
        text, kind = one_line(error), type(error).__name__
        expected = isinstance(error, (NonFiniteError, OSError, RuntimeError, ImportError)) or text == kind
        print(f"{name}: error: {text if expected else f'{kind}: {text}'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
