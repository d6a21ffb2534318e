"""Shared test settings: headless rendering and a bounded thread count on the 2-core CI machine."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
