"""Episode storage on zarr in Diffusion Policy's layout, with crash-safe whole-episode appends.

Layout (identical to Diffusion Policy's `ReplayBuffer`, so its datasets open unchanged)::

    <root>                        attrs: JSON dict (task name, `env_args`, `diffpolicy_format`)
    <root>/data/<key>   (N, ...)  every episode concatenated along axis 0 (N = total steps)
    <root>/meta/episode_ends (E,) int64, cumulative exclusive end of each episode
    <root>/meta/<name>  (E,)      per-episode values (`seed`, `success`, `model_file`, ...)
    <root>/meta/<name>  (E, d)    per-episode vectors (`final_obs.<key>`: the observation after the
                                  episode's last action, which no step of `data/<key>` holds)

Per-episode meta arrays hold int64 / float64 / bool (or the numpy dtype the caller passed), one
value or one fixed-length vector per episode;
strings (e.g. a robosuite MJCF `model_file`) are a zarr variable-length UTF-8 string array with
one episode per chunk, so appending an episode never rewrites earlier strings.

Images (uint8 arrays with ndim 4, `(N, H, W, C)`) are chunked one frame per chunk; every data array
is zstd-compressed. New stores are written in zarr format 3 by default; format 2 (what Diffusion
Policy wrote) is read, appended to and, on request, written.

Commit protocol (single writer): `add_episodes` validates every episode it is given first, then
writes `data/*` (one resize and one write per key for all of them), then `meta/<name>`, and commits
by writing `meta/episode_ends` last; `add_episode` is its one-episode case. Readers trust only
`episode_ends`: data and meta arrays may be longer than it says (the orphaned tail of an append
that was killed), and the next append overwrites that tail. Each store write is an atomic file
replace (zarr's LocalStore), so the one torn state left is `episode_ends` resized but its new
entries not yet written; those entries read as the array's fill value (-1 for stores created here)
and are ignored as uncommitted. New entries that span two chunks of `episode_ends` may be written
one chunk only: the episodes that chunk names are whole (their data and meta were written before)
and count as committed, so a killed append leaves whole episodes, a prefix of those it was given.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr
import zarr.codecs
import zarr.storage

from diffpolicy.data.errors import DataFormatError, EpisodeError
from diffpolicy.episode_meta import FINAL_OBS
from diffpolicy.errors import (
    ExistingFileError,
    InvalidIndexError,
    InvalidTypeError,
    InvalidValueError,
    MissingFileError,
    MissingKeyError,
    ReadOnlyError,
)

FORMAT_INFO = {
    "name": "diffpolicy.replay_buffer",
    "version": 1,
    "layout": "diffusion_policy",
    "meta_strings": "variable-length UTF-8 string array, one episode per chunk",
}
EPISODE_ENDS = "episode_ends"
_ENDS_FILL = -1
_META_CHUNK = 1024
_LOW_DIM_CHUNK_BYTES = 256 * 1024
_ZSTD_LEVEL = 3


def stores_final_obs(buffer: "ReplayBuffer") -> bool:
    """Whether episodes appended to `buffer` carry `final_obs.*` meta: always in a new store, never in
    one whose episodes were stored without it (every episode of a store has the same meta names)."""
    return buffer.n_episodes == 0 or any(name.startswith(FINAL_OBS) for name in buffer.meta_keys())


def is_image_array(dtype: np.dtype, ndim: int) -> bool:
    """Image data is uint8 with ndim 4: `(N, H, W, C)`."""
    return np.dtype(dtype) == np.uint8 and ndim == 4


def default_chunks(frame: tuple[int, ...], dtype: np.dtype) -> tuple[int, ...]:
    """Chunk shape of a data array with per-step shape `frame`: one frame per chunk for images,
    about 256 KiB of consecutive steps otherwise."""
    if is_image_array(dtype, 1 + len(frame)):
        return (1, *frame)
    row_bytes = max(1, np.dtype(dtype).itemsize * int(np.prod(frame, dtype=np.int64)))
    return (max(1, _LOW_DIM_CHUNK_BYTES // row_bytes), *frame)


class StepArray:
    """Lazy read-only view of `data/<key>` limited to the committed steps `[0, n_steps)`.

    Supports `a[i]`, `a[start:stop(:step>0)]`, `a[int_array]` (any shape, duplicates and any
    order allowed), extra per-axis indices after the first, `len(a)` and `np.asarray(a)`.
    """

    def __init__(self, array: zarr.Array, n_steps: int, key: str):
        self._array = array
        self._n = n_steps
        self.key = key

    @property
    def shape(self) -> tuple[int, ...]:
        return (self._n, *self._array.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self._array.dtype

    @property
    def ndim(self) -> int:
        return self._array.ndim

    def __len__(self) -> int:
        return self._n

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self._array[: self._n]
        return out if dtype is None else out.astype(dtype)

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """Rows at integer `indices` (any shape S) -> `(*S, ...)`; one zarr read for all rows."""
        indices = np.asarray(indices)
        if indices.dtype.kind not in "iu":
            raise InvalidTypeError(f"data/{self.key}: indices must be integers, got dtype {indices.dtype}")
        flat = indices.reshape(-1)
        if flat.size and (flat.min() < -self._n or flat.max() >= self._n):
            raise InvalidIndexError(
                f"data/{self.key}: index out of range [-{self._n}, {self._n}) "
                f"(got min {flat.min()}, max {flat.max()})"
            )
        flat = np.where(flat < 0, flat + self._n, flat)
        unique, inverse = np.unique(flat, return_inverse=True)
        if not unique.size:
            rows = np.empty((0, *self._array.shape[1:]), self.dtype)
        elif unique[-1] - unique[0] + 1 == unique.size:  # one contiguous run: a plain slice
            rows = self._array[int(unique[0]) : int(unique[-1]) + 1]
        else:
            rows = self._array.get_orthogonal_selection((unique,))
        return rows[inverse].reshape(*indices.shape, *self._array.shape[1:])

    def __getitem__(self, index) -> np.ndarray:
        first, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        if isinstance(first, slice):
            start, stop, step = first.indices(self._n)
            if step < 1:
                raise InvalidIndexError(f"data/{self.key}: slice step must be positive, got {step}")
            return self._array[(slice(start, stop, step), *rest)]
        if isinstance(first, (int, np.integer)):
            if not -self._n <= first < self._n:
                raise InvalidIndexError(f"data/{self.key}: step {first} out of range for {self._n} steps")
            return self._array[(int(first) % self._n, *rest)]
        rows = self.gather(np.asarray(first))
        return rows[(slice(None),) * np.ndim(first) + tuple(rest)] if rest else rows


class ReplayBuffer:
    """Episodes on a zarr store (see the module docstring for the layout and commit protocol).

    Use `ReplayBuffer.create(path)` or `ReplayBuffer.open(path, mode)`; not thread/process safe
    for more than one writer.
    """

    def __init__(self, group: zarr.Group, path: Path, store=None, cache_low_dim: bool = False,
                 image_cache_bytes: int = 0):
        self._group = group
        self.path = path
        self._store = store
        self._cache_low_dim = cache_low_dim
        self._cache: dict[str, np.ndarray] = {}
        self._ends = self._read_committed_ends()
        self._check_lengths()
        self._cache_images = image_cache_bytes > 0 and 0 < self.image_bytes() <= image_cache_bytes
        if cache_low_dim or self._cache_images:
            for key in self.keys():
                self[key]

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        overwrite: bool = False,
        zarr_format: int = 3,
        attrs: Mapping[str, Any] | None = None,
    ) -> "ReplayBuffer":
        """Create an empty store at `path` (zarr format 3, or 2 for Diffusion Policy tools)."""
        path = Path(path)
        if zarr_format not in (2, 3):
            raise InvalidValueError(f"zarr_format must be 2 or 3, got {zarr_format!r}")
        if path.exists() and not overwrite:
            raise ExistingFileError(f"{path} already exists; pass overwrite=True to replace it")
        group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
        group.attrs.update({"diffpolicy_format": FORMAT_INFO, **dict(attrs or {})})
        group.require_group("data")
        meta = group.require_group("meta")
        meta.create_array(
            EPISODE_ENDS, shape=(0,), dtype=np.int64, chunks=(_META_CHUNK,), fill_value=_ENDS_FILL
        )
        return cls(group, path)

    @classmethod
    def open(
        cls, path: str | os.PathLike, mode: str = "r", cache_low_dim: bool = False, image_cache_bytes: int = 0
    ) -> "ReplayBuffer":
        """Open an existing store (zarr v2 or v3; a `.zip` file read-only).

        mode: "r" read-only, "a" read and append. cache_low_dim: keep every non-image data array
        (see `is_image_array`) in memory. image_cache_bytes: read the image arrays into memory too
        when all of them together (`image_bytes()`, decompressed) fit in this many bytes; otherwise
        (and by default) images stay on disk and each read decompresses its frames.
        """
        if isinstance(image_cache_bytes, bool) or not isinstance(image_cache_bytes, int) or image_cache_bytes < 0:
            raise InvalidValueError(f"image_cache_bytes must be an int >= 0, got {image_cache_bytes!r}")
        path = Path(path)
        if mode not in ("r", "a"):
            raise InvalidValueError(f"mode must be 'r' or 'a', got {mode!r}")
        if not path.exists():
            raise MissingFileError(f"no replay buffer at {path}")
        store = None
        if path.is_file() and path.suffix == ".zip":
            if mode != "r":
                raise InvalidValueError(f"{path}: zip stores open read-only (mode='r'), got mode={mode!r}")
            store = zarr.storage.ZipStore(path, mode="r")
        try:
            group = zarr.open_group(store if store is not None else str(path),
                                    mode="r" if mode == "r" else "r+")
        except (FileNotFoundError, zarr.errors.BaseZarrError) as err:
            raise DataFormatError(f"{path} is not a zarr group: {err}") from err
        for required in ("data", f"meta/{EPISODE_ENDS}"):
            if required not in group:
                raise DataFormatError(
                    f"{path} is missing '{required}' (Diffusion Policy layout: data/<key> arrays "
                    f"and meta/{EPISODE_ENDS})"
                )
        return cls(group, path, store=store, cache_low_dim=cache_low_dim, image_cache_bytes=image_cache_bytes)

    def close(self) -> None:
        """Release the store (needed only for zip stores)."""
        if self._store is not None:
            self._store.close()

    def __enter__(self) -> "ReplayBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ reading
    @property
    def episode_ends(self) -> np.ndarray:
        """(E,) int64 committed cumulative episode ends (a read-only view)."""
        view = self._ends.view()
        view.flags.writeable = False
        return view

    @property
    def n_episodes(self) -> int:
        return len(self._ends)

    @property
    def n_steps(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    @property
    def attrs(self):
        """Root attributes: a persistent JSON mapping (task name, `env_args`, format info)."""
        return self._group.attrs

    def keys(self) -> list[str]:
        """Names of the `data/<key>` arrays, sorted."""
        return sorted(self._group["data"].array_keys())

    def meta_keys(self) -> list[str]:
        """Names of the per-episode `meta/<name>` arrays (without `episode_ends`), sorted."""
        return sorted(k for k in self._group["meta"].array_keys() if k != EPISODE_ENDS)

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    def __getitem__(self, key: str) -> np.ndarray | StepArray:
        """`data/<key>` over the committed steps: an in-memory array when cached, else lazy."""
        if key in self._cache:
            return self._cache[key]
        array = self._data_array(key)
        if self._cache_images if is_image_array(array.dtype, array.ndim) else self._cache_low_dim:
            self._cache[key] = array[: self.n_steps]
            return self._cache[key]
        return StepArray(array, self.n_steps, key)

    def image_bytes(self) -> int:
        """Decompressed size in bytes of the committed steps of every image array (`is_image_array`)."""
        arrays = [self._data_array(key) for key in self.keys()]
        return sum(self.n_steps * int(np.prod(a.shape[1:], dtype=np.int64)) * a.dtype.itemsize
                   for a in arrays if is_image_array(a.dtype, a.ndim))

    def episode_slice(self, index: int) -> slice:
        """Steps of episode `index` (negative counts from the end) as a slice of axis 0."""
        if not -self.n_episodes <= index < self.n_episodes:
            raise InvalidIndexError(f"{self.path}: episode {index} out of range for {self.n_episodes}")
        index %= self.n_episodes
        start = int(self._ends[index - 1]) if index > 0 else 0
        return slice(start, int(self._ends[index]))

    def get_episode(self, index: int) -> dict[str, np.ndarray]:
        """Every data key of episode `index` -> `(T, ...)` arrays."""
        steps = self.episode_slice(index)
        return {key: np.asarray(self[key][steps]) for key in self.keys()}

    def episode_meta(self, name: str) -> np.ndarray:
        """`(E,)` per-episode values of `meta/<name>`, `(E, d)` for vectors (strings come as an object
        array of str)."""
        if name not in self.meta_keys():
            raise MissingKeyError(f"{self.path}: no episode meta {name!r}; present: {self.meta_keys()}")
        return self._group["meta"][name][: self.n_episodes]

    def __repr__(self) -> str:
        return (f"ReplayBuffer({str(self.path)!r}, episodes={self.n_episodes}, "
                f"steps={self.n_steps}, keys={self.keys()})")

    # ------------------------------------------------------------------ appending
    def add_episode(
        self,
        data: Mapping[str, np.ndarray],
        meta: Mapping[str, int | float | bool | str] | None = None,
    ) -> None:
        """Append one whole episode atomically: `add_episodes([(data, meta)])`.

        data: key -> `(T, ...)` numeric array, same T >= 1 for every key, the same key set,
        trailing shape and (losslessly castable) dtype as the store; float data must be finite.
        meta: name -> scalar (int, float, bool, str) or numeric vector `(d,)` (finite when float),
        the same names, dtypes and lengths as earlier episodes.
        Nothing is written unless everything validates.
        """
        self.add_episodes([(data, meta)])

    def add_episodes(
        self,
        episodes: Sequence[tuple[Mapping[str, np.ndarray], Mapping[str, int | float | bool | str] | None]],
    ) -> None:
        """Append whole episodes `[(data, meta), ...]` in order, with one resize and one write per
        data key and per meta name for all of them (see `add_episode` for what each must be).

        Every episode is validated, against the store or, in an empty store, against the first
        episode given, before anything is written; a rejected one names its index in the list.
        A killed append leaves a prefix of the episodes committed, each whole (module docstring).
        """
        if self._group.read_only:
            raise ReadOnlyError(f"{self.path} is open read-only; open it with mode='a'")
        checked = self._validate_episodes(episodes)
        if not checked:
            return
        if self.n_episodes == 0:
            self._drop_orphans()
        lengths = np.array([length for _, _, length in checked], dtype=np.int64)
        new_ends = self.n_steps + np.cumsum(lengths)
        start, stop = self.n_steps, int(new_ends[-1])
        first_arrays, first_values, _ = checked[0]
        for key, value in first_arrays.items():
            target = self._require_data_array(key, value)
            target.resize((stop, *value.shape[1:]))
            target[start:stop] = np.concatenate([arrays[key].astype(target.dtype, copy=False)
                                                 for arrays, _, _ in checked])
            self._cache.pop(key, None)
        index, count = self.n_episodes, len(checked)
        for name, value in first_values.items():
            target = self._require_meta_array(name, value)
            target.resize((index + count, *value.shape))
            stored = object if value.dtype.kind == "U" else target.dtype
            target[index:] = np.stack([values[name] for _, values, _ in checked]).astype(stored)
        ends = self._group["meta"][EPISODE_ENDS]
        ends.resize((index + count,))
        ends[index:] = new_ends
        self._ends = np.concatenate([self._ends, new_ends])

    def check_episodes(
        self,
        episodes: Sequence[tuple[Mapping[str, np.ndarray], Mapping[str, int | float | bool | str] | None]],
    ) -> None:
        """Raise the EpisodeError `add_episodes(episodes)` would raise, writing nothing."""
        self._validate_episodes(episodes)

    # ------------------------------------------------------------------ internals
    def _data_array(self, key: str) -> zarr.Array:
        data = self._group["data"]
        if key not in data:
            raise MissingKeyError(f"{self.path}: no data key {key!r}; present: {self.keys()}")
        return data[key]

    def _read_committed_ends(self) -> np.ndarray:
        array = self._group["meta"][EPISODE_ENDS]
        ends = np.asarray(array[:]).astype(np.int64)
        fill = array.fill_value
        count = len(ends)
        # A trailing run of fill values after a larger entry (or filling the array) is entries
        # resized but never written: an append killed before its commit.
        if count and fill is not None and fill <= 0 and ends[count - 1] == fill:
            while count and ends[count - 1] == fill:
                count -= 1
            if count and ends[count - 1] < fill:
                count = len(ends)  # not a torn commit: the monotonicity check below names it
        ends = ends[:count]
        steps = np.diff(ends, prepend=0)
        if count and steps.min() < 0:
            bad = int(np.argmax(steps < 0))
            before = int(ends[bad - 1]) if bad else 0
            raise DataFormatError(
                f"{self.path}: meta/{EPISODE_ENDS} must be non-decreasing and non-negative; "
                f"entry {bad} is {int(ends[bad])} after {before}"
            )
        return ends

    def _check_lengths(self) -> None:
        for key in self.keys():
            length = self._group["data"][key].shape[0]
            if length < self.n_steps:
                raise DataFormatError(
                    f"{self.path}: data/{key} has {length} steps but meta/{EPISODE_ENDS} "
                    f"ends at {self.n_steps}"
                )
        for name in self.meta_keys():
            length = self._group["meta"][name].shape[0]
            if length < self.n_episodes:
                raise DataFormatError(
                    f"{self.path}: meta/{name} has {length} entries but meta/{EPISODE_ENDS} "
                    f"has {self.n_episodes} episodes"
                )

    def _validate_episodes(self, episodes) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]]:
        """Every `(data, meta)` pair checked against the store's layout, or in an empty store
        against the first pair's -> `(arrays, meta values, length)` per episode."""
        if isinstance(episodes, (Mapping, str, bytes)) or not isinstance(episodes, Sequence):
            raise EpisodeError(f"{self.path}: episodes must be a list of (data, meta) pairs, "
                               f"got {type(episodes).__name__}")
        layout = _Layout.of_store(self) if self.n_episodes else None
        checked = []
        for index, pair in enumerate(episodes):
            where = str(self.path) if len(episodes) == 1 else f"{self.path}: episode {index} of {len(episodes)}"
            if not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2:
                raise EpisodeError(f"{where}: expected a (data, meta) pair, got {type(pair).__name__}", index=index)
            data, meta = pair
            try:
                arrays, length = self._validate_data(data, layout, where)
                values = self._validate_meta(meta or {}, layout, where)
            except EpisodeError as err:
                raise EpisodeError(str(err), index=index) from None
            if layout is None:
                layout = _Layout.of_episode(arrays, values, "episode 0")
            checked.append((arrays, values, length))
        return checked

    def _validate_data(self, data: Mapping[str, np.ndarray], layout: _Layout | None,
                       where: str) -> tuple[dict[str, np.ndarray], int]:
        if not isinstance(data, Mapping) or not data:
            raise EpisodeError(f"{where}: episode data must be a non-empty dict of arrays")
        arrays = {_check_name(key, "data"): np.asarray(value) for key, value in data.items()}
        if layout is not None and set(arrays) != set(layout.frames):
            known = sorted(layout.frames)
            raise EpisodeError(
                f"{where}: episode keys {sorted(arrays)} differ from {layout.owner}'s "
                f"{known} (missing {sorted(set(known) - set(arrays))}, "
                f"unexpected {sorted(set(arrays) - set(known))})"
            )
        lengths = {key: (value.shape[0] if value.ndim else None) for key, value in arrays.items()}
        first_key = next(iter(arrays))
        length = lengths[first_key]
        for key, value in arrays.items():
            if value.ndim == 0 or lengths[key] != length or not lengths[key]:
                raise EpisodeError(
                    f"{where}: every data key needs the same length T >= 1 along axis 0; "
                    f"lengths {lengths}"
                )
            if value.dtype.kind not in "biuf":
                raise EpisodeError(
                    f"{where}: data key {key!r} must be numeric or bool, got dtype "
                    f"{value.dtype}"
                )
            if layout is not None:
                layout.check_data(key, value, where)
            if value.dtype.kind == "f":
                _check_finite(where, key, value)
        return arrays, int(length)

    def _validate_meta(self, meta: Mapping[str, Any], layout: _Layout | None, where: str) -> dict[str, np.ndarray]:
        values = {}
        for name, value in meta.items():
            _check_name(name, "meta")
            if name == EPISODE_ENDS:
                raise EpisodeError(f"{where}: meta name {EPISODE_ENDS!r} is reserved")
            array = np.asarray(value)
            if array.ndim > 1 or array.dtype.kind not in ("biufU" if array.ndim == 0 else "biuf"):
                raise EpisodeError(
                    f"{where}: episode meta {name!r} must be a scalar int, float, bool or "
                    f"str, or a numeric vector (d,), got {type(value).__name__} {array.dtype} shape {array.shape}"
                )
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise EpisodeError(f"{where}: episode meta {name!r} has a non-finite value: {array.tolist()}")
            values[name] = array
        if layout is not None:
            layout.check_meta(values, where)
        return values

    def _drop_orphans(self) -> None:
        """Before the first committed episode, every data/meta array is an orphan: remove it."""
        for key in self.keys():
            del self._group["data"][key]
        for name in self.meta_keys():
            del self._group["meta"][name]
        self._cache.clear()

    def _compressor(self):
        if self._group.metadata.zarr_format == 2:
            return numcodecs.Zstd(level=_ZSTD_LEVEL)
        return zarr.codecs.ZstdCodec(level=_ZSTD_LEVEL)

    def _require_data_array(self, key: str, value: np.ndarray) -> zarr.Array:
        data = self._group["data"]
        if key in data:
            return data[key]
        return data.create_array(
            key, shape=(0, *value.shape[1:]), dtype=value.dtype,
            chunks=default_chunks(value.shape[1:], value.dtype), compressors=self._compressor(),
        )

    def _require_meta_array(self, name: str, value: np.ndarray) -> zarr.Array:
        meta = self._group["meta"]
        if name in meta:
            return meta[name]
        if value.dtype.kind == "U":
            return meta.create_array(name, shape=(0,), dtype=str, chunks=(1,))
        return meta.create_array(name, shape=(0, *value.shape), dtype=value.dtype, chunks=(_META_CHUNK, *value.shape))


@dataclass(frozen=True)
class _Layout:
    """What an appended episode must match: per-step shape and dtype of each data key, per-episode
    shape and dtype of each meta name (object for strings), and whose layout it is (for messages)."""

    frames: dict[str, tuple[tuple[int, ...], np.dtype]]
    meta: dict[str, tuple[tuple[int, ...], np.dtype]]
    owner: str

    @classmethod
    def of_store(cls, buffer: "ReplayBuffer") -> "_Layout":
        data, meta = buffer._group["data"], buffer._group["meta"]
        return cls({key: (tuple(data[key].shape[1:]), data[key].dtype) for key in buffer.keys()},
                   {name: (tuple(meta[name].shape[1:]), meta[name].dtype) for name in buffer.meta_keys()},
                   "the store")

    @classmethod
    def of_episode(cls, arrays: dict[str, np.ndarray], values: dict[str, np.ndarray], owner: str) -> "_Layout":
        return cls({key: (value.shape[1:], value.dtype) for key, value in arrays.items()},
                   {name: (value.shape, np.dtype(object) if value.dtype.kind == "U" else value.dtype)
                    for name, value in values.items()}, owner)

    def check_data(self, key: str, value: np.ndarray, where: str) -> None:
        frame, dtype = self.frames[key]
        if frame != value.shape[1:]:
            raise EpisodeError(
                f"{where}: data key {key!r} has per-step shape {value.shape[1:]}, {self.owner} "
                f"has {frame}"
            )
        if not np.can_cast(value.dtype, dtype, casting="safe"):
            raise EpisodeError(
                f"{where}: data key {key!r} has dtype {value.dtype}, {self.owner} holds "
                f"{dtype} (only lossless casts are allowed)"
            )

    def check_meta(self, values: dict[str, np.ndarray], where: str) -> None:
        if set(values) != set(self.meta):
            raise EpisodeError(
                f"{where}: episode meta names {sorted(values)} differ from {self.owner}'s "
                f"{sorted(self.meta)}"
            )
        for name, array in values.items():
            shape, stored = self.meta[name]
            if array.shape != shape:
                raise EpisodeError(f"{where}: episode meta {name!r} has shape {array.shape}, {self.owner} holds {shape}")
            is_str = array.dtype.kind == "U"
            if is_str != (stored == object) or (
                not is_str and not np.can_cast(array.dtype, stored, casting="safe")
            ):
                raise EpisodeError(
                    f"{where}: episode meta {name!r} has dtype {array.dtype}, {self.owner} "
                    f"holds {stored}"
                )


@contextmanager
def staged_store(out: str | os.PathLike, zarr_format: int = 3) -> Iterator[ReplayBuffer]:
    """A new store built under `<out>.partial` and renamed to `out` (replacing it) only when the
    block ends without an error; otherwise the partial store is removed and `out` is untouched.
    The importers build whole datasets with it, so nothing is ever half-written at `out`."""
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    try:
        yield ReplayBuffer.create(tmp, overwrite=True, zarr_format=zarr_format)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise EpisodeError(
            f"{where} names must be non-empty strings without '/' or a leading '.', got {name!r}"
        )
    return name


def _check_finite(where: str, key: str, value: np.ndarray) -> None:
    finite = np.isfinite(value)
    if not finite.all():
        index = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise EpisodeError(
            f"{where}: data key {key!r} has a non-finite value {value[index]} at index {index} "
            f"(step {index[0]})"
        )
