"""Quaternion observations a model can predict: the rotation matrix in, a w >= 0 quaternion out.

robosuite reports relative orientations (`Can_to_robot0_eef_quat`, ...) as `mat2quat` of a
rotation matrix, which keeps the scalar part w >= 0. Where the rotation sits near a half turn (a
gripper above an upright can: w ~ 0) the reported quaternion jumps between q and -q from one step
to the next although nothing moved: 2.4 % of the consecutive steps of the Can demonstrations. No
model can predict such a jump from the motion. Both signs are the same rotation, so the world
model reads and predicts the rotation matrix, a continuous function of the rotation, and reports
the quaternion the environment would: the unit quaternion of that matrix with w >= 0 (for a
predicted matrix that is not exactly a rotation, the closest one: Bar-Itzhack's eigenvector).

Quaternions are (x, y, z, w), robosuite's order. `QuaternionFeatures` maps flat observations
`(..., D)` whose slices `[s, s + 4)` (for each start s) hold such quaternions to features
`(..., D + 5 n)`: every other dimension in place, each quaternion replaced by its 9 matrix entries.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffpolicy.worldmodel.errors import WorldModelError


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Quaternions `(..., 4)` (x, y, z, w; any norm > 0) -> row-major rotation matrices `(..., 9)`.
    q and -q give the same matrix (every entry is a product of two components)."""
    q = q / q.norm(dim=-1, keepdim=True)
    x, y, z, w = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ], -1)


def matrix_to_quaternion(m: torch.Tensor) -> torch.Tensor:
    """Row-major 3 x 3 matrices `(..., 9)` -> unit quaternions `(..., 4)` (x, y, z, w) with w >= 0:
    the eigenvector of Bar-Itzhack's symmetric 4 x 4 matrix with the largest eigenvalue (exact for a
    rotation; the closest rotation's quaternion otherwise)."""
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m.double().unbind(-1)
    k = torch.stack([
        torch.stack([m00 - m11 - m22, m01 + m10, m02 + m20, m21 - m12], -1),
        torch.stack([m01 + m10, m11 - m00 - m22, m12 + m21, m02 - m20], -1),
        torch.stack([m02 + m20, m12 + m21, m22 - m00 - m11, m10 - m01], -1),
        torch.stack([m21 - m12, m02 - m20, m10 - m01, m00 + m11 + m22], -1),
    ], -2) / 3.0
    q = torch.linalg.eigh(k)[1][..., -1]  # eigenvalues ascend: the last column
    q = torch.where(q[..., 3:] < 0, -q, q)
    return q.to(m.dtype)


class QuaternionFeatures:
    """Observations `(..., dim)` <-> features `(..., feature_dim)`; see the module docstring.

    starts: where each quaternion begins in the flat observation (ascending after sorting; the
    slices may not overlap or run past `dim`)."""

    def __init__(self, starts: Sequence[int], dim: int) -> None:
        self.starts, self.dim = tuple(sorted(int(s) for s in starts)), int(dim)
        for first, second in zip(self.starts, self.starts[1:]):
            if second < first + 4:
                raise WorldModelError(f"model.quaternions {list(self.starts)}: the slices [{first}, {first + 4}) and "
                                      f"[{second}, {second + 4}) overlap")
        if self.starts and (self.starts[0] < 0 or self.starts[-1] + 4 > self.dim):
            raise WorldModelError(f"model.quaternions {list(self.starts)}: every slice [s, s + 4) must lie in the "
                                  f"observation's {self.dim} dimensions")
        self.feature_dim = self.dim + 5 * len(self.starts)

    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        """Observations `(..., dim)` -> features `(..., feature_dim)` (the same tensor without quaternions)."""
        if not self.starts:
            return obs
        parts, at = [], 0
        for s in self.starts:
            parts += [obs[..., at:s], quaternion_to_matrix(obs[..., s:s + 4])]
            at = s + 4
        return torch.cat([*parts, obs[..., at:]], -1)

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """Features `(..., feature_dim)` -> observations `(..., dim)`, each quaternion with w >= 0."""
        if not self.starts:
            return features
        parts, at, shift = [], 0, 0
        for s in self.starts:
            parts += [features[..., at + shift:s + shift], matrix_to_quaternion(features[..., s + shift:s + shift + 9])]
            at, shift = s + 4, shift + 5
        return torch.cat([*parts, features[..., at + shift:]], -1)
