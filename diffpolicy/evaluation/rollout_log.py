"""Per-tick rollout logs people can look at: the `RolloutLogger` interface and its MCAP writer.

`evaluation.rollout.rollout(..., logger=...)` calls, for every episode it runs,
`begin_episode(episode, seed)`, then `log_tick(episode, tick)` once per executed action, then
`end_episode(episode, result)`. A `Tick` carries what the rollout knows at that control tick; the
real-time controller adds its own state in `Tick.controller` (a JSON-able dict: delay estimate,
mode, queue length...), so a new field needs no new logger method.

`McapRolloutLogger` writes one MCAP file per episode (`episode_<i>_seed_<seed>.mcap`, renamed into
place when the episode ends), JSON-encoded messages with JSON schemas, which Foxglove opens and
plots; message time is the tick's time in the episode (step / control rate). Topics:

    /observation/<key>   {step, value: [...]} for low-dim keys; foxglove.RawImage (rgb8) for images
    /action              {step, action: [Da]}            the executed action
    /chunk               {step, chunk: [[Da] x Tp], executed_from}, only on ticks that predicted one
    /reward              {step, reward, return, success, <info metrics, e.g. coverage>}
    /controller          Tick.controller, when present
    /render              foxglove.RawImage of the rendered scene, when the rollout records frames
    /episode             the episode's result (seed, success, return, length, coverage) at its end

`read_mcap(path)` reads such a file back (notebooks, tests).
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np


@dataclass
class Tick:
    """One control tick of one episode.

    observation: `{key: (...)}` the latest observation when the action was executed (at a tick that
    predicted a chunk, the last of the To observations the chunk was conditioned on).
    action: `(Da,)` the executed action. chunk: `(Tp, Da)` the chunk as predicted at this tick (None
    on ticks that executed a queued action); executed_from: index in `chunk` of the first action
    executed from it. metrics: scalar env metrics after the step (e.g. coverage). frame: rendered
    scene `(H, W, 3)` uint8 after the step, when the rollout records frames. controller: the
    controller's state at this tick (JSON-able), when a controller runs the episode.
    """

    step: int
    time_s: float
    observation: dict[str, np.ndarray]
    action: np.ndarray
    reward: float
    episode_return: float
    success: bool
    chunk: np.ndarray | None = None
    executed_from: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    frame: np.ndarray | None = None
    controller: dict[str, Any] | None = None


class RolloutLogger(Protocol):
    """Receives every tick of the episodes a rollout runs (see the module docstring)."""

    def begin_episode(self, episode: int, seed: int) -> None: ...

    def log_tick(self, episode: int, tick: Tick) -> None: ...

    def end_episode(self, episode: int, result: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


_TIME = {"type": "object", "properties": {"sec": {"type": "integer"}, "nsec": {"type": "integer"}}}
RAW_IMAGE_SCHEMA = {  # foxglove.RawImage, JSON encoding (data base64)
    "title": "foxglove.RawImage", "type": "object",
    "properties": {"timestamp": _TIME, "frame_id": {"type": "string"}, "width": {"type": "integer"},
                   "height": {"type": "integer"}, "encoding": {"type": "string"}, "step": {"type": "integer"},
                   "data": {"type": "string", "contentEncoding": "base64"}},
}
_SCHEMAS = {
    "diffpolicy.Value": {"type": "object", "properties": {"step": {"type": "integer"},
                                                          "value": {"type": "array", "items": {"type": "number"}}}},
    "diffpolicy.Action": {"type": "object", "properties": {"step": {"type": "integer"},
                                                           "action": {"type": "array", "items": {"type": "number"}}}},
    "diffpolicy.Chunk": {"type": "object", "properties": {
        "step": {"type": "integer"}, "executed_from": {"type": "integer"},
        "chunk": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}}},
    "diffpolicy.Reward": {"type": "object", "properties": {
        "step": {"type": "integer"}, "reward": {"type": "number"}, "return": {"type": "number"},
        "success": {"type": "boolean"}}, "additionalProperties": {"type": "number"}},
    "diffpolicy.Controller": {"type": "object", "properties": {"step": {"type": "integer"}},
                              "additionalProperties": True},
    "diffpolicy.Episode": {"type": "object", "additionalProperties": True},
    "foxglove.RawImage": RAW_IMAGE_SCHEMA,
}


def _is_image(value: np.ndarray) -> bool:
    return value.dtype == np.uint8 and value.ndim == 3 and value.shape[2] == 3


def _raw_image(image: np.ndarray, time_ns: int, frame_id: str) -> dict[str, Any]:
    height, width = image.shape[:2]
    return {"timestamp": {"sec": time_ns // 1_000_000_000, "nsec": time_ns % 1_000_000_000},
            "frame_id": frame_id, "width": int(width), "height": int(height), "encoding": "rgb8",
            "step": int(width) * 3, "data": base64.b64encode(np.ascontiguousarray(image).tobytes()).decode()}


class _EpisodeFile:
    """One episode's MCAP file: channels registered on first use, JSON messages."""

    def __init__(self, path: Path):
        from mcap.writer import Writer

        self.path = path
        self.tmp = path.with_name(path.name + ".partial")
        self._stream = open(self.tmp, "wb")
        self._writer = Writer(self._stream)
        self._writer.start(profile="", library="diffpolicy")
        self._schemas: dict[str, int] = {}
        self._channels: dict[str, int] = {}
        self._sequence = 0

    def write(self, topic: str, schema: str, message: dict[str, Any], time_ns: int) -> None:
        if topic not in self._channels:
            if schema not in self._schemas:
                self._schemas[schema] = self._writer.register_schema(
                    name=schema, encoding="jsonschema", data=json.dumps(_SCHEMAS[schema]).encode())
            self._channels[topic] = self._writer.register_channel(
                topic=topic, message_encoding="json", schema_id=self._schemas[schema])
        self._sequence += 1
        self._writer.add_message(self._channels[topic], log_time=time_ns, publish_time=time_ns,
                                 data=json.dumps(message).encode(), sequence=self._sequence)

    def finish(self) -> None:
        self._writer.finish()
        self._stream.flush()
        os.fsync(self._stream.fileno())
        self._stream.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self._stream.close()
        self.tmp.unlink(missing_ok=True)


class McapRolloutLogger:
    """`RolloutLogger` writing `out_dir/episode_<i>_seed_<seed>.mcap` for the first `episodes`
    episodes (all when None). Close it (or use it as a context manager) when the rollout is done:
    episodes still open then (an interrupted run) leave no file behind."""

    def __init__(self, out_dir: str | os.PathLike, episodes: int | None = None):
        self.out_dir = Path(out_dir)
        self.limit = episodes
        self.written: list[Path] = []
        self._open: dict[int, _EpisodeFile] = {}
        self._last_ns: dict[int, int] = {}

    def begin_episode(self, episode: int, seed: int) -> None:
        if self.limit is not None and episode >= self.limit:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._open[episode] = _EpisodeFile(self.out_dir / f"episode_{episode:03d}_seed_{seed}.mcap")
        self._last_ns[episode] = 0

    def log_tick(self, episode: int, tick: Tick) -> None:
        file = self._open.get(episode)
        if file is None:
            return
        ns = int(round(tick.time_s * 1e9))
        self._last_ns[episode] = ns
        step = int(tick.step)
        for key, value in tick.observation.items():
            value = np.asarray(value)
            if _is_image(value):
                file.write(f"/observation/{key}", "foxglove.RawImage", _raw_image(value, ns, key), ns)
            else:
                file.write(f"/observation/{key}", "diffpolicy.Value",
                           {"step": step, "value": value.reshape(-1).tolist()}, ns)
        file.write("/action", "diffpolicy.Action", {"step": step, "action": np.asarray(tick.action).tolist()}, ns)
        if tick.chunk is not None:
            file.write("/chunk", "diffpolicy.Chunk", {"step": step, "chunk": np.asarray(tick.chunk).tolist(),
                                                      "executed_from": int(tick.executed_from or 0)}, ns)
        file.write("/reward", "diffpolicy.Reward", {"step": step, "reward": float(tick.reward),
                                                    "return": float(tick.episode_return),
                                                    "success": bool(tick.success),
                                                    **{k: float(v) for k, v in tick.metrics.items()}}, ns)
        if tick.controller is not None:
            file.write("/controller", "diffpolicy.Controller", {"step": step, **tick.controller}, ns)
        if tick.frame is not None:
            file.write("/render", "foxglove.RawImage", _raw_image(np.asarray(tick.frame), ns, "render"), ns)

    def end_episode(self, episode: int, result: dict[str, Any]) -> None:
        file = self._open.pop(episode, None)
        if file is None:
            return
        file.write("/episode", "diffpolicy.Episode", dict(result), self._last_ns.pop(episode))
        file.finish()
        self.written.append(file.path)

    def close(self) -> None:
        for file in self._open.values():
            file.abort()
        self._open.clear()

    def __enter__(self) -> "McapRolloutLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_mcap(path: str | os.PathLike) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    """`{topic: [(log_time_ns, message), ...]}` of a JSON-encoded MCAP file, in file order."""
    from mcap.reader import make_reader

    topics: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    with open(path, "rb") as stream:
        for _, channel, message in make_reader(stream).iter_messages(log_time_order=False):
            topics.setdefault(channel.topic, []).append((message.log_time, json.loads(message.data)))
    return topics


def decode_raw_image(message: dict[str, Any]) -> np.ndarray:
    """A foxglove.RawImage message (rgb8) -> `(H, W, 3)` uint8."""
    data = np.frombuffer(base64.b64decode(message["data"]), dtype=np.uint8)
    return data.reshape(message["height"], message["width"], 3)
