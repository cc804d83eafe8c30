"""The text-to-image pipeline, built on the `latent_diffusion` library."""
from latent_diffusion.pipelines.text2img import LatentDiffusionPipeline, LatentDiffusionPipelineOutput

__all__ = ["LatentDiffusionPipeline", "LatentDiffusionPipelineOutput"]
