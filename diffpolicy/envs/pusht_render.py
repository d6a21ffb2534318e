"""Drawing of the PushT scene with Pillow (no pygame), in Diffusion Policy's colours.

The scene is drawn on a canvas an integer factor larger than the requested size (at least
`MIN_CANVAS` pixels) and reduced with a box filter, which anti-aliases edges the way Diffusion
Policy's 512 -> 96 resize does.
Pixel (row, column) = world (y, x) * size / 512.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

WORKSPACE = 512.0
MIN_CANVAS = 384
BACKGROUND = (255, 255, 255)
WALL_COLOR = (211, 211, 211)     # LightGray
GOAL_COLOR = (144, 238, 144)     # LightGreen
BLOCK_COLOR = (119, 136, 153)    # LightSlateGray
AGENT_COLOR = (65, 105, 225)     # RoyalBlue
TARGET_COLOR = (255, 0, 0)
WALL_LOW, WALL_HIGH, WALL_WIDTH = 5.0, 506.0, 4.0
AGENT_RADIUS = 15.0


def render_scene(size: int, agent_pos: np.ndarray, block_outline: np.ndarray, goal_outline: np.ndarray,
                 target: np.ndarray | None = None) -> np.ndarray:
    """Draw walls, goal T, block T, agent disk and (optionally) the commanded target.

    Args:
        size: side of the returned image in pixels.
        agent_pos: (2,) agent centre in world pixels.
        block_outline, goal_outline: (K, 2) polygon corners in world pixels.
        target: (2,) commanded position, drawn as a red cross, or None.
    Returns:
        (size, size, 3) uint8 RGB image.
    """
    supersample = -(-MIN_CANVAS // size)
    canvas_size = size * supersample
    scale = canvas_size / WORKSPACE
    image = Image.new("RGB", (canvas_size, canvas_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    lo, hi = WALL_LOW * scale, WALL_HIGH * scale
    draw.rectangle([lo, lo, hi, hi], outline=WALL_COLOR, width=max(1, round(WALL_WIDTH * scale)))
    draw.polygon([tuple(p) for p in np.asarray(goal_outline) * scale], fill=GOAL_COLOR)
    draw.polygon([tuple(p) for p in np.asarray(block_outline) * scale], fill=BLOCK_COLOR)
    cx, cy = np.asarray(agent_pos, dtype=float) * scale
    r = AGENT_RADIUS * scale
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=AGENT_COLOR)
    if target is not None:
        tx, ty = np.asarray(target, dtype=float) * scale
        arm, width = 8.0 / 96.0 * canvas_size / 2, max(1, round(canvas_size / 96.0))
        draw.line([tx - arm, ty, tx + arm, ty], fill=TARGET_COLOR, width=width)
        draw.line([tx, ty - arm, tx, ty + arm], fill=TARGET_COLOR, width=width)
    return np.asarray(image.reduce(supersample))
