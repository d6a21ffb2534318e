"""Imitation training: typed config, the trainer loop, checkpoints, data-parallel helpers.

    from diffpolicy.train import build_config, train
    config = build_config("pusht", "diffusion", ["train.steps=5000"])
    train(config, "runs/pusht_diffusion")
"""

from diffpolicy.train.checkpoints import CheckpointManager, resolve_policy_dir
from diffpolicy.train.config import TrainConfig, apply_overrides, build_config, config_for_run
from diffpolicy.train.trainer import DatasetMismatchError, DatasetMissingError, RunDirectoryError, TrainResult, train

__all__ = ["CheckpointManager", "DatasetMismatchError", "DatasetMissingError", "RunDirectoryError", "TrainConfig",
           "TrainResult", "apply_overrides", "build_config", "config_for_run", "resolve_policy_dir", "train"]
