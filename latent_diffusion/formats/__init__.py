"""Files and formats: model folders and their checks, the embedded default's assets, atomic writes,
PNG metadata, LoRA key layouts, and the Hugging Face Hub."""
