"""Modules: ``FPILayer`` (one fixed-point-iterative layer) and ``DynamicFPIStep`` (L of them +
NOP, dispatched per row)."""
from .dynamic import DynamicFPIStep
from .fpi import FPILayer, SpectralBound

__all__ = ["FPILayer", "SpectralBound", "DynamicFPIStep"]
