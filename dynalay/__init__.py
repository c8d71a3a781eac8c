"""dynalay: fused kernels for DynaLay (fixed-point-iterative layers with per-sample dynamic
layer selection).  Importing the package registers the ``dynalay::*`` custom ops; it never
fails because a compiled extension is missing (see ``python -m dynalay info``)."""
from . import backends, ops
from .ops import ConvergenceWarning, FixedPointResult, NotConvergedError, SolverConfig, fixed_point

__version__ = "0.1.0"

__all__ = ["backends", "ops", "fixed_point", "FixedPointResult", "SolverConfig", "ConvergenceWarning",
           "NotConvergedError", "__version__"]
