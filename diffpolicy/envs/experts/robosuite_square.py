"""Scripted Square expert (robosuite NutAssemblySquare): grasp the square nut by its handle, lift
it, turn it square to the peg, bring its hole over the square peg, lower it down the peg, release.

The nut's pose in the hand is read back every step: the gripper yaw that squares the nut and the
gripper position that centres the hole over the peg are corrected for how the nut actually sits
(closed loop), so a nut that slipped or swung in the fingers still goes down the peg.

Multimodality (all from the seeded Generator): where along the handle the fingers close, the
approach and carry heights, a via point, which of the two nearest square orientations the nut is
turned to (the hole is symmetric under quarter turns; the handle then points a different way)
and the speed.
"""

from __future__ import annotations

import numpy as np

from diffpolicy.envs.experts.pick_place import (
    Waypoint,
    WaypointExpert,
    body_yaw,
    constant,
    grasp_yaw_choices,
    nearest_equivalent,
)

HANDLE_SITE = "SquareNut_handle_site"
NUT_HALF_HEIGHT = 0.01
REACHABLE_NUT_YAWS = (np.pi / 2, np.pi, -np.pi / 2)  # handle pointing left, at the robot, right
MAX_NUT_TURN = 2.0  # radians; at least two of the three yaws are always within it
MAX_WRIST = 2.5  # radians: Panda joint 7 stops at +-2.9


class SquareExpert(WaypointExpert):
    """Closed-loop scripted expert for robosuite NutAssemblySquare (see `WaypointExpert`)."""

    env_name = "NutAssemblySquare"

    def plan(self, rng: np.random.Generator) -> list[Waypoint]:
        scene = self.scene
        rs = scene.rs
        nut = rs.obj_body_id["SquareNut"]
        peg = scene.body_pos(rs.peg1_body_id)
        peg_top = float(peg[2] + 0.1)
        table_z = float(rs.table_offset[2])

        def nut_pos() -> np.ndarray:
            return scene.body_pos(nut)

        def nut_yaw() -> float:
            return body_yaw(scene.body_rot(nut))

        along = float(rng.uniform(0.0, 0.012))  # grasp point past the handle site, away from the ring

        def handle_point() -> np.ndarray:
            axis = scene.body_rot(nut)[:, 0]
            return scene.site_pos(HANDLE_SITE) + along * axis

        grasp_yaw_value = grasp_yaw_choices(nut_yaw() + np.pi / 2, np.pi, scene.eef_yaw())[0]
        grasp_yaw = constant(grasp_yaw_value)
        wrist_after_grasp = scene.wrist_angle() - (grasp_yaw_value - scene.eef_yaw())
        above = float(rng.uniform(0.06, 0.12))
        grip_height = float(rng.uniform(0.0, 0.005))
        carry_z = peg_top + float(rng.uniform(0.08, 0.14))

        # The peg is square to the world axes, so the nut fits at yaw 0, 90, 180 or 270 degrees; at 0
        # the handle (and the hand) would be beyond the peg, out of the Panda's reach.
        # Turning the nut turns the wrist joint the other way; keep it clear of its limit.
        start_yaw = nut_yaw()
        turns = {yaw: nearest_equivalent(yaw - start_yaw, 0.0, 2 * np.pi) for yaw in REACHABLE_NUT_YAWS}
        wrist = {yaw: abs(wrist_after_grasp - turn) for yaw, turn in turns.items()}
        options = [yaw for yaw, turn in turns.items() if abs(turn) <= MAX_NUT_TURN and wrist[yaw] <= MAX_WRIST]
        if not options:
            options = [min(wrist, key=wrist.get)]
        final_nut_yaw = float(options[int(rng.integers(len(options)))])
        self.decisions = {"final_nut_yaw": final_nut_yaw, "grasp_along_handle": along}

        def carry_yaw() -> float:
            turn = nearest_equivalent(final_nut_yaw - nut_yaw(), 0.0, 2 * np.pi)
            return scene.eef_yaw() + turn

        def over_peg(nut_z: float):
            def target() -> np.ndarray:
                hand_minus_nut = scene.eef_pos() - nut_pos()
                return np.array([*(peg[:2] + hand_minus_nut[:2]), nut_z + hand_minus_nut[2]])
            return target

        def not_held() -> bool:
            return float(np.linalg.norm(handle_point() - scene.eef_pos())) > 0.03

        via = np.array([*(0.5 * (nut_pos()[:2] + peg[:2]) + rng.uniform(-0.05, 0.05, size=2)),
                        carry_z + rng.uniform(0.0, 0.05)])
        hand_over_peg = peg_top + NUT_HALF_HEIGHT + float(rng.uniform(0.015, 0.03))
        return [
            Waypoint("above", lambda: handle_point() + [0.0, 0.0, above], grasp_yaw, -1.0, tol=0.015),
            Waypoint("descend", lambda: handle_point() + [0.0, 0.0, grip_height], grasp_yaw, -1.0, tol=0.005,
                     hold=2, speed=0.02),
            Waypoint("grasp", lambda: handle_point() + [0.0, 0.0, grip_height], grasp_yaw, 1.0, tol=1.0,
                     yaw_tol=np.pi, hold=8),
            Waypoint("lift", lambda: np.array([*scene.eef_pos()[:2], carry_z]), carry_yaw, 1.0, tol=0.02,
                     yaw_tol=np.pi, abort_if=not_held),
            Waypoint("via", constant(via), carry_yaw, 1.0, tol=0.04, yaw_tol=np.pi, abort_if=not_held),
            Waypoint("over_peg", over_peg(hand_over_peg), carry_yaw, 1.0, tol=0.01, yaw_tol=0.05,
                     abort_if=not_held),
            Waypoint("align", over_peg(hand_over_peg), carry_yaw, 1.0, tol=0.003, yaw_tol=0.03, hold=3,
                     speed=0.01, timeout=60, abort_if=not_held),
            Waypoint("insert", over_peg(table_z + NUT_HALF_HEIGHT + 0.005), carry_yaw, 1.0, tol=0.006,
                     yaw_tol=np.pi, speed=0.015, timeout=80, abort_if=not_held, xy_first=0.004),
            Waypoint("release", lambda: scene.eef_pos(), carry_yaw, -1.0, tol=1.0, yaw_tol=np.pi, hold=6),
            Waypoint("retreat", lambda: np.array([*scene.eef_pos()[:2], peg_top + 0.05]), carry_yaw, -1.0,
                     tol=0.01, yaw_tol=np.pi, timeout=400),
        ]
