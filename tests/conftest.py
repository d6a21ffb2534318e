"""Shared test settings: headless rendering and a bounded thread count on the 2-core CI machine."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
# Idle OpenMP threads spin by default; on a loaded 2-core machine that makes small ops 30x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
