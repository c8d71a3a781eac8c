"""Training, evaluation and reporting for the DynaLay model (``dynalay train`` / ``dynalay eval``)."""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import DataBundle, load_data
from .reward import RewardBreakdown, RewardConfig, compute_rewards
from .trainer import TrainConfig, Trainer, TrainingDiverged, calibrate_knob

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "calibrate_knob", "RewardConfig", "RewardBreakdown", "compute_rewards",
           "load_data", "DataBundle", "CheckpointError", "save_checkpoint", "load_checkpoint"]
