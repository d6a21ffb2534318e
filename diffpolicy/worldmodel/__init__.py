"""diffpolicy.worldmodel: a learned world model and fine-tuning inside it (DiWA-style dreams).

- `data`: `Transitions`, episodes of low-dim observations, executed actions, rewards and success
  from replay buffers or memory, cut into training windows.
- `model`: `LatentWorldModel`, an ensemble of latent dynamics models (encoder, action-conditioned
  latent transition, decoder, reward / success heads) whose disagreement is the uncertainty.
- `training`: `train_world_model` (resumable checkpoints, `diffpolicy worldmodel train`);
  `heldout`: prediction error and disagreement vs horizon, calibration of the uncertainty.
- `imagine`: `DreamVecEnv`, imagined chunk environments with the vector-env interface the RL
  machinery steps, cut where the model is unsure.
- `dream`: `finetune` / `DreamSession`, DPPO or flow PPO on imagined rollouts, real-environment
  evaluation, and mixed mode (a counted real budget that refreshes the model).
- `play`: a policy's own real rollouts recorded step by step (`diffpolicy worldmodel collect`).
"""
