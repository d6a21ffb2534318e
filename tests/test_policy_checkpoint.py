"""Checkpoints: exact save -> load, atomic writes, and every way a checkpoint can be wrong."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from policy_helpers import DA, TP, B, make_obs, make_policy

import diffpolicy.policies.checkpoint as checkpoint_module
from diffpolicy.policies import (
    FORMAT_VERSION,
    CheckpointError,
    CheckpointNotFoundError,
    ChunkPolicy,
    PickleRefusedError,
    write_checkpoint,
)
from diffpolicy.policies.checkpoint import sha256_of


@pytest.fixture
def saved(tmp_path):
    policy = make_policy("diffusion").eval()
    directory = tmp_path / "ckpt"
    policy.save_pretrained(directory, metadata={"task": "pusht", "step": 1200})
    return policy, directory


def _config(directory):
    return json.loads((directory / "config.json").read_text())


def _write_config(directory, header):
    (directory / "config.json").write_text(json.dumps(header))


def _rehash(directory):
    """Record the current weights' sha256 in config.json (an attacker who edits both files)."""
    header = _config(directory)
    header["weights"]["sha256"] = sha256_of(directory / "model.safetensors")
    _write_config(directory, header)


# ---------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_save_load_gives_identical_samples(tmp_path, kind):
    policy = make_policy(kind).eval()
    policy.save_pretrained(tmp_path / "ckpt")
    loaded = ChunkPolicy.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == policy.config and not loaded.training
    obs = make_obs()
    expected = policy.sample(obs, generator=torch.Generator().manual_seed(11))
    assert torch.equal(loaded.sample(obs, generator=torch.Generator().manual_seed(11)), expected)
    for name, tensor in policy.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_image_policy_round_trip(tmp_path):
    policy = make_policy(images=True).eval()
    policy.save_pretrained(tmp_path / "ckpt")
    loaded = ChunkPolicy.from_pretrained(tmp_path / "ckpt")
    obs = make_obs(images=True)
    assert torch.equal(loaded.sample(obs, generator=torch.Generator().manual_seed(0)),
                       policy.sample(obs, generator=torch.Generator().manual_seed(0)))


def test_config_json_records_version_config_hash_and_metadata(saved):
    policy, directory = saved
    assert sorted(os.listdir(directory)) == ["config.json", "model.safetensors"]
    header = _config(directory)
    assert header["format_version"] == FORMAT_VERSION == 1
    assert header["policy_config"] == policy.config.to_dict()
    assert header["weights"] == {"file": "model.safetensors", "sha256": sha256_of(directory / "model.safetensors")}
    assert ChunkPolicy.from_pretrained(directory).metadata == {"task": "pusht", "step": 1200}
    names = checkpoint_module.read_checkpoint(directory).tensors
    assert {"normalizer.ranges.action.min", "normalizer.ranges.state.max"} <= set(names)


def test_save_overwrites_a_checkpoint_and_leaves_no_temporary_files(saved):
    _, directory = saved
    other = make_policy("flow", seed=1).eval()
    other.save_pretrained(directory)
    assert ChunkPolicy.from_pretrained(directory).config.process.type == "flow"
    assert sorted(os.listdir(directory.parent)) == ["ckpt"]


def test_crash_while_writing_keeps_the_old_checkpoint_whole(saved, monkeypatch):
    policy, directory = saved
    before = {name: (directory / name).read_bytes() for name in ("config.json", "model.safetensors")}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "fsync_file", crash)  # after the weights file is written
    with pytest.raises(OSError, match="disk full"):
        make_policy("flow", seed=1).save_pretrained(directory)
    assert {name: (directory / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(directory.parent)) == ["ckpt"]
    monkeypatch.undo()
    fresh = directory.parent / "fresh"
    monkeypatch.setattr(checkpoint_module, "fsync_file", crash)
    with pytest.raises(OSError):
        policy.save_pretrained(fresh)
    assert not fresh.exists()


def test_save_refuses_a_directory_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match=r"refusing to overwrite .*\['notes.txt'\]"):
        make_policy().save_pretrained(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(CheckpointError, match="JSON-serializable"):
        make_policy().save_pretrained(tmp_path / "ckpt", metadata={"step": torch.tensor(3)})
    assert not (tmp_path / "ckpt").exists() and os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------- bad checkpoints
def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=r"checkpoint directory .*nowhere does not exist"):
        ChunkPolicy.from_pretrained(tmp_path / "nowhere")
    assert issubclass(CheckpointNotFoundError, FileNotFoundError)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_missing_file(saved, name):
    _, directory = saved
    (directory / name).unlink()
    with pytest.raises(CheckpointNotFoundError, match=rf"checkpoint file .*{name} is missing"):
        ChunkPolicy.from_pretrained(directory)


def test_bad_json(saved):
    _, directory = saved
    (directory / "config.json").write_text('{"format_version": 1,,}')
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON: .* line 1, column 22"):
        ChunkPolicy.from_pretrained(directory)


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_unsupported_format_version(saved, version):
    _, directory = saved
    header = _config(directory)
    header["format_version"] = version
    _write_config(directory, header)
    with pytest.raises(CheckpointError, match=rf"format_version {version!r} is not supported; .* reads \[1\]"):
        ChunkPolicy.from_pretrained(directory)


def test_tampered_weights(saved):
    _, directory = saved
    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors does not match the sha256 recorded in .*config.json"):
        ChunkPolicy.from_pretrained(directory)


class _Trap:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_pickle_offered_as_weights_is_refused_unopened(saved, writer):
    _, directory = saved
    trap = directory.parent / "unpickled"
    weights = directory / "model.safetensors"
    if writer == "torch.save":
        torch.save({"trap": _Trap(trap)}, weights)
    else:
        weights.write_bytes(pickle.dumps({"trap": _Trap(trap)}, protocol=4))
    _rehash(directory)
    message = r"model.safetensors is a pickle / torch.save archive.*never unpickles"
    with pytest.raises(PickleRefusedError, match=message):
        ChunkPolicy.from_pretrained(directory)
    assert not trap.exists()


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".ckpt"])
def test_pickle_path_is_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(PickleRefusedError, match=r"looks like a pickle / torch.save file; diffpolicy never unpickles"):
        ChunkPolicy.from_pretrained(path)


def test_directory_with_only_a_pickle_says_so(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointNotFoundError, match=r"model.safetensors is missing; found \['pytorch_model.bin'\]"):
        ChunkPolicy.from_pretrained(tmp_path)


def test_garbage_weights_with_matching_hash(saved):
    _, directory = saved
    (directory / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    _rehash(directory)
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a valid safetensors file"):
        ChunkPolicy.from_pretrained(directory)


def _rewrite_tensors(directory, change):
    checkpoint = checkpoint_module.read_checkpoint(directory)
    tensors = dict(checkpoint.tensors)
    change(tensors)
    write_checkpoint(directory, tensors, checkpoint.policy_config, checkpoint.metadata)


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update({"normalizer.ranges.action.min": torch.zeros(DA + 1)}),
     r"tensor 'normalizer.ranges.action.min' has shape \(3,\) torch.float32, the config needs \(2,\) torch.float32"),
    (lambda t: t.pop("normalizer.ranges.state.max"),
     r"tensor 'normalizer.ranges.state.max' \(shape \(3,\)\) required by the config is missing"),
    (lambda t: t.update({"normalizer.ranges.velocity.min": torch.zeros(2)}),
     r"tensor 'normalizer.ranges.velocity.min' \(shape \(2,\)\) is not part of the policy"),
    (lambda t: t.update({"backbone.net.0.bias": t["backbone.net.0.bias"].double()}),
     r"tensor 'backbone.net.0.bias' has shape \(32,\) torch.float64, the config needs \(32,\) torch.float32"),
])
def test_tensors_that_do_not_match_the_config(saved, change, message):
    _, directory = saved
    _rewrite_tensors(directory, change)
    with pytest.raises(CheckpointError, match=message):
        ChunkPolicy.from_pretrained(directory)


def test_config_edited_to_another_architecture(saved):
    _, directory = saved
    header = _config(directory)
    header["policy_config"]["backbone"]["hidden_dim"] = 16
    _write_config(directory, header)
    with pytest.raises(CheckpointError, match=r"tensor 'backbone.net.0.bias' has shape \(32,\) .* needs \(16,\)"):
        ChunkPolicy.from_pretrained(directory)


def test_invalid_policy_config(saved):
    _, directory = saved
    header = _config(directory)
    header["policy_config"]["pred_horizon"] = "16"
    _write_config(directory, header)
    with pytest.raises(CheckpointError, match=r"config.json: invalid policy_config: config key 'pred_horizon'"):
        ChunkPolicy.from_pretrained(directory)


def test_sample_shapes_of_loaded_policy(saved):
    _, directory = saved
    loaded = ChunkPolicy.from_pretrained(directory)
    assert loaded.sample(make_obs()).shape == (B, TP, DA)
