"""dynalay: fused kernels for DynaLay (fixed-point-iterative layers with per-sample dynamic
layer selection).  Importing the package registers the ``dynalay::*`` custom ops; it never
fails because a compiled extension is missing (see ``python -m dynalay info``)."""
from . import backends, ops
from .ops import (ConvergenceWarning, DynamicStepResult, FixedPointResult, NotConvergedError, Routing, SolverConfig,
                  dispatch, dynamic_step, fixed_point, route)
from . import nn  # noqa: E402  (after ops)

__version__ = "0.1.0"

__all__ = ["backends", "ops", "nn", "fixed_point", "dynamic_step", "route", "dispatch", "DynamicStepResult", "Routing", "FixedPointResult", "SolverConfig", "ConvergenceWarning",
           "NotConvergedError", "__version__"]
