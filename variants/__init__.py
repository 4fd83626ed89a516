"""Registries of interchangeable model parts: attention, MLP, normalisation and position encoding.

Importing this package imports every module in it, so a variant registers itself by being a file
here. See ``variants.registry`` for the builder signatures.
"""

import importlib
import pkgutil

from variants.registry import ATTENTION, MLP, NORM, POSITION, Registry, UnknownVariantError

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "registry":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ATTENTION", "MLP", "NORM", "POSITION", "Registry", "UnknownVariantError"]
