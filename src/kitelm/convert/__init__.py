"""Checkpoint converters: foreign formats → kitelm models (`kitelm convert`, and `kitelm.load` on such sources)."""

from .recurrentgemma import convert, detect, load_foreign, load_model

__all__ = ["convert", "detect", "load_foreign", "load_model"]
