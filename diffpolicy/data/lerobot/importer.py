"""Import a LeRobot v3.0 dataset directory into a new `ReplayBuffer` (pyarrow and PyAV).

Every numeric feature except LeRobot's per-frame bookkeeping (timestamp, frame_index, ...) becomes
the data key `layout.buffer_key(feature)`; video and image (PNG / JPEG in the parquet) features are
decoded to uint8 `(T, H, W, 3)`.
Episodes are appended whole, in `episode_index` order. A dataset written by `export_lerobot`
gets its root attributes and episode meta back exactly; for any other dataset the buffer gets the
root attribute `lerobot` (fps, robot_type, codebase_version, tasks) and the episode meta `task`
(the episode's task texts joined by newlines) plus every extra scalar column of `meta/episodes/`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from diffpolicy.data.errors import DataFormatError, EpisodeError
from diffpolicy.data.lerobot import layout
from diffpolicy.data.lerobot.video import decode_image, read_frames
from diffpolicy.data.replay_buffer import ReplayBuffer, staged_store
from diffpolicy.errors import ExistingFileError, MissingFileError


def import_lerobot(
    src: str | os.PathLike,
    out_zarr: str | os.PathLike,
    overwrite: bool = False,
    zarr_format: int = 3,
) -> ReplayBuffer:
    """Read the LeRobot v3 dataset at `src` into a new store at `out_zarr` (built under a temporary
    name, renamed when complete) and return it opened read-only."""
    src, out_zarr = Path(src), Path(out_zarr)
    if not src.is_dir():
        raise MissingFileError(f"no LeRobot dataset directory at {src}")
    if out_zarr.exists() and not overwrite:
        raise ExistingFileError(f"{out_zarr} already exists; pass overwrite=True to replace it")
    info = layout.read_info(src)
    info_path = src / layout.INFO_PATH
    features = {name: f for name, f in info["features"].items() if name not in layout.FRAME_FEATURES}
    for name, feature in features.items():
        if feature["dtype"] in ("video", "image"):
            layout.check_image_shape(feature, f"{info_path}: feature {name!r}")
        else:
            layout.numeric_dtype(feature, f"{info_path}: feature {name!r}")
    keys = {name: layout.buffer_key(name) for name in features}
    for name, key in keys.items():
        same = sorted(other for other, k in keys.items() if k == key)
        if len(same) > 1:
            raise DataFormatError(f"{info_path}: features {same} would all become the data key {key!r}")
    if "action" not in keys.values():
        raise DataFormatError(f"{info_path}: no 'action' feature; features are {sorted(info['features'])}")
    episodes = _read_episodes(src, features)
    own = info.get("diffpolicy")
    meta_names = own["episode_meta"] if own else [c for c in episodes.column_names if _is_meta_column(episodes, c)]
    with staged_store(out_zarr, zarr_format) as buffer:
        buffer.attrs.update(own["attrs"] if own else _foreign_attrs(src, info))
        reader = _DataReader(src, info, features)
        rows = episodes.to_pylist()
        meta_columns = {name: _meta_column(episodes, name, src) for name in meta_names}
        for position in np.argsort([row["episode_index"] for row in rows], kind="stable"):
            row = rows[position]
            data = reader.episode(row)
            meta = {name: column[position] for name, column in meta_columns.items()}
            if not own:
                meta.setdefault("task", "\n".join(row.get("tasks") or []))
            episode = {keys[name]: value for name, value in data.items()}
            if own:
                shapes = own.get("shapes", {})
                episode = {key: _restore_shape(value, shapes.get(key), src) for key, value in episode.items()}
            try:
                buffer.add_episode(episode, meta)
            except EpisodeError as err:
                raise DataFormatError(f"{src}: episode {row['episode_index']}: {err}") from err
        if buffer.n_steps != int(info.get("total_frames", buffer.n_steps)):
            raise DataFormatError(f"{info_path}: total_frames = {info['total_frames']} but the episodes hold "
                                  f"{buffer.n_steps} frames")
    return ReplayBuffer.open(out_zarr, mode="r")


def _is_meta_column(episodes: pa.Table, name: str) -> bool:
    """An extra scalar column of a foreign dataset's meta/episodes (not layout, not stats)."""
    kind = episodes.schema.field(name).type
    scalar = pa.types.is_string(kind) or pa.types.is_boolean(kind) or pa.types.is_integer(kind) or \
        pa.types.is_floating(kind)
    return scalar and name not in layout.EPISODE_COLUMNS and not name.startswith(layout.EPISODE_PREFIXES)


def _restore_shape(value: np.ndarray, shape: list[int] | None, src: Path) -> np.ndarray:
    """The per-step shape the exported store had (info.json's diffpolicy.shapes)."""
    if shape is None or list(value.shape[1:]) == list(shape):
        return value
    if int(np.prod(value.shape[1:])) != int(np.prod(shape)):
        raise DataFormatError(f"{src / layout.INFO_PATH}: diffpolicy.shapes says per-step shape {shape}, the data "
                              f"holds {list(value.shape[1:])}")
    return value.reshape(len(value), *shape)


def _meta_column(episodes: pa.Table, name: str, src: Path) -> np.ndarray:
    """(E,) values of the episode column `name` in their parquet dtype (strings as str); `(E, d)` for
    a fixed-size list column (a per-episode vector such as `final_obs.<key>`)."""
    if name not in episodes.column_names:
        raise DataFormatError(f"{src / layout.EPISODES_DIR}: no episode column {name!r} (info.json's "
                              f"diffpolicy.episode_meta lists it)")
    column = episodes[name].combine_chunks()
    vector = pa.types.is_fixed_size_list(column.type)
    value_type = column.type.value_type if vector else column.type
    if column.null_count or not (pa.types.is_boolean(value_type) or pa.types.is_integer(value_type)
                                 or pa.types.is_floating(value_type) or (pa.types.is_string(value_type) and not vector)):
        raise DataFormatError(f"{src / layout.EPISODES_DIR}: episode column {name!r} of type {column.type} "
                              f"is not a scalar int, float, bool or string column, or a fixed-size list of "
                              f"numbers, without nulls")
    if vector:
        return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)
    values = column.to_numpy(zero_copy_only=False)
    return values.astype(str) if pa.types.is_string(column.type) else values


def _read_episodes(src: Path, features: dict) -> pa.Table:
    """All `meta/episodes/chunk-*/file-*.parquet` rows as one table, with the columns checked."""
    directory = src / layout.EPISODES_DIR
    files = sorted(directory.glob("chunk-*/file-*.parquet"))
    if not files:
        raise MissingFileError(f"{src}: no episode metadata: {directory}/chunk-*/file-*.parquet does not exist")
    tables = []
    for path in files:
        table = pq.read_table(path)
        required = ["episode_index", "length", "data/chunk_index", "data/file_index",
                    "dataset_from_index", "dataset_to_index"]
        for name, feature in features.items():
            if feature["dtype"] == "video":
                required += [f"videos/{name}/{c}" for c in ("chunk_index", "file_index", "from_timestamp")]
        missing = [c for c in required if c not in table.column_names]
        if missing:
            raise DataFormatError(f"{path} lacks the episode columns {missing}")
        tables.append(table.select([c for c in table.column_names if not c.startswith("stats/")]))
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowInvalid as err:
        raise DataFormatError(f"{directory}: episode files disagree on their columns: {err}") from err


def _foreign_attrs(src: Path, info: dict) -> dict:
    tasks_path = src / layout.TASKS_PATH
    tasks: list[str] = []
    if tasks_path.is_file():
        table = pq.read_table(tasks_path)
        column = next((c for c in ("task", "__index_level_0__") if c in table.column_names), None)
        if column is None or "task_index" not in table.column_names:
            raise DataFormatError(f"{tasks_path} needs columns task (or the pandas index) and task_index; "
                                  f"has {table.column_names}")
        order = np.argsort(table["task_index"].to_numpy())
        tasks = [table[column].to_pylist()[i] for i in order]
    return {"lerobot": {"source": str(src), "codebase_version": info["codebase_version"], "fps": info["fps"],
                        "robot_type": info.get("robot_type"), "tasks": tasks}}


class _DataReader:
    """Reads one episode's frames: parquet columns (one data file cached at a time) and videos."""

    def __init__(self, src: Path, info: dict, features: dict):
        self.src, self.info, self.features = src, info, features
        self.fps = float(info["fps"])
        self._path: Path | None = None
        self._table: pa.Table | None = None

    def episode(self, row: dict) -> dict[str, np.ndarray]:
        index = int(row["episode_index"])
        path = self.src / self.info["data_path"].format(chunk_index=int(row["data/chunk_index"]),
                                                        file_index=int(row["data/file_index"]))
        table = self._load(path)
        if "episode_index" not in table.column_names:
            raise DataFormatError(f"{path} has no episode_index column")
        mask = np.asarray(table["episode_index"].combine_chunks().to_numpy(zero_copy_only=False)) == index
        frames = table.filter(pa.array(mask))
        length = int(row["length"])
        where = f"{path} (episode {index})"
        if frames.num_rows != length or int(row["dataset_to_index"]) - int(row["dataset_from_index"]) != length:
            raise DataFormatError(f"{where}: meta/episodes says length {length} (frames "
                                  f"{row['dataset_from_index']}..{row['dataset_to_index']}), the data file holds "
                                  f"{frames.num_rows} frames of the episode")
        if "frame_index" in frames.column_names:
            order = frames["frame_index"].to_numpy()
            if not np.array_equal(order, np.arange(length)):
                raise DataFormatError(f"{where}: frame_index is not 0..{length - 1} in order")
        data = {}
        for name, feature in self.features.items():
            if feature["dtype"] == "video":
                data[name] = self._video(name, feature, row, frames, where)
                continue
            if name not in frames.column_names:
                raise DataFormatError(f"{path}: info.json lists feature {name!r} but the parquet file has no such "
                                      f"column (columns: {frames.column_names})")
            if feature["dtype"] == "image":
                data[name] = _images(frames[name], feature, f"{path}: column {name!r}")
                continue
            values = layout.from_arrow(frames[name], f"{path}: column {name!r}")
            layout.check_column(values, feature, f"{path}: column {name!r}")
            data[name] = values
        return data

    def _load(self, path: Path) -> pa.Table:
        if path != self._path:
            if not path.is_file():
                raise MissingFileError(f"{self.src}: data file {path} named by meta/episodes does not exist")
            table = pq.read_table(path)
            known = set(self.info["features"])
            extra = [c for c in table.column_names if c not in known]
            if extra:
                raise DataFormatError(f"{path}: columns {extra} are not features of {self.src / layout.INFO_PATH}")
            self._path, self._table = path, table
        return self._table

    def _video(self, name: str, feature: dict, row: dict, frames: pa.Table, where: str) -> np.ndarray:
        path = self.src / self.info["video_path"].format(video_key=name,
                                                         chunk_index=int(row[f"videos/{name}/chunk_index"]),
                                                         file_index=int(row[f"videos/{name}/file_index"]))
        if "timestamp" in frames.column_names:
            timestamps = frames["timestamp"].to_numpy().astype(np.float64)
        else:
            timestamps = np.arange(frames.num_rows) / self.fps
        return read_frames(path, name, float(row[f"videos/{name}/from_timestamp"]), timestamps, self.fps,
                           tuple(feature["shape"]), where)


def _images(column: pa.ChunkedArray, feature: dict, where: str) -> np.ndarray:
    """An image feature's struct<bytes, path> column -> uint8 `(T, H, W, 3)`."""
    column = column.combine_chunks()
    if not pa.types.is_struct(column.type) or column.type.get_field_index("bytes") < 0:
        raise DataFormatError(f"{where}: an image feature's column must be struct<bytes, path>, got {column.type}")
    shape = tuple(feature["shape"])
    out = np.empty((len(column), *shape), dtype=np.uint8)
    for row, data in enumerate(column.field("bytes").to_pylist()):
        if data is None:
            raise DataFormatError(f"{where}: row {row} has no image bytes (images referenced by path are not read)")
        image = decode_image(data, f"{where} row {row}")
        if image.shape != shape:
            raise DataFormatError(f"{where} row {row}: the image is {list(image.shape)}, info.json says {list(shape)}")
        out[row] = image
    return out
