"""Modules: ``FPILayer`` (one fixed-point-iterative layer)."""
from .fpi import FPILayer, SpectralBound

__all__ = ["FPILayer", "SpectralBound"]
