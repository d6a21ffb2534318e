"""Normalizer: min-max to [-1, 1], exact round trip, constant dims, images, and its errors."""

import numpy as np
import pytest
import torch

from diffpolicy.policies.errors import NormalizerError, ObservationDtypeError
from diffpolicy.policies.normalizer import Normalizer


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    action = rng.uniform(-3.0, 7.0, size=(500, 16, 2)).astype(np.float32)
    state = rng.normal(100.0, 20.0, size=(500, 2, 5)).astype(np.float32)
    state[..., 3] = 4.25  # a constant dimension
    image = rng.integers(0, 256, size=(10, 2, 8, 8, 3), dtype=np.uint8)
    return {"action": action, "state": state, "image": image}


def test_fit_maps_data_range_onto_minus_one_one(data):
    norm = Normalizer.fit(data, image_keys=["image"])
    assert norm.dims == {"action": 2, "state": 5}
    for key in ("action", "state"):
        x = norm.normalize(key, torch.from_numpy(data[key]))
        flat = x.reshape(-1, x.shape[-1])
        varying = [d for d in range(flat.shape[1]) if not (key == "state" and d == 3)]
        torch.testing.assert_close(flat[:, varying].min(0).values, -torch.ones(len(varying)), rtol=0, atol=1e-6)
        torch.testing.assert_close(flat[:, varying].max(0).values, torch.ones(len(varying)), rtol=0, atol=1e-6)
    constant = norm.normalize("state", torch.from_numpy(data["state"]))[..., 3]
    assert torch.equal(constant, torch.zeros_like(constant))


def test_stats_equal_numpy_min_max(data):
    norm = Normalizer.fit(data, image_keys=["image"])
    flat = data["action"].reshape(-1, 2)
    assert torch.equal(norm.ranges["action"].min, torch.from_numpy(flat.min(0)))
    assert torch.equal(norm.ranges["action"].max, torch.from_numpy(flat.max(0)))


def test_round_trip_is_exact_to_float32(data):
    norm = Normalizer.fit(data, image_keys=["image"])
    for key in ("action", "state"):
        x = torch.from_numpy(data[key])
        back = norm.unnormalize(key, norm.normalize(key, x))
        # only the float32 rounding of the normalized value (|err| <= 2^-24 in [-1, 1]) scaled back by
        # the half-range, plus the final float32 rounding of the result
        half = float((norm.ranges[key].max - norm.ranges[key].min).max()) / 2
        torch.testing.assert_close(back, x, rtol=2**-24, atol=half * 2**-24)


def test_constant_dimension_stays_finite_off_the_fit_value(data):
    norm = Normalizer.fit(data, image_keys=["image"])
    x = torch.full((1, 5), 5.25)
    out = norm.normalize("state", x)
    assert torch.isfinite(out).all()
    assert out[0, 3] == pytest.approx(1.0)  # shifted only: 5.25 - 4.25


def test_images_scale_uint8_to_minus_one_one():
    norm = Normalizer({}, image_keys=["image"])
    img = torch.tensor([0, 255, 51], dtype=torch.uint8)
    torch.testing.assert_close(norm.normalize("image", img), torch.tensor([-1.0, 1.0, 51 / 127.5 - 1]))
    with pytest.raises(ObservationDtypeError, match="image key 'image' must be uint8, got torch.float32"):
        norm.normalize("image", img.float())


def test_missing_key_and_dimension_mismatch_are_named(data):
    norm = Normalizer.fit(data, image_keys=["image"])
    with pytest.raises(NormalizerError, match=r"no normalizer statistics for key 'velocity'.*\['action', 'state'\]"):
        norm.normalize("velocity", torch.zeros(3, 2))
    with pytest.raises(NormalizerError, match=r"key 'action': expected last dimension 2.*shape \(4, 3\)"):
        norm.normalize("action", torch.zeros(4, 3))
    with pytest.raises(NormalizerError, match=r"key 'state': expected last dimension 5.*shape \(7,\)"):
        norm.unnormalize("state", torch.zeros(7))


def test_fit_rejects_bad_data():
    with pytest.raises(NormalizerError, match=r"key 'action' has a non-finite value at index \(1, 0\)"):
        Normalizer.fit({"action": np.array([[0.0], [np.nan]])})
    with pytest.raises(ObservationDtypeError, match="image key 'cam' must be uint8"):
        Normalizer.fit({"cam": np.zeros((2, 4, 4, 3), np.float32)}, image_keys=["cam"])
    with pytest.raises(NormalizerError, match=r"image key\(s\) \['cam'\] not found"):
        Normalizer.fit({"action": np.zeros((2, 2))}, image_keys=["cam"])
    with pytest.raises(NormalizerError, match="max < min at dimension 1"):
        Normalizer({"a": (torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]))})


def test_state_dict_round_trip_through_placeholder(data):
    norm = Normalizer.fit(data, image_keys=["image"])
    state = norm.state_dict()
    assert set(state) == {"ranges.action.min", "ranges.action.max", "ranges.state.min", "ranges.state.max"}
    fresh = Normalizer.placeholder(norm.dims, image_keys=["image"])
    fresh.load_state_dict(state)
    x = torch.from_numpy(data["state"])
    assert torch.equal(fresh.normalize("state", x), norm.normalize("state", x))
