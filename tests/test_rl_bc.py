"""The optional BC regulariser of DPPO and flow PPO: with bc_coef > 0 the fine-tuned copy keeps a
lower imitation loss on the demonstrations than RL alone leaves it; bad settings and missing or
mismatched demonstrations fail before any environment step."""

import dataclasses

import numpy as np
import pytest
import torch
from rl_tasks import TASK, make_bc_policy, make_env, write_card, write_demonstrations

from diffpolicy.cli import main
from diffpolicy.data.replay_buffer import ReplayBuffer
from diffpolicy.policies.errors import ConfigError
from diffpolicy.rl import dppo, flow_ppo
from diffpolicy.rl.errors import FinetuneError, MissingDemonstrationsError
from diffpolicy.train.trainer import DatasetMismatchError, to_device, window_dataset

SMALL = {"n_envs": 8, "n_steps": 6, "batch_size": 16, "epochs": 4, "eval_episodes": 2, "eval_every": 0}
ALGOS = {
    "dppo": (dppo, "diffusion", 5, dppo.DPPOConfig(lr=1e-3, finetune_steps=3, clip_start=0.05, clip_end=0.2, **SMALL)),
    "flowppo": (flow_ppo, "flow", 4, flow_ppo.FlowPPOConfig(lr=1e-3, clip=0.2, std_min=0.05, std_max=0.3,
                                                            log_prob_per_dim=False, **SMALL)),
}


def never_make_env():
    raise AssertionError("an environment was made: bad input must fail before")


def copy_imitation_loss(policy, store) -> float:
    """The fine-tuned copy's denoising loss on every demonstration window, averaged over 20 fixed draws."""
    windows = window_dataset(ReplayBuffer.open(store, cache_low_dim=True), None, policy.config)
    batch = to_device(windows.batch(np.arange(len(windows))), torch.device("cpu"))
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        return float(np.mean([float(policy.compute_loss(batch, generator, finetuned=True)) for _ in range(20)]))


@pytest.mark.parametrize("algo", list(ALGOS))
def test_bc_keeps_the_copy_closer_to_the_demonstrations(algo, tmp_path):
    module, kind, steps, config = ALGOS[algo]
    store = write_demonstrations(tmp_path / "demos.zarr")
    config = dataclasses.replace(config, env_steps=300)  # four iterations
    rl_only = module.finetune(make_bc_policy(kind, inference_steps=steps), make_env, config, tmp_path / "rl",
                              progress=False)
    base = make_bc_policy(kind, inference_steps=steps)
    if algo == "flowppo":  # by default the demonstrations are the store the base policy was trained on
        base.metadata["train_config"] = {"data": {"path": store}}
        regularised = dataclasses.replace(config, bc_coef=1.0)
    else:
        regularised = dataclasses.replace(config, bc_coef=1.0, bc_data=store)
    with_bc = module.finetune(base, make_env, regularised, tmp_path / "bc", progress=False)
    start = make_bc_policy(kind, inference_steps=steps)
    start.start_finetuning(with_bc.policy.config.finetune_steps)
    losses = {name: copy_imitation_loss(policy, store)
              for name, policy in (("start", start), ("rl", rl_only.policy), ("bc", with_bc.policy))}
    assert losses["bc"] < losses["rl"], losses
    assert losses["bc"] - losses["start"] < 0.5 * (losses["rl"] - losses["start"]), losses  # most of the drift undone
    assert all(row["bc_loss"] > 0 for row in with_bc.history) and "bc_loss" not in rl_only.history[0]
    assert [row["first_ratio_error"] for row in with_bc.history] == [0.0] * 4  # BC does not touch the ratio
    assert ",bc_loss" in (tmp_path / "bc" / "curves.csv").read_text().splitlines()[0]


def test_the_copys_loss_is_the_policys_loss_before_any_update():
    policy = make_bc_policy("diffusion")
    batch = {"obs": {"pos": torch.rand(6, 1, 2)}, "action": torch.rand(6, 4, 2) * 2 - 1}
    with pytest.raises(ConfigError, match=r"compute_loss\(finetuned=True\): this policy has no fine-tuned copy"):
        policy.compute_loss(batch, finetuned=True)
    policy.start_finetuning(2)
    base = policy.compute_loss(batch, torch.Generator().manual_seed(5))
    copy = policy.compute_loss(batch, torch.Generator().manual_seed(5), finetuned=True)
    assert torch.equal(base, copy) and copy.requires_grad
    with torch.no_grad():
        next(policy.finetuned_backbone.parameters()).add_(0.1)
    assert not torch.equal(policy.compute_loss(batch, torch.Generator().manual_seed(5), finetuned=True), base)


@pytest.mark.parametrize("algo", list(ALGOS))
def test_bad_bc_settings_fail_before_any_environment_step(algo, tmp_path, capsys):
    module, kind, steps, config = ALGOS[algo]
    config_cls = type(config)
    with pytest.raises(FinetuneError, match=r"config key 'bc_coef': expected a finite number >= 0 .* got -0.5"):
        config_cls(bc_coef=-0.5)
    with pytest.raises(FinetuneError, match="config key 'bc_coef'"):
        config_cls(bc_coef=float("nan"))
    with pytest.raises(FinetuneError, match=r"'bc_data' is 'demos.zarr' but 'bc_coef' is 0"):
        config_cls(bc_data="demos.zarr")
    policy = make_bc_policy(kind, inference_steps=steps)
    # A named store that is not there.
    with pytest.raises(MissingDemonstrationsError, match=r"config key 'bc_data': no replay-buffer store at .*nowhere"):
        module.finetune(policy, never_make_env,
                        dataclasses.replace(config, bc_coef=0.1, bc_data=str(tmp_path / "nowhere")), tmp_path / "a")
    # No store named, and the checkpoint records none / one that is gone.
    with pytest.raises(MissingDemonstrationsError, match="the checkpoint records no training store"):
        module.finetune(make_bc_policy(kind, inference_steps=steps), never_make_env,
                        dataclasses.replace(config, bc_coef=0.1), tmp_path / "b")
    moved = make_bc_policy(kind, inference_steps=steps)
    moved.metadata["train_config"] = {"data": {"path": str(tmp_path / "gone.zarr")}}
    with pytest.raises(MissingDemonstrationsError, match=r"the checkpoint's training store .*: no replay-buffer store"):
        module.finetune(moved, never_make_env, dataclasses.replace(config, bc_coef=0.1), tmp_path / "c")
    # A store of another task's shapes.
    other = ReplayBuffer.create(tmp_path / "wide.zarr")
    other.add_episode({"pos": np.zeros((5, 2), np.float32), "action": np.zeros((5, 3), np.float32)})
    other.close()
    with pytest.raises(DatasetMismatchError,
                       match=r"wide.zarr: actions have shape \[3\] per step, the policy expects \[2\]"):
        module.finetune(make_bc_policy(kind, inference_steps=steps), never_make_env,
                        dataclasses.replace(config, bc_coef=0.1, bc_data=str(tmp_path / "wide.zarr")), tmp_path / "d")
    assert not any((tmp_path / name).exists() for name in "abcd")
    # Through the command line: the override is read and refused by name.
    card = write_card(tmp_path / "point.yaml")
    policy.save_pretrained(tmp_path / "ckpt", metadata={"task": TASK})
    cli_algo = "dppo" if algo == "dppo" else "flowppo"
    assert main(["finetune", "--algo", cli_algo, "--checkpoint", str(tmp_path / "ckpt"), "--task", card,
                 "--out", str(tmp_path / "e"), "bc_coef=-1"]) == 2
    assert "config key 'bc_coef': expected a finite number >= 0" in capsys.readouterr().err
