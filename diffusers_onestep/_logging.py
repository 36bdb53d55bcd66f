"""Silences one known-harmless warning before diffusers is imported (imported first by the package `__init__`)."""

import logging


__all__ = []

# diffusers' pipeline modules import transformers' `CLIPImageProcessor` / `SiglipImageProcessor`, which without
# torchvision fall back to the PIL processors (transformers 4's behaviour) and log so on every import.
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed)" not in record.getMessage()
)
