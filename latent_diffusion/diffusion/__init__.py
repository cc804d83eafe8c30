"""The diffusion math of the seeds: noise schedules, the Gaussian forward process and its posterior,
classifier-free guidance, the training objective, SDEdit and inpainting, and the samplers (`samplers/`)."""
