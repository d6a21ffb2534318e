"""robosuite's success checks of Lift, Can and Square as rules on low-dim observations.

robosuite decides success from the simulator (`_check_success`); a world model's dream only has
the observations it predicts. Each task's check is a box the object's position must lie in
(strictly), and for Can and Square a gripper that has let go: robosuite's reach term
`1 - tanh(10 d) < 0.6`, with d the distance between the end effector and the object. The boxes
are read from the built environment (bins, pegs, table), so they follow its model, and the
object's position is found in `object` by the environment's sensor layout:

- Lift: the cube more than 4 cm above the table top;
- Can: the can inside its compartment of the goal bin (less than 10 cm above the bin's base),
  gripper let go;
- Square: the nut within 3 cm of the square peg in x and y and less than 5 cm above the table,
  gripper let go.

The sparse reward of these tasks is 1 at success and 0 otherwise (robosuite's, `reward_shaping`
off, for one object).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from diffpolicy.errors import InvalidValueError

REACH_LIMIT = 0.6  # robosuite: success needs 1 - tanh(10 d) < 0.6 (the gripper away from the object)
POSITION_SENSOR = {"Lift": "cube_pos", "PickPlaceCan": "Can_pos", "NutAssemblySquare": "SquareNut_pos"}
SENSOR_SIZE = {"pos": 3, "quat": 4}  # by the sensor name's suffix


@dataclass(frozen=True)
class ObservedSuccess:
    """Success as a function of observations: `low < position < high` (per axis, strict), where the
    object's position is `object[:, start:start + 3]`, and, with `let_go`, the reach term below
    `REACH_LIMIT`."""

    start: int
    low: tuple[float, float, float]
    high: tuple[float, float, float]
    let_go: bool

    def __call__(self, obs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Reward and success `(N,)` float64, `(N,)` bool of observations `{"object": (N, Do),
        "robot0_eef_pos": (N, 3), ...}` (float32 or float64)."""
        for key in ("object", "robot0_eef_pos"):
            if key not in obs:
                raise InvalidValueError(f"robosuite reward_from_observation: needs the low-dim key {key!r}, "
                                        f"got keys {sorted(obs)}")
        position = np.asarray(obs["object"], dtype=np.float64)[:, self.start:self.start + 3]
        success = np.all((position > np.asarray(self.low)) & (position < np.asarray(self.high)), axis=1)
        if self.let_go:
            distance = np.linalg.norm(np.asarray(obs["robot0_eef_pos"], dtype=np.float64) - position, axis=1)
            success &= 1.0 - np.tanh(10.0 * distance) < REACH_LIMIT
        return success.astype(np.float64), success


def sensor_starts(object_sensors: list[str]) -> dict[str, int]:
    """Where each sensor starts in the `object` observation, which concatenates `object_sensors` in order."""
    starts, at = {}, 0
    for name in object_sensors:
        suffix = name.rsplit("_", 1)[-1]
        if suffix not in SENSOR_SIZE:
            raise InvalidValueError(f"robosuite object sensor {name!r}: unknown size (expected a name ending in "
                                    f"{sorted(SENSOR_SIZE)})")
        starts[name] = at
        at += SENSOR_SIZE[suffix]
    return starts


def position_start(env_name: str, object_sensors: list[str]) -> int:
    """Where the object's position `(3,)` starts in the `object` observation."""
    starts = sensor_starts(object_sensors)
    if POSITION_SENSOR[env_name] not in starts:
        raise InvalidValueError(f"observed_success: {env_name}'s object sensors {object_sensors} hold no "
                                f"{POSITION_SENSOR[env_name]!r}")
    return starts[POSITION_SENSOR[env_name]]


def observed_success(env_name: str, env: Any, object_sensors: list[str]) -> ObservedSuccess:
    """The success rule of robosuite environment `env` (built and reset) of task `env_name`, whose
    `object` observation concatenates `object_sensors`."""
    if env_name not in POSITION_SENSOR:
        raise InvalidValueError(f"observed_success: no success rule for robosuite task {env_name!r}")
    start = position_start(env_name, object_sensors)
    if env_name == "Lift":
        table = float(env.model.mujoco_arena.table_offset[2])
        return ObservedSuccess(start, (-np.inf, -np.inf, table + 0.04), (np.inf, np.inf, np.inf), let_go=False)
    if env_name == "PickPlaceCan":  # compartment `object_id` of the goal bin: its x / y half, by the id
        x, y, z = (float(v) for v in env.bin2_pos)
        half_x, half_y = float(env.bin_size[0]) / 2, float(env.bin_size[1]) / 2
        low_x = x - half_x if env.object_id in (0, 2) else x
        low_y = y - half_y if env.object_id < 2 else y
        return ObservedSuccess(start, (low_x, low_y, z), (low_x + half_x, low_y + half_y, z + 0.1), let_go=True)
    peg_x, peg_y, _ = (float(v) for v in env.sim.data.body_xpos[env.peg1_body_id])  # NutAssemblySquare
    table = float(env.table_offset[2])
    return ObservedSuccess(start, (peg_x - 0.03, peg_y - 0.03, -np.inf), (peg_x + 0.03, peg_y + 0.03, table + 0.05),
                           let_go=True)
