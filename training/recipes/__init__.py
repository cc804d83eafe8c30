"""Recipes: complete, resumable programs that build a particular model with the general training pieces.

`shapes/` makes the embedded default model (`latent_diffusion/default_model/`).
"""
