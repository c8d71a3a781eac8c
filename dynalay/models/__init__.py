"""Models built on the dynalay ops: ``DynaLay`` (FPI layer pool + agent) and its baselines."""
from .dynalay import CostModel, DynaLay, DynaLayConfig, DynaLayOutput, MLPBaseline, Policy, mlp_hidden_for_params

__all__ = ["DynaLay", "DynaLayConfig", "DynaLayOutput", "CostModel", "Policy", "MLPBaseline", "mlp_hidden_for_params"]
