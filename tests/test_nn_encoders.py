"""Observation encoders: spatial softmax, crops, image input checks, observation layout."""

import pytest
import torch
from torch import nn

from diffpolicy.nn import (
    MLPStateEncoder,
    NNConfigError,
    NNInputError,
    ObservationEncoder,
    ResNetImageEncoder,
    SpatialSoftmax,
    make_observation_encoder,
)
from diffpolicy.nn.image_encoder import center_crop, random_crop

TINY = {"widths": (8, 16), "blocks_per_stage": 1, "num_keypoints": 4, "feature_dim": 6}


def coordinate_images(n: int, height: int, width: int) -> torch.Tensor:
    """uint8 (n, H, W, 3) whose pixels encode (row, col, image index)."""
    rows = torch.arange(height).view(1, height, 1).expand(n, height, width)
    cols = torch.arange(width).view(1, 1, width).expand(n, height, width)
    index = torch.arange(n).view(n, 1, 1).expand(n, height, width)
    return torch.stack([rows, cols, index], dim=-1).to(torch.uint8)


def test_spatial_softmax_peaked_map_gives_peak_coordinates():
    h, w = 5, 7
    peaks = [(0, 0), (4, 6), (2, 3), (1, 5)]
    features = torch.zeros(1, len(peaks), h, w)
    for k, (r, c) in enumerate(peaks):
        features[0, k, r, c] = 60.0
    out = SpatialSoftmax(len(peaks), num_keypoints=None)(features)
    expected = torch.tensor([[-1 + 2 * c / (w - 1), -1 + 2 * r / (h - 1)] for r, c in peaks]).flatten()
    torch.testing.assert_close(out[0], expected, atol=1e-6, rtol=0)


def test_spatial_softmax_matches_expectation_formula():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 4, 6, generator=gen)
    temperature = 0.5
    out = SpatialSoftmax(3, num_keypoints=None, temperature=temperature)(features)
    for n in range(2):
        for k in range(3):
            p = torch.softmax((features[n, k] / temperature).flatten(), 0).view(4, 6)
            x = sum(p[i, j] * (-1 + 2 * j / 5) for i in range(4) for j in range(6))
            y = sum(p[i, j] * (-1 + 2 * i / 3) for i in range(4) for j in range(6))
            torch.testing.assert_close(out[n, 2 * k:2 * k + 2], torch.stack([x, y]), atol=1e-6, rtol=0)


def test_spatial_softmax_with_keypoint_conv_shape():
    layer = SpatialSoftmax(8, num_keypoints=5)
    assert layer(torch.randn(3, 8, 4, 4)).shape == (3, 10) and layer.output_dim == 10


def test_random_crop_is_a_window_of_the_source_and_reproducible():
    images = coordinate_images(16, 20, 24)
    crops = random_crop(images, 12, 10, torch.Generator().manual_seed(3))
    assert crops.shape == (16, 12, 10, 3)
    for n in range(16):
        top, left = int(crops[n, 0, 0, 0]), int(crops[n, 0, 0, 1])
        assert 0 <= top <= 8 and 0 <= left <= 14
        assert torch.equal(crops[n], images[n, top:top + 12, left:left + 10])
    again = random_crop(images, 12, 10, torch.Generator().manual_seed(3))
    assert torch.equal(crops, again)
    other = random_crop(images, 12, 10, torch.Generator().manual_seed(4))
    assert not torch.equal(crops, other)
    offsets = {(int(c[0, 0, 0]), int(c[0, 0, 1])) for c in crops}
    assert len(offsets) > 1, "each image gets its own offset"


def test_random_crop_global_rng_is_seedable():
    images = coordinate_images(8, 20, 20)
    torch.manual_seed(11)
    first = random_crop(images, 16, 16, None)
    torch.manual_seed(11)
    assert torch.equal(first, random_crop(images, 16, 16, None))


def test_encoder_crops_randomly_in_train_and_centered_in_eval():
    encoder = ResNetImageEncoder((20, 22, 3), crop_shape=(16, 16), **TINY)
    images = coordinate_images(6, 20, 22)
    encoder.train()
    train_crop = encoder.crop(images, torch.Generator().manual_seed(0))
    assert torch.equal(train_crop, encoder.crop(images, torch.Generator().manual_seed(0)))
    encoder.eval()
    eval_crop = encoder.crop(images, torch.Generator().manual_seed(0))
    assert train_crop.shape == eval_crop.shape == (6, 16, 16, 3)
    assert torch.equal(eval_crop, images[:, 2:18, 3:19])
    assert torch.equal(eval_crop, center_crop(images, 16, 16))
    assert torch.equal(eval_crop, encoder.crop(images, torch.Generator().manual_seed(1)))


def test_image_encoder_output_scaling_and_determinism():
    torch.manual_seed(0)
    encoder = ResNetImageEncoder((16, 16, 3), crop_shape=(14, 14), **TINY).eval()
    images = torch.randint(0, 256, (2, 3, 16, 16, 3), dtype=torch.uint8)
    images[0, 0, 8, 8] = torch.tensor([0, 255, 128], dtype=torch.uint8)
    seen = {}
    encoder.trunk.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    out = encoder(images)
    assert out.shape == (2, 3, 6) and encoder.output_dim == 6
    x = seen["x"]
    assert x.shape == (6, 3, 14, 14) and x.dtype == torch.float32
    torch.testing.assert_close(x, images.reshape(6, 16, 16, 3)[:, 1:15, 1:15].permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert x.min() == -1.0 and x.max() == 1.0
    assert torch.equal(out, encoder(images))


def test_image_encoder_train_mode_uses_generator():
    torch.manual_seed(0)
    encoder = ResNetImageEncoder((16, 16, 3), crop_shape=(10, 10), **TINY).train()
    images = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    a = encoder(images, torch.Generator().manual_seed(5))
    assert torch.equal(a, encoder(images, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, encoder(images, torch.Generator().manual_seed(6)))


def test_image_encoder_rejects_float_and_wrong_layout():
    encoder = ResNetImageEncoder((16, 16, 3), **TINY)
    with pytest.raises(TypeError, match="must be uint8 .* got dtype torch.float32"):
        encoder(torch.rand(2, 16, 16, 3))
    with pytest.raises(NNInputError, match=r"\(\.\.\., 16, 16, 3\).*got \(2, 16, 16, 4\) \(C = 4\)"):
        encoder(torch.zeros(2, 16, 16, 4, dtype=torch.uint8))
    with pytest.raises(NNInputError, match=r"channels last.*got \(2, 3, 16, 16\)"):
        encoder(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(NNConfigError, match="crop_shape"):
        ResNetImageEncoder((16, 16, 3), crop_shape=(20, 8), **TINY)
    with pytest.raises(NNConfigError, match=r"image_shape must be \(H, W, 3\)"):
        ResNetImageEncoder((3, 16, 16), **TINY)


def test_default_trunk_is_resnet18_sized_with_groupnorm():
    encoder = ResNetImageEncoder((84, 84, 3), crop_shape=(76, 76))
    trunk_params = sum(p.numel() for p in encoder.trunk.parameters())
    assert trunk_params == 11_176_512  # torchvision resnet18 without fc (11,176,512), GroupNorm affine = BN affine
    assert encoder.trunk(torch.zeros(1, 3, 76, 76)).shape == (1, 512, 3, 3)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in encoder.modules())


def test_state_encoder_identity_is_dp_flattening():
    encoder = MLPStateEncoder({"b": 3, "a": 2}, obs_horizon=2)
    obs = {"a": torch.randn(4, 2, 2), "b": torch.randn(4, 2, 3), "unused": torch.randn(4, 1)}
    expected = torch.cat([obs["a"], obs["b"]], dim=-1).reshape(4, 10)
    assert torch.equal(encoder(obs), expected) and encoder.output_dim == 10
    assert list(encoder.parameters()) == []


def test_state_encoder_mlp_and_errors():
    encoder = MLPStateEncoder({"a": 2}, obs_horizon=3, hidden_dims=(8, 5))
    assert encoder({"a": torch.randn(4, 3, 2)}).shape == (4, 15) and encoder.output_dim == 15
    with pytest.raises(NNInputError, match=r"key 'a' is missing; got keys \['b'\]"):
        encoder({"b": torch.randn(4, 3, 2)})
    with pytest.raises(NNInputError, match=r"'a' must have shape \(B, To=3, d=2\), got \(4, 2, 2\)"):
        encoder({"a": torch.randn(4, 2, 2)})
    with pytest.raises(TypeError, match="'a' must be floating point"):
        encoder({"a": torch.ones(4, 3, 2, dtype=torch.long)})


def make_obs(batch=2, horizon=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "pos": torch.randn(batch, horizon, 3, generator=gen),
        "cam": torch.randint(0, 256, (batch, horizon, 16, 16, 3), generator=gen, dtype=torch.uint8),
        "wrist": torch.randint(0, 256, (batch, horizon, 12, 12, 3), generator=gen, dtype=torch.uint8),
    }


SHAPES = {"pos": (3,), "cam": (16, 16, 3), "wrist": (12, 12, 3)}
IMAGE_CONFIG = {"image_widths": (8, 16), "image_blocks_per_stage": 1, "num_keypoints": 4, "image_feature_dim": 6}


def test_observation_encoder_layout_per_time_step():
    torch.manual_seed(0)
    encoder = ObservationEncoder(SHAPES, 2, image_keys=["wrist", "cam"], crop_shape=(10, 10), **IMAGE_CONFIG).eval()
    obs = make_obs()
    out = encoder(obs)
    assert encoder.output_dim == 2 * (3 + 6 + 6) == out.shape[1] and out.shape[0] == 2
    steps = out.view(2, 2, 15)
    assert torch.equal(steps[..., :3], obs["pos"])  # identity state part first
    changed = dict(obs, cam=obs["cam"].clone())
    changed["cam"][:, 1] = 255 - changed["cam"][:, 1]
    new_steps = encoder(changed).view(2, 2, 15)
    assert torch.equal(new_steps[:, 0], steps[:, 0])  # step 0 untouched
    assert torch.equal(new_steps[:, 1, 9:], steps[:, 1, 9:])  # 'wrist' features untouched
    assert not torch.allclose(new_steps[:, 1, 3:9], steps[:, 1, 3:9])  # 'cam' features of step 1 changed


def test_observation_encoder_shared_image_encoder_and_errors():
    shapes = {"left": (16, 16, 3), "right": (16, 16, 3)}
    shared = ObservationEncoder(shapes, 1, image_keys=["left", "right"], share_image_encoder=True, **IMAGE_CONFIG)
    separate = ObservationEncoder(shapes, 1, image_keys=["left", "right"], **IMAGE_CONFIG)
    n_shared = sum(p.numel() for p in shared.parameters())
    assert 2 * n_shared == sum(p.numel() for p in separate.parameters())
    with pytest.raises(NNConfigError, match="share_image_encoder needs equal image shapes"):
        ObservationEncoder(SHAPES, 2, image_keys=["cam", "wrist"], share_image_encoder=True, **IMAGE_CONFIG)
    with pytest.raises(NNConfigError, match=r"image_keys not in it: \['top'\]"):
        ObservationEncoder(SHAPES, 2, image_keys=["top"])
    with pytest.raises(NNConfigError, match=r"low-dim key 'cam' must have shape \(d,\)"):
        ObservationEncoder(SHAPES, 2, image_keys=["wrist"])

    encoder = ObservationEncoder(SHAPES, 2, image_keys=["cam", "wrist"], **IMAGE_CONFIG)
    obs = make_obs()
    with pytest.raises(NNInputError, match=r"image key 'wrist' is missing"):
        encoder({k: v for k, v in obs.items() if k != "wrist"})
    expected = r"image 'cam' must have shape \(B, To, H, W, 3\) = \(2, 2, 16, 16, 3\), got \(2, 3, 16, 16, 3\)"
    with pytest.raises(NNInputError, match=expected):
        encoder(dict(obs, cam=torch.zeros(2, 3, 16, 16, 3, dtype=torch.uint8)))
    with pytest.raises(TypeError, match="must be uint8"):
        encoder(dict(obs, cam=obs["cam"].float()))


def test_make_observation_encoder_infers_image_keys_and_checks_keys():
    encoder = make_observation_encoder(dict(IMAGE_CONFIG, crop_shape=[10, 10]), SHAPES, 2)
    assert encoder.image_keys == ["cam", "wrist"] and encoder.state_keys == ["pos"]
    assert encoder(make_obs()).shape == (2, encoder.output_dim)
    with pytest.raises(NNConfigError, match=r"unknown config key\(s\) \['crop'\]; allowed keys are \[.*'crop_shape'"):
        make_observation_encoder({"crop": [10, 10]}, SHAPES, 2)
    with pytest.raises(NNConfigError, match="make_observation_encoder: .*crop_shape"):
        make_observation_encoder({"crop_shape": [30, 30]}, SHAPES, 2)
