"""Scripted Lift expert: approach above the cube, descend, grasp, lift.

Multimodality (all from the seeded Generator): which pair of cube faces the fingers close on (the
cube is symmetric under quarter turns, so two grasp yaws within a quarter turn of the gripper),
an optional via point to one side, the approach height, the grasp depth, the lift height and the
episode's speed.
"""

from __future__ import annotations

import numpy as np

from diffpolicy.envs.experts.pick_place import Waypoint, WaypointExpert, body_yaw, constant, grasp_yaw_choices


class LiftExpert(WaypointExpert):
    """Closed-loop scripted expert for robosuite Lift (see `WaypointExpert`)."""

    env_name = "Lift"

    def plan(self, rng: np.random.Generator) -> list[Waypoint]:
        scene = self.scene
        cube = scene.rs.cube_body_id
        table_z = float(scene.rs.table_offset[2])

        def cube_pos() -> np.ndarray:
            return scene.body_pos(cube)

        choices = grasp_yaw_choices(body_yaw(scene.body_rot(cube)), np.pi / 2, scene.eef_yaw())
        grasp_yaw = choices[int(rng.integers(len(choices)))]
        yaw = constant(grasp_yaw)
        above = float(rng.uniform(0.05, 0.14))
        depth = float(rng.uniform(-0.006, 0.004))
        lift = float(rng.uniform(0.08, 0.16))
        # 0: fingers close on the cube's +-y faces (along its x axis), 1: on its +-x faces.
        face = int(round(((grasp_yaw - body_yaw(scene.body_rot(cube))) % np.pi) / (np.pi / 2))) % 2
        self.decisions = {"grasp_face": face, "approach_height": above}
        waypoints = []
        if rng.random() < 0.5:
            side = rng.uniform(-0.08, 0.08, size=2)
            height = float(rng.uniform(0.12, 0.2))
            start = scene.eef_pos()
            via = np.array([*(0.5 * (start[:2] + cube_pos()[:2]) + side), cube_pos()[2] + height])
            waypoints.append(Waypoint("via", constant(via), yaw, -1.0, tol=0.03, yaw_tol=np.pi))

        def not_held() -> bool:
            return float(np.linalg.norm(cube_pos() - scene.eef_pos())) > 0.03

        def lift_target() -> np.ndarray:
            return np.array([*scene.eef_pos()[:2], table_z + 0.025 + lift])

        waypoints += [
            Waypoint("above", lambda: cube_pos() + [0.0, 0.0, above], yaw, -1.0, tol=0.015),
            Waypoint("descend", lambda: cube_pos() + [0.0, 0.0, depth], yaw, -1.0, tol=0.006, hold=2,
                     speed=0.02),
            Waypoint("grasp", lambda: cube_pos() + [0.0, 0.0, depth], yaw, 1.0, tol=1.0, yaw_tol=np.pi,
                     hold=8),
            Waypoint("lift", lift_target, yaw, 1.0, tol=0.01, yaw_tol=np.pi, timeout=400, abort_if=not_held),
        ]
        return waypoints
