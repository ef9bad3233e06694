"""Victim models: architectures (registry), training, verified checkpoints."""

from medsec.models.architectures import Victim, create_model, list_models
from medsec.models.checkpoint import load_checkpoint, save_checkpoint
from medsec.models.training import TrainConfig, evaluate, predict_proba, train_victim

__all__ = [
    "TrainConfig",
    "Victim",
    "create_model",
    "evaluate",
    "list_models",
    "load_checkpoint",
    "predict_proba",
    "save_checkpoint",
    "train_victim",
]
