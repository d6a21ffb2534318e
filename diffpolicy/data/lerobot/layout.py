"""The LeRobot dataset v3.0 layout, its `meta/info.json`, and numpy <-> Arrow columns.

    meta/info.json          codebase_version "v3.0", fps, robot_type, total_episodes, total_frames,
                            total_tasks, chunks_size, data_files_size_in_mb, video_files_size_in_mb,
                            splits, data_path, video_path (templates below), features:
                            {key: {dtype, shape, names[, info]}}
    meta/stats.json         {key: {min, max, mean, std, count}} over all frames (images: per
                            channel, shape (3, 1, 1), in [0, 1])
    meta/tasks.parquet      task (str, the pandas index) -> task_index (int64)
    meta/episodes/chunk-XXX/file-YYY.parquet
                            one row per episode: episode_index, tasks (list of str), length,
                            data/chunk_index, data/file_index, dataset_from_index, dataset_to_index
                            (global frame indices, to exclusive), videos/<key>/chunk_index,
                            videos/<key>/file_index, videos/<key>/from_timestamp, .../to_timestamp
                            (seconds in that video file), meta/episodes/chunk_index, file_index,
                            stats/<key>/<min|max|mean|std|count> (the episode's statistics)
    data/chunk-XXX/file-YYY.parquet
                            one row per frame: every non-video feature plus timestamp (float32,
                            seconds from the episode start), frame_index, episode_index, index
                            (global), task_index
    videos/<key>/chunk-XXX/file-YYY.mp4

A feature of shape [1] is a scalar column (a list column of one element is read too); shape
[D, ...] is a (nested) list column of that shape. dtype is a numpy dtype name, "video" (frames in the mp4s),
"image" (a struct<bytes, path> column of PNG / JPEG bytes, as Hugging Face `datasets.Image` writes
it) or "string" (not read here).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from diffpolicy.data.errors import DataFormatError
from diffpolicy.errors import MissingFileError

CODEBASE_VERSION = "v3.0"
INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
EPISODES_DIR = "meta/episodes"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = EPISODES_DIR + "/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
CHUNKS_SIZE = 1000  # files per chunk directory

# Per-frame bookkeeping columns every data file has (LeRobot's DEFAULT_FEATURES).
FRAME_FEATURES = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
# Per-episode columns of meta/episodes that are layout, not episode meta.
EPISODE_COLUMNS = ("episode_index", "tasks", "length", "dataset_from_index", "dataset_to_index")
EPISODE_PREFIXES = ("data/", "videos/", "meta/", "stats/")
REQUIRED_INFO = ("codebase_version", "fps", "features", "data_path")

# Buffer key <-> LeRobot feature: "action" and "reward" have LeRobot's names, every other key k is
# "observation.k". The import strips the prefix, so buffer -> LeRobot -> buffer keeps every name.
_RENAMED = {"action": "action", "reward": "next.reward"}
OBS_PREFIX = "observation."


def feature_name(key: str) -> str:
    """LeRobot feature name of buffer key `key`."""
    return _RENAMED.get(key, OBS_PREFIX + key)


def buffer_key(feature: str) -> str:
    """Buffer key of LeRobot feature `feature` (the inverse of `feature_name`)."""
    for key, name in _RENAMED.items():
        if feature == name:
            return key
    return feature[len(OBS_PREFIX):] if feature.startswith(OBS_PREFIX) else feature


def chunk_file(index: int, chunks_size: int = CHUNKS_SIZE) -> dict[str, int]:
    """The `chunk_index` / `file_index` of the `index`-th file of a kind."""
    return {"chunk_index": index // chunks_size, "file_index": index % chunks_size}


def read_info(root: Path) -> dict[str, Any]:
    """Read and check `root/meta/info.json` (version, required fields, feature entries)."""
    path = root / INFO_PATH
    if not path.is_file():
        raise MissingFileError(f"{root} is not a LeRobot dataset: {path} does not exist "
                               f"(LeRobot v3 keeps its schema in {INFO_PATH})")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path} is not valid JSON: {err}") from err
    missing = [field for field in REQUIRED_INFO if field not in info]
    if missing:
        raise DataFormatError(f"{path} lacks {missing}; LeRobot v3 info.json has {list(REQUIRED_INFO)}")
    version = str(info["codebase_version"])
    if not version.startswith("v3."):
        raise DataFormatError(f"{path}: codebase_version is {version!r}, expected {CODEBASE_VERSION!r} "
                              "(convert older datasets with LeRobot's convert_dataset_v21_to_v30)")
    if not isinstance(info["features"], dict) or not info["features"]:
        raise DataFormatError(f"{path}: 'features' must be a non-empty object, got {info['features']!r}")
    for key, feature in info["features"].items():
        if not isinstance(feature, dict) or "dtype" not in feature or "shape" not in feature:
            raise DataFormatError(f"{path}: features[{key!r}] needs 'dtype' and 'shape', got {feature!r}")
        if not all(isinstance(n, int) and n > 0 for n in feature["shape"]):
            raise DataFormatError(f"{path}: features[{key!r}].shape must be positive integers, "
                                  f"got {feature['shape']!r}")
        if feature["dtype"] == "video" and not info.get("video_path"):
            raise DataFormatError(f"{path}: feature {key!r} is a video but info.json has no video_path")
    if not float(info["fps"]) > 0:
        raise DataFormatError(f"{path}: fps must be > 0, got {info['fps']!r}")
    return info


def to_arrow(values: np.ndarray) -> pa.Array:
    """`(T,)` and `(T, 1)` -> a scalar column (LeRobot's shape [1]); `(T, d1, ..., dk)` -> nested
    fixed-size lists of that shape (shape [D]: a Hugging Face `Sequence(length=D)`)."""
    array = pa.array(np.ascontiguousarray(values).reshape(-1))
    if values.shape[1:] in ((), (1,)):
        return array
    for size in reversed(values.shape[1:]):
        array = pa.FixedSizeListArray.from_arrays(array, size)
    return array


def from_arrow(column: pa.ChunkedArray | pa.Array, where: str) -> np.ndarray:
    """A (nested) list or scalar column -> `(T, ...)` numpy array; every row must have the same
    shape (`where` names the file and key in the error)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    shape = [len(array)]
    while pa.types.is_list(array.type) or pa.types.is_large_list(array.type) or \
            pa.types.is_fixed_size_list(array.type):
        if array.null_count:
            raise DataFormatError(f"{where}: {array.null_count} null rows")
        if pa.types.is_fixed_size_list(array.type):
            size = array.type.list_size
        else:
            lengths = np.diff(np.asarray(array.offsets))
            if len(lengths) and (lengths != lengths[0]).any():
                raise DataFormatError(f"{where}: rows have different lengths "
                                      f"{sorted(set(lengths.tolist()))[:5]}; expected one shape per feature")
            size = int(lengths[0]) if len(lengths) else 0
        shape.append(size)
        array = array.flatten()
    if array.null_count:
        raise DataFormatError(f"{where}: {array.null_count} null values")
    try:
        values = array.to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise DataFormatError(f"{where}: column of type {column.type} is not numeric: {err}") from err
    return values.reshape(shape)


def check_column(values: np.ndarray, feature: dict, where: str) -> None:
    """The column read from parquet must match its info.json feature: dtype and shape."""
    expected = [int(n) for n in feature["shape"]]
    got = list(values.shape[1:]) or [1]
    if got != expected:
        raise DataFormatError(f"{where}: info.json says shape {expected}, the parquet column has "
                              f"{got} per frame")
    if np.dtype(feature["dtype"]) != values.dtype:
        raise DataFormatError(f"{where}: info.json says dtype {feature['dtype']}, the parquet column "
                              f"holds {values.dtype}")


def check_image_shape(feature: dict, where: str) -> None:
    """A video or image feature must be `[height, width, 3]`."""
    shape = list(feature["shape"])
    if len(shape) != 3 or shape[2] != 3:
        raise DataFormatError(f"{where}: {feature['dtype']} shape {shape} (names {feature.get('names')}); "
                              "expected [height, width, 3]")


def numeric_dtype(feature: dict, where: str) -> np.dtype:
    """The numpy dtype of a numeric feature (an error for "string" and other non-numeric dtypes)."""
    try:
        dtype = np.dtype(feature["dtype"])
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in "biuf":
        raise DataFormatError(f"{where}: dtype {feature['dtype']!r} is not supported (numeric dtypes, "
                              "'video' and 'image' are)")
    return dtype
