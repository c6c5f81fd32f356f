"""The five-point keypoint image that conditions the IdentityNet.

Pixel-identical to the official InstantID `draw_kps` for the same keypoints and canvas: the
IdentityNet was trained on exactly these pictures, so colours, stick widths, truncations and draw
order are all part of the model's input format, not style choices.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
import torch

# RGB, in insightface's keypoint order: left eye, right eye, nose, left mouth corner, right mouth corner.
KEYPOINT_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (255, 0, 255),
)
NOSE = 2
# Every non-nose point joins the nose; each limb takes its non-nose endpoint's colour.
LIMBS: tuple[tuple[int, int], ...] = ((0, NOSE), (1, NOSE), (3, NOSE), (4, NOSE))
STICK_WIDTH = 4
LIMB_INTENSITY = 0.6
POINT_RADIUS = 10
# A limb's colour as upstream's float canvas ends up: its point's colour x 0.6, truncated to uint8.
LIMB_COLORS = tuple(tuple(int(np.float64(channel) * LIMB_INTENSITY) for channel in color) for color in KEYPOINT_COLORS)


def _checked_keypoints(kps: np.ndarray) -> np.ndarray:
    points = np.asarray(kps)
    if points.shape != (5, 2):
        raise ValueError(f"keypoints must have shape (5, 2) (x, y for eyes, nose, mouth corners); got {points.shape}")
    if not (np.issubdtype(points.dtype, np.integer) or np.issubdtype(points.dtype, np.floating)):
        raise ValueError(f"keypoints must be integers or floats; got dtype {points.dtype}")
    if not np.isfinite(points).all():
        raise ValueError(f"keypoints must be finite numbers; got {points.tolist()}")
    return points


def _check_canvas(width: int, height: int) -> None:
    if int(width) != width or int(height) != height or width < 1 or height < 1:
        raise ValueError(f"canvas size must be positive integers; got {width}x{height}")


def draw_keypoints(kps: np.ndarray, width: int, height: int) -> np.ndarray:
    """The keypoint image (uint8, height x width x 3, RGB) for five (x, y) points in canvas pixels.

    The arithmetic stays in the keypoints' own dtype, as upstream does: insightface gives float32,
    and float32 lengths and means truncate differently from float64 ones at pixel boundaries."""
    points = _checked_keypoints(kps)
    _check_canvas(width, height)
    # Upstream fills the limbs at full colour on a float canvas and then scales the whole canvas to
    # 60 % and truncates to uint8. The fill is not antialiased, so every pixel is 0 or a full palette
    # colour: filling the uint8 image with the scaled, truncated colours gives the same pixels
    # without two whole-canvas float passes (tens of ms at 1024^2).
    image = np.zeros((int(height), int(width), 3), dtype=np.uint8)
    for start, end in LIMBS:
        xs = points[[start, end], 0]
        ys = points[[start, end], 1]
        length = ((xs[0] - xs[1]) ** 2 + (ys[0] - ys[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
        polygon = cv2.ellipse2Poly(
            (int(np.mean(xs)), int(np.mean(ys))), (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1
        )
        cv2.fillConvexPoly(image, polygon, LIMB_COLORS[start])
    for index, (x, y) in enumerate(points):
        cv2.circle(image, (int(x), int(y)), POINT_RADIUS, KEYPOINT_COLORS[index], -1)
    return image


def keypoint_image_batch(kps_list: Sequence[np.ndarray | None], width: int, height: int) -> torch.Tensor:
    """A ComfyUI IMAGE [B, H, W, 3] float32 in 0..1, one keypoint image per entry.

    A None entry (no face) becomes an all-black image at its position, so batch positions stay
    aligned with the caller's inputs; whether None is acceptable is the caller's decision."""
    if len(kps_list) == 0:
        raise ValueError("no keypoint sets given: a keypoint image batch needs at least one entry")
    _check_canvas(width, height)
    images = [
        np.zeros((int(height), int(width), 3), dtype=np.uint8) if kps is None else draw_keypoints(kps, width, height)
        for kps in kps_list
    ]
    return torch.from_numpy(np.stack(images)).to(torch.float32).div_(255.0)  # in place: one 4-byte copy fewer


# ------------------------------------------------------------------------- fitting the canvas --

FIT_MODES = ("pad", "crop", "stretch")
# insightface's order after a horizontal flip: the image-left eye is the former right eye, and so
# on, so index 0 (red) stays on the image-left eye and every colour keeps its meaning.
MIRRORED_ORDER = (1, 0, NOSE, 4, 3)


class CanvasFit:
    """Where five points from a `source` sized image go on a `width` x `height` canvas.

    pad: one scale so the whole source fits, centred, the rest black. crop: one scale so the source
    fills the canvas, centred, the overflow cut (what ComfyUI does to a hint of another aspect).
    stretch: each axis scaled on its own. A width or height of 0 keeps that side of the source, so
    CanvasFit() leaves the points and the size as they are. Coordinates scale as insightface maps
    detector points back to the image (a plain multiplication, no half-pixel shift)."""

    def __init__(self, width: int = 0, height: int = 0, fit: str = "pad", mirror: bool = False) -> None:
        if fit not in FIT_MODES:
            raise ValueError(f"fit is {fit!r}; choose one of {', '.join(FIT_MODES)}.")
        if int(width) != width or int(height) != height or width < 0 or height < 0:
            raise ValueError(f"width and height must be whole numbers >= 0 (0 = the source size); got {width}x{height}")
        self.width, self.height, self.fit, self.mirror = int(width), int(height), fit, bool(mirror)

    def size(self, source_width: int, source_height: int) -> tuple[int, int]:
        """The canvas (width, height) for a source of this size."""
        return self.width or int(source_width), self.height or int(source_height)

    def scale_and_offset(self, source_width: int, source_height: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-axis scale and offset (x, y) that map source pixels onto the canvas."""
        _check_canvas(source_width, source_height)
        width, height = self.size(source_width, source_height)
        scale = np.array([width / source_width, height / source_height], dtype=np.float64)
        if self.fit != "stretch":
            scale[:] = scale.min() if self.fit == "pad" else scale.max()
        offset = (np.array([width, height], dtype=np.float64) - scale * [source_width, source_height]) / 2
        return scale, offset

    def points(self, kps: np.ndarray, source_width: int, source_height: int) -> np.ndarray:
        """The five points on the canvas, in the keypoints' own dtype (see draw_keypoints)."""
        points = _checked_keypoints(kps)
        if self.size(source_width, source_height) == (source_width, source_height) and not self.mirror:
            return points
        scale, offset = self.scale_and_offset(source_width, source_height)
        placed = np.asarray(points, dtype=np.float64) * scale + offset
        if self.mirror:
            # The canvas spans [0, width]: x -> width - x flips it, and draw_keypoints' int() then
            # lands each circle on the mirrored pixel column.
            placed[:, 0] = self.size(source_width, source_height)[0] - placed[:, 0]
            placed = placed[list(MIRRORED_ORDER)]
        return placed.astype(points.dtype if np.issubdtype(points.dtype, np.floating) else np.float64)
