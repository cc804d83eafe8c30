"""The end of a LoRA run: OUT/pytorch_lora_weights.safetensors, its model card, the validation grid, the upload.

The output is the adapter (lora_weights.py), not the frozen base model; `--push_to_hub` uploads only
those three files.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import Optional

from latent_diffusion.formats.atomic import write_text_atomic
from latent_diffusion.training.lora import count_parameters
from latent_diffusion.training.lora_weights import LORA_WEIGHTS, save_lora_weights
from latent_diffusion.training.settings import TrainingSettings

GRID = "validation_grid.png"
UPLOADED = (LORA_WEIGHTS, "README.md", GRID)
CARD_FLAGS = ("network_type", "lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "train_text_encoder_lora",
              "text_encoder_lr", "resolution", "train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler",
              "max_train_steps", "mixed_precision", "use_ema", "snr_gamma", "seed")
CARD_BODY = """# LoRA adapter for {base}

A {network} adapter (rank {rank}, alpha {alpha}) for the UNet
{text_encoder}of `{base}`, trained with
latent_diffusion's `training/train_text2img.py`. The file `{weights}` is in {layout} format;
the base model is not included.

## How to use

```python
from latent_diffusion import LatentDiffusionPipeline

pipe = LatentDiffusionPipeline.from_pretrained("{base}")
pipe.load_lora_weights("PATH_OR_HUB_ID_OF_THIS_ADAPTER")
image = pipe("{prompt}").images[0]
```

With diffusers: `StableDiffusionPipeline.from_pretrained("{base}").load_lora_weights("PATH_OR_HUB_ID")`.
From the command line: `latent-diffusion generate "{prompt}" --model {base} --lora PATH[:SCALE]`.
{grid}
## Training hyperparameters

| Setting | Value |
|---|---|
{rows}
"""

logger = logging.getLogger(__name__)


def write_lora_card(output_dir: str, settings: TrainingSettings, *, hyperparameters: dict, metrics: dict,
                    grid: Optional[str]) -> str:
    """README.md for the adapter: Hub metadata (base model, `lora` tag) and how to load it with us and diffusers."""
    from latent_diffusion.formats.hub import card_metadata

    base, prompts, lora = settings.model.pretrained_model_name_or_path, settings.validation.validation_prompts, settings.lora
    data = card_metadata(base_model=base, dataset=settings.data.source,
                         tags=["text-to-image", "latent-diffusion", "diffusers", "lora"], license="apache-2.0",
                         prompts=prompts or [])
    if grid is not None and os.path.abspath(grid) != os.path.abspath(os.path.join(output_dir, GRID)):
        shutil.copyfile(grid, os.path.join(output_dir, GRID))
    body = CARD_BODY.format(
        base=base, network={"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}[lora.network_type],
        rank=lora.rank, alpha=lora.alpha, weights=LORA_WEIGHTS,
        layout="kohya's (AUTOMATIC1111, ComfyUI)" if lora.save_format == "kohya" else "diffusers'",
        text_encoder="and the text encoder(s) " if lora.train_text_encoder else "",
        prompt=(prompts or ["a red circle above a blue square"])[0],
        grid=f"\n## Validation grid\n\n![validation grid]({GRID})\n" if grid is not None else "",
        rows="\n".join(f"| {k} | {v} |" for k, v in {**hyperparameters, **metrics}.items()))
    path = os.path.join(output_dir, "README.md")
    write_text_atomic(path, f"---\n{data.to_yaml()}\n---\n\n{body}")
    return path


def save_lora_run(settings: TrainingSettings, accelerator, models, unet, ema, step: int, make_pipeline) -> None:
    """The end of a LoRA run: OUT/pytorch_lora_weights.safetensors (EMA weights when on), card, grid, upload."""
    from latent_diffusion.training.validation import run_validation

    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    out, val = settings.output, settings.validation
    trained = accelerator.unwrap_model(unet)
    trained.eval()
    if ema is not None:  # training is over: the adapter keeps the averaged weights
        ema.copy_to(trained)
    encoders = {"text_encoder": models.text_encoder, "text_encoder_2": models.text_encoder_2}
    path = save_lora_weights(out.output_dir, trained, encoders if settings.text_encoder_trains else None,
                             save_format=settings.lora.save_format, alpha=settings.lora.alpha,
                             network_type=settings.lora.network_type)
    grid, metrics = None, {}
    if val.validation_prompts:
        grid, metrics = run_validation(
            make_pipeline(models, trained), val.validation_prompts, step=step, output_dir=out.output_dir,
            seed=settings.optim.seed, num_inference_steps=val.num_validation_inference_steps,
            guidance_scale=val.validation_guidance_scale, resolution=settings.data.resolution,
            metric_names=val.validation_metrics)
    hyper = {**settings.record(CARD_FLAGS), "lora_alpha": settings.lora.alpha}
    write_lora_card(out.output_dir, settings, hyperparameters=hyper, metrics=metrics, grid=grid)
    trainable, total = count_parameters(trained)
    logger.info(f"saved the LoRA adapter to {path} ({os.path.getsize(path) / 2**20:.2f} MiB; {trainable} of "
                f"{total} UNet parameters trained)")
    if out.push_to_hub:
        from latent_diffusion.formats.hub import push_folder

        push_folder(out.output_dir, out.hub_model_id, token=out.hub_token, commit_message="End of LoRA training",
                    allow_patterns=list(UPLOADED))

