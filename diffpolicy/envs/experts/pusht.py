"""A scripted PushT expert: a closed-loop pusher that plans each push from the pose error.

Model. Contacts with the disk are frictionless and the block is quasi-static (see
`diffpolicy.envs.pusht`), so pushing the disk a distance `d` along `u` (the inward normal of a flat
edge) at a contact whose lever arm about the centre of gravity is `h = (p - cog) x u` moves the
block by, to first order,

    d_cog = u * d * I / (I + h^2),     d_angle = d * h / (I + h^2)      (mass 1, I = 3000).

Planning. Candidate contacts are points sampled along the 8 edges of the T outline (away from the
corners, far enough from the two inner corners for the disk to fit). For the pose error
`e = (goal cog - cog, wrap(goal angle - angle))` under the metric diag(1, 1, rho^2), a contact with
unit-push motion `m` gives the best push depth `d* = m.W.e / m.W.m` and a predicted cost reduction;
the expert scores contacts by reduction per expected time (travel to the contact plus pushing) and
draws the next contact uniformly among those scoring within `choice_band` of the best: this is where
demonstrations become multimodal (which edge, and so which side of the T, it pushes from).

Execution. Travelling to a contact follows an orbit of radius `orbit_radius` about the block's
centre of gravity (or a straight line when that clears the block), tracked by pure pursuit: the
commanded target runs `lookahead` pixels ahead of the disk along the path, so targets move smoothly.
Which way round the orbit it goes is drawn at random when both ways are of similar length. Pushing
commands a target `depth` pixels inside the contact edge, re-planned every step on the same edge
(sliding along it, since contact is frictionless); the expert leaves the edge when its best push
is used up, a much better contact appears elsewhere, or the block stops responding (a wall).
All randomness comes from the Generator seeded by `reset(seed)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import shapely

from diffpolicy.envs.pusht import (
    AGENT_RADIUS,
    BLOCK_COG_LOCAL,
    GOAL_POSE,
    T_OUTLINE_LOCAL,
    WORKSPACE,
    local_to_world,
    rotation,
)

BLOCK_MOMENT = 3000.0


def wrap_angle(angle):
    """`angle` (a float or an array, radians) wrapped to [-pi, pi)."""
    return (angle + math.pi) % (2 * math.pi) - math.pi


@dataclass(frozen=True)
class ContactSet:
    """Candidate contacts in the block frame, K of them.

    edge (K,) int: outline edge index; s (K,): distance along that edge from its first corner;
    touch (K, 2): disk centre when touching; normal (K, 2): outward edge normal; lever (K,): h;
    entry_k (K,): distance from `touch` along `normal` out to the orbit circle;
    entry_angle (K,): polar angle of that exit point about the centre of gravity.
    """

    edge: np.ndarray
    s: np.ndarray
    touch: np.ndarray
    normal: np.ndarray
    lever: np.ndarray
    entry_k: np.ndarray
    entry_angle: np.ndarray
    edge_start: np.ndarray  # (8, 2) first corner of each edge
    edge_dir: np.ndarray    # (8, 2) unit direction of each edge
    edge_normal: np.ndarray  # (8, 2) outward unit normal of each edge


def build_contacts(spacing: float, corner_margin: float, clearance: float, orbit_radius: float) -> ContactSet:
    """Sample contacts every `spacing` px along each edge of the T outline (block frame)."""
    outline = T_OUTLINE_LOCAL
    n_edges = len(outline)
    polygon = shapely.Polygon(outline)
    orientation = 1.0 if shapely.geometry.polygon.orient(polygon, 1.0).equals_exact(polygon, 1e-9) else -1.0
    dirs = np.roll(outline, -1, axis=0) - outline
    lengths = np.linalg.norm(dirs, axis=1)
    dirs = dirs / lengths[:, None]
    # A corner is concave when the outline turns against its orientation there.
    previous = np.roll(dirs, 1, axis=0)  # the 2-D cross product (numpy 2 dropped np.cross of 2-vectors)
    turn = (previous[:, 0] * dirs[:, 1] - previous[:, 1] * dirs[:, 0]) * orientation
    concave = turn < 0
    edge, s_all, touch, normal, edge_normal = [], [], [], [], []
    for i in range(n_edges):
        d = dirs[i]
        n = np.array([d[1], -d[0]])
        midpoint = outline[i] + d * lengths[i] / 2
        if polygon.contains(shapely.Point(midpoint + n)):
            n = -n
        edge_normal.append(n)
        start = AGENT_RADIUS + clearance if concave[i] else corner_margin
        end = AGENT_RADIUS + clearance if concave[(i + 1) % n_edges] else corner_margin
        for s in np.arange(start, lengths[i] - end + 1e-9, spacing):
            edge.append(i)
            s_all.append(s)
            touch.append(outline[i] + d * s + n * AGENT_RADIUS)
            normal.append(n)
    touch, normal = np.array(touch), np.array(normal)
    offset = touch - BLOCK_COG_LOCAL
    lever = -(offset[:, 0] * normal[:, 1] - offset[:, 1] * normal[:, 0])  # (p - cog) x (-n)
    w_n = np.sum(offset * normal, axis=1)
    entry_k = -w_n + np.sqrt(np.maximum(w_n ** 2 - np.sum(offset ** 2, axis=1) + orbit_radius ** 2, 0.0))
    exit_point = offset + normal * entry_k[:, None]
    return ContactSet(
        edge=np.array(edge), s=np.array(s_all), touch=touch, normal=normal, lever=lever, entry_k=entry_k,
        entry_angle=np.arctan2(exit_point[:, 1], exit_point[:, 0]), edge_start=outline.copy(), edge_dir=dirs,
        edge_normal=np.array(edge_normal),
    )


class Path:
    """A polyline `(N, 2)` tracked by pure pursuit with monotone progress."""

    def __init__(self, points: np.ndarray):
        keep = np.concatenate([[True], np.linalg.norm(np.diff(points, axis=0), axis=1) > 1e-9])
        self.points = points[keep]
        seg = np.linalg.norm(np.diff(self.points, axis=0), axis=1)
        self.cumulative = np.concatenate([[0.0], np.cumsum(seg)])
        self.length = float(self.cumulative[-1])
        self.progress = 0.0

    def project(self, point: np.ndarray) -> float:
        """Arc length of the point of the path closest to `point`."""
        if len(self.points) == 1:
            return 0.0
        a, b = self.points[:-1], self.points[1:]
        ab = b - a
        t = np.clip(np.sum((point - a) * ab, axis=1) / np.maximum(np.sum(ab * ab, axis=1), 1e-12), 0.0, 1.0)
        dist = np.linalg.norm(a + ab * t[:, None] - point, axis=1)
        i = int(np.argmin(dist))
        return float(self.cumulative[i] + t[i] * (self.cumulative[i + 1] - self.cumulative[i]))

    def at(self, arc: float) -> np.ndarray:
        arc = float(np.clip(arc, 0.0, self.length))
        i = int(np.clip(np.searchsorted(self.cumulative, arc, side="right") - 1, 0, len(self.points) - 2))
        seg = self.cumulative[i + 1] - self.cumulative[i]
        t = 0.0 if seg <= 0 else (arc - self.cumulative[i]) / seg
        return self.points[i] + t * (self.points[i + 1] - self.points[i])

    def pursue(self, position: np.ndarray, lookahead: float) -> tuple[np.ndarray, float]:
        """Target `lookahead` ahead of the disk's progress; returns (target, remaining length)."""
        self.progress = max(self.progress, self.project(position))
        return self.at(self.progress + lookahead), self.length - self.progress


class PushTExpert:
    """Scripted closed-loop pusher for `PushTEnv` (module docstring); reads the privileged state.

    Args:
        env: a PushTEnv, possibly wrapped (the expert reads `env.unwrapped`).
        rho: pixels per radian in the pose-error metric.
        orbit_radius: radius (px) of the travel orbit about the block's centre of gravity.
        lookahead: pure-pursuit lead (px) of the target along a travel path.
        max_depth: largest push depth (px) commanded inside the contact edge.
        choice_band: contacts scoring at least `choice_band * best` are drawn from uniformly.
        switch_ratio: leave the current edge when another contact scores this many times more.
        travel_speed, push_speed: expected px per step, used to estimate times in the score.
        max_target_step: largest change (px) of the commanded target between two steps.
        contact_spacing: distance (px) between candidate contacts along an edge.
        patience, min_improvement: leave an edge after `patience` touching steps that did not
            lower the pose cost (px^2) by `min_improvement`.
        ban_steps: an edge left for lack of progress is not chosen again for this many steps.
    """

    def __init__(self, env, rho: float = 60.0, orbit_radius: float = 112.0, lookahead: float = 45.0,
                 max_depth: float = 25.0, choice_band: float = 0.8, switch_ratio: float = 2.0,
                 travel_speed: float = 20.0, push_speed: float = 10.0, max_target_step: float = 45.0,
                 contact_spacing: float = 3.0, patience: int = 5, min_improvement: float = 0.5,
                 ban_steps: int = 10):
        self.env = env
        self.rho = rho
        self.orbit_radius = orbit_radius
        self.lookahead = lookahead
        self.max_depth = max_depth
        self.choice_band = choice_band
        self.switch_ratio = switch_ratio
        self.travel_speed = travel_speed
        self.push_speed = push_speed
        self.max_target_step = max_target_step
        self.patience = patience
        self.min_improvement = min_improvement
        self.ban_steps = ban_steps
        self.contacts = build_contacts(contact_spacing, corner_margin=4.0, clearance=3.0, orbit_radius=orbit_radius)
        goal = np.asarray(GOAL_POSE)
        self.goal_cog = local_to_world(BLOCK_COG_LOCAL, goal)
        self.goal_angle = float(goal[2])
        self.reset()

    # ------------------------------------------------------------------ public API
    def reset(self, seed: int | None = None) -> None:
        """Start a new episode; the expert's choices are drawn from a Generator seeded by `seed`."""
        self.rng = np.random.default_rng(seed)
        self.phase = "plan"            # plan -> travel -> push -> plan ...
        self.edge = -1
        self.path: Path | None = None
        self.last_target: np.ndarray | None = None
        self.best_cost, self.stale_steps = math.inf, 0
        self.banned_until = np.zeros(len(self.contacts.edge_start), dtype=int)
        self.step_count = 0
        # One record per planned contact: step, edge, orbit (+1 / -1 round the orbit, 0 straight).
        self.log: list[dict] = []

    def act(self, obs=None) -> np.ndarray:
        """The next commanded target (x, y) as float32 `(2,)`; `obs` is unused (privileged state)."""
        sim = self.env.unwrapped
        pose = sim.block_pose
        agent = np.asarray(sim.agent.position)
        target = self._decide(pose, agent)
        if self.last_target is not None:
            jump = target - self.last_target
            norm = float(np.linalg.norm(jump))
            if norm > self.max_target_step:
                target = self.last_target + jump * (self.max_target_step / norm)
        target = np.clip(target, 0.0, WORKSPACE)
        self.last_target = target
        self.step_count += 1
        return target.astype(np.float32)

    # ------------------------------------------------------------------ planning
    def _error(self, pose: np.ndarray) -> tuple[np.ndarray, float]:
        """(goal cog - cog) `(2,)` and the wrapped angle error to the goal."""
        cog = local_to_world(BLOCK_COG_LOCAL, pose)
        return self.goal_cog - cog, wrap_angle(self.goal_angle - float(pose[2]))

    def _push_model(self, pose: np.ndarray, e_pos: np.ndarray, e_ang: float):
        """Per contact: best depth d* (capped) and predicted cost reduction, both `(K,)`."""
        c = self.contacts
        rot = rotation(float(pose[2]))
        u = -(c.normal @ rot.T)                                   # push directions, world frame
        denom = BLOCK_MOMENT + c.lever ** 2
        m_pos = u * (BLOCK_MOMENT / denom)[:, None]
        m_ang = c.lever / denom
        rho2 = self.rho ** 2
        gain = m_pos @ e_pos + rho2 * m_ang * e_ang
        curvature = np.sum(m_pos ** 2, axis=1) + rho2 * m_ang ** 2
        depth = np.clip(gain / curvature, 0.0, 4 * self.max_depth)
        reduction = 2 * gain * depth - curvature * depth ** 2
        return depth, reduction

    def _agent_local(self, pose: np.ndarray, agent: np.ndarray) -> np.ndarray:
        """The disk centre in the block frame."""
        return (agent - pose[:2]) @ rotation(float(pose[2]))

    def _travel_lengths(self, agent_local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Orbit travel length to each contact going the short way, and the angle to cover `(K,)`."""
        c = self.contacts
        offset = agent_local - BLOCK_COG_LOCAL
        radius = float(np.hypot(*offset))
        angle = wrap_angle(c.entry_angle - math.atan2(offset[1], offset[0]))
        length = abs(self.orbit_radius - radius) + self.orbit_radius * np.abs(angle) + c.entry_k
        return length, angle

    def _scores(self, pose, agent, current_edge: int) -> tuple[np.ndarray, np.ndarray]:
        """Per contact `(K,)`: predicted cost reduction per expected step, and the best depth.

        Travel to a contact on `current_edge` (the edge being pushed, -1 for none) is the slide
        along it; to any other contact, the way round the orbit.
        """
        c = self.contacts
        e_pos, e_ang = self._error(pose)
        depth, reduction = self._push_model(pose, e_pos, e_ang)
        agent_local = self._agent_local(pose, agent)
        travel, _ = self._travel_lengths(agent_local)
        overhead = np.full(len(c.edge), 3.0)
        if current_edge >= 0:
            on_edge = c.edge == current_edge
            along = (agent_local - c.edge_start[current_edge]) @ c.edge_dir[current_edge]
            travel = np.where(on_edge, np.abs(c.s - along), travel)
            overhead = np.where(on_edge, 1.0, overhead)
        time = travel / self.travel_speed + depth / self.push_speed + overhead
        score = np.where(depth > 0, reduction / time, 0.0)
        score = np.where(self.banned_until[c.edge] > self.step_count, 0.0, score)
        return score, depth

    def _plan(self, pose, agent) -> None:
        """Choose the next contact and the path to it."""
        score, _ = self._scores(pose, agent, current_edge=-1)
        best = float(score.max())
        candidates = np.flatnonzero(score >= self.choice_band * best) if best > 0 else np.arange(len(score))
        k = int(self.rng.choice(candidates))
        self.edge = int(self.contacts.edge[k])
        direction = self._orbit_direction(pose, agent, k)
        self.path, orbits = self._travel_path(pose, agent, k, direction)
        self.phase = "travel"
        self.log.append({"step": self.step_count, "edge": self.edge, "orbit": direction if orbits else 0})

    def _orbit_direction(self, pose, agent, k: int) -> int:
        """+1 / -1 (increasing / decreasing polar angle); random when both ways are comparable."""
        _, angle = self._travel_lengths(self._agent_local(pose, agent))
        short = float(angle[k])
        if abs(short) >= 0.75 * math.pi:
            return int(self.rng.choice([-1, 1]))
        return 1 if short >= 0 else -1

    def _travel_path(self, pose, agent, k: int, direction: int) -> tuple[Path, bool]:
        """World polyline from the disk to contact k, and whether it goes round the orbit.

        The path is straight (via a point on the contact's approach line) when that clears the
        block, else it rises to the orbit, follows it in `direction` and comes in along the normal.
        """
        c = self.contacts
        touch = local_to_world(c.touch[k], pose)
        normal = c.normal[k] @ rotation(float(pose[2])).T
        approach = touch + normal * min(float(c.entry_k[k]), 40.0)
        block = shapely.Polygon(local_to_world(T_OUTLINE_LOCAL, pose))
        clear = shapely.LineString([agent, approach]).distance(block) > AGENT_RADIUS + 4.0
        if clear and shapely.LineString([approach, touch]).distance(block) > AGENT_RADIUS - 1.0:
            return Path(np.array([agent, approach, touch])), False
        cog = local_to_world(BLOCK_COG_LOCAL, pose)
        offset = agent - cog
        start_angle = math.atan2(offset[1], offset[0])
        exit_local = c.touch[k] + c.normal[k] * c.entry_k[k] - BLOCK_COG_LOCAL
        end_angle = math.atan2(exit_local[1], exit_local[0]) + float(pose[2])
        sweep = (end_angle - start_angle) % (2 * math.pi)
        if direction < 0:
            sweep -= 2 * math.pi
        n_arc = max(2, int(abs(sweep) * self.orbit_radius / 5.0))
        angles = start_angle + np.linspace(0.0, sweep, n_arc)
        arc = cog + self.orbit_radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        return Path(np.concatenate([agent[None], arc, touch[None] + normal[None] * c.entry_k[k], touch[None]])), True

    # ------------------------------------------------------------------ execution
    def _decide(self, pose: np.ndarray, agent: np.ndarray) -> np.ndarray:
        if self.phase == "push":
            target = self._push_target(pose, agent)
            if target is not None:
                return target
            self.phase = "plan"
        if self.phase == "plan":
            self._plan(pose, agent)
        target, remaining = self.path.pursue(agent, self.lookahead)
        if remaining <= self.lookahead:
            self.phase = "push"
            self.best_cost, self.stale_steps = math.inf, 0
            push = self._push_target(pose, agent)
            if push is not None:
                return push
            self._plan(pose, agent)
            target, _ = self.path.pursue(agent, self.lookahead)
        return target

    def _push_target(self, pose, agent) -> np.ndarray | None:
        """Target for pushing on the current edge, or None when the edge should be left."""
        c = self.contacts
        agent_local = self._agent_local(pose, agent)
        touching = (agent_local - c.edge_start[self.edge]) @ c.edge_normal[self.edge] < AGENT_RADIUS + 1.5
        if self._no_progress(pose, touching):
            self.banned_until[self.edge] = self.step_count + self.ban_steps
            return None
        score, depth = self._scores(pose, agent, current_edge=self.edge)
        on_edge = c.edge == self.edge
        edge_scores = np.where(on_edge, score, 0.0)
        k = int(np.argmax(edge_scores))
        other_best = float(np.where(on_edge, 0.0, score).max())
        if edge_scores[k] <= 0 or depth[k] < 0.5 or other_best > self.switch_ratio * edge_scores[k]:
            return None
        rot = rotation(float(pose[2]))
        touch = local_to_world(c.touch[k], pose)
        return touch - (c.normal[k] @ rot.T) * min(float(depth[k]), self.max_depth)

    def _no_progress(self, pose, touching: bool) -> bool:
        """True once `patience` steps touching the edge have not lowered the pose cost.

        Catches pushes the first-order model gets wrong (the disk riding round a corner and
        spinning the block) and a block pinned against a wall.
        """
        if not touching:
            return False
        e_pos, e_ang = self._error(pose)
        cost = float(e_pos @ e_pos + (self.rho * e_ang) ** 2)
        if cost < self.best_cost - self.min_improvement:
            self.best_cost, self.stale_steps = cost, 0
        else:
            self.stale_steps += 1
        return self.stale_steps >= self.patience

