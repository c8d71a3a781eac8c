"""dynalay custom ops.  Importing this module registers them (namespace ``dynalay``)."""
from ._common import ConvergenceWarning, NotConvergedError, SolverConfig
from .dispatch import (DynamicStepResult, Routing, dispatch, dynamic_step, dynamic_step_op, grouped_linear,
                       grouped_wgrad, route, route_op)
from .fixed_point import FixedPointResult, fixed_point, fixed_point_adjoint, fixed_point_fwd, last_backward_stats

__all__ = ["DynamicStepResult", "Routing", "dispatch", "dynamic_step", "dynamic_step_op", "route", "route_op",
           "ConvergenceWarning", "NotConvergedError", "SolverConfig", "FixedPointResult", "fixed_point",
           "fixed_point_adjoint", "fixed_point_fwd", "grouped_linear", "grouped_wgrad", "last_backward_stats"]
