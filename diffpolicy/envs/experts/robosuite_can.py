"""Scripted Can expert (robosuite PickPlaceCan): grasp the can from above, carry it over the
target bin's can compartment, lower it, release and move away.

Multimodality (all from the seeded Generator): the grasp yaw (the can is round, any yaw within a
third of a turn of the gripper's), the approach and carry heights, a via point on the way to the
target bin, where in the compartment the can is put down, the release height and the speed.
"""

from __future__ import annotations

import numpy as np

from diffpolicy.envs.experts.pick_place import Waypoint, WaypointExpert, constant


class CanExpert(WaypointExpert):
    """Closed-loop scripted expert for robosuite PickPlaceCan (see `WaypointExpert`)."""

    env_name = "PickPlaceCan"

    def plan(self, rng: np.random.Generator) -> list[Waypoint]:
        scene = self.scene
        rs = scene.rs
        can = rs.obj_body_id["Can"]
        goal = np.array(rs.target_bin_placements[rs.object_to_id["can"]], dtype=np.float64)
        bin_floor = float(rs.bin2_pos[2])

        def can_pos() -> np.ndarray:
            return scene.body_pos(can)

        grasp_yaw = scene.eef_yaw() + float(rng.uniform(-np.pi / 3, np.pi / 3))
        yaw = constant(grasp_yaw)
        above = float(rng.uniform(0.06, 0.14))
        grip_height = float(rng.uniform(0.005, 0.02))
        carry_z = bin_floor + float(rng.uniform(0.2, 0.26))
        # Near the compartment's corner closest to the robot: beyond it the Panda cannot keep the
        # gripper pointing down that low. The can (radius ~3.3 cm) stays clear of the walls.
        corner = goal[:2] - [0.0975, 0.1225]
        drop = corner + rng.uniform([0.035, 0.035], [0.065, 0.07])
        release_z = bin_floor + 0.07 + grip_height + float(rng.uniform(0.0, 0.03))
        via = np.array([*(rng.uniform(0.3, 0.7) * (drop - can_pos()[:2]) + can_pos()[:2]
                          + [rng.uniform(-0.1, 0.05), 0.0]), carry_z + rng.uniform(0.0, 0.08)])

        self.decisions = {"grasp_yaw": grasp_yaw, "drop_x": float(drop[0]), "drop_y": float(drop[1])}

        def not_held() -> bool:
            offset = can_pos() - scene.eef_pos()
            return float(np.linalg.norm(offset[:2])) > 0.03 or abs(offset[2] + grip_height) > 0.03

        def over(xy: np.ndarray, z: float):
            return lambda: np.array([xy[0], xy[1], z])

        return [
            Waypoint("above", lambda: can_pos() + [0.0, 0.0, above], yaw, -1.0, tol=0.015),
            Waypoint("descend", lambda: can_pos() + [0.0, 0.0, grip_height], yaw, -1.0, tol=0.006, hold=2,
                     speed=0.02),
            Waypoint("grasp", lambda: can_pos() + [0.0, 0.0, grip_height], yaw, 1.0, tol=1.0, yaw_tol=np.pi,
                     hold=8),
            Waypoint("lift", lambda: np.array([*scene.eef_pos()[:2], carry_z]), yaw, 1.0, tol=0.02,
                     yaw_tol=np.pi, abort_if=not_held),
            Waypoint("via", constant(via), yaw, 1.0, tol=0.04, yaw_tol=np.pi, abort_if=not_held),
            Waypoint("carry", over(drop, carry_z), yaw, 1.0, tol=0.015, yaw_tol=np.pi, abort_if=not_held),
            Waypoint("lower", over(drop, release_z), yaw, 1.0, tol=0.01, yaw_tol=np.pi, speed=0.02,
                     abort_if=not_held),
            Waypoint("release", over(drop, release_z), yaw, -1.0, tol=1.0, yaw_tol=np.pi, hold=6),
            Waypoint("retreat", over(drop, release_z + 0.15), yaw, -1.0, tol=0.01, yaw_tol=np.pi, timeout=400),
        ]
