"""robomimic `env_args` for the robosuite tasks: describe an env, and rebuild one from a description.

The format is robomimic's (stored as a JSON string in HDF5 `data.attrs["env_args"]`):

    {"env_name": "Lift", "type": 1, "env_version": "1.5.2",
     "env_kwargs": {<keyword arguments of robosuite.make>}}

`type` 1 means robosuite. Datasets recorded with robosuite <= 1.4 carry a part controller config
(`{"type": "OSC_POSE", ...}`) in `env_kwargs["controller_configs"]`; robosuite 1.5 needs a
composite config, so `make_env_from_env_args` converts it with robosuite's own
`refactor_composite_controller_config`.
"""

from __future__ import annotations

import copy
from typing import Any

from diffpolicy.envs.robosuite_tasks import (
    MANAGED_KWARGS,
    ROBOT,
    TASK_ENV_NAMES,
    RobosuiteEnv,
    robosuite_kwargs,
)
from diffpolicy.envs.tasks import TaskCard, resolve_entry_point
from diffpolicy.errors import InvalidValueError

ROBOSUITE_ENV_TYPE = 1
# env_kwargs a robomimic file may carry that only matter to an on-screen viewer or a GPU choice.
IGNORED_KWARGS = ("has_renderer", "render_camera", "render_gpu_device_id")


class EnvArgsError(InvalidValueError):
    """An `env_args` dict cannot be turned into one of the supported robosuite environments."""


def env_args_for(card_or_env: TaskCard | Any) -> dict[str, Any]:
    """robomimic `env_args` of a task card's environment or of a built `RobosuiteEnv`.

    A card is described without building its env (the kwargs are computed the same way the env
    computes them); an env (wrapped or not) is described by the kwargs it was built with.
    """
    import robosuite

    if isinstance(card_or_env, TaskCard):
        card = card_or_env
        env_cls = resolve_entry_point(card.env["entry_point"], f"{card.source}: env.entry_point")
        if not (isinstance(env_cls, type) and issubclass(env_cls, RobosuiteEnv)):
            raise EnvArgsError(
                f"{card.source}: env.entry_point {card.env['entry_point']!r} is not a RobosuiteEnv; "
                "robomimic env_args exist only for robosuite tasks"
            )
        kwargs = dict(card.env.get("kwargs", {}))
        env_name = kwargs.pop("env_name", "Lift")
        for own in ("render_size", "terminate_on_success", "full_render_quality"):
            kwargs.pop(own, None)
        make_kwargs = robosuite_kwargs(**kwargs)
    else:
        env = getattr(card_or_env, "unwrapped", card_or_env)
        if not isinstance(env, RobosuiteEnv):
            raise EnvArgsError(f"env_args_for: expected a TaskCard or a RobosuiteEnv, got {type(env).__name__}")
        env_name, make_kwargs = env.env_name, env.make_kwargs
    return {
        "env_name": env_name,
        "type": ROBOSUITE_ENV_TYPE,
        "env_version": robosuite.__version__,
        "env_kwargs": copy.deepcopy(make_kwargs),
    }


def make_env_from_env_args(env_args: dict[str, Any], **overrides: Any) -> RobosuiteEnv:
    """Rebuild a `RobosuiteEnv` from robomimic `env_args` (this package's or a robomimic dataset's).

    The observation type and camera settings come from `env_kwargs` (`use_camera_obs`,
    `camera_names`, `camera_heights`, `camera_widths`); `overrides` are `RobosuiteEnv` arguments
    that win over them (e.g. `obs_type="low_dim"` to replay an image dataset without rendering).
    Old (robosuite <= 1.4) part controller configs are converted to composite configs.
    """
    if not isinstance(env_args, dict):
        raise EnvArgsError(f"env_args: expected a dict, got {type(env_args).__name__}")
    missing = [key for key in ("env_name", "type", "env_kwargs") if key not in env_args]
    if missing:
        raise EnvArgsError(f"env_args: missing key(s) {missing}; got keys {sorted(env_args)}")
    if env_args["type"] != ROBOSUITE_ENV_TYPE:
        raise EnvArgsError(
            f"env_args['type']: expected {ROBOSUITE_ENV_TYPE} (robosuite), got {env_args['type']!r}; "
            "other robomimic env types (2 = gym, 3 = ig_momart) are not supported"
        )
    env_name = env_args["env_name"]
    if env_name not in TASK_ENV_NAMES:
        raise EnvArgsError(f"env_args['env_name']: expected one of {TASK_ENV_NAMES}, got {env_name!r}")
    env_kwargs = env_args["env_kwargs"]
    if not isinstance(env_kwargs, dict):
        raise EnvArgsError(f"env_args['env_kwargs']: expected a dict, got {type(env_kwargs).__name__}")

    kwargs = copy.deepcopy(env_kwargs)
    robots = kwargs.get("robots", [ROBOT])
    robots = [robots] if isinstance(robots, str) else list(robots)
    if robots != [ROBOT]:
        raise EnvArgsError(f"env_args['env_kwargs']['robots']: expected [{ROBOT!r}], got {robots!r}")
    kwargs["robots"] = robots
    if "controller_configs" in kwargs:
        kwargs["controller_configs"] = composite_controller_config(kwargs["controller_configs"])
    if kwargs.get("camera_depths"):
        raise EnvArgsError("env_args['env_kwargs']['camera_depths']: depth images are not supported, got true")

    options: dict[str, Any] = {"obs_type": "image" if kwargs.get("use_camera_obs") else "low_dim"}
    if "camera_names" in kwargs:
        names = kwargs["camera_names"]
        options["camera_names"] = [names] if isinstance(names, str) else list(names)
    if "camera_heights" in kwargs or "camera_widths" in kwargs:
        height = kwargs.get("camera_heights", kwargs.get("camera_widths"))
        options["image_size"] = (int(height), int(kwargs.get("camera_widths", height)))
    for key in (*MANAGED_KWARGS, *IGNORED_KWARGS):
        kwargs.pop(key, None)
    return RobosuiteEnv(env_name=env_name, **{**kwargs, **options, **overrides})


def composite_controller_config(config: dict[str, Any]) -> dict[str, Any]:
    """A robosuite 1.5 composite controller config; robosuite <= 1.4 part configs are converted.

    `{"type": "OSC_POSE", ...}` becomes the Panda's default composite config with that part config
    as its right arm (and a GRIP gripper), with old key names renamed (`rename_old_part_keys`); a
    composite config (with `body_parts`) is returned as is.
    """
    from robosuite.controllers.composite.composite_controller_factory import (
        is_part_controller_config,
        refactor_composite_controller_config,
    )

    if not isinstance(config, dict) or "type" not in config:
        raise EnvArgsError(
            "env_args['env_kwargs']['controller_configs']: expected a dict with a 'type' "
            f"(a composite config or a robosuite <= 1.4 part config such as OSC_POSE), got {config!r}"
        )
    if "body_parts" not in config and not is_part_controller_config(config):
        raise EnvArgsError(
            f"env_args['env_kwargs']['controller_configs']: unknown controller type {config['type']!r} "
            "without 'body_parts'; expected a composite config or a part config "
            "(OSC_POSE, OSC_POSITION, IK_POSE, JOINT_POSITION, JOINT_VELOCITY, JOINT_TORQUE)"
        )
    if "body_parts" in config:
        return copy.deepcopy(config)
    return refactor_composite_controller_config(rename_old_part_keys(config), ROBOT, ["right"])


# robosuite <= 1.4 (robomimic-era) OSC keys and their robosuite 1.5 names. The 1.5 controllers take
# **kwargs and silently ignore unknown keys, so an unrenamed `control_delta: false` would turn an
# absolute-pose dataset into a delta-pose environment.
OLD_PART_KEYS = {"damping": "damping_ratio", "damping_limits": "damping_ratio_limits"}


def rename_old_part_keys(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a part controller config with old key names moved to their robosuite 1.5 names."""
    out = copy.deepcopy(config)
    for old, new in OLD_PART_KEYS.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    if "control_delta" in out:
        delta = out.pop("control_delta")
        out.setdefault("input_type", "delta" if delta else "absolute")
    return out
