"""Recognising an image that already IS a five-point keypoint drawing (what `keypoints.draw_keypoints`
and the official `draw_kps` make), so that Apply can use a saved keypoint PNG, or the output of Face
Keypoints Preprocessor, as the IdentityNet hint as is, as the earlier pack did.

A drawing is recognised by its structure, not by pixel equality, so that it survives resizing
(also to another aspect ratio) and JPEG compression:
- mostly black background, and nearly every coloured pixel has one of the five point hues;
- one full-brightness disc of each of the five point colours, of similar size;
- each limb that is long enough to show between its two discs is there, in its point's hue at
  60 % brightness, along the line between the discs' centres;
- nothing else: away from the discs and limbs the image is black.
Points so close that their discs cover each other (a face a few pixels wide) are not recognised.
A photo fails at least one of these: few photos are mostly black, a dark photo's coloured pixels
are not pure primaries and its background is not black, and five discs joined by dimmer same-hue
sticks do not occur by chance.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from .keypoints import KEYPOINT_COLORS, LIMB_INTENSITY, LIMBS

DARK = 48                 # brightest channel below this: background
BLACK = 16                # away from the drawing (JPEG and resizing leave the far background at about 0)
JPEG_BLOCK = 8            # JPEG ringing stays within the 8x8 blocks an edge touches
BRIGHT = 96               # brightest channel from this on: coloured enough to judge its hue
POINT_LEVEL = round(255 * (1 + LIMB_INTENSITY) / 2)  # between a limb (153) and a point (255)
HUE_TOLERANCE = 0.35      # largest channel error of rgb / max(rgb) against a pure palette hue
MIN_DARK_FRACTION = 0.5
MAX_OFF_HUE_FRACTION = 0.25
MAX_RADIUS_RATIO = 1.8    # largest disc radius / the median one (later discs may cover parts of earlier ones)
MIN_DISC_AREA = 12        # pixels; smaller discs are too degraded to tell apart
DISC_MARGIN = 1.3         # radii from a disc's centre to past its edge, also when a resize stretched it
LIMB_COVERAGE = 0.7       # share of the visible limb line that must carry the limb colour
MAX_STRAY_FRACTION = 0.05  # coloured pixels away from the discs and limbs
HUES = np.array(KEYPOINT_COLORS, dtype=np.float32) / 255.0


@dataclass(frozen=True)
class _Disc:
    centre: np.ndarray    # (x, y)
    radius: float         # of a disc with the same area


def is_keypoint_drawing(rgb: np.ndarray) -> bool:
    """True when an RGB uint8 HxWx3 image is a five-point keypoint drawing."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 16:
        return False
    if not _mostly_dark(rgb[::4, ::4]):  # cheap early exit for most photos
        return False
    brightest = _brightest(rgb)
    if np.mean(brightest < DARK) < MIN_DARK_FRACTION:
        return False
    hue = _hue_index(rgb, brightest)
    coloured = hue[brightest >= BRIGHT]
    if coloured.size == 0 or np.mean(coloured < 0) > MAX_OFF_HUE_FRACTION:
        return False
    discs = [_disc(hue == index, brightest) for index in range(len(KEYPOINT_COLORS))]
    if any(disc is None for disc in discs) or not _similar_sizes(discs):
        return False
    return _limbs_present(discs, hue, brightest) and _nothing_else_drawn(discs, brightest)


def keypoint_drawings(images: torch.Tensor) -> list[bool]:
    """For each image of a ComfyUI IMAGE batch [B, H, W, C]: is it a keypoint drawing? A photo that
    is not mostly dark even in every 4th pixel is rejected before the whole image is converted."""
    return [_mostly_dark(_as_rgb8(image[::4, ::4])) and is_keypoint_drawing(_as_rgb8(image)) for image in images]


def _mostly_dark(rgb: np.ndarray) -> bool:
    return rgb.ndim == 3 and rgb.shape[2] == 3 and bool(np.mean(_brightest(rgb) < DARK) >= MIN_DARK_FRACTION)


def _brightest(rgb: np.ndarray) -> np.ndarray:
    """Per pixel, the brightest channel (channel by channel: numpy's max over a last axis of 3 is
    ten times slower, 30 ms at 1024^2)."""
    return np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])


def _as_rgb8(image: torch.Tensor) -> np.ndarray:
    """One image [H, W, C] as uint8 RGB, converted alone so that a large batch is never copied whole."""
    pixels = torch.nan_to_num(image.detach().to("cpu", torch.float32)[..., :3], nan=0.0)
    return pixels.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8).numpy()


def _hue_index(rgb: np.ndarray, brightest: np.ndarray) -> np.ndarray:
    """Per pixel: the index of the palette hue it has (any brightness), or -1 (none, or too dark)."""
    # int8 and flat positions: a full-size int64 array and boolean masks over HxWx3 took 15 ms at 1024^2.
    hue = np.full(brightest.size, -1, dtype=np.int8)
    coloured = np.flatnonzero(brightest >= BRIGHT)
    direction = rgb.reshape(-1, 3)[coloured].astype(np.float32) / brightest.reshape(-1)[coloured, None].astype(np.float32)
    errors = np.abs(direction[:, None, :] - HUES).max(axis=-1)
    index = errors.argmin(axis=-1)
    hue[coloured] = np.where(errors[np.arange(len(index)), index] <= HUE_TOLERANCE, index, -1)
    return hue.reshape(brightest.shape)


def _disc(of_hue: np.ndarray, brightest: np.ndarray) -> _Disc | None:
    """The largest full-brightness region of one point hue, if it is a single roundish blob."""
    mask = (of_hue & (brightest >= POINT_LEVEL)).astype(np.uint8)
    count, _, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count < 2:
        return None
    areas = stats[1:, cv2.CC_STAT_AREA]
    order = np.argsort(areas)[::-1]
    largest = order[0]
    if areas[largest] < MIN_DISC_AREA or (len(order) > 1 and areas[order[1]] > 0.25 * areas[largest]):
        return None
    width, height = stats[1 + largest, cv2.CC_STAT_WIDTH], stats[1 + largest, cv2.CC_STAT_HEIGHT]
    if areas[largest] < 0.4 * width * height:  # a disc fills pi/4 of its box; lines and rings do not
        return None
    return _Disc(centroids[1 + largest], float(np.sqrt(areas[largest] / np.pi)))


def _similar_sizes(discs: list[_Disc]) -> bool:
    """Discs are drawn with one radius (a non-uniform resize stretches them all alike)."""
    radii = np.array([disc.radius for disc in discs])
    return radii.max() <= MAX_RADIUS_RATIO * np.median(radii)


def _limbs_present(discs: list[_Disc], hue: np.ndarray, brightest: np.ndarray) -> bool:
    """Every limb with a visible stretch between its discs has the limb colour along it."""
    radius = max(disc.radius for disc in discs)
    limb = (brightest >= BRIGHT) & (brightest < POINT_LEVEL)
    for start, end in LIMBS:  # (point, nose): the limb has the point's hue
        a, b = discs[start].centre, discs[end].centre
        length = float(np.linalg.norm(b - a))
        visible = length - 2 * DISC_MARGIN * radius
        if visible < radius:  # the discs cover (almost) all of this limb
            continue
        margin = DISC_MARGIN * radius / length
        steps = np.linspace(margin, 1 - margin, max(int(visible), 2))
        points = np.rint(a + steps[:, None] * (b - a)).astype(int)
        xs = points[:, 0].clip(0, hue.shape[1] - 1)
        ys = points[:, 1].clip(0, hue.shape[0] - 1)
        if np.mean((hue[ys, xs] == start) & limb[ys, xs]) < LIMB_COVERAGE:
            return False
    return True


def _nothing_else_drawn(discs: list[_Disc], brightest: np.ndarray) -> bool:
    """Away from the discs and limbs the image is black: no other coloured pixels and no dim
    texture (which a keypoint drawing pasted onto a dark photo has)."""
    radius = max(disc.radius for disc in discs)
    expected = np.zeros(brightest.shape, np.uint8)
    centres = [np.rint(disc.centre).astype(int) for disc in discs]
    for start, end in LIMBS:
        cv2.line(expected, tuple(map(int, centres[start])), tuple(map(int, centres[end])), 1,
                 int(1.4 * radius) + 2 * JPEG_BLOCK)
    for centre in centres:
        cv2.circle(expected, tuple(map(int, centre)), int(np.ceil(1.6 * radius)) + JPEG_BLOCK, 1, -1)
    stray = np.count_nonzero((brightest > BLACK) & (expected == 0))
    return stray <= MAX_STRAY_FRACTION * np.count_nonzero(brightest >= BRIGHT)
