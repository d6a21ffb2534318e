"""Whether bf16 autocast pays on this machine's CPU.

oneDNN runs bf16 matrix multiplies natively on CPUs with the avx512_bf16 or AMX instructions
(AMD Zen 4 and later, Intel Cooper Lake / Sapphire Rapids and later): about twice the float32 rate
there. Elsewhere it emulates them, slower than float32, so the trainer refuses `train.cpu_bf16`.
"""

from __future__ import annotations

from pathlib import Path

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The instruction-set flags of the first CPU in `cpuinfo` (empty where there is none: not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def native_cpu_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU multiplies bf16 matrices natively (`NATIVE_BF16_FLAGS`)."""
    return any(flag in cpu_flags(cpuinfo) for flag in NATIVE_BF16_FLAGS)
