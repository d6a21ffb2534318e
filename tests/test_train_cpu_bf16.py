"""bf16 autocast on the CPU (`train.cpu_bf16`): the flag reaches the forward pass, the weights stay
float32 and close to a float32 run's, and a CPU without native bf16 matrix multiplies is refused."""

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import TINY, make_pusht_dataset

import diffpolicy.train.trainer as trainer
from diffpolicy.policies.errors import ConfigError
from diffpolicy.train.config import build_config
from diffpolicy.train.precision import cpu_flags, native_cpu_bf16

ZEN4_FLAGS = "fpu vme sse sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni"
SKYLAKE_FLAGS = "fpu vme sse sse2 avx2 avx512f avx512bw avx512vl"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_pusht_dataset(tmp_path_factory.mktemp("data") / "pusht.zarr", episodes=2)


def cpuinfo(tmp_path, flags):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nvendor_id\t: X\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    return path


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    assert "avx512_bf16" in cpu_flags(cpuinfo(tmp_path, ZEN4_FLAGS))
    assert native_cpu_bf16(cpuinfo(tmp_path, ZEN4_FLAGS))
    assert native_cpu_bf16(cpuinfo(tmp_path, "sse2 amx_tile amx_bf16"))
    assert not native_cpu_bf16(cpuinfo(tmp_path, SKYLAKE_FLAGS))  # bf16 would be emulated there
    assert not native_cpu_bf16(tmp_path / "missing")  # not Linux: no claim of native support


def weights(run_dir, steps):
    return load_file(run_dir / "checkpoints" / f"step_{steps:08d}" / "state" / "model.safetensors")


def test_cpu_bf16_trains_in_autocast_with_float32_weights(tmp_path, dataset, monkeypatch):
    monkeypatch.setattr(trainer, "native_cpu_bf16", lambda: True)  # the flag's effect, on any CPU
    autocast_dtypes = []
    real_autocast = torch.autocast

    def recording_autocast(device_type, dtype=None, enabled=True, **kwargs):
        autocast_dtypes.append((device_type, dtype, enabled))
        return real_autocast(device_type, dtype=dtype, enabled=enabled, **kwargs)

    monkeypatch.setattr(trainer.torch, "autocast", recording_autocast)
    overrides = [*TINY, f"data.path={dataset}"]
    trainer.train(build_config("pusht", "diffusion", overrides), tmp_path / "fp32", progress=False)
    assert set(autocast_dtypes) == {("cpu", torch.bfloat16, False)}
    autocast_dtypes.clear()
    trainer.train(build_config("pusht", "diffusion", [*overrides, "train.cpu_bf16=true"]), tmp_path / "bf16",
                  progress=False)
    assert set(autocast_dtypes) == {("cpu", torch.bfloat16, True)}
    fp32, bf16 = weights(tmp_path / "fp32", 20), weights(tmp_path / "bf16", 20)
    assert all(t.dtype == torch.float32 for t in bf16.values())
    assert any(not torch.equal(fp32[k], bf16[k]) for k in fp32)  # bf16 arithmetic did run
    for key in fp32:  # 20 steps from the same start: the same training, to bf16's precision
        torch.testing.assert_close(bf16[key], fp32[key], atol=0.02, rtol=0.05)


def test_cpu_bf16_is_refused_where_the_cpu_would_emulate_it(tmp_path, dataset, monkeypatch):
    monkeypatch.setattr(trainer, "native_cpu_bf16", lambda: False)
    config = build_config("pusht", "diffusion", [*TINY, f"data.path={dataset}", "train.cpu_bf16=true"])
    with pytest.raises(ConfigError, match=r"train.cpu_bf16=true: this CPU has no native bf16 matrix multiply "
                                          r"\(neither of avx512_bf16, amx_bf16 in /proc/cpuinfo\)"):
        trainer.train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
