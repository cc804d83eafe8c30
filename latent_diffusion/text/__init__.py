"""Text conditioning: tokenizing prompts, encoding them with CLIP/T5, and the SD / SDXL conditioners
that turn prompt and negative prompt into what the UNet reads."""
