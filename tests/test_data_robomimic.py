"""Robomimic HDF5 export / import: the documented layout, a bit-exact zarr -> HDF5 -> zarr trip."""

import json

import h5py
import numpy as np
import pytest

from diffpolicy.data import DataFormatError, ReplayBuffer, export_robomimic, import_robomimic

ENV_ARGS = {"env_name": "Lift", "type": 1, "env_version": "1.5.2",
            "env_kwargs": {"robots": ["Panda"], "control_freq": 20, "reward_shaping": False}}


def robosuite_like_buffer(path, rng, lengths=(5, 3, 8)):
    buffer = ReplayBuffer.create(path, attrs={"task": "lift", "env_args": ENV_ARGS,
                                              "filter_keys": {"train": [0, 2], "valid": [1]}})
    for index, length in enumerate(lengths):
        buffer.add_episode(
            {
                "action": rng.uniform(-1, 1, size=(length, 7)).astype(np.float32),
                "rewards": rng.normal(size=length),
                "dones": (np.arange(length) == length - 1).astype(np.int64),
                "states": rng.normal(size=(length, 32)),
                "robot0_eef_pos": rng.normal(size=(length, 3)),
                "object": rng.normal(size=(length, 10)).astype(np.float32),
                "agentview_image": rng.integers(0, 256, size=(length, 16, 16, 3), dtype=np.uint8),
            },
            {"model_file": f"<mujoco model='lift'><body name='b{index}'/></mujoco>",
             "seed": np.int32(100 + index), "success": bool(index % 2), "return": rng.normal(),
             "final_obs.object": rng.normal(size=10).astype(np.float32)},
        )
    return buffer


def test_round_trip_is_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    source = robosuite_like_buffer(tmp_path / "src.zarr", rng)
    export_robomimic(source, tmp_path / "demo.hdf5")
    result = import_robomimic(tmp_path / "demo.hdf5", tmp_path / "back.zarr")

    assert result.keys() == source.keys() and result.meta_keys() == source.meta_keys()
    np.testing.assert_array_equal(result.episode_ends, source.episode_ends)
    for key in source.keys():
        original, back = np.asarray(source[key]), np.asarray(result[key])
        assert back.dtype == original.dtype and back.tobytes() == original.tobytes(), key
    for name in source.meta_keys():
        original, back = source.episode_meta(name), result.episode_meta(name)
        assert back.dtype == original.dtype and back.shape == original.shape, name
        np.testing.assert_array_equal(back, original, err_msg=name)
    assert dict(result.attrs) == dict(source.attrs)
    assert not (tmp_path / "back.zarr.partial").exists()
    assert not (tmp_path / "demo.hdf5.partial").exists()


def test_written_file_follows_robomimic_layout(tmp_path):
    rng = np.random.default_rng(1)
    source = robosuite_like_buffer(tmp_path / "src.zarr", rng)
    export_robomimic(source, tmp_path / "demo.hdf5")
    with h5py.File(tmp_path / "demo.hdf5", "r") as f:
        data = f["data"]
        assert data.attrs["total"] == 16
        assert json.loads(data.attrs["env_args"]) == ENV_ARGS
        assert sorted(data.keys()) == ["demo_0", "demo_1", "demo_2"]
        demo = data["demo_1"]
        episode = source.get_episode(1)
        assert demo.attrs["num_samples"] == 3
        assert demo.attrs["model_file"] == "<mujoco model='lift'><body name='b1'/></mujoco>"
        np.testing.assert_array_equal(demo["actions"][()], episode["action"])
        for key in ("rewards", "dones", "states"):
            np.testing.assert_array_equal(demo[key][()], episode[key])
        assert sorted(demo["obs"].keys()) == ["agentview_image", "object", "robot0_eef_pos"]
        for key in demo["obs"]:
            np.testing.assert_array_equal(demo["obs"][key][()], episode[key])
            final = source.episode_meta("final_obs.object")[1:2] if key == "object" else episode[key][-1:]
            shifted = np.concatenate([episode[key][1:], final])  # the stored final observation, else the last repeated
            np.testing.assert_array_equal(demo["next_obs"][key][()], shifted)
        assert demo["obs/agentview_image"].compression == "gzip"
        assert [name.decode() for name in f["mask/train"][()]] == ["demo_0", "demo_2"]
        assert [name.decode() for name in f["mask/valid"][()]] == ["demo_1"]


def test_buffer_without_rewards_gets_robomimic_defaults_and_keeps_its_keys(tmp_path):
    buffer = ReplayBuffer.create(tmp_path / "src.zarr")
    buffer.add_episode({"action": np.ones((4, 2)), "pos": np.zeros((4, 3))})
    export_robomimic(buffer, tmp_path / "demo.hdf5", env_args=ENV_ARGS)
    with h5py.File(tmp_path / "demo.hdf5", "r") as f:
        np.testing.assert_array_equal(f["data/demo_0/rewards"][()], np.zeros(4))
        np.testing.assert_array_equal(f["data/demo_0/dones"][()], [0, 0, 0, 1])
        assert "states" not in f["data/demo_0"]
    back = import_robomimic(tmp_path / "demo.hdf5", tmp_path / "back.zarr")
    assert back.keys() == ["action", "pos"]
    assert back.attrs["env_args"] == ENV_ARGS


def write_plain_robomimic(path, env_args=True):
    """A robomimic file as robomimic's own scripts write it (no diffpolicy attributes)."""
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["total"] = 5
        if env_args:
            data.attrs["env_args"] = json.dumps(ENV_ARGS)
        for name, length in (("demo_10", 3), ("demo_2", 2)):
            demo = data.create_group(name)
            demo.attrs["num_samples"] = length
            demo.attrs["model_file"] = f"<mujoco model='{name}'/>".encode()
            demo["actions"] = np.full((length, 7), float(length))
            demo["rewards"] = np.zeros(length)
            demo["dones"] = np.zeros(length, dtype=np.int64)
            demo["states"] = np.zeros((length, 4))
            demo["obs/robot0_eef_pos"] = np.full((length, 3), float(length))
            demo["next_obs/robot0_eef_pos"] = np.full((length, 3), float(length))
        f["mask/valid"] = np.array([b"demo_10"])


def test_imports_plain_robomimic_file_in_demo_order(tmp_path):
    write_plain_robomimic(tmp_path / "plain.hdf5")
    buffer = import_robomimic(tmp_path / "plain.hdf5", tmp_path / "out.zarr")
    np.testing.assert_array_equal(buffer.episode_ends, [2, 5])  # demo_2 before demo_10
    assert list(buffer.episode_meta("model_file")) == ["<mujoco model='demo_2'/>",
                                                       "<mujoco model='demo_10'/>"]
    assert buffer.keys() == ["action", "dones", "rewards", "robot0_eef_pos", "states"]
    assert buffer.attrs["filter_keys"] == {"valid": [1]}
    assert buffer.attrs["env_args"] == ENV_ARGS


def test_missing_env_args_is_named_unless_given(tmp_path):
    write_plain_robomimic(tmp_path / "no_env.hdf5", env_args=False)
    with pytest.raises(DataFormatError, match=r"no_env\.hdf5: data has no 'env_args'"):
        import_robomimic(tmp_path / "no_env.hdf5", tmp_path / "out.zarr")
    assert not (tmp_path / "out.zarr").exists() and not (tmp_path / "out.zarr.partial").exists()
    buffer = import_robomimic(tmp_path / "no_env.hdf5", tmp_path / "out.zarr", env_args=ENV_ARGS)
    assert buffer.attrs["env_args"] == ENV_ARGS


def test_bad_files_and_arguments(tmp_path):
    write_plain_robomimic(tmp_path / "demo.hdf5")
    with pytest.raises(FileNotFoundError, match="missing.hdf5"):
        import_robomimic(tmp_path / "missing.hdf5", tmp_path / "out.zarr")
    with pytest.raises(DataFormatError, match="lacks \\['type', 'env_kwargs'\\]"):
        import_robomimic(tmp_path / "demo.hdf5", tmp_path / "out.zarr", env_args={"env_name": "x"})
    with h5py.File(tmp_path / "demo.hdf5", "a") as f:
        f["data/demo_2"].attrs["num_samples"] = 9
    with pytest.raises(DataFormatError, match="data/demo_2: num_samples = 9 but actions has 2"):
        import_robomimic(tmp_path / "demo.hdf5", tmp_path / "out.zarr")
    with h5py.File(tmp_path / "demo.hdf5", "a") as f:
        f["data/demo_2"].attrs["num_samples"] = 2
        f["data/demo_2/actions"][0, 0] = np.nan
    message = r"data/demo_2: .*'action' has a non-finite value nan at index \(0, 0\)"
    with pytest.raises(DataFormatError, match=message):
        import_robomimic(tmp_path / "demo.hdf5", tmp_path / "out.zarr")
    assert not (tmp_path / "out.zarr").exists()

    empty = ReplayBuffer.create(tmp_path / "empty.zarr")
    with pytest.raises(DataFormatError, match="no 'env_args'"):
        export_robomimic(empty, tmp_path / "x.hdf5")
    empty.add_episode({"act": np.zeros((2, 2))})
    with pytest.raises(DataFormatError, match="needs data key 'action'"):
        export_robomimic(empty, tmp_path / "x.hdf5", env_args=ENV_ARGS)
    with pytest.raises(FileExistsError, match="demo.hdf5"):
        export_robomimic(empty, tmp_path / "demo.hdf5", env_args=ENV_ARGS)
    assert not (tmp_path / "x.hdf5").exists()
