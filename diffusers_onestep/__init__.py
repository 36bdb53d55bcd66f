"""diffusers-onestep: one-step text-to-image for Hugging Face diffusers."""

__version__ = "0.1.0.dev0"

__all__ = ["__version__"]
