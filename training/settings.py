"""The training run's settings, typed once: train_text2img.py parses its flags, then builds a `TrainingSettings`.

Each group is a frozen dataclass whose fields carry the flag names (`--learning_rate` is
`settings.optim.learning_rate`), so the flags (training's public API) and the settings read the same.
Optional features are None when off: `settings.lora` (no `--lora_rank`), `settings.bucket` (no
`--enable_bucket`), `settings.mask` (no `--masked_loss`); `settings.captions` (training/captions.py) and
`settings.dreambooth` (folder datasets, prior preservation) always exist, and their defaults change nothing.
Values worked out from several flags are worked out here, once (the LoRA α default, the target module list,
the prior loss weight). The pieces of training take the group or values they need, never the Namespace.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Any, Optional


def _from_flags(cls, args: argparse.Namespace):
    """An instance of the dataclass `cls` holding the flags of the same names."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class ModelSettings:
    pretrained_model_name_or_path: str
    unet_config: Optional[str]
    revision: Optional[str]
    variant: Optional[str]
    prediction_type: Optional[str]
    single_file_config: Optional[str] = None  # configs + tokenizer folder for a single-file base model


@dataclass(frozen=True)
class DataSettings:
    dataset_name: Optional[str]
    dataset_config_name: Optional[str]
    train_data_dir: Optional[str]
    image_column: str
    caption_column: str
    max_train_samples: Optional[int]
    resolution: int
    center_crop: bool
    random_flip: bool
    caption_dropout: float
    dataloader_num_workers: int
    no_cache: bool
    cache_dir: Optional[str]

    @property
    def source(self) -> str:
        """The dataset as the model card names it."""
        return self.dataset_name or self.train_data_dir


@dataclass(frozen=True)
class OptimSettings:
    train_batch_size: int
    gradient_accumulation_steps: int
    max_train_steps: Optional[int]
    num_train_epochs: int
    learning_rate: float
    scale_lr: bool
    lr_scheduler: str
    lr_warmup_steps: int
    adam_beta1: float
    adam_beta2: float
    adam_weight_decay: float
    adam_epsilon: float
    use_8bit_adam: bool
    max_grad_norm: float
    snr_gamma: Optional[float]
    noise_offset: float
    use_ema: bool
    ema_decay: float
    mixed_precision: Optional[str]
    gradient_checkpointing: bool
    allow_tf32: bool
    seed: int


@dataclass(frozen=True)
class OutputSettings:
    output_dir: str
    checkpointing_steps: int
    checkpoints_total_limit: Optional[int]
    resume_from_checkpoint: Optional[str]
    logging_dir: str
    report_to: str
    tracker_project_name: str
    sample_index_log: Optional[str]
    generation_defaults: Optional[list[str]]  # KEY=VALUE overrides of the base's generation_config.json
    push_to_hub: bool
    push_checkpoints_to_hub: bool
    hub_model_id: Optional[str]
    hub_token: Optional[str]
    save_single_file: bool = False  # also OUT/model.safetensors in the original SD layout
    checkpoint_on_stop: bool = False


@dataclass(frozen=True)
class ValidationSettings:
    validation_prompts: Optional[list[str]]
    validation_steps: int
    validation_metrics: list[str]
    num_validation_inference_steps: int
    validation_guidance_scale: float
    validation_split: float  # held-out fraction for val/loss (training/validation_loss.py)


@dataclass(frozen=True)
class SpeedSettings:
    adamw_implementation: str
    channels_last: bool
    compile: bool
    compile_mode: str
    loss_log_steps: int


@dataclass(frozen=True)
class LoraSettings:
    """peft LoRA adapters (training/lora.py); α is resolved (`--lora_alpha`, default: the rank)."""

    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    train_text_encoder: bool  # the text encoder trains too: captions are encoded with gradients every step
    save_format: str = "diffusers"  # --lora_save_format: "diffusers" or "kohya" (AUTOMATIC1111, ComfyUI)
    network_type: str = "lora"  # --network_type: lora, dora, loha or lokr (training/network_types.py)


def target_modules(spec: str) -> tuple[str, ...]:
    """`--lora_target_modules` 'to_k, to_q' -> ('to_k', 'to_q')."""
    return tuple(name.strip() for name in spec.split(",") if name.strip())


def lora_settings(args: argparse.Namespace) -> Optional[LoraSettings]:
    from latent_diffusion.training.network_types import default_save_format

    if args.lora_rank is None:
        return None
    network_type = getattr(args, "network_type", "lora")
    return LoraSettings(rank=args.lora_rank, alpha=args.lora_alpha or args.lora_rank, dropout=args.lora_dropout,
                        target_modules=target_modules(args.lora_target_modules),
                        train_text_encoder=args.train_text_encoder_lora,
                        save_format=getattr(args, "lora_save_format", None) or default_save_format(network_type),
                        network_type=network_type)


@dataclass(frozen=True)
class TextEncoderSettings:
    """The text encoder(s) train (training/text_encoders.py): in full (`--train_text_encoder`) or their LoRA
    adapters (`--train_text_encoder_lora`); SDXL: both encoders. `learning_rate` is `--text_encoder_lr`; None means
    the UNet's learning rate after `--scale_lr`, as diffusers' DreamBooth scripts do (text_encoders.learning_rate)."""

    full: bool
    learning_rate: Optional[float]  # None: the UNet's (scaled) learning rate


def text_encoder_settings(args: argparse.Namespace) -> Optional[TextEncoderSettings]:
    full = getattr(args, "train_text_encoder", False)
    if not (full or getattr(args, "train_text_encoder_lora", False)):
        return None
    return TextEncoderSettings(full=full, learning_rate=getattr(args, "text_encoder_lr", None))


@dataclass(frozen=True)
class BucketSettings:
    """Aspect-ratio bucketing (training/bucketing.py): bucket sides in pixels."""

    min_bucket_reso: int
    max_bucket_reso: int
    bucket_reso_steps: int


@dataclass(frozen=True)
class CaptionSettings:
    """How each caption is rewritten before it is encoded (see the module docstring); defaults change nothing."""

    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: Optional[str] = None
    caption_tag_dropout_rate: float = 0.0
    caption_prefix: Optional[str] = None
    caption_suffix: Optional[str] = None
    caption_variants: int = 16

    @property
    def random(self) -> bool:
        """Whether the rewrite differs from draw to draw (shuffling or tag dropout)."""
        return self.shuffle_caption or self.caption_tag_dropout_rate > 0

    @property
    def changes_captions(self) -> bool:
        return self.random or bool(self.caption_prefix) or bool(self.caption_suffix)


@dataclass(frozen=True)
class DreamBoothSettings:
    """Folder datasets (training/folders.py): kohya's `N_caption/` tree under --train_data_dir with sidecar
    captions, or DreamBooth's instance folder and prompt; prior preservation with class / regularisation images
    (training/dreambooth.py). `prior_loss_weight` is resolved (default 1.0)."""

    caption_extension: str
    instance_data_dir: Optional[str]
    instance_prompt: Optional[str]
    class_data_dir: Optional[str]
    class_prompt: Optional[str]
    reg_data_dir: Optional[str]
    with_prior_preservation: bool
    prior_loss_weight: float
    num_class_images: int
    sample_batch_size: int


def dreambooth_settings(args: argparse.Namespace) -> DreamBoothSettings:
    names = {f.name for f in fields(DreamBoothSettings)} - {"prior_loss_weight"}
    weight = 1.0 if args.prior_loss_weight is None else args.prior_loss_weight
    return DreamBoothSettings(prior_loss_weight=weight, **{name: getattr(args, name) for name in names})


@dataclass(frozen=True)
class MaskSettings:
    """--masked_loss (training/masked_loss.py): masks from the images' alpha, or from `mask_dir`."""

    mask_dir: Optional[str]


@dataclass(frozen=True)
class TrainingSettings:
    model: ModelSettings
    data: DataSettings
    optim: OptimSettings
    output: OutputSettings
    validation: ValidationSettings
    speed: SpeedSettings
    lora: Optional[LoraSettings]
    bucket: Optional[BucketSettings]
    flags: dict[str, Any]  # the flags as given: a record for the trackers and model cards, not read otherwise
    captions: CaptionSettings = CaptionSettings()  # tag shuffling and dropout, prefix and suffix (training/captions.py)
    dreambooth: Optional[DreamBoothSettings] = None  # folder datasets and prior preservation (training/folders.py)
    mask: Optional[MaskSettings] = None  # --masked_loss, else None
    text_encoder: Optional[TextEncoderSettings] = None  # --train_text_encoder(_lora), else None

    @property
    def text_encoder_trains(self) -> bool:
        """The text encoder(s) train (in full, or their LoRA adapters): captions are encoded with gradients every
        step, never taken from the cache's embeddings."""
        return self.text_encoder is not None

    @property
    def text_encoder_full(self) -> bool:
        """--train_text_encoder: the whole text encoder(s) train, and the output folder holds them."""
        return self.text_encoder is not None and self.text_encoder.full

    def record(self, names) -> dict[str, Any]:
        """The named flags as given (a model card's hyperparameter table)."""
        return {name: self.flags[name] for name in names}

    def tracker_config(self) -> dict[str, Any]:
        """The flags with a scalar value, for the trackers."""
        return {k: v for k, v in self.flags.items() if isinstance(v, (int, float, str, bool))}


def training_settings(args: argparse.Namespace) -> TrainingSettings:
    """The typed settings of checked flags (train_text2img's `parse_args`)."""
    return TrainingSettings(
        model=_from_flags(ModelSettings, args), data=_from_flags(DataSettings, args),
        optim=_from_flags(OptimSettings, args), output=_from_flags(OutputSettings, args),
        validation=_from_flags(ValidationSettings, args), speed=_from_flags(SpeedSettings, args),
        lora=lora_settings(args), bucket=_from_flags(BucketSettings, args) if args.enable_bucket else None,
        flags=dict(vars(args)), captions=_from_flags(CaptionSettings, args), dreambooth=dreambooth_settings(args),
        mask=_from_flags(MaskSettings, args) if args.masked_loss else None,
        text_encoder=text_encoder_settings(args),
    )
