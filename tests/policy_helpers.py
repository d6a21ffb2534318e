"""Small chunk policies, observations and batches shared by the policy tests."""

import numpy as np
import torch

from diffpolicy.policies import ChunkPolicy, Normalizer, PolicyConfig, diffusion_process, flow_process

B, TO, TP, DA, DS = 4, 2, 6, 2, 3
IMAGE = (16, 16, 3)
TINY_IMAGE_ENCODER = {"image_widths": [4, 8], "image_blocks_per_stage": 1, "num_keypoints": 4,
                      "image_feature_dim": 8, "crop_shape": [12, 12]}


def make_config(kind="diffusion", images=False, **overrides):
    process = diffusion_process(train_steps=20) if kind == "diffusion" else flow_process()
    shapes = {"state": (DS,), **({"image": IMAGE} if images else {})}
    return PolicyConfig(
        obs_shapes=shapes, image_keys=("image",) if images else (), action_dim=DA, obs_horizon=TO,
        pred_horizon=TP, action_horizon=4, process=process, backbone={"type": "mlp", "hidden_dim": 32},
        encoder=TINY_IMAGE_ENCODER if images else {}, inference_steps=8, **overrides)


def make_normalizer(images=False, action_low=100.0, action_high=200.0):
    rng = np.random.default_rng(0)
    data = {"action": rng.uniform(action_low, action_high, size=(64, DA)), "state": rng.normal(size=(64, DS)) * 5}
    if images:
        data["image"] = rng.integers(0, 256, size=(4, *IMAGE), dtype=np.uint8)
    return Normalizer.fit(data, image_keys=["image"] if images else [])


def make_policy(kind="diffusion", images=False, seed=0, **overrides):
    torch.manual_seed(seed)
    return ChunkPolicy(make_config(kind, images, **overrides), make_normalizer(images))


def make_obs(batch=B, images=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = {"state": torch.randn(batch, TO, DS, generator=g) * 5}
    if images:
        obs["image"] = torch.randint(0, 256, (batch, TO, *IMAGE), generator=g, dtype=torch.uint8)
    return obs


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"obs": make_obs(seed=seed), "action": 100 + 100 * torch.rand(B, TP, DA, generator=g)}
