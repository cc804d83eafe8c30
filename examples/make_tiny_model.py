"""Write a tiny random Stable Diffusion folder built from config (offline), to try training and generation fast.

    python examples/make_tiny_model.py tiny-sd
"""
import sys

from diffusers import StableDiffusionPipeline

from latent_diffusion.tiny import tiny_components

if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "tiny-sd"
    StableDiffusionPipeline(**tiny_components(scheduler="pndm"), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(out)
    print(out)
