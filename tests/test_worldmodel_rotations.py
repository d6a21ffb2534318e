"""A world model reads sign-ambiguous quaternions as rotation matrices and reports w >= 0 quaternions."""

import numpy as np
import pytest
import torch

from diffpolicy.worldmodel.data import Transitions
from diffpolicy.worldmodel.errors import WorldModelError
from diffpolicy.worldmodel.model import LatentWorldModel, ModelConfig
from diffpolicy.worldmodel.rotations import QuaternionFeatures, matrix_to_quaternion, quaternion_to_matrix


def unit_quaternions(n: int, seed: int = 0) -> torch.Tensor:
    q = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return q / q.norm(dim=-1, keepdim=True)


def with_w_positive(q: torch.Tensor) -> torch.Tensor:
    return torch.where(q[..., 3:] < 0, -q, q)


def test_the_matrix_rotates_as_the_quaternion_and_forgets_its_sign():
    q = unit_quaternions(500)
    v = torch.randn(500, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    u, w = q[:, :3], q[:, 3:]
    twice = 2 * torch.cross(u, v, dim=-1)
    rotated = v + w * twice + torch.cross(u, twice, dim=-1)  # q v q* (Rodrigues' form)
    matrix = quaternion_to_matrix(q).reshape(-1, 3, 3)
    torch.testing.assert_close((matrix @ v[..., None])[..., 0], rotated, rtol=0, atol=1e-12)
    assert torch.equal(quaternion_to_matrix(q), quaternion_to_matrix(-q))
    torch.testing.assert_close(matrix @ matrix.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(500, 3, 3),
                               rtol=0, atol=1e-12)


def test_matrix_to_quaternion_inverts_with_w_positive_and_projects_a_noisy_matrix():
    q = unit_quaternions(500, seed=2)
    torch.testing.assert_close(matrix_to_quaternion(quaternion_to_matrix(q)), with_w_positive(q), rtol=0, atol=1e-12)
    noisy = quaternion_to_matrix(q) + 1e-3 * torch.randn(500, 9, generator=torch.Generator().manual_seed(3),
                                                          dtype=torch.float64)
    recovered = matrix_to_quaternion(noisy)
    torch.testing.assert_close(recovered.norm(dim=-1), torch.ones(500, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (recovered[:, 3] >= 0).all()
    assert ((recovered * with_w_positive(q)).sum(-1).abs() > 1 - 1e-5).all()  # the same rotation, to the noise


def test_features_replace_each_quaternion_in_place_and_decode_back():
    features = QuaternionFeatures([10, 3], 14)
    assert features.starts == (3, 10) and features.feature_dim == 24
    obs = torch.randn(6, 14, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    obs[:, 3:7], obs[:, 10:14] = unit_quaternions(6, 5), unit_quaternions(6, 6)
    encoded = features.encode(obs)
    assert torch.equal(encoded[:, :3], obs[:, :3]) and torch.equal(encoded[:, 12:15], obs[:, 7:10])
    assert torch.equal(encoded[:, 3:12], quaternion_to_matrix(obs[:, 3:7]))
    assert torch.equal(encoded[:, 15:], quaternion_to_matrix(obs[:, 10:14]))
    flipped = obs.clone()
    flipped[:, 3:7] *= -1
    assert torch.equal(features.encode(flipped), encoded)
    expected = obs.clone()
    expected[:, 3:7], expected[:, 10:14] = with_w_positive(obs[:, 3:7]), with_w_positive(obs[:, 10:14])
    torch.testing.assert_close(features.decode(encoded), expected, rtol=0, atol=1e-12)
    assert torch.equal(QuaternionFeatures([], 5).encode(obs[:, :5]), obs[:, :5])


@pytest.mark.parametrize("starts, message", [([0, 2], "overlap"), ([11], "must lie in"), ([-1], "must lie in")])
def test_bad_quaternion_slices_are_named(starts, message):
    with pytest.raises(WorldModelError, match=message):
        QuaternionFeatures(starts, 14)


def test_a_world_model_reads_either_sign_alike_and_reports_w_positive(tmp_path):
    n, obs = 64, torch.randn(64, 7, generator=torch.Generator().manual_seed(7))
    obs[:, 2:6] = unit_quaternions(n, 8).float()
    data = Transitions(("pos", "quat", "grip"), (2, 4, 1), obs.numpy(), np.zeros((n, 2), np.float32),
                       np.zeros(n, np.float32), np.zeros(n, bool), np.array([32, 64]), np.zeros((2, 7), np.float32),
                       np.zeros(2, bool))
    model = LatentWorldModel(ModelConfig(members=2, quaternions=(2,)), data.keys, data.dims, 2,
                             np.full(2, -1.0), np.full(2, 1.0))
    model.fit_normalization(data)
    assert model.obs_dim == 12 and model.obs_mean.shape == (12,)
    flipped = obs.clone()
    flipped[:, 2:6] *= -1
    torch.testing.assert_close(model.normalize_obs(flipped), model.normalize_obs(obs), rtol=0, atol=0)
    expected = obs.clone()
    expected[:, 2:6] = with_w_positive(obs[:, 2:6])
    torch.testing.assert_close(model.unnormalize_obs(model.normalize_obs(obs)), expected, rtol=0, atol=2e-6)
    model.save(tmp_path / "model")
    loaded = LatentWorldModel.load(tmp_path / "model")
    assert loaded.config.quaternions == (2,)
    torch.testing.assert_close(loaded.normalize_obs(obs), model.normalize_obs(obs), rtol=0, atol=0)
    with pytest.raises(ValueError, match="model.quaternions"):
        ModelConfig(quaternions=(-2,))
