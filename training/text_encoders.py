"""Training the text encoder(s): `--train_text_encoder` (full fine-tuning; SDXL: both encoders), and what it shares
with `--train_text_encoder_lora` (training/lora.py): `--text_encoder_lr`, gradient averaging, clipping.

As in diffusers' train_dreambooth.py and kohya's sd-scripts (`--train_text_encoder`, `--text_encoder_lr`), the
encoders learn with the UNet: their weights train in float32 (under `--mixed_precision` their forward runs in
accelerate's autocast, as a prepared model's does), `--gradient_checkpointing` applies to them too, and they are
one AdamW parameter group at `--text_encoder_lr` (default: the UNet's learning rate). Their embeddings change every
step, so captions are encoded with gradients every step (the latents may stay cached: `CaptionedCachedSamples`).

The encoders are not wrapped in DDP (our encoding code reads `.device` and calls them directly): their gradients
are averaged across processes before clipping and the optimizer step (`average_gradients`, from the training
step), so every process keeps the same weights. FSDP and DeepSpeed shard what accelerate prepared and would
leave the encoders out: that combination is refused. In full
mode, checkpoints get `text_encoder.safetensors` (SDXL: and `text_encoder_2.safetensors`) from accelerate's save
hook, read back by its load hook, so resuming is exact; the output folder holds the trained encoders.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from latent_diffusion.formats.atomic import atomic_write

CHECKPOINT_FILE = "{name}.safetensors"  # text_encoder.safetensors, text_encoder_2.safetensors
SHARDING = ("FSDP", "DEEPSPEED")


def encoders_of(text_encoder, text_encoder_2=None) -> dict[str, torch.nn.Module]:
    """{"text_encoder": ..., "text_encoder_2": ...} of the encoders that exist (SD: one, SDXL: two)."""
    found = {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    return {name: encoder for name, encoder in found.items() if encoder is not None}


def check_distributed_type(distributed_type) -> None:
    """Refuse sharded training (FSDP, DeepSpeed) with a training text encoder, in one line naming the flags."""
    name = getattr(distributed_type, "name", str(distributed_type))
    if name in SHARDING:
        raise ValueError(f"--train_text_encoder / --train_text_encoder_lora cannot be combined with {name} "
                         "(it shards only the UNet; the text encoders would be left out): use DDP (multi_gpu)")


def unfreeze(encoders: dict, device) -> None:
    """Make the encoders trainable in full: float32 weights on `device`, in train mode."""
    for encoder in encoders.values():
        encoder.to(device, dtype=torch.float32)
        encoder.requires_grad_(True)
        encoder.train()


def enable_gradient_checkpointing(encoders: dict) -> None:
    """--gradient_checkpointing for training encoders; not reentrant, as their input ids carry no gradient."""
    for encoder in encoders.values():  # transformers 5 renamed it (the old name warns); older ones have only that
        enable = getattr(encoder, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def trainable_parameters(encoders: dict) -> list[torch.nn.Parameter]:
    """The encoders' parameters that train (all of them in full mode, the adapters' with LoRA)."""
    return [p for encoder in encoders.values() for p in encoder.parameters() if p.requires_grad]


def average_gradients(accelerator, encoders: dict) -> None:
    """Average the encoders' gradients over processes (they are not in DDP); called once per optimizer step,
    after the last accumulated backward and before --max_grad_norm clips, so every process clips and steps the
    same gradients."""
    if accelerator.num_processes == 1 or not encoders:
        return
    for p in trainable_parameters(encoders):
        if p.grad is not None:
            p.grad = accelerator.reduce(p.grad, reduction="mean")


def register_checkpoint_hooks(accelerator, encoders: dict) -> None:
    """Checkpoints hold each fully trained encoder as `<name>.safetensors` beside accelerate's UNet weights."""

    def save_encoders(models, weights, output_dir):
        if accelerator.is_main_process:  # every process holds the same weights (averaged gradients)
            for name, encoder in encoders.items():
                state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
                with atomic_write(os.path.join(output_dir, CHECKPOINT_FILE.format(name=name)),
                                  suffix=".safetensors") as tmp:
                    save_file(state, str(tmp))

    def load_encoders(models, input_dir):
        for name, encoder in encoders.items():
            path = os.path.join(input_dir, CHECKPOINT_FILE.format(name=name))
            if not os.path.isfile(path):
                raise ValueError(f"--resume_from_checkpoint {input_dir!r} has no {os.path.basename(path)}: it was "
                                 "not written by a --train_text_encoder run")
            missing, unexpected = encoder.load_state_dict(load_file(path, device=str(encoder.device)), strict=False)
            if missing or unexpected:
                raise ValueError(f"--resume_from_checkpoint {path!r} holds a different {name} "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")

    accelerator.register_save_state_pre_hook(save_encoders)
    accelerator.register_load_state_pre_hook(load_encoders)


def learning_rate(settings, unet_lr: float) -> float:
    """The text encoders' learning rate: --text_encoder_lr, or the UNet's (already scaled by --scale_lr)."""
    te = settings.text_encoder
    return unet_lr if te is None or te.learning_rate is None else te.learning_rate


def clipped_parameters(unet, encoders: Optional[dict]):
    """What --max_grad_norm clips: the UNet's parameters and the training encoders' (one norm over all)."""
    params = list(unet.parameters())
    return params + trainable_parameters(encoders) if encoders else params
