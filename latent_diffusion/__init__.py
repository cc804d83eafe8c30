"""latent_diffusion: a small, hackable Stable-Diffusion-style latent text-to-image system.

The library holds the diffusion math, samplers, conditioning, the Shapes
world and evaluation. The pipeline lives in `latent_diffusion.pipelines`
(built on the library, never the reverse); it is re-exported here lazily so
that `from latent_diffusion import LatentDiffusionPipeline` works without the
library importing it.
"""
__version__ = "0.1.0"

__all__ = ["LatentDiffusionPipeline", "__version__"]


def __getattr__(name):
    if name == "LatentDiffusionPipeline":
        from latent_diffusion.pipelines import LatentDiffusionPipeline

        return LatentDiffusionPipeline
    raise AttributeError(f"module 'latent_diffusion' has no attribute {name!r}")
