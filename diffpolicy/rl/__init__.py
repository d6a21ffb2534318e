"""diffpolicy.rl: reinforcement learning: fine-tuning of chunk policies, and learned experts.

- `dppo`: DPPO, PPO through the denoising chain of a diffusion policy (last K' steps fine-tuned).
- `flow_ppo`: ReinFlow-style PPO for flow policies with a learned, bounded step noise.
- `dsrl`: SAC / PPO (stable-baselines3) in the initial-noise space of a frozen policy.
Shared pieces: `gae` (terminated vs truncated), `chunk_env` / `vec_env` (chunk-level vector
environments), `rollout`, `ppo`, `chain_ppo`, `critic`, `session` (resume), `curves`.
- `expert_training`: stable-baselines3 "medium" experts for the locomotion tasks (the learned
  experts that `diffpolicy.envs.experts.learned` loads).
"""
