"""The optional behaviour-cloning regulariser of the on-policy algorithms (DPPO, flow PPO).

With `bc_coef` > 0, every PPO minibatch step adds `bc_coef` times the policy's ordinary
imitation loss (`ChunkPolicy.compute_loss`, run through the fine-tuned copy) on `batch_size`
demonstration windows to the actor's loss, so RL moves the copy only as far as the
demonstrations let it (DPPO's optional BC loss). The windows are drawn with replacement, and
every random draw (window indices, levels, noise) comes from the run's sampling generator, so a
resumed run repeats them bit-exactly. The demonstrations are `bc_data`, a replay-buffer store
(`diffpolicy collect`, the importers), or by default the store the base policy was trained on
(its checkpoint's `train_config.data.path`).

    bc = BCRegularizer.from_config(policy, config)   # None when bc_coef = 0
    loss = policy_loss + value_loss + config.bc_coef * bc.loss(generator)
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffpolicy.data.replay_buffer import ReplayBuffer
from diffpolicy.data.torch_dataset import WindowDataset
from diffpolicy.policies.chunk_policy import ChunkPolicy
from diffpolicy.rl.errors import FinetuneError, MissingDemonstrationsError
from diffpolicy.rl.session import OnPolicyConfig
from diffpolicy.train.trainer import check_store, to_device, window_dataset


def demonstration_path(policy: ChunkPolicy, bc_data: str | None) -> Path:
    """`bc_data`, else the base checkpoint's training store (`metadata["train_config"]["data"]["path"]`)."""
    if bc_data is not None:
        path, origin = Path(bc_data), "config key 'bc_data'"
    else:
        trained_on = policy.metadata.get("train_config", {}).get("data", {}).get("path")
        if trained_on is None:
            raise MissingDemonstrationsError(
                "config key 'bc_coef' > 0 needs demonstrations: the checkpoint records no training store "
                "(metadata train_config.data.path); pass bc_data=PATH of a replay-buffer store")
        path, origin = Path(trained_on), "the checkpoint's training store (train_config.data.path)"
    if not path.exists():
        raise MissingDemonstrationsError(f"{origin}: no replay-buffer store at {path} for the BC regulariser; "
                                         "pass bc_data=PATH of the demonstrations (e.g. `diffpolicy collect --out`)")
    return path


class BCRegularizer:
    """Demonstration windows of a store checked against the policy, and the copy's loss on them."""

    def __init__(self, policy: ChunkPolicy, path: Path, batch_size: int) -> None:
        if policy.config.finetune_steps == 0:
            raise FinetuneError("the BC regulariser trains the fine-tuned copy; call start_finetuning first")
        self.policy, self.batch_size = policy, batch_size
        self.buffer = ReplayBuffer.open(path, mode="r", cache_low_dim=True)
        config = policy.config
        check_store(self.buffer, dict(config.obs_shapes), config.action_dim, f"BC demonstrations {path}",
                    "the policy", "Pass bc_data=PATH of demonstrations of the policy's task")
        self.windows: WindowDataset = window_dataset(self.buffer, None, config)

    @classmethod
    def from_config(cls, policy: ChunkPolicy, config: OnPolicyConfig) -> BCRegularizer | None:
        """From an `OnPolicyConfig` (`bc_coef`, `bc_data`, `batch_size`); None when `bc_coef` is 0."""
        if config.bc_coef == 0:
            return None
        return cls(policy, demonstration_path(policy, config.bc_data), config.batch_size)

    def loss(self, generator: torch.Generator) -> torch.Tensor:
        """The fine-tuned copy's imitation loss (a scalar, differentiable) on `batch_size` windows."""
        indices = torch.randint(len(self.windows), (self.batch_size,), generator=generator)
        batch = to_device(self.windows.batch(indices.numpy()), next(self.policy.parameters()).device)
        return self.policy.compute_loss(batch, generator, finetuned=True)

    def close(self) -> None:
        self.buffer.close()
