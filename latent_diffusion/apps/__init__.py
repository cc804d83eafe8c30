"""The applications, the outermost layer: the `latent-diffusion` CLI and the web UI (they may import the pipeline)."""
