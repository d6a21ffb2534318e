"""Export a `ReplayBuffer` as a LeRobot v3.0 dataset (pyarrow and PyAV, no `lerobot` package).

Buffer keys become features by `layout.feature_name` ("action", "next.reward", "observation.<k>");
image keys (uint8 `(T, H, W, 3)`) are stored as videos (dtype "video", lossy) or, with
`images="png"`, as PNG frames in the parquet files (dtype "image", lossless); every other key is a
parquet column.
Per-episode meta (`seed`, `success`, ...) are extra columns of `meta/episodes/`; the store's root
attributes and per-step shapes (`(T,)` and `(T, 1)` are both LeRobot's scalar shape [1]) travel in
`info.json["diffpolicy"]`, so buffer -> LeRobot -> buffer is exact for
everything but video frames (codec loss, see `VIDEO_TOLERANCE`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from diffpolicy.data.errors import DataFormatError
from diffpolicy.data.lerobot import layout
from diffpolicy.data.lerobot.video import PIX_FMT, VideoWriter, as_fraction, encode_png, pick_codec
from diffpolicy.data.replay_buffer import ReplayBuffer, is_image_array
from diffpolicy.errors import ExistingFileError, InvalidValueError
from diffpolicy.fsutil import fsync_dir, fsync_tree

# Video frames after export -> import, per frame: mean absolute error per pixel value (0-255) and
# PSNR. yuv420p's half-resolution chroma dominates at sharp colour edges: on the tests' rendered
# scene (a red disk on a shaded floor, 37 x 48) crf 0 gives 2.6 / 30.4 dB, the default crf 15
# 3.0 / 30.0 dB, crf 30 5.3 / 27.0 dB; the smaller 24 x 32 scene of a LeRobot-style file 4.1 / 28.3 dB.
VIDEO_TOLERANCE = {"mean_abs_error": 5.0, "psnr_db": 27.0}
DEFAULT_CRF = 15
DATA_FILES_SIZE_IN_MB = 100
IMAGE_STORAGE = ("video", "png")


class _Stats:
    """Running min / max / mean / std over frames of one feature (images: per channel, in [0, 1])."""

    def __init__(self, image: bool):
        self.image = image
        self.count = 0
        self.total = self.squares = self.low = self.high = None

    def add(self, values: np.ndarray) -> None:
        values = values.astype(np.float64)
        if self.image:
            values = values.reshape(-1, values.shape[-1]) / 255.0
        elif values.ndim == 1:
            values = values[:, None]
        low, high = values.min(axis=0), values.max(axis=0)
        if self.total is None:
            self.total, self.squares, self.low, self.high = (np.zeros_like(low), np.zeros_like(low), low, high)
        self.total += values.sum(axis=0)
        self.squares += (values ** 2).sum(axis=0)
        self.low, self.high = np.minimum(self.low, low), np.maximum(self.high, high)
        self.count += len(values)

    def to_json(self, frames: int) -> dict:
        mean = self.total / self.count
        std = np.sqrt(np.maximum(self.squares / self.count - mean ** 2, 0.0))
        shape = (-1, 1, 1) if self.image else self.total.shape
        out = {name: value.reshape(shape).tolist() for name, value in
               (("min", self.low), ("max", self.high), ("mean", mean), ("std", std))}
        out["count"] = [frames]
        return out


def export_lerobot(
    buffer: ReplayBuffer,
    out_dir: str | os.PathLike,
    fps: float | None = None,
    task: str | None = None,
    robot_type: str | None = None,
    crf: int = DEFAULT_CRF,
    images: str = "video",
    data_files_size_in_mb: float = DATA_FILES_SIZE_IN_MB,
    overwrite: bool = False,
) -> Path:
    """Write `buffer` as a LeRobot v3.0 dataset directory at `out_dir` (built as `out_dir.partial`
    and renamed when complete).

    fps: frames per second (default: the store's `task_card.control_hz`; one of them is required).
    task: the task text of every episode (default: the episode meta `task` where the store has it,
    else its root attribute `task`). crf: H.264 quality of the videos (lower is closer, 0 lossless
    luma). images: "video" (mp4 per image key, LeRobot's default) or "png" (frames in the parquet).
    data_files_size_in_mb: a new data file (and video file per image key) starts once the current
    one holds this many megabytes of low-dimensional data (LeRobot's default 100).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ExistingFileError(f"{out_dir} already exists; pass overwrite=True to replace it")
    if "action" not in buffer.keys():
        raise DataFormatError(f"{buffer.path}: LeRobot datasets need data key 'action'; present: {buffer.keys()}")
    if buffer.n_episodes == 0:
        raise DataFormatError(f"{buffer.path} has no episodes to export")
    fps = _resolve_fps(buffer, fps)
    tasks = _episode_tasks(buffer, task)
    meta_names = buffer.meta_keys()
    clash = [name for name in meta_names if name in layout.EPISODE_COLUMNS]
    if clash:
        raise DataFormatError(f"{buffer.path}: episode meta {clash} would clash with LeRobot's episode columns")
    if images not in IMAGE_STORAGE:
        raise InvalidValueError(f"images must be one of {IMAGE_STORAGE}, got {images!r}")
    features, video_keys = _features(buffer, images)
    codec = pick_codec() if video_keys else None
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        writer = _Writer(tmp, buffer, features, video_keys, fps, codec, crf, data_files_size_in_mb, tasks)
        writer.write_all()
        info = {
            "codebase_version": layout.CODEBASE_VERSION,
            "robot_type": robot_type,
            "total_episodes": buffer.n_episodes,
            "total_frames": buffer.n_steps,
            "total_tasks": len(writer.task_index),
            "chunks_size": layout.CHUNKS_SIZE,
            "data_files_size_in_mb": data_files_size_in_mb,
            "video_files_size_in_mb": data_files_size_in_mb,
            "fps": int(fps) if float(fps).is_integer() else float(fps),
            "splits": {"train": f"0:{buffer.n_episodes}"},
            "data_path": layout.DATA_PATH,
            "video_path": layout.VIDEO_PATH if video_keys else None,
            "features": {**features, **layout.FRAME_FEATURES},
            "diffpolicy": {"attrs": {k: v for k, v in buffer.attrs.items() if k != "diffpolicy_format"},
                           "episode_meta": meta_names,
                           "shapes": {key: list(buffer[key].shape[1:]) for key in buffer.keys()}},
        }
        (tmp / "meta").mkdir(parents=True, exist_ok=True)
        (tmp / layout.INFO_PATH).write_text(json.dumps(info, indent=4))
        (tmp / layout.STATS_PATH).write_text(json.dumps(writer.stats_json(), indent=4))
        _write_tasks(tmp / layout.TASKS_PATH, writer.task_index)
        _write_episodes(tmp / layout.EPISODES_PATH.format(chunk_index=0, file_index=0), writer.episode_rows,
                        buffer, meta_names)
        fsync_tree(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def _resolve_fps(buffer: ReplayBuffer, fps: float | None) -> float:
    if fps is None:
        fps = (buffer.attrs.get("task_card") or {}).get("control_hz")
    if fps is None:
        raise InvalidValueError(f"{buffer.path} records no task_card.control_hz; pass fps= (frames per second)")
    if not float(fps) > 0:
        raise InvalidValueError(f"fps must be > 0, got {fps!r}")
    return float(fps)


def _episode_tasks(buffer: ReplayBuffer, task: str | None) -> list[str]:
    if task is None and "task" in buffer.meta_keys():
        return [str(t) for t in buffer.episode_meta("task")]
    text = task if task is not None else buffer.attrs.get("task", "")
    return [str(text)] * buffer.n_episodes


def _features(buffer: ReplayBuffer, images: str) -> tuple[dict[str, dict], list[str]]:
    """Every key's feature entry, and the image keys stored as videos."""
    features, video_keys = {}, []
    for key in buffer.keys():
        array = buffer[key]
        name = layout.feature_name(key)
        if name in layout.FRAME_FEATURES or "/" in name:
            raise DataFormatError(f"{buffer.path}: data key {key!r} would become LeRobot feature {name!r}, "
                                  "which is reserved")
        if is_image_array(array.dtype, array.ndim):
            height, width, channels = array.shape[1:]
            if channels != 3:
                raise DataFormatError(f"{buffer.path}: image key {key!r} has {channels} channels; videos need 3")
            features[name] = {"dtype": "video" if images == "video" else "image", "shape": [height, width, 3],
                              "names": ["height", "width", "channels"]}
            if images == "video":
                video_keys.append(key)
        else:
            features[name] = {"dtype": str(array.dtype), "shape": list(array.shape[1:]) or [1], "names": None}
    return features, video_keys


class _Writer:
    """Writes the data parquet files and the videos, and collects episode rows and stats."""

    def __init__(self, root, buffer, features, video_keys, fps, codec, crf, file_mb, tasks):
        self.root, self.buffer, self.features = root, buffer, features
        self.video_keys, self.fps, self.codec, self.crf = video_keys, fps, codec, crf
        self.file_bytes = file_mb * 2 ** 20
        self.tasks = tasks
        self.task_index: dict[str, int] = {}
        self.episode_rows: list[dict] = []
        self.stats = {key: _Stats(features[layout.feature_name(key)]["dtype"] in ("video", "image"))
                      for key in buffer.keys()}
        self.file_number = 0
        self.tables: list[pa.Table] = []
        self.bytes = 0
        self.videos: dict[str, VideoWriter] = {}

    def write_all(self) -> None:
        try:
            for episode in range(self.buffer.n_episodes):
                if self.tables and self.bytes >= self.file_bytes:
                    self._close_file()
                    self.file_number += 1
                self._add_episode(episode)
            self._close_file()
        except BaseException:
            for writer in self.videos.values():
                writer.abort()
            raise

    def _add_episode(self, episode: int) -> None:
        steps = self.buffer.episode_slice(episode)
        length = steps.stop - steps.start
        task = self.tasks[episode]
        task_index = self.task_index.setdefault(task, len(self.task_index))
        frame_index = np.arange(length, dtype=np.int64)
        columns, episode_stats = {}, {}
        for key in self.buffer.keys():
            values = np.asarray(self.buffer[key][steps])
            self.stats[key].add(values)
            own = _Stats(self.stats[key].image)
            own.add(values)
            episode_stats.update({f"stats/{layout.feature_name(key)}/{name}": value
                                  for name, value in own.to_json(length).items()})
            if key in self.video_keys:
                self._video(key, values.shape[1:3]).append(values)
            elif self.features[layout.feature_name(key)]["dtype"] == "image":
                columns[layout.feature_name(key)] = _png_column(values)
            else:
                columns[layout.feature_name(key)] = layout.to_arrow(values)
        columns.update({
            "timestamp": pa.array((frame_index / self.fps).astype(np.float32)),
            "frame_index": pa.array(frame_index),
            "episode_index": pa.array(np.full(length, episode, dtype=np.int64)),
            "index": pa.array(np.arange(steps.start, steps.stop, dtype=np.int64)),
            "task_index": pa.array(np.full(length, task_index, dtype=np.int64)),
        })
        table = pa.table(columns)
        self.tables.append(table)
        self.bytes += table.nbytes
        where = layout.chunk_file(self.file_number)
        row = {"episode_index": episode, "tasks": [task], "length": length,
               "data/chunk_index": where["chunk_index"], "data/file_index": where["file_index"],
               "dataset_from_index": steps.start, "dataset_to_index": steps.stop}
        for key in self.video_keys:
            start = (self.videos[key].frames_written - length) / self.fps
            row.update({f"videos/{layout.feature_name(key)}/chunk_index": where["chunk_index"],
                        f"videos/{layout.feature_name(key)}/file_index": where["file_index"],
                        f"videos/{layout.feature_name(key)}/from_timestamp": start,
                        f"videos/{layout.feature_name(key)}/to_timestamp": start + length / self.fps})
        row["meta/episodes/chunk_index"], row["meta/episodes/file_index"] = 0, 0
        row.update(episode_stats)
        self.episode_rows.append(row)

    def _video(self, key: str, size: tuple[int, int]) -> VideoWriter:
        if key not in self.videos:
            path = self.root / layout.VIDEO_PATH.format(video_key=layout.feature_name(key),
                                                        **layout.chunk_file(self.file_number))
            self.videos[key] = VideoWriter(path, self.fps, size[0], size[1], self.codec, self.crf)
            name = layout.feature_name(key)
            writer = self.videos[key]
            self.features[name]["info"] = {
                "video.height": writer.encoded_height, "video.width": writer.encoded_width,
                "video.codec": "h264" if self.codec == "libx264" else self.codec, "video.pix_fmt": PIX_FMT,
                "video.is_depth_map": False, "video.fps": float(as_fraction(self.fps)), "video.channels": 3,
                "has_audio": False}
        return self.videos[key]

    def _close_file(self) -> None:
        path = self.root / layout.DATA_PATH.format(**layout.chunk_file(self.file_number))
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.concat_tables(self.tables), path)
        for writer in self.videos.values():
            writer.close()
        self.tables, self.bytes, self.videos = [], 0, {}

    def stats_json(self) -> dict:
        """stats.json: every feature's statistics, the per-frame bookkeeping columns' too."""
        stats = {layout.feature_name(key): s.to_json(self.buffer.n_steps) for key, s in self.stats.items()}
        lengths = np.diff(self.buffer.episode_ends, prepend=0)
        frame_index = np.concatenate([np.arange(n) for n in lengths])
        columns = {
            "timestamp": frame_index / self.fps,
            "frame_index": frame_index,
            "episode_index": np.repeat(np.arange(len(lengths)), lengths),
            "index": np.arange(self.buffer.n_steps),
            "task_index": np.repeat([self.task_index[t] for t in self.tasks], lengths),
        }
        for name, values in columns.items():
            column = _Stats(image=False)
            column.add(values)
            stats[name] = column.to_json(self.buffer.n_steps)
        return stats


def _png_column(frames: np.ndarray) -> pa.StructArray:
    """Frames `(T, H, W, 3)` as the struct<bytes, path> column of a Hugging Face `Image` feature."""
    data = pa.array([encode_png(frame) for frame in frames], pa.binary())
    return pa.StructArray.from_arrays([data, pa.nulls(len(frames), pa.string())], names=["bytes", "path"])


def _write_tasks(path: Path, task_index: dict[str, int]) -> None:
    """tasks.parquet with the task text as the pandas index (as LeRobot writes it)."""
    table = pa.table({"task_index": pa.array(list(task_index.values()), pa.int64()),
                      "task": pa.array(list(task_index), pa.string())})
    pandas_meta = {"index_columns": ["task"], "column_indexes": [], "columns": [
        {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
         "metadata": None},
        {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object", "metadata": None}],
        "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": "2.2.0"}
    pq.write_table(table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()}), path)


def _write_episodes(path: Path, rows: Sequence[dict], buffer: ReplayBuffer, meta_names: list[str]) -> None:
    columns = {name: [row[name] for row in rows] for name in rows[0]}
    arrays = {name: pa.array(values, pa.list_(pa.string()) if name == "tasks" else None)
              for name, values in columns.items()}
    for name in meta_names:
        values = buffer.episode_meta(name)
        if values.dtype == object:
            arrays[name] = pa.array(list(values), pa.string())
        elif values.ndim == 2:  # a per-episode vector (`final_obs.<key>`): a fixed-size list column
            arrays[name] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
        else:
            arrays[name] = pa.array(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(arrays), path)
