"""diffpolicy.rl: learned reinforcement-learning code.

- `expert_training`: stable-baselines3 "medium" experts for the locomotion tasks (the learned
  experts that `diffpolicy.envs.experts.learned` loads).
"""
