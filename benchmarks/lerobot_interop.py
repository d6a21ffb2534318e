"""LeRobot v3.0 export -> import of zarr stores: time, size, exactness (state) and codec loss (images).

    python benchmarks/lerobot_interop.py datasets/pusht.zarr datasets/pusht_image.zarr

For each store: export to `<store>.lerobot`, import into `<store>.back.zarr` (both replaced), then
compare every key: state keys must be bit-exact; image keys report the worst frame's mean absolute
error (0-255) and PSNR. Prints one table row per store.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from diffpolicy.data import ReplayBuffer, is_image_array
from diffpolicy.data.lerobot import export_lerobot, import_lerobot


def measure(store: Path) -> str:
    source = ReplayBuffer.open(store)
    out, back = store.with_suffix(".lerobot"), store.with_suffix(".back.zarr")
    started = time.perf_counter()
    export_lerobot(source, out, overwrite=True)
    exported = time.perf_counter() - started
    result = import_lerobot(out, back, overwrite=True)
    imported = time.perf_counter() - started - exported
    mib = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2 ** 20
    images = []
    for key in source.keys():
        original, copy = np.asarray(source[key]), np.asarray(result[key])
        if is_image_array(original.dtype, original.ndim):
            error = np.abs(original.astype(np.float64) - copy)
            psnr = 10 * np.log10(255 ** 2 / np.maximum((error ** 2).mean(axis=(1, 2, 3)), 1e-12))
            images.append(f"{key}: {error.mean(axis=(1, 2, 3)).max():.2f} / {psnr.min():.1f} dB")
        elif original.dtype != copy.dtype or original.tobytes() != copy.tobytes():
            raise AssertionError(f"{store}: key {key!r} changed in the round trip")
    return (f"| {store.name} | {source.n_episodes} | {source.n_steps} | {exported:.1f} | {imported:.1f} | "
            f"{mib:.1f} | bit-exact | {'; '.join(images) or '-'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stores", nargs="+", type=Path, help="zarr replay buffers")
    args = parser.parse_args()
    print("| store | episodes | steps | export s | import s | LeRobot MiB | state keys | images: worst frame "
          "mean abs error / PSNR |")
    print("|---|---|---|---|---|---|---|---|")
    for store in args.stores:
        print(measure(store), flush=True)


if __name__ == "__main__":
    main()
