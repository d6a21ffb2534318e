"""ReplayBuffer: Diffusion Policy layout, zarr v2/v3 interop, atomic appends, clear errors."""

import shutil

import numcodecs
import numpy as np
import pytest
import zarr

from diffpolicy.data import DataFormatError, EpisodeError, ReplayBuffer, StepArray


def make_episode(rng: np.random.Generator, length: int, image: bool = True) -> dict:
    episode = {
        "action": rng.normal(size=(length, 2)).astype(np.float32),
        "state": rng.normal(size=(length, 5)),
    }
    if image:
        episode["img"] = rng.integers(0, 256, size=(length, 12, 10, 3), dtype=np.uint8)
    return episode


def filled_buffer(path, rng, lengths=(4, 7, 1), zarr_format=3):
    buffer = ReplayBuffer.create(path, zarr_format=zarr_format, attrs={"task": "toy"})
    episodes = [make_episode(rng, n) for n in lengths]
    for index, episode in enumerate(episodes):
        meta = {"seed": index, "success": index % 2 == 0,
                "model_file": f"<mujoco model='{index}'/>"}
        buffer.add_episode(episode, meta)
    return buffer, episodes


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_layout_is_diffusion_policy_and_reads_back_exactly(tmp_path, zarr_format):
    rng = np.random.default_rng(0)
    path = tmp_path / "buf.zarr"
    buffer, episodes = filled_buffer(path, rng, zarr_format=zarr_format)

    root = zarr.open_group(str(path), mode="r")
    assert root.metadata.zarr_format == zarr_format
    assert sorted(root["data"].array_keys()) == ["action", "img", "state"]
    assert sorted(root["meta"].array_keys()) == ["episode_ends", "model_file", "seed", "success"]
    ends = root["meta/episode_ends"]
    assert ends.dtype == np.int64
    np.testing.assert_array_equal(ends[:], [4, 11, 12])
    assert root["data/action"].dtype == np.float32 and root["data/action"].shape == (12, 2)
    assert root["data/state"].dtype == np.float64
    img = root["data/img"]
    assert img.dtype == np.uint8 and img.shape == (12, 12, 10, 3) and img.chunks == (1, 12, 10, 3)
    assert img.compressors, "images must be compressed"
    np.testing.assert_array_equal(root["meta/seed"][:], [0, 1, 2])
    assert root["meta/seed"].dtype == np.int64 and root["meta/success"].dtype == bool
    assert list(root["meta/model_file"][:]) == [f"<mujoco model='{i}'/>" for i in range(3)]
    assert root.attrs["task"] == "toy" and root.attrs["diffpolicy_format"]["version"] == 1

    reopened = ReplayBuffer.open(path)
    assert reopened.n_episodes == 3 and reopened.n_steps == 12
    for index, episode in enumerate(episodes):
        got = reopened.get_episode(index)
        for key, value in episode.items():
            assert got[key].dtype == value.dtype
            np.testing.assert_array_equal(got[key], value)
    np.testing.assert_array_equal(reopened.episode_meta("success"), [True, False, True])


def test_reads_v2_store_written_with_plain_zarr(tmp_path):
    """A store laid out like Diffusion Policy's pusht_cchi_v7_replay.zarr, written by zarr v2."""
    rng = np.random.default_rng(1)
    path = tmp_path / "pusht_like.zarr"
    ends = np.array([3, 8, 10], dtype=np.int64)
    arrays = {
        "action": rng.uniform(0, 512, size=(10, 2)).astype(np.float32),
        "state": rng.uniform(0, 512, size=(10, 5)).astype(np.float32),
        "keypoint": rng.uniform(0, 512, size=(10, 9, 2)).astype(np.float32),
        "img": rng.integers(0, 256, size=(10, 96, 96, 3), dtype=np.uint8),
    }
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    for key, value in arrays.items():
        chunks = (1, *value.shape[1:]) if key == "img" else value.shape
        array = root.create_array(f"data/{key}", shape=value.shape, dtype=value.dtype,
                                  chunks=chunks, compressors=numcodecs.Blosc(cname="zstd"))
        array[:] = value
    root.create_array("meta/episode_ends", shape=(3,), dtype=np.int64, chunks=(3,))[:] = ends

    buffer = ReplayBuffer.open(path, cache_low_dim=True)
    assert buffer.keys() == ["action", "img", "keypoint", "state"]
    np.testing.assert_array_equal(buffer.episode_ends, ends)
    assert isinstance(buffer["img"], StepArray) and isinstance(buffer["state"], np.ndarray)
    np.testing.assert_array_equal(buffer.get_episode(1)["keypoint"], arrays["keypoint"][3:8])
    np.testing.assert_array_equal(buffer["img"][np.array([9, 0, 9])], arrays["img"][[9, 0, 9]])

    appending = ReplayBuffer.open(path, mode="a")
    appending.add_episode({key: value[:2] for key, value in arrays.items()})
    again = ReplayBuffer.open(path)
    assert zarr.open_group(str(path), mode="r").metadata.zarr_format == 2
    np.testing.assert_array_equal(again.episode_ends, [3, 8, 10, 12])
    np.testing.assert_array_equal(again.get_episode(3)["img"], arrays["img"][:2])


def test_opens_zip_store(tmp_path):
    rng = np.random.default_rng(2)
    _, episodes = filled_buffer(tmp_path / "buf.zarr", rng)
    archive = shutil.make_archive(str(tmp_path / "buf.zarr"), "zip", tmp_path / "buf.zarr")
    with ReplayBuffer.open(archive) as buffer:
        np.testing.assert_array_equal(buffer.get_episode(1)["img"], episodes[1]["img"])
    with pytest.raises(ValueError, match="read-only"):
        ReplayBuffer.open(archive, mode="a")


def test_step_array_indexing_hides_orphaned_tail(tmp_path):
    rng = np.random.default_rng(3)
    buffer, episodes = filled_buffer(tmp_path / "buf.zarr", rng)
    whole = np.concatenate([e["img"] for e in episodes])
    raw = zarr.open_group(str(tmp_path / "buf.zarr"), mode="r+")["data/img"]
    raw.resize((20, 12, 10, 3))  # an orphaned tail, as a killed append leaves
    lazy = ReplayBuffer.open(tmp_path / "buf.zarr")["img"]
    assert lazy.shape == (12, 12, 10, 3) and len(lazy) == 12
    np.testing.assert_array_equal(np.asarray(lazy), whole)
    np.testing.assert_array_equal(lazy[-1], whole[-1])
    np.testing.assert_array_equal(lazy[2:30:3, 1], whole[2::3, 1])
    np.testing.assert_array_equal(lazy[np.array([[11, 0], [5, 5]])], whole[[[11, 0], [5, 5]]])
    with pytest.raises(IndexError, match="out of range"):
        lazy[12]
    with pytest.raises(IndexError, match="out of range"):
        lazy.gather(np.array([3, 12]))


def test_append_overwrites_orphaned_tail_and_ignores_torn_commit(tmp_path):
    rng = np.random.default_rng(4)
    path = tmp_path / "buf.zarr"
    buffer, episodes = filled_buffer(path, rng)
    root = zarr.open_group(str(path), mode="r+")
    # Simulate a kill after data and meta were written and episode_ends was resized, before its
    # new entry was written: every array is longer than the committed episodes say.
    root["data/action"].resize((30, 2))
    root["data/action"][12:30] = np.nan
    root["meta/seed"].resize((4,))
    root["meta/episode_ends"].resize((4,))
    reopened = ReplayBuffer.open(path, mode="a")
    assert reopened.n_episodes == 3 and reopened.n_steps == 12
    assert len(reopened.episode_meta("seed")) == 3

    extra = make_episode(rng, 5)
    reopened.add_episode(extra, {"seed": 3, "success": False, "model_file": ""})
    final = ReplayBuffer.open(path)
    np.testing.assert_array_equal(final.episode_ends, [4, 11, 12, 17])
    assert root["data/action"].shape == (17, 2)
    for key, value in extra.items():
        np.testing.assert_array_equal(final.get_episode(3)[key], value)
    np.testing.assert_array_equal(final.episode_meta("seed"), [0, 1, 2, 3])
    assert final.episode_meta("model_file")[3] == ""


def test_uncommitted_first_episode_is_replaced(tmp_path):
    path = tmp_path / "buf.zarr"
    ReplayBuffer.create(path)
    root = zarr.open_group(str(path), mode="r+")
    root.create_array("data/other", shape=(9, 3), dtype=np.float32)  # orphan of a killed append
    buffer = ReplayBuffer.open(path, mode="a")
    assert buffer.n_episodes == 0
    episode = make_episode(np.random.default_rng(5), 3, image=False)
    buffer.add_episode(episode)
    assert ReplayBuffer.open(path).keys() == ["action", "state"]


def test_cached_low_dim_follows_appends(tmp_path):
    rng = np.random.default_rng(6)
    path = tmp_path / "buf.zarr"
    filled_buffer(path, rng)
    buffer = ReplayBuffer.open(path, mode="a", cache_low_dim=True)
    assert isinstance(buffer["action"], np.ndarray) and len(buffer["action"]) == 12
    extra = make_episode(rng, 2)
    buffer.add_episode(extra, {"seed": 9, "success": True, "model_file": "x"})
    np.testing.assert_array_equal(buffer["action"][-2:], extra["action"])


def test_images_are_read_into_memory_only_when_they_fit_the_budget(tmp_path):
    rng = np.random.default_rng(7)
    path = tmp_path / "buf.zarr"
    _, episodes = filled_buffer(path, rng)
    frames = np.concatenate([episode["img"] for episode in episodes])
    lazy = ReplayBuffer.open(path, cache_low_dim=True)
    assert lazy.image_bytes() == frames.nbytes == 12 * 12 * 10 * 3
    fits = ReplayBuffer.open(path, cache_low_dim=True, image_cache_bytes=frames.nbytes)
    too_small = ReplayBuffer.open(path, cache_low_dim=True, image_cache_bytes=frames.nbytes - 1)
    assert isinstance(fits["img"], np.ndarray) and isinstance(too_small["img"], StepArray)
    assert isinstance(lazy["img"], StepArray) and isinstance(too_small["state"], np.ndarray)
    indices = np.array([11, 0, 5, 5])
    np.testing.assert_array_equal(fits["img"][indices], frames[indices])
    np.testing.assert_array_equal(fits["img"][indices], lazy["img"][indices])
    images_only = ReplayBuffer.open(path, image_cache_bytes=frames.nbytes)  # low-dim arrays stay lazy
    assert isinstance(images_only["img"], np.ndarray) and isinstance(images_only["state"], StepArray)

    appending = ReplayBuffer.open(path, mode="a", image_cache_bytes=10 * frames.nbytes)
    extra = make_episode(rng, 2)
    appending.add_episode(extra, {"seed": 9, "success": True, "model_file": "x"})
    np.testing.assert_array_equal(appending["img"][-2:], extra["img"])  # the cache follows appends
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="image_cache_bytes must be an int >= 0"):
            ReplayBuffer.open(path, image_cache_bytes=bad)


def test_create_refuses_existing_path_and_open_needs_a_store(tmp_path):
    ReplayBuffer.create(tmp_path / "a.zarr")
    with pytest.raises(FileExistsError, match="a.zarr"):
        ReplayBuffer.create(tmp_path / "a.zarr")
    ReplayBuffer.create(tmp_path / "a.zarr", overwrite=True)
    with pytest.raises(FileNotFoundError, match="missing.zarr"):
        ReplayBuffer.open(tmp_path / "missing.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="not a zarr group"):
        ReplayBuffer.open(tmp_path / "empty")
    with pytest.raises(PermissionError, match="read-only"):
        ReplayBuffer.open(tmp_path / "a.zarr").add_episode({"x": np.zeros(2)})


def test_store_without_episode_ends_is_named(tmp_path):
    path = tmp_path / "bad.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    root.create_array("data/action", shape=(4, 2), dtype=np.float32)
    with pytest.raises(DataFormatError, match=r"bad\.zarr is missing 'meta/episode_ends'"):
        ReplayBuffer.open(path)


def test_data_shorter_than_episode_ends_is_named(tmp_path):
    path = tmp_path / "bad.zarr"
    root = zarr.open_group(str(path), mode="w")
    root.create_array("data/action", shape=(4, 2), dtype=np.float32)
    root.create_array("data/state", shape=(7, 3), dtype=np.float32)
    root.create_array("meta/episode_ends", shape=(2,), dtype=np.int64)[:] = [3, 7]
    message = "data/action has 4 steps but meta/episode_ends ends at 7"
    with pytest.raises(DataFormatError, match=message):
        ReplayBuffer.open(path)


def test_meta_shorter_than_episode_ends_is_named(tmp_path):
    path = tmp_path / "bad.zarr"
    root = zarr.open_group(str(path), mode="w")
    root.create_array("data/action", shape=(7, 2), dtype=np.float32)
    root.create_array("meta/episode_ends", shape=(2,), dtype=np.int64)[:] = [3, 7]
    root.create_array("meta/seed", shape=(1,), dtype=np.int64)
    with pytest.raises(DataFormatError, match="meta/seed has 1 entries but .* has 2 episodes"):
        ReplayBuffer.open(path)


@pytest.mark.parametrize("ends, message", [([3, 2, 7], "entry 1 is 2 after 3"),
                                           ([-2, 4], "entry 0 is -2 after 0"),
                                           ([4, 7, 5, 7], "entry 2 is 5 after 7")])
def test_non_monotonic_episode_ends(tmp_path, ends, message):
    path = tmp_path / "bad.zarr"
    root = zarr.open_group(str(path), mode="w")
    root.create_array("data/action", shape=(7, 2), dtype=np.float32)
    root.create_array("meta/episode_ends", shape=(len(ends),), dtype=np.int64)[:] = ends
    with pytest.raises(DataFormatError, match=message):
        ReplayBuffer.open(path)


def _episode_error(buffer, data, meta=None):
    before = (buffer.n_episodes, {key: buffer._group["data"][key].shape for key in buffer.keys()})
    with pytest.raises(EpisodeError) as info:
        buffer.add_episode(data, meta)
    after = (buffer.n_episodes, {key: buffer._group["data"][key].shape for key in buffer.keys()})
    assert before == after, "a rejected episode must not write anything"
    return str(info.value)


def test_bad_episodes_are_rejected_before_any_write(tmp_path):
    rng = np.random.default_rng(7)
    buffer, _ = filled_buffer(tmp_path / "buf.zarr", rng)
    meta = {"seed": 5, "success": True, "model_file": ""}
    good = make_episode(rng, 6)

    bad = dict(good, action=good["action"].copy())
    bad["action"][4, 1] = np.nan
    message = _episode_error(buffer, bad, meta)
    assert "'action' has a non-finite value nan at index (4, 1) (step 4)" in message
    bad = dict(good, state=good["state"].copy())
    bad["state"][2, 0] = -np.inf
    message = _episode_error(buffer, bad, meta)
    assert "'state' has a non-finite value -inf at index (2, 0)" in message

    message = _episode_error(buffer, {k: v for k, v in good.items() if k != "img"}, meta)
    assert "missing ['img']" in message
    message = _episode_error(buffer, dict(good, extra=np.zeros(6)), meta)
    assert "unexpected ['extra']" in message
    message = _episode_error(buffer, dict(good, state=good["state"][:5]), meta)
    assert "same length" in message and "'state': 5" in message and "'action': 6" in message
    message = _episode_error(buffer, dict(good, state=good["state"][:, :4]), meta)
    assert "'state' has per-step shape (4,), the store has (5,)" in message
    message = _episode_error(buffer, dict(good, img=good["img"].astype(np.float32)), meta)
    assert "'img' has dtype float32, the store holds uint8" in message
    assert "same length T >= 1" in _episode_error(buffer, {k: v[:0] for k, v in good.items()}, meta)
    assert "must be numeric" in _episode_error(buffer, dict(good, state=np.array(["a"] * 6)), meta)
    assert "meta names" in _episode_error(buffer, good, {"seed": 1})
    assert "episode meta 'seed' has dtype <U1" in _episode_error(buffer, good, dict(meta, seed="x"))
    assert "episode meta 'seed' has shape (2,), the store holds ()" in _episode_error(buffer, good, dict(meta, seed=[1, 2]))
    assert "must be a scalar" in _episode_error(buffer, good, dict(meta, seed=[[1, 2]]))
    assert "or a numeric vector (d,)" in _episode_error(buffer, good, dict(meta, seed=["a", "b"]))
    assert "'seed' has a non-finite value: [1.0, nan]" in _episode_error(buffer, good, dict(meta, seed=[1.0, np.nan]))
    assert "reserved" in _episode_error(buffer, good, dict(meta, episode_ends=3))
    assert "without '/'" in _episode_error(buffer, {"a/b": np.zeros(2)})

    buffer.add_episode(dict(good, state=good["state"].astype(np.float32)), meta)  # lossless cast
    assert buffer.n_episodes == 4


def episode_meta(index: int) -> dict:
    return {"seed": index, "success": index % 2 == 0, "model_file": f"<mujoco model='{index}'/>" * (index % 3)}


def store_contents(path) -> dict:
    """Every array of a store (data and meta, read whole) and its attrs."""
    root = zarr.open_group(str(path), mode="r")
    arrays = {f"{group}/{name}": root[group][name][:] for group in ("data", "meta")
              for name in root[group].array_keys()}
    return {"arrays": arrays, "attrs": dict(root.attrs)}


def assert_same_contents(a: dict, b: dict) -> None:
    assert a["attrs"] == b["attrs"] and sorted(a["arrays"]) == sorted(b["arrays"])
    for name, value in a["arrays"].items():
        assert value.dtype == b["arrays"][name].dtype, name
        np.testing.assert_array_equal(value, b["arrays"][name], err_msg=name)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_add_episodes_writes_what_one_at_a_time_writes(tmp_path, zarr_format):
    rng = np.random.default_rng(8)
    episodes = [(make_episode(rng, n), episode_meta(i)) for i, n in enumerate((4, 1, 7, 3, 5))]
    single = ReplayBuffer.create(tmp_path / "single.zarr", zarr_format=zarr_format)
    for data, meta in episodes:
        single.add_episode(data, meta)
    batched = ReplayBuffer.create(tmp_path / "batched.zarr", zarr_format=zarr_format)
    batched.add_episodes(episodes[:3])  # into an empty store: episode 0 sets the layout
    batched.add_episodes([])  # nothing to add is a no-op
    batched.add_episodes(episodes[3:])  # appended to a store with episodes
    np.testing.assert_array_equal(batched.episode_ends, [4, 5, 12, 15, 20])
    assert_same_contents(store_contents(tmp_path / "single.zarr"), store_contents(tmp_path / "batched.zarr"))
    reopened = ReplayBuffer.open(tmp_path / "batched.zarr")
    for index, (data, _) in enumerate(episodes):
        for key, value in data.items():
            np.testing.assert_array_equal(reopened.get_episode(index)[key], value)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_per_episode_vectors_round_trip_append_and_keep_their_length(tmp_path, zarr_format):
    """`final_obs.<key>` meta: one `(d,)` vector per episode, read back `(E, d)` exactly after a reopen
    and an append; a vector of another length is refused, and nothing of that episode is written."""
    rng = np.random.default_rng(3)
    finals = [rng.normal(size=5) for _ in range(4)]
    path = tmp_path / "v.zarr"
    buffer = ReplayBuffer.create(path, zarr_format=zarr_format)
    buffer.add_episodes([(make_episode(rng, 3, image=False), {"seed": i, "final_obs.state": finals[i]}) for i in range(3)])
    buffer = ReplayBuffer.open(path, mode="a")
    buffer.add_episode(make_episode(rng, 2, image=False), {"seed": 3, "final_obs.state": finals[3]})
    np.testing.assert_array_equal(ReplayBuffer.open(path).episode_meta("final_obs.state"), np.stack(finals))
    with pytest.raises(EpisodeError, match=r"'final_obs.state' has shape \(4,\), the store holds \(5,\)"):
        buffer.add_episode(make_episode(rng, 2, image=False), {"seed": 4, "final_obs.state": np.zeros(4)})
    assert ReplayBuffer.open(path).n_episodes == 4 and ReplayBuffer.open(path).n_steps == 11


def test_add_episodes_casts_losslessly_and_follows_the_cache(tmp_path):
    rng = np.random.default_rng(9)
    first, second = make_episode(rng, 3, image=False), make_episode(rng, 2, image=False)
    second["state"] = second["state"].astype(np.float32)  # float32 into the float64 of episode 0
    buffer = ReplayBuffer.create(tmp_path / "buf.zarr")
    buffer.add_episodes([(first, {"seed": 0}), (second, {"seed": np.int32(1)})])
    buffer = ReplayBuffer.open(tmp_path / "buf.zarr", mode="a", cache_low_dim=True)
    assert buffer["state"].dtype == np.float64 and buffer.episode_meta("seed").dtype == np.int64
    np.testing.assert_array_equal(buffer["state"][3:], second["state"])
    third = make_episode(rng, 4, image=False)
    buffer.add_episodes([(third, {"seed": 2})])
    np.testing.assert_array_equal(buffer["action"][-4:], third["action"])


def _batch_error(buffer, episodes):
    before = (buffer.n_episodes, {key: buffer._group["data"][key].shape for key in buffer.keys()})
    with pytest.raises(EpisodeError) as info:
        buffer.add_episodes(episodes)
    after = (buffer.n_episodes, {key: buffer._group["data"][key].shape for key in buffer.keys()})
    assert before == after, "a rejected batch must not write anything"
    return str(info.value)


def test_add_episodes_validates_every_episode_before_writing_any(tmp_path):
    rng = np.random.default_rng(10)
    good = [(make_episode(rng, n), episode_meta(i)) for i, n in enumerate((3, 4, 2))]
    empty = ReplayBuffer.create(tmp_path / "empty.zarr")
    late_nan = [*good[:2], (dict(good[2][0], action=np.full((2, 2), np.nan, np.float32)), good[2][1])]
    message = _batch_error(empty, late_nan)
    assert "episode 2 of 3: data key 'action' has a non-finite value nan" in message
    assert empty.keys() == [] and ReplayBuffer.open(tmp_path / "empty.zarr").n_episodes == 0
    with pytest.raises(EpisodeError) as info:
        empty.check_episodes(late_nan)  # the same check, writing nothing
    assert info.value.index == 2 and "episode 2 of 3" in str(info.value)
    # In an empty store the first episode of the batch sets the layout the others must match.
    message = _batch_error(empty, [good[0], (dict(good[1][0], img=good[1][0]["img"][:, :5]), good[1][1])])
    assert "episode 1 of 2: data key 'img' has per-step shape (5, 10, 3), episode 0 has (12, 10, 3)" in message
    message = _batch_error(empty, [good[0], (dict(good[1][0], action=good[1][0]["action"].astype(np.float64)),
                                             good[1][1])])
    assert "episode 1 of 2: data key 'action' has dtype float64, episode 0 holds float32" in message
    message = _batch_error(empty, [good[0], (good[1][0], {"seed": 1})])
    assert "episode 1 of 2: episode meta names ['seed'] differ from episode 0's" in message
    message = _batch_error(empty, [good[0], (good[1][0], dict(good[1][1], success=2))])
    assert "episode meta 'success' has dtype int64, episode 0 holds bool" in message
    message = _batch_error(empty, [good[0], (good[1][0], dict(good[1][1], model_file=3))])
    assert "episode meta 'model_file' has dtype int64, episode 0 holds object" in message
    message = _batch_error(empty, [good[0], ({k: v for k, v in good[1][0].items() if k != "img"}, good[1][1])])
    assert "differ from episode 0's" in message and "missing ['img']" in message

    buffer, _ = filled_buffer(tmp_path / "buf.zarr", rng)
    message = _batch_error(buffer, [good[0], (dict(good[1][0], state=good[1][0]["state"][:, :4]), good[1][1])])
    assert "episode 1 of 2: data key 'state' has per-step shape (4,), the store has (5,)" in message
    assert "expected a (data, meta) pair" in _batch_error(buffer, [good[0], good[1][0]])
    assert "a list of (data, meta) pairs, got dict" in _batch_error(buffer, good[0][0])
    with pytest.raises(EpisodeError) as info:
        buffer.add_episodes(good[0][0])
    assert info.value.index is None
    assert ReplayBuffer.open(tmp_path / "buf.zarr").n_episodes == 3


def test_torn_batch_commit_keeps_the_whole_episodes_it_names(tmp_path):
    rng = np.random.default_rng(11)
    path = tmp_path / "buf.zarr"
    buffer, episodes = filled_buffer(path, rng)
    extra = [(make_episode(rng, n), episode_meta(3 + i)) for i, n in enumerate((2, 3, 4))]
    buffer.add_episodes(extra)
    root = zarr.open_group(str(path), mode="r+")
    ends = root["meta/episode_ends"]
    # Killed after resizing episode_ends for a batch of three, before writing its entries.
    ends[3:] = -1
    assert ReplayBuffer.open(path).n_episodes == 3 and ReplayBuffer.open(path).n_steps == 12
    # Entries spanning two chunks of which only the first was written: that episode is whole.
    ends[3] = 14
    reopened = ReplayBuffer.open(path, mode="a")
    assert reopened.n_episodes == 4
    np.testing.assert_array_equal(reopened.get_episode(3)["img"], extra[0][0]["img"])
    reopened.add_episodes(extra[1:])
    np.testing.assert_array_equal(ReplayBuffer.open(path).episode_ends, [4, 11, 12, 14, 17, 21])
    ends[4:] = [-3, 17]  # a negative entry that is not the fill value is corruption, not a torn commit
    with pytest.raises(DataFormatError, match="entry 4 is -3 after 14"):
        ReplayBuffer.open(path)
