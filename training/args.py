"""Command-line flags of train_text2img.py (names follow diffusers' train_text_to_image.py where the feature is the same).

Parsing checks the flags (each problem names its flag); training/settings.py then types them once.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from latent_diffusion.checks import MAX_IMAGE_SIDE, check_finite_flags

from latent_diffusion.training.generation_defaults import parse_generation_overrides, resolve_model_name
from latent_diffusion.training.settings import target_modules
from latent_diffusion.training.speed import add_speed_args, check_speed_args

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
FLOAT_FLAG_BOUNDS = {  # every float flag: finite, within (minimum, maximum); None is unbounded
    "--learning_rate": (0, None), "--adam_beta1": (0, 1), "--adam_beta2": (0, 1), "--adam_weight_decay": (0, None),
    "--adam_epsilon": (0, None), "--max_grad_norm": (0, None), "--snr_gamma": (0, None), "--noise_offset": (0, None),
    "--ema_decay": (0, 1), "--caption_dropout": (0, 1), "--validation_guidance_scale": (0, None),
    "--text_encoder_lr": (0, None),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train (or fine-tune) the UNet of a latent text-to-image model.")
    add_model_args(p.add_argument_group("model"))
    add_data_args(p.add_argument_group("data"))
    add_optimisation_args(p.add_argument_group("optimisation"))
    add_output_args(p.add_argument_group("checkpoints, logging, validation, output"))
    add_speed_args(p.add_argument_group("speed (training/speed.py)"))
    from latent_diffusion.training.bucketing import add_bucket_args

    add_lora_args(p.add_argument_group("LoRA (training/lora.py)"))
    add_text_encoder_args(p.add_argument_group("text encoder training (training/text_encoders.py)"))
    add_bucket_args(p.add_argument_group("aspect-ratio bucketing (training/bucketing.py)"))
    from latent_diffusion.training.captions import add_caption_args
    from latent_diffusion.training.dreambooth import add_dreambooth_args

    add_caption_args(p.add_argument_group("captions: tags, shuffling, dropout (training/captions.py)"))
    add_dreambooth_args(p.add_argument_group("DreamBooth, prior preservation, kohya folders (training/dreambooth.py)"))
    from latent_diffusion.training.masked_loss import add_masked_loss_args

    add_masked_loss_args(p.add_argument_group("masked loss (training/masked_loss.py)"))
    from latent_diffusion.training.validation_loss import add_validation_loss_args

    add_validation_loss_args(p.add_argument_group("held-out validation loss (training/validation_loss.py)"))
    return p


def add_model_args(g) -> None:
    g.add_argument("--pretrained_model_name_or_path", required=True,
                   help="diffusers folder or Hub id with unet, vae, text_encoder, tokenizer and scheduler, a "
                        "single .safetensors checkpoint in the original SD layout, or 'default': the embedded Shapes model")
    g.add_argument("--single_file_config", default=None, metavar="FOLDER",
                   help="with a single-file model from another tool: a diffusers folder of the same family whose "
                        "configs and tokenizer(s) it uses (released files hold no tokenizer)")
    g.add_argument("--unet_config", default=None,
                   help="JSON file of a UNet2DConditionModel config: train this UNet from scratch instead")
    g.add_argument("--revision", default=None, help="Hub revision of the pretrained model")
    g.add_argument("--variant", default=None, help="weights variant of the pretrained model, e.g. fp16")
    g.add_argument("--prediction_type", default=None, choices=("epsilon", "v_prediction", "sample"),
                   help="what the UNet learns to predict; default: the scheduler's. Saved into the output scheduler")


def add_data_args(g) -> None:
    g.add_argument("--dataset_name", default=None, help="Hub dataset id or a local path load_dataset understands")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--train_data_dir", default=None, help="imagefolder with images and a metadata.jsonl of captions")
    g.add_argument("--image_column", default="image")
    g.add_argument("--caption_column", default="text", help="a caption, or a list of captions (one is drawn per step)")
    g.add_argument("--max_train_samples", type=int, default=None)
    g.add_argument("--resolution", type=int, default=512)
    g.add_argument("--center_crop", action="store_true", help="centre crop (default: random crop)")
    g.add_argument("--random_flip", action="store_true", help="flip images horizontally at random")
    g.add_argument("--caption_dropout", type=float, default=0.0,
                   help="probability of training on the empty caption (for classifier-free guidance)")
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--no_cache", action="store_true", help="encode images and captions every step (no latent cache)")
    g.add_argument("--cache_dir", default=None,
                   help="where the latent/embedding cache lives (default: OUTPUT_DIR/latent_cache); "
                        "also passed to datasets as its cache folder")


def add_optimisation_args(g) -> None:
    g.add_argument("--train_batch_size", type=int, default=16, help="per process")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    g.add_argument("--num_train_epochs", type=int, default=100)
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--scale_lr", action="store_true",
                   help="multiply the learning rate by processes × batch size × accumulation steps")
    g.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS)
    g.add_argument("--lr_warmup_steps", type=int, default=500)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW (needs bitsandbytes)")
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--snr_gamma", type=float, default=None, help="min-SNR-γ loss weighting; 5.0 is usual")
    g.add_argument("--noise_offset", type=float, default=0.0, help="scale of per-channel offset noise")
    g.add_argument("--use_ema", action="store_true", help="keep an EMA of the UNet; the saved pipeline holds it")
    g.add_argument("--ema_decay", type=float, default=0.9999)
    g.add_argument("--mixed_precision", default=None, choices=("no", "fp16", "bf16"),
                   help="default: accelerate's config or launch flag")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--seed", type=int, default=0)


def add_output_args(g) -> None:
    g.add_argument("--output_dir", default="sd-model-finetuned")
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a checkpoint folder')
    g.add_argument("--checkpoint_on_stop", action="store_true",
                   help="on Ctrl-C or SIGTERM, save a checkpoint of the step just finished before stopping")
    g.add_argument("--logging_dir", default="logs", help="tracker folder, relative to --output_dir")
    g.add_argument("--report_to", default="tensorboard", help='"tensorboard", "wandb", "all" or "none"')
    g.add_argument("--tracker_project_name", default="text2image-fine-tune")
    g.add_argument("--validation_prompts", nargs="+", default=None)
    g.add_argument("--validation_steps", type=int, default=500)
    g.add_argument("--validation_metrics", nargs="*", default=[],
                   help="names of registered validation metrics (training.validation.VALIDATION_METRICS): "
                        "pixel_std, shapes_adherence (Shapes judge accuracy on Shapes validation prompts)")
    g.add_argument("--num_validation_inference_steps", type=int, default=25)
    g.add_argument("--validation_guidance_scale", type=float, default=7.5)
    g.add_argument("--sample_index_log", default=None,
                   help="append each step's dataset indices per rank to this file (rank number appended)")
    g.add_argument("--generation_defaults", nargs="+", default=None, metavar="KEY=VALUE",
                   help="the output's generation_config.json: sampler=, num_inference_steps=, guidance_scale= "
                        "(default: the base model's)")
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--push_checkpoints_to_hub", action="store_true", help="also upload each checkpoint's weights")
    g.add_argument("--hub_model_id", default=None)
    g.add_argument("--hub_token", default=None)
    g.add_argument("--save_single_file", action="store_true",
                   help="also write OUT/model.safetensors (float16, the original SD key layout that AUTOMATIC1111, "
                        "ComfyUI and kohya load)")


def add_lora_args(g) -> None:
    from latent_diffusion.training.lora import DEFAULT_UNET_TARGETS
    from latent_diffusion.training.network_types import NETWORK_TYPES

    g.add_argument("--lora_rank", type=int, default=None,
                   help="train peft LoRA adapters of this rank instead of the whole UNet (the UNet stays frozen)")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA scale numerator α (default: the rank)")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the LoRA branch's input")
    g.add_argument("--lora_save_format", default=None, choices=("diffusers", "kohya"),
                   help="layout of OUT/pytorch_lora_weights.safetensors: diffusers', or kohya's (lora_unet_*/lora_te_* "
                        "with alpha) that AUTOMATIC1111/Forge and ComfyUI load (default: diffusers' for lora/dora, "
                        "kohya's LyCORIS keys for loha/lokr)")
    g.add_argument("--network_type", default="lora", choices=NETWORK_TYPES,
                   help="adapter kind (training/network_types.py): lora, dora (weight-decomposed LoRA), loha "
                        "(Hadamard product), lokr (Kronecker product); rank, alpha and targets as for lora")
    g.add_argument("--lora_target_modules", default=",".join(DEFAULT_UNET_TARGETS),
                   help="comma-separated UNet module names to adapt (default: %(default)s)")
    g.add_argument("--train_text_encoder_lora", action="store_true",
                   help="also add LoRA adapters to the text encoder's attention (SDXL: both encoders; latents "
                        "may stay cached, captions are encoded every step)")


def add_text_encoder_args(g) -> None:
    g.add_argument("--train_text_encoder", action="store_true",
                   help="fine-tune the whole text encoder (SDXL: both) with the UNet; latents may stay cached, "
                        "captions are encoded every step")
    g.add_argument("--text_encoder_lr", type=float, default=None,
                   help="learning rate of the text encoder(s), with --train_text_encoder or --train_text_encoder_lora "
                        "(default: --learning_rate)")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the flags; a bad value ends with argparse's error naming the flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.pretrained_model_name_or_path = resolve_model_name(args.pretrained_model_name_or_path)
    problems = check_args(args)
    if problems:
        parser.error("; ".join(problems))
    return args


def check_args(args: argparse.Namespace) -> list[str]:
    """Every problem found in the flags, each naming its flag (checks that need no model or data)."""
    problems = []
    if sum(source is not None for source in (args.dataset_name, args.train_data_dir, args.instance_data_dir)) != 1:
        problems.append("give exactly one of --dataset_name, --train_data_dir or --instance_data_dir")
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        problems.append(f"--train_data_dir {args.train_data_dir!r} is not a folder")
    from latent_diffusion.training.bounds import flag_problems

    problems += flag_problems(args)  # --output_dir writable, --unet_config a JSON object, validation prompts bounded
    for flag in ("train_batch_size", "gradient_accumulation_steps", "resolution", "checkpointing_steps",
                 "validation_steps", "num_train_epochs", "num_validation_inference_steps"):
        if getattr(args, flag) < 1:
            problems.append(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("max_train_steps", "max_train_samples", "checkpoints_total_limit"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            problems.append(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    problems += check_finite_flags({f"--{k}": v for k, v in vars(args).items()}, FLOAT_FLAG_BOUNDS)
    if args.ema_decay == 1.0 or args.snr_gamma == 0.0:  # the edges FLOAT_FLAG_BOUNDS lets through
        problems.append("--ema_decay must be < 1 and --snr_gamma > 0")
    if args.lr_warmup_steps < 0 or args.dataloader_num_workers < 0:
        problems.append("--lr_warmup_steps and --dataloader_num_workers must be >= 0")
    if args.resolution > MAX_IMAGE_SIDE:
        problems.append(f"--resolution must be at most {MAX_IMAGE_SIDE}, got {args.resolution}")
    if args.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(args.resume_from_checkpoint):
        problems.append(f"--resume_from_checkpoint {args.resume_from_checkpoint!r} does not exist "
                        "(give a checkpoint folder or 'latest')")
    if (args.push_to_hub or args.push_checkpoints_to_hub) and not args.hub_model_id:
        problems.append("--push_to_hub and --push_checkpoints_to_hub need --hub_model_id")
    problems += check_speed_args(args)
    try:
        parse_generation_overrides(args.generation_defaults)
    except ValueError as error:
        problems.append(str(error))
    from latent_diffusion.training.bucketing import check_bucket_args
    from latent_diffusion.training.validation import VALIDATION_METRICS

    problems += check_lora_args(args) + check_text_encoder_args(args) + check_bucket_args(args)
    from latent_diffusion.training.captions import check_caption_args
    from latent_diffusion.training.dreambooth import check_dreambooth_args

    from latent_diffusion.training.masked_loss import check_masked_loss_args
    from latent_diffusion.training.validation_loss import check_validation_loss_args

    problems += check_caption_args(args) + check_dreambooth_args(args) + check_masked_loss_args(args)
    problems += check_validation_loss_args(args)

    for name in args.validation_metrics:
        if name not in VALIDATION_METRICS:
            problems.append(f"--validation_metrics: unknown metric {name!r}; registered: {sorted(VALIDATION_METRICS)}")
    return problems


def check_lora_args(args: argparse.Namespace) -> list[str]:
    """Problems with the LoRA flags, each naming its flag."""
    from latent_diffusion.training.network_types import check_network_args

    problems = check_network_args(args.network_type, args.lora_rank, args.lora_dropout, args.lora_save_format)
    if args.lora_rank is None:
        if args.train_text_encoder_lora:
            problems.append("--train_text_encoder_lora needs --lora_rank")
        return problems
    if args.lora_rank < 1:
        problems.append(f"--lora_rank must be >= 1, got {args.lora_rank}")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        problems.append(f"--lora_alpha must be > 0, got {args.lora_alpha}")
    if not 0.0 <= args.lora_dropout < 1.0:
        problems.append(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if not target_modules(args.lora_target_modules):
        problems.append("--lora_target_modules must name at least one module, e.g. to_k,to_q,to_v,to_out.0")
    if getattr(args, "unet_config", None):
        problems.append("--lora_rank adapts a pretrained UNet; it cannot be combined with --unet_config")
    return problems


def check_text_encoder_args(args: argparse.Namespace) -> list[str]:
    """Problems with --train_text_encoder and --text_encoder_lr, each naming its flags."""
    problems = []
    if args.train_text_encoder and args.lora_rank is not None:
        problems.append("--train_text_encoder fine-tunes the whole text encoder and --lora_rank trains adapters "
                        "only: use one of them (--train_text_encoder_lora trains text-encoder adapters)")
    if args.text_encoder_lr is not None and not (args.train_text_encoder or args.train_text_encoder_lora):
        problems.append("--text_encoder_lr needs --train_text_encoder or --train_text_encoder_lora")
    return problems
