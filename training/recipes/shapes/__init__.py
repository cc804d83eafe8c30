"""The Shapes recipe: the embedded default model built from nothing in three stages (see README.md here)."""
