"""Rollout videos: frames (uint8 `(H, W, 3)`) to an H.264 mp4 through imageio-ffmpeg."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from diffpolicy.errors import InvalidValueError


def write_video(path: str | os.PathLike, frames: Sequence[np.ndarray], fps: float) -> Path:
    """Write `frames` (each uint8 `(H, W, 3)`, all the same shape) to an mp4 at `path`.

    Odd heights/widths are padded by one black row/column (yuv420p needs even sizes). The file is
    written under a temporary name and renamed, so a killed run leaves no half-written video.
    """
    import imageio.v2 as imageio

    path = Path(path)
    if not frames:
        raise InvalidValueError(f"write_video({path}): no frames to write")
    first = np.asarray(frames[0])
    if first.dtype != np.uint8 or first.ndim != 3 or first.shape[2] != 3:
        raise InvalidValueError(f"write_video({path}): frames must be uint8 (H, W, 3), "
                         f"got {first.dtype} {first.shape} at index 0")
    h, w = first.shape[:2]
    pad = ((0, h % 2), (0, w % 2), (0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        with imageio.get_writer(tmp, fps=fps, codec="libx264", format="FFMPEG", macro_block_size=1,
                                pixelformat="yuv420p", ffmpeg_log_level="error") as writer:
            for i, frame in enumerate(frames):
                frame = np.asarray(frame)
                if frame.shape != first.shape or frame.dtype != np.uint8:
                    raise InvalidValueError(f"write_video({path}): frame {i} is {frame.dtype} {frame.shape}, "
                                     f"expected uint8 {first.shape} like frame 0")
                writer.append_data(np.pad(frame, pad))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path
