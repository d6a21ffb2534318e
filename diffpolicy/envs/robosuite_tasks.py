"""Robomimic-style robosuite tasks (Lift, Can, Square) behind the project's env contract.

`RobosuiteEnv(env_name="Lift")` builds one robosuite 1.5 environment (Panda arm, OSC pose
controller from the robot's default composite controller config, 20 Hz) once and reuses it across
resets. The gymnasium TimeLimit comes from the task card (`make_env`), not from robosuite.

- Actions `(7,)` in [-1, 1]: delta position (scaled by the controller to +-5 cm), delta
  axis-angle (+-0.5 rad, world frame), gripper (-1 open, +1 close).
- Observations: a `Dict` of robomimic's low-dim keys, float32:
  `robot0_eef_pos (3,)`, `robot0_eef_quat (4,)` (x, y, z, w), `robot0_gripper_qpos (2,)`,
  `object (Do,)` (robosuite's `object-state`: Lift 10, Can 14, Square 14).
  With `obs_type="image"` also one uint8 `(H, W, 3)` image per camera, `<camera>_image`, rendered
  offscreen (EGL under `MUJOCO_GL=egl`) and flipped upright as robomimic stores them.
- `info["is_success"]` is robosuite's `_check_success()` after every step; the step reward is
  robosuite's sparse reward. With `terminate_on_success` the episode ends at the first success
  (as robomimic demonstrations do).
- Rendering: shadows and reflections are off by default (`full_render_quality=False`): under
  software EGL the reflective table re-renders the scene and costs more than half of a frame.
- Seeding: robosuite draws some model properties when it builds the env (Lift: the cube's size)
  from its `seed` keyword, fixed to 0 by default so every build has the same model. It draws
  object placements and the robot's initial joint noise from `env.rng`,
  a numpy Generator also held by every placement sampler. `reset(seed=...)` hands gymnasium's
  `np_random` to all of them, so a seed fixes the initial state and unseeded resets continue the
  same stream.
- Observations are computed by this wrapper from the simulator state after each step (robosuite's
  own are sampled early in the step and partly one sample stale), so they are an exact function of
  the state: `get_state() -> (1 + nq + nv,)` float64 is the flattened MuJoCo state as robomimic
  stores it (time, qpos, qvel), and `set_state(state)` restores it and returns the same
  observation the step returned. `model_xml()` is the MJCF XML of the loaded model.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium  # noqa: E402
import numpy as np  # noqa: E402
from gymnasium import spaces  # noqa: E402

from diffpolicy.envs.robosuite_success import observed_success, sensor_starts  # noqa: E402
from diffpolicy.errors import InvalidValueError  # noqa: E402

TASK_ENV_NAMES = ("Lift", "PickPlaceCan", "NutAssemblySquare")
LOW_DIM_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")
DEFAULT_CAMERAS = ("agentview", "robot0_eye_in_hand")
OBS_TYPES = ("low_dim", "image")
ROBOT = "Panda"

# robosuite.make keyword arguments the wrapper decides itself; the rest pass through.
MANAGED_KWARGS = ("has_renderer", "has_offscreen_renderer", "use_camera_obs", "use_object_obs",
                  "ignore_done", "camera_names", "camera_heights", "camera_widths", "camera_depths")


def default_controller_config() -> dict[str, Any]:
    """The Panda's default robosuite 1.5 composite controller config (BASIC with an OSC_POSE arm)."""
    from robosuite.controllers import load_composite_controller_config

    return load_composite_controller_config(robot=ROBOT)


def robosuite_kwargs(
    obs_type: str = "low_dim",
    image_size: int | tuple[int, int] = 84,
    camera_names: tuple[str, ...] | list[str] = DEFAULT_CAMERAS,
    render_mode: str | None = None,
    **env_kwargs: Any,
) -> dict[str, Any]:
    """The full keyword arguments `robosuite.make(env_name, **kwargs)` receives (JSON-serialisable).

    `env_kwargs` (robots, controller_configs, control_freq, reward_shaping, ...) override the
    defaults; the keys in `MANAGED_KWARGS` are set from `obs_type`, `image_size`, `camera_names`.
    """
    if obs_type not in OBS_TYPES:
        raise InvalidValueError(f"RobosuiteEnv: obs_type must be one of {OBS_TYPES}, got {obs_type!r}")
    managed = sorted(set(env_kwargs) & set(MANAGED_KWARGS))
    if managed:
        raise InvalidValueError(
            f"RobosuiteEnv: env kwargs {managed} are set by the wrapper; use obs_type / image_size / "
            "camera_names instead"
        )
    height, width = (image_size, image_size) if np.isscalar(image_size) else tuple(image_size)
    use_images = obs_type == "image"
    kwargs: dict[str, Any] = {
        "robots": [ROBOT],
        "controller_configs": default_controller_config(),
        "control_freq": 20,
        "reward_shaping": False,
        "hard_reset": False,
        "horizon": 1_000_000,  # robosuite's own horizon is unused: ignore_done, TimeLimit from the card
        "renderer": "mujoco",
        # Seeds robosuite's model building (Lift draws its cube size then), so every build of a task
        # has the same model; episodes are seeded separately by `reset(seed=...)`.
        "seed": 0,
    }
    kwargs.update(env_kwargs)
    kwargs.update(
        has_renderer=False,
        has_offscreen_renderer=use_images or render_mode == "rgb_array",
        use_camera_obs=use_images,
        use_object_obs=True,
        ignore_done=True,
        camera_names=list(camera_names),
        camera_heights=int(height),
        camera_widths=int(width),
        camera_depths=False,
    )
    return kwargs


def _share_rng(env: Any, rng: np.random.Generator) -> None:
    """Make `rng` the generator of a robosuite env and of all its placement samplers."""
    env.rng = rng
    stack = [getattr(env, "placement_initializer", None)]
    while stack:
        sampler = stack.pop()
        if sampler is None:
            continue
        sampler.rng = rng
        stack.extend(getattr(sampler, "samplers", {}).values())


class RobosuiteEnv(gymnasium.Env):
    """A robosuite manipulation task with a Dict observation of robomimic's keys.

    Args:
        env_name: "Lift", "PickPlaceCan" or "NutAssemblySquare".
        obs_type: "low_dim" (state keys) or "image" (state keys plus one image per camera).
        image_size: camera image size, an int or (height, width).
        camera_names: cameras rendered for `obs_type="image"`.
        render_mode: None or "rgb_array" (`render()` gives the agentview camera at `render_size`).
        render_size: (height, width) of `render()` frames.
        terminate_on_success: end the episode (terminated=True) at the first success.
        full_render_quality: keep MuJoCo's shadows and reflections in the offscreen cameras.
        **env_kwargs: further `robosuite.make` keyword arguments (e.g. `controller_configs`,
            `control_freq`, `lite_physics`); they are recorded in `env_args`, so keep them JSON.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self,
        env_name: str = "Lift",
        obs_type: str = "low_dim",
        image_size: int | tuple[int, int] = 84,
        camera_names: tuple[str, ...] | list[str] = DEFAULT_CAMERAS,
        render_mode: str | None = None,
        render_size: tuple[int, int] = (256, 256),
        terminate_on_success: bool = True,
        full_render_quality: bool = False,
        **env_kwargs: Any,
    ):
        if env_name not in TASK_ENV_NAMES:
            raise InvalidValueError(f"RobosuiteEnv: env_name must be one of {TASK_ENV_NAMES}, got {env_name!r}")
        if render_mode not in (None, "rgb_array"):
            raise InvalidValueError(f"RobosuiteEnv: render_mode must be None or 'rgb_array', got {render_mode!r}")
        import robosuite

        self.env_name = env_name
        self.obs_type = obs_type
        self.camera_names = tuple(camera_names)
        self.render_mode = render_mode
        self.render_size = tuple(int(s) for s in render_size)
        self.terminate_on_success = bool(terminate_on_success)
        self.full_render_quality = bool(full_render_quality)
        self.make_kwargs = robosuite_kwargs(obs_type, image_size, self.camera_names, render_mode, **env_kwargs)
        self._env = robosuite.make(env_name, **self.make_kwargs)
        self.metadata = {**self.metadata, "render_fps": int(self.make_kwargs["control_freq"])}
        self._take_over_observables()
        self._env.reset()
        self._model_xml = self._env.sim.model.get_xml()
        self._configure_renderer()
        self._success_rule = observed_success(env_name, self._env, self._object_sensors)
        obs = self._observe()
        space = {
            key: spaces.Box(-np.inf, np.inf, shape=obs[key].shape, dtype=np.float32) for key in LOW_DIM_KEYS
        }
        for key in self.image_keys:
            space[key] = spaces.Box(0, 255, shape=obs[key].shape, dtype=np.uint8)
        self.observation_space = spaces.Dict(space)
        low, high = self._env.action_spec
        self.action_space = spaces.Box(low.astype(np.float32), high.astype(np.float32), dtype=np.float32)

    # ------------------------------------------------------------------ properties
    @property
    def robosuite_env(self) -> Any:
        """The wrapped robosuite environment (privileged access for experts and replay)."""
        return self._env

    @property
    def image_keys(self) -> tuple[str, ...]:
        return tuple(f"{cam}_image" for cam in self.camera_names) if self.obs_type == "image" else ()

    @property
    def dt(self) -> float:
        """Seconds of simulated time per `step` (the control period)."""
        return float(self._env.control_timestep)

    @property
    def state_dim(self) -> int:
        """Length of `get_state()`: 1 + nq + nv (time, qpos, qvel)."""
        model = self._env.sim.model
        return int(1 + model.nq + model.nv)

    # ------------------------------------------------------------------ gymnasium API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        _share_rng(self._env, self.np_random)
        self._env.reset()
        obs = self._observe()
        if self._env.hard_reset:  # a hard reset reloads the model and makes a new render context
            self._model_xml = self._env.sim.model.get_xml()
            self._configure_renderer()
        return obs, {"is_success": bool(self._env._check_success())}

    def step(self, action: np.ndarray):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != self.action_space.shape:
            raise InvalidValueError(
                f"{self.env_name} step: expected an action of shape {self.action_space.shape}, got {action.shape}"
            )
        if not np.all(np.isfinite(action)):
            raise InvalidValueError(f"{self.env_name} step: action has non-finite entries: {action}")
        action = np.clip(action, -1.0, 1.0)
        self._env.step(action)
        # With lite physics the last substep leaves positions one substep behind qpos; recompute
        # them so observations, reward and success are functions of `get_state()`.
        self._env.sim.forward()
        reward = self._env.reward(action)
        success = bool(self._env._check_success())
        terminated = success and self.terminate_on_success
        return self._observe(), float(reward), terminated, False, {"is_success": success}

    def reward_from_observation(self, obs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The sparse reward and success `(N,)`, `(N,)` bool of low-dim observations `{"object": (N, Do),
        "robot0_eef_pos": (N, 3), ...}` by robosuite's own success check (`envs.robosuite_success`):
        what a world model's dream pays for the observations it predicts (`DreamConfig.task_reward`)."""
        return self._success_rule(obs)

    def canonical_quaternions(self) -> dict[str, list[int]]:
        """Where the observation's sign-ambiguous quaternions start, per key: the relative orientations
        (`<object>_to_robot0_eef_quat`), which robosuite computes with `mat2quat` (w >= 0), so they jump
        between q and -q near a half turn. A world model reads their rotation matrices instead
        (`worldmodel.rotations`). The absolute ones (`robot0_eef_quat`, `<object>_quat`) move continuously."""
        starts = sensor_starts(self._object_sensors)
        relative = [start for name, start in starts.items() if "_to_" in name and name.endswith("_quat")]
        return {"object": relative} if relative else {}

    def render(self) -> np.ndarray | None:
        """The agentview camera as uint8 `(H, W, 3)` when `render_mode="rgb_array"`."""
        if self.render_mode != "rgb_array":
            return None
        height, width = self.render_size
        frame = self._env.sim.render(width=width, height=height, camera_name="agentview")
        return np.ascontiguousarray(frame[::-1])

    def close(self) -> None:
        self._env.close()

    # ------------------------------------------------------------------ state replay
    def get_state(self) -> np.ndarray:
        """The flattened MuJoCo state `(1 + nq + nv,)` float64: time, qpos, qvel."""
        return np.asarray(self._env.sim.get_state().flatten(), dtype=np.float64)

    def set_state(self, state: np.ndarray) -> dict[str, np.ndarray]:
        """Restore a state from `get_state()` (or a robomimic `states` row); returns its observation."""
        state = np.asarray(state, dtype=np.float64)
        if state.shape != (self.state_dim,):
            model = self._env.sim.model
            raise InvalidValueError(
                f"{self.env_name} set_state: expected a flat state of shape ({self.state_dim},) "
                f"(time, nq={model.nq} qpos, nv={model.nv} qvel), got {state.shape}"
            )
        self._env.sim.set_state_from_flattened(state)
        self._env.sim.forward()
        return self._observe()

    def model_xml(self) -> str:
        """The MJCF XML of the loaded model (robomimic's per-episode `model_file`).

        MuJoCo can only save the *last model loaded in the process*, so the XML is captured right
        after this env loads its model; asking the simulator later could return another env's.
        """
        return self._model_xml

    # ------------------------------------------------------------------ helpers
    def _configure_renderer(self) -> None:
        """Turn shadows and reflections off in robosuite's offscreen context (if it made one)."""
        context = getattr(self._env.sim, "_render_context_offscreen", None)
        if context is None or self.full_render_quality:
            return
        import mujoco

        context.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        context.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0

    def _take_over_observables(self) -> None:
        """Compute observations from the simulator state ourselves; robosuite computes none.

        robosuite samples its observables at the first physics substep of a control step (not its
        end), and its relative-pose object sensors read the *previous* sample of the object pose
        from a cache, so its observations are not a function of the state `get_state()` returns.
        Here every observation is computed from the current state after the step (two passes over
        the sensors, so cached inputs are fresh) and images are rendered once per step.
        """
        observables = self._env._observables
        self._sensors = [(name, obs) for name, obs in observables.items()
                         if obs.is_enabled() and obs.modality != "image"]
        self._object_sensors = [name for name, obs in self._sensors if obs.modality == "object" and obs.is_active()]
        for observable in observables.values():
            observable.set_enabled(False)

    def _observe(self) -> dict[str, np.ndarray]:
        cache: dict[str, np.ndarray] = {}
        for _ in range(2):  # relative-pose sensors read other sensors' values from the cache
            for name, observable in self._sensors:
                cache[name] = np.asarray(observable._sensor(cache))
        obs = {key: cache[key].astype(np.float32) for key in LOW_DIM_KEYS[:-1]}
        obs["object"] = np.concatenate([np.ravel(cache[name]) for name in self._object_sensors]).astype(np.float32)
        height, width = self.make_kwargs["camera_heights"], self.make_kwargs["camera_widths"]
        for camera, key in zip(self.camera_names, self.image_keys):
            frame = self._env.sim.render(width=width, height=height, camera_name=camera)
            obs[key] = np.ascontiguousarray(frame[::-1])
        return obs
