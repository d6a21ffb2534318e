"""Robomimic HDF5 interop: `export_robomimic(buffer, path)` and `import_robomimic(path, out_zarr)`.

Robomimic's layout (h5py)::

    data                    attrs: total (steps), env_args (JSON: env_name, type, env_version,
                                   env_kwargs; type 1 = robosuite)
    data/demo_<i>           attrs: num_samples, model_file (MJCF XML), other episode meta
    data/demo_<i>/actions   (N, A)      <- buffer key "action"
    data/demo_<i>/rewards   (N,)        <- buffer key "rewards" (zeros if the buffer has none)
    data/demo_<i>/dones     (N,)        <- buffer key "dones" (1 at the last step if none)
    data/demo_<i>/states    (N, S)      <- buffer key "states" (only if the buffer has it)
    data/demo_<i>/obs/<key>             <- every other buffer key
    data/demo_<i>/next_obs/<key>        obs shifted by one step, then the episode meta final_obs.<key> (or the last step repeated)
    mask/<filter>           (M,) bytes  demo names of a filter (e.g. train / valid)

Every per-episode meta value becomes a demo attribute; the buffer's other root attrs travel as
the JSON attr `data.attrs["diffpolicy_attrs"]` and `rewards`/`dones` filled in on export are
flagged with the dataset attr `diffpolicy_synthesized`, so zarr -> HDF5 -> zarr is bit-exact.
Filters map to the buffer root attr `filter_keys = {filter: [episode indices]}`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

from diffpolicy.data.errors import DataFormatError, EpisodeError
from diffpolicy.data.replay_buffer import ReplayBuffer, is_image_array, staged_store
from diffpolicy.episode_meta import FINAL_OBS
from diffpolicy.errors import ExistingFileError, InvalidValueError, MissingFileError

ACTION_KEY = "action"
DEMO_DATASETS = ("rewards", "dones", "states")
ROOT_ATTRS = "diffpolicy_attrs"
SYNTHESIZED = "diffpolicy_synthesized"
FILTER_KEYS = "filter_keys"
_DEMO_NAME = re.compile(r"^demo_(\d+)$")
_ENV_ARGS_FIELDS = ("env_name", "type", "env_kwargs")


def export_robomimic(
    buffer: ReplayBuffer,
    path: str | os.PathLike,
    env_args: Mapping | None = None,
    filter_keys: Mapping[str, Sequence[int]] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `buffer` as a robomimic HDF5 file at `path` (written to a temporary file, then
    renamed, so a failure leaves nothing behind).

    env_args: robomimic env metadata; default `buffer.attrs["env_args"]` (one of them is required).
    filter_keys: filter name -> episode indices; default `buffer.attrs["filter_keys"]`, if any.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ExistingFileError(f"{path} already exists; pass overwrite=True to replace it")
    attrs = dict(buffer.attrs)
    env_args = dict(env_args if env_args is not None else attrs.get("env_args") or {})
    if not env_args:
        raise DataFormatError(
            f"{buffer.path} has no 'env_args' root attribute; pass env_args= to export_robomimic"
        )
    _check_env_args(env_args, f"env_args for {path}")
    if ACTION_KEY not in buffer.keys():
        raise DataFormatError(f"{buffer.path}: robomimic needs data key {ACTION_KEY!r}; "
                              f"present: {buffer.keys()}")
    filters = dict(filter_keys if filter_keys is not None else attrs.get(FILTER_KEYS, {}))
    for name, episodes in filters.items():
        bad = [e for e in episodes if not 0 <= int(e) < buffer.n_episodes]
        if bad:
            raise InvalidValueError(f"filter {name!r} names episodes {bad} outside "
                             f"[0, {buffer.n_episodes})")
    if "num_samples" in buffer.meta_keys():
        raise DataFormatError(f"{buffer.path}: episode meta 'num_samples' would clash with "
                              "robomimic's demo attribute")
    extra_attrs = {k: v for k, v in attrs.items() if k not in ("env_args", FILTER_KEYS)}
    meta = {name: buffer.episode_meta(name) for name in buffer.meta_keys()}

    tmp = path.with_name(path.name + ".partial")
    try:
        with h5py.File(tmp, "w") as f:
            data = f.create_group("data")
            data.attrs["total"] = buffer.n_steps
            data.attrs["env_args"] = json.dumps(env_args)
            data.attrs[ROOT_ATTRS] = json.dumps(extra_attrs)
            for index in range(buffer.n_episodes):
                episode = buffer.get_episode(index)
                values = {name: column[index] for name, column in meta.items()}
                _write_demo(data.create_group(f"demo_{index}"), episode, values)
            for name, episodes in filters.items():
                names = [f"demo_{int(e)}".encode() for e in episodes]
                f.create_dataset(f"mask/{name}", data=np.array(names, dtype=bytes))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def import_robomimic(
    path: str | os.PathLike,
    out_zarr: str | os.PathLike,
    env_args: Mapping | None = None,
    overwrite: bool = False,
    zarr_format: int = 3,
) -> ReplayBuffer:
    """Read a robomimic HDF5 file into a new `ReplayBuffer` at `out_zarr` (opened read-only).

    `actions` -> data key "action", `obs/<key>` -> "<key>", `rewards`/`dones`/`states` keep their
    names, demo attrs (`model_file`, ...) -> episode meta, `env_args` -> root attr. env_args
    replaces the file's (required when the file has none). The store is built under a temporary
    name and renamed when complete.
    """
    path, out_zarr = Path(path), Path(out_zarr)
    if not path.is_file():
        raise MissingFileError(f"no robomimic HDF5 file at {path}")
    if out_zarr.exists() and not overwrite:
        raise ExistingFileError(f"{out_zarr} already exists; pass overwrite=True to replace it")
    with h5py.File(path, "r") as f:
        if "data" not in f:
            raise DataFormatError(f"{path} has no 'data' group (robomimic layout)")
        data = f["data"]
        demos = _demo_names(data, path)
        attrs = _root_attrs(data, path, env_args)
        masks = _read_masks(f, demos, path)
        if masks:
            attrs[FILTER_KEYS] = masks
        with staged_store(out_zarr, zarr_format) as buffer:
            buffer.attrs.update(attrs)
            total = 0
            for name in demos:
                episode, meta = _read_demo(data[name], f"{path}:data/{name}")
                try:
                    buffer.add_episode(episode, meta)
                except EpisodeError as err:
                    raise DataFormatError(f"{path}: data/{name}: {err}") from err
                total += len(episode[ACTION_KEY])
            if "total" in data.attrs and int(data.attrs["total"]) != total:
                raise DataFormatError(f"{path}: data attr total = {int(data.attrs['total'])} "
                                      f"but the demos hold {total} samples")
    return ReplayBuffer.open(out_zarr, mode="r")


def _write_demo(demo: h5py.Group, episode: dict[str, np.ndarray], meta: dict) -> None:
    length = len(episode[ACTION_KEY])
    demo.attrs["num_samples"] = length
    for name, value in meta.items():
        demo.attrs[name] = value
    demo.create_dataset("actions", data=episode[ACTION_KEY])
    synthesized = {
        "rewards": np.zeros(length, dtype=np.float64),
        "dones": (np.arange(length) == length - 1).astype(np.int64),
    }
    for key in DEMO_DATASETS:
        if key in episode:
            demo.create_dataset(key, data=episode[key])
        elif key in synthesized:
            demo.create_dataset(key, data=synthesized[key]).attrs[SYNTHESIZED] = True
    for key, value in episode.items():
        if key == ACTION_KEY or key in DEMO_DATASETS:
            continue
        final = meta.get(FINAL_OBS + key, value[-1])  # the observation after the last action, where kept
        following = np.concatenate([value[1:], np.asarray(final, value.dtype)[None]])
        for group, array in (("obs", value), ("next_obs", following)):
            options = {}
            if is_image_array(array.dtype, array.ndim):
                options = {"chunks": (1, *array.shape[1:]), "compression": "gzip"}
            demo.create_dataset(f"{group}/{key}", data=array, **options)


def _read_demo(demo: h5py.Group, where: str) -> tuple[dict[str, np.ndarray], dict]:
    if "actions" not in demo:
        raise DataFormatError(f"{where} has no 'actions' dataset")
    episode = {ACTION_KEY: demo["actions"][()]}
    for key in DEMO_DATASETS:
        if key in demo and not demo[key].attrs.get(SYNTHESIZED, False):
            episode[key] = demo[key][()]
    for key, dataset in demo["obs"].items() if "obs" in demo else ():
        if key in episode:
            raise DataFormatError(f"{where}: obs key {key!r} clashes with a top-level dataset")
        episode[key] = dataset[()]
    length = len(episode[ACTION_KEY])
    if "num_samples" in demo.attrs and int(demo.attrs["num_samples"]) != length:
        raise DataFormatError(f"{where}: num_samples = {int(demo.attrs['num_samples'])} but "
                              f"actions has {length} steps")
    meta = {}
    for name, value in demo.attrs.items():
        if name == "num_samples":
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        if np.ndim(value) > 1 or (np.ndim(value) == 1 and np.asarray(value).dtype.kind not in "biuf"):
            raise DataFormatError(f"{where}: demo attribute {name!r} is not a scalar or a numeric vector "
                                  f"(shape {np.shape(value)}, {np.asarray(value).dtype})")
        meta[name] = value
    return episode, meta


def _demo_names(data: h5py.Group, path: Path) -> list[str]:
    names = list(data.keys())
    bad = [name for name in names if not _DEMO_NAME.match(name)]
    if bad:
        raise DataFormatError(f"{path}: data holds {bad}; robomimic expects only demo_<i> groups")
    return sorted(names, key=lambda name: int(_DEMO_NAME.match(name).group(1)))


def _root_attrs(data: h5py.Group, path: Path, env_args: Mapping | None) -> dict:
    attrs = json.loads(data.attrs[ROOT_ATTRS]) if ROOT_ATTRS in data.attrs else {}
    attrs.pop("diffpolicy_format", None)  # the new store carries this code's format info
    if env_args is None:
        if "env_args" not in data.attrs:
            raise DataFormatError(f"{path}: data has no 'env_args' attribute (robomimic env "
                                  "metadata); pass env_args= to import_robomimic")
        try:
            env_args = json.loads(data.attrs["env_args"])
        except (json.JSONDecodeError, TypeError) as err:
            raise DataFormatError(f"{path}: data attr env_args is not valid JSON: {err}") from err
    _check_env_args(env_args, f"{path}: env_args")
    attrs["env_args"] = dict(env_args)
    return attrs


def _read_masks(f: h5py.File, demos: list[str], path: Path) -> dict[str, list[int]]:
    if "mask" not in f:
        return {}
    position = {name: index for index, name in enumerate(demos)}
    masks = {}
    for name, dataset in f["mask"].items():
        entries = [v.decode() if isinstance(v, bytes) else str(v) for v in dataset[()]]
        unknown = [entry for entry in entries if entry not in position]
        if unknown:
            raise DataFormatError(f"{path}: mask/{name} names unknown demos {unknown[:5]}")
        masks[name] = [position[entry] for entry in entries]
    return masks


def _check_env_args(env_args, where: str) -> None:
    if not isinstance(env_args, Mapping):
        raise DataFormatError(f"{where} must be a JSON object, got {type(env_args).__name__}")
    missing = [field for field in _ENV_ARGS_FIELDS if field not in env_args]
    if missing:
        raise DataFormatError(f"{where} lacks {missing} (robomimic needs env_name, type, "
                              f"env_kwargs); got keys {sorted(env_args)}")
