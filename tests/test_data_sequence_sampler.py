"""SequenceSampler: hand-computed windows with edge padding and masks, a slow reference, splits."""

import numpy as np
import pytest
import torch

from diffpolicy.data import ReplayBuffer, SequenceSampler, split_episodes
from diffpolicy.data.torch_dataset import WindowDataset


@pytest.fixture
def tiny_buffer(tmp_path):
    """Episode 0 has steps 0, 1, 2; episode 1 has steps 10..14. Step value v: state = v,
    action = (v, -v), img = v everywhere (uint8, lazy on disk)."""
    buffer = ReplayBuffer.create(tmp_path / "tiny.zarr")
    for values in (np.arange(3), np.arange(10, 15)):
        buffer.add_episode({
            "state": values[:, None].astype(np.float32),
            "action": np.stack([values, -values], axis=1).astype(np.float32),
            "img": np.broadcast_to(values[:, None, None, None].astype(np.uint8),
                                   (len(values), 2, 2, 3)),
        })
    return buffer


# Per latency: (episode, offset, obs steps, obs_is_pad, action steps, action_is_pad) of the first
# and last windows of each episode, computed by hand from the docstring's definition
# with To = 2, Tp = 4, pad_before = 1 and pad_after = Tp - To = 2.
HAND_WINDOWS = {
    0: [(0, -1, [0, 0], [1, 0], [0, 0, 1, 2], [1, 0, 0, 0]),
        (0, 0, [0, 1], [0, 0], [0, 1, 2, 2], [0, 0, 0, 1]),
        (0, 1, [1, 2], [0, 0], [1, 2, 2, 2], [0, 0, 1, 1]),
        (1, -1, [10, 10], [1, 0], [10, 10, 11, 12], [1, 0, 0, 0]),
        (1, 3, [13, 14], [0, 0], [13, 14, 14, 14], [0, 0, 1, 1])],
    1: [(0, -1, [0, 0], [1, 0], [0, 1, 2, 2], [0, 0, 0, 1]),
        (0, 0, [0, 1], [0, 0], [1, 2, 2, 2], [0, 0, 1, 1]),
        (1, -1, [10, 10], [1, 0], [10, 11, 12, 13], [0, 0, 0, 0]),
        (1, 2, [12, 13], [0, 0], [13, 14, 14, 14], [0, 0, 1, 1])],
    2: [(0, -1, [0, 0], [1, 0], [1, 2, 2, 2], [0, 0, 1, 1]),
        (1, -1, [10, 10], [1, 0], [11, 12, 13, 14], [0, 0, 0, 0]),
        (1, 1, [11, 12], [0, 0], [13, 14, 14, 14], [0, 0, 1, 1])],
    # Episode 0 (3 steps) is too short: every window would pad more than pad_after actions.
    3: [(1, -1, [10, 10], [1, 0], [12, 13, 14, 14], [0, 0, 0, 1]),
        (1, 0, [10, 11], [0, 0], [13, 14, 14, 14], [0, 0, 1, 1])],
}
WINDOW_COUNTS = {0: (3, 5), 1: (2, 4), 2: (1, 3), 3: (0, 2)}


@pytest.mark.parametrize("latency", sorted(HAND_WINDOWS))
def test_hand_computed_windows(tiny_buffer, latency):
    sampler = SequenceSampler(tiny_buffer, ["state", "img"], obs_horizon=2, pred_horizon=4,
                              latency=latency)
    counts = WINDOW_COUNTS[latency]
    assert len(sampler) == sum(counts)
    np.testing.assert_array_equal(sampler.window_episode, [0] * counts[0] + [1] * counts[1])
    for episode, offset, obs, obs_pad, action, action_pad in HAND_WINDOWS[latency]:
        index = np.flatnonzero((sampler.window_episode == episode)
                               & (sampler.window_offset == offset))
        assert index.size == 1, (episode, offset)
        item = sampler[int(index[0])]
        np.testing.assert_array_equal(item["obs"]["state"], np.array(obs, np.float32)[:, None])
        np.testing.assert_array_equal(item["obs"]["img"][:, 0, 0, 0], obs)
        assert item["obs"]["img"].shape == (2, 2, 2, 3) and item["obs"]["img"].dtype == np.uint8
        np.testing.assert_array_equal(item["action"], np.stack([action, np.negative(action)], 1))
        np.testing.assert_array_equal(item["obs_is_pad"], np.array(obs_pad, bool))
        np.testing.assert_array_equal(item["action_is_pad"], np.array(action_pad, bool))


def reference_windows(lengths, mask, obs_horizon, pred_horizon, latency, pad_before, pad_after):
    """Slow per-step definition: lists of (obs rows, obs pads, action rows, action pads)."""
    span = max(obs_horizon, latency + pred_horizon)
    windows, start = [], 0
    for episode, length in enumerate(lengths):
        if mask[episode]:
            for offset in range(-pad_before, length - span + pad_after + 1):
                rows = []
                for first, horizon in ((offset, obs_horizon), (offset + latency, pred_horizon)):
                    steps = [first + j for j in range(horizon)]
                    rows.append([start + min(max(s, 0), length - 1) for s in steps])
                    rows.append([not 0 <= s < length for s in steps])
                windows.append(rows)
        start += length
    return windows


def test_vectorized_index_matches_reference(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 25, size=30)
    lengths[:3] = [1, 2, 40]
    buffer = ReplayBuffer.create(tmp_path / "rand.zarr")
    for length in lengths:
        buffer.add_episode({"action": rng.normal(size=(length, 3)),
                            "obs": rng.normal(size=(length, 2))})
    cached = ReplayBuffer.open(tmp_path / "rand.zarr", cache_low_dim=True)
    for trial in range(12):
        to, tp = int(rng.integers(1, 4)), int(rng.integers(1, 9))
        latency = int(rng.integers(0, 4))
        pad_before, pad_after = int(rng.integers(0, to)), int(rng.integers(0, tp))
        mask = rng.random(len(lengths)) < 0.7
        sampler = SequenceSampler(cached, ["obs"], to, tp, latency=latency, pad_before=pad_before,
                                  pad_after=pad_after, episode_mask=mask)
        expected = reference_windows(lengths, mask, to, tp, latency, pad_before, pad_after)
        assert len(sampler) == len(expected)
        if not expected:
            continue
        batch = sampler.sample_batch(np.arange(len(sampler)))
        obs_rows, obs_pad, action_rows, action_pad = (np.array(x) for x in zip(*expected))
        np.testing.assert_array_equal(batch["obs"]["obs"], cached["obs"][obs_rows])
        np.testing.assert_array_equal(batch["action"], cached["action"][action_rows])
        np.testing.assert_array_equal(batch["obs_is_pad"], obs_pad)
        np.testing.assert_array_equal(batch["action_is_pad"], action_pad)


def test_batch_equals_items_and_lazy_equals_cached(tiny_buffer):
    lazy = SequenceSampler(tiny_buffer, ["state", "img"], 2, 4, latency=1)
    cached = SequenceSampler(ReplayBuffer.open(tiny_buffer.path, cache_low_dim=True),
                             ["state", "img"], 2, 4, latency=1)
    indices = np.array([5, 0, 5, 3, -1])
    batch, cached_batch = lazy.sample_batch(indices), cached.sample_batch(indices)
    for row, index in enumerate(indices):
        item = lazy[int(index)]
        for key in ("state", "img"):
            np.testing.assert_array_equal(batch["obs"][key][row], item["obs"][key])
            np.testing.assert_array_equal(cached_batch["obs"][key][row], item["obs"][key])
        for key in ("action", "action_is_pad", "obs_is_pad"):
            np.testing.assert_array_equal(batch[key][row], item[key])
    assert batch["obs"]["img"].shape == (5, 2, 2, 2, 3) and batch["action"].shape == (5, 4, 2)


def test_episode_mask_and_split(tiny_buffer):
    train, val = split_episodes(10, 0.25, np.random.default_rng(3))
    assert val.sum() == 2 and train.sum() == 8 and not (train & val).any()
    again, _ = split_episodes(10, 0.25, np.random.default_rng(3))
    np.testing.assert_array_equal(train, again)
    assert split_episodes(5, 0.0, np.random.default_rng(0))[1].sum() == 0
    assert split_episodes(3, 0.9, np.random.default_rng(0))[1].sum() == 2

    only_second = SequenceSampler(tiny_buffer, ["state"], 2, 4,
                                  episode_mask=np.array([False, True]))
    assert len(only_second) == 5 and set(only_second.window_episode) == {1}
    assert only_second[0]["obs"]["state"][1, 0] == 10


def test_torch_adapter_batches_with_default_collate(tiny_buffer):
    sampler = SequenceSampler(tiny_buffer, ["state", "img"], 2, 4)
    dataset = WindowDataset(sampler)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, shuffle=False)
    batch = next(iter(loader))
    expected = sampler.sample_batch(np.arange(3))
    assert batch["obs"]["img"].dtype == torch.uint8 and batch["action_is_pad"].dtype == torch.bool
    torch.testing.assert_close(batch["action"], torch.from_numpy(expected["action"]))
    torch.testing.assert_close(batch["obs"]["img"], torch.from_numpy(expected["obs"]["img"]))
    assert dataset[1]["obs"]["state"].shape == (2, 1)


def test_bad_arguments(tiny_buffer):
    with pytest.raises(KeyError, match="no data key 'nope'"):
        SequenceSampler(tiny_buffer, ["nope"], 2, 4)
    with pytest.raises(KeyError, match="no data key 'act'"):
        SequenceSampler(tiny_buffer, ["state"], 2, 4, action_key="act")
    with pytest.raises(TypeError, match="sequence of observation keys"):
        SequenceSampler(tiny_buffer, "state", 2, 4)
    with pytest.raises(ValueError, match="obs_horizon must be at least 1"):
        SequenceSampler(tiny_buffer, ["state"], 0, 4)
    with pytest.raises(ValueError, match="latency must be at least 0"):
        SequenceSampler(tiny_buffer, ["state"], 2, 4, latency=-1)
    with pytest.raises(ValueError, match="pad_before must be at least 0, at most 1; got 2"):
        SequenceSampler(tiny_buffer, ["state"], 2, 4, pad_before=2)
    with pytest.raises(ValueError, match="pad_after must be at least 0, at most 3; got 4"):
        SequenceSampler(tiny_buffer, ["state"], 2, 4, pad_after=4)
    with pytest.raises(ValueError, match=r"episode_mask must be a bool array of shape \(2,\)"):
        SequenceSampler(tiny_buffer, ["state"], 2, 4, episode_mask=np.ones(3, bool))
    sampler = SequenceSampler(tiny_buffer, ["state"], 2, 4)
    with pytest.raises(IndexError, match="out of range for 8 windows"):
        sampler[8]
    with pytest.raises(IndexError, match=r"\[-8, 8\)"):
        sampler.sample_batch(np.array([0, 9]))
    with pytest.raises(TypeError, match="1-D integer array"):
        sampler.sample_batch(np.array([0.0]))
    with pytest.raises(ValueError, match="val_fraction"):
        split_episodes(4, 1.0, np.random.default_rng(0))
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        split_episodes(4, 0.5, 0)
