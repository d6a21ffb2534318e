"""`diffpolicy dataset`: move datasets between the zarr replay buffer and LeRobot's v3.0 layout.

    diffpolicy dataset import-lerobot path/to/lerobot_dataset datasets/imported.zarr
    diffpolicy dataset export-lerobot datasets/pusht.zarr exports/pusht_lerobot --task "push the T"

Import reads `meta/info.json`, `meta/episodes/`, the parquet data files and decodes video and image
keys with PyAV; export writes the same layout (image keys as H.264 videos, `--crf` sets their
quality, or with `--images png` as lossless PNG frames in the parquet files).
Bad input raises a `DiffpolicyError` naming the file and key (the command line exits with code 2).
"""

from __future__ import annotations

import argparse

from diffpolicy.errors import UsageError

ACTIONS = ("import-lerobot", "export-lerobot")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=ACTIONS, help="import-lerobot SRC_DIR DEST_ZARR | export-lerobot SRC_ZARR DEST_DIR")
    parser.add_argument("src", help="LeRobot dataset directory (import) or zarr replay buffer (export)")
    parser.add_argument("dest", help="new zarr replay buffer (import) or new LeRobot dataset directory (export)")
    parser.add_argument("--overwrite", action="store_true", help="replace DEST if it exists")
    parser.add_argument("--fps", type=float, default=None,
                        help="export: frames per second (default: the store's task card control_hz)")
    parser.add_argument("--task", default=None,
                        help="export: task text of every episode (default: episode meta 'task', else the store's task name)")
    parser.add_argument("--robot-type", default=None, help="export: info.json robot_type")
    parser.add_argument("--crf", type=int, default=None, help="export: H.264 quality of image videos (0 lossless luma; default 15)")
    parser.add_argument("--images", choices=["video", "png"], default="video",
                        help="export: image keys as mp4 videos (LeRobot's default, lossy) or PNG frames in the parquet (exact)")


def run(args: argparse.Namespace) -> int:
    from diffpolicy.data import ReplayBuffer
    from diffpolicy.data.lerobot import export_lerobot, import_lerobot
    from diffpolicy.data.lerobot.export import DEFAULT_CRF

    if args.action == "import-lerobot":
        buffer = import_lerobot(args.src, args.dest, overwrite=args.overwrite)
        print(f"imported {buffer.n_episodes} episodes ({buffer.n_steps} steps, keys {buffer.keys()}) "
              f"from {args.src} into {args.dest}")
        return 0
    crf = DEFAULT_CRF if args.crf is None else args.crf
    if not 0 <= crf <= 51:
        raise UsageError(f"--crf must be in [0, 51], got {crf}")
    with ReplayBuffer.open(args.src, mode="r") as buffer:
        out = export_lerobot(buffer, args.dest, fps=args.fps, task=args.task, robot_type=args.robot_type,
                             crf=crf, images=args.images, overwrite=args.overwrite)
        print(f"exported {buffer.n_episodes} episodes ({buffer.n_steps} frames) from {args.src} "
              f"to LeRobot v3.0 at {out}")
    return 0
