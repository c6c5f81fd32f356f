"""The keypoint image against a separate, literal transcription of the official draw_kps steps
(reference/instantid-official.md §1.3), pixel for pixel."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from instantid.keypoints import KEYPOINT_COLORS, draw_keypoints, keypoint_image_batch


def official_steps(kps, width, height):
    """The documented upstream algorithm, step by step, with no shared code: float canvas, four
    limbs to the nose, x0.6, uint8, then radius-10 circles. kps keep their dtype (np.array(kps))."""
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
    limb_seq = np.array([[0, 2], [1, 2], [3, 2], [4, 2]])
    kps = np.array(kps)
    out = np.zeros([height, width, 3])
    for i in range(len(limb_seq)):
        index = limb_seq[i]
        color = colors[index[0]]
        x = kps[index][:, 0]
        y = kps[index][:, 1]
        length = ((x[0] - x[1]) ** 2 + (y[0] - y[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(y[0] - y[1], x[0] - x[1]))
        polygon = cv2.ellipse2Poly((int(np.mean(x)), int(np.mean(y))), (int(length / 2), 4), int(angle), 0, 360, 1)
        out = cv2.fillConvexPoly(out.copy(), polygon, color)
    out = (out * 0.6).astype(np.uint8)
    for idx_kp, kp in enumerate(kps):
        x, y = kp
        out = cv2.circle(out.copy(), (int(x), int(y)), 10, colors[idx_kp], -1)
    return out


FRONTAL = np.array([[250.3, 280.7], [390.1, 278.2], [320.5, 350.9], [262.8, 420.4], [380.6, 418.3]], dtype=np.float32)
FRACTIONAL = np.array([[100.999, 120.5], [160.5, 119.999], [130.25, 150.75], [108.4999, 181.5001], [152.0001, 180.9]])
NEAR_BORDER = np.array([[-12.7, 30.2], [25.4, -8.9], [5.5, 20.1], [-3.2, 60.8], [40.9, 58.3]], dtype=np.float32)
NON_SQUARE = np.array([[420.6, 300.2], [590.3, 310.8], [505.1, 390.4], [430.2, 470.9], [580.7, 478.1]], dtype=np.float32)

CASES = {
    "frontal-640": (FRONTAL, 640, 640),
    "fractional-float64": (FRACTIONAL, 256, 256),
    "near-border": (NEAR_BORDER, 320, 240),
    "non-square-1016x768": (NON_SQUARE, 1016, 768),
    "right-border-1016x768": (NON_SQUARE + np.array([500, 280], dtype=np.float32), 1016, 768),
    "integers": (np.array([[30, 40], [70, 40], [50, 60], [35, 80], [65, 80]]), 100, 120),
}


@pytest.mark.parametrize("name", CASES)
def test_pixel_identical_to_official_steps(name):
    kps, width, height = CASES[name]
    expected = official_steps(kps, width, height)
    image = draw_keypoints(kps, width, height)
    assert image.dtype == np.uint8 and image.shape == (height, width, 3)
    assert np.array_equal(image, expected)
    assert image.any()


def test_pixel_identical_on_random_faces():
    rng = np.random.default_rng(1234)
    for _ in range(40):
        width, height = (int(v) for v in rng.integers(64, 400, size=2))
        centre = rng.uniform(-20, [width + 20, height + 20])
        scale = rng.uniform(8, 80)
        template = np.array([[-1.0, -0.6], [1.0, -0.6], [0.0, 0.2], [-0.8, 1.0], [0.8, 1.0]])
        kps = (centre + scale * template + rng.normal(0, 3, size=(5, 2))).astype(rng.choice([np.float32, np.float64]))
        assert np.array_equal(draw_keypoints(kps, width, height), official_steps(kps, width, height))


def test_float32_arithmetic_is_kept():
    """Upstream gets float32 kps from insightface and computes in float32; this case sits on a
    truncation boundary where the float64 mean lands on the other side (float32 rounds
    2.99999999 to 3.0, so the mean of 1 and it is 2.0 -> centre 2; float64 gives 1.999999995 -> 1)."""
    kps64 = np.array([[1.0, 10.0], [40.0, 12.0], [2.99999999, 10.0], [5.0, 40.0], [30.0, 40.0]])
    kps32 = kps64.astype(np.float32)
    assert int(np.mean(kps32[[0, 2], 0])) == 2 and int(np.mean(kps64[[0, 2], 0])) == 1
    assert np.array_equal(draw_keypoints(kps32, 64, 64), official_steps(kps32, 64, 64))
    assert np.array_equal(draw_keypoints(kps64, 64, 64), official_steps(kps64, 64, 64))


def test_exact_colours_at_centres_and_limbs():
    image = draw_keypoints(FRONTAL, 640, 640)
    assert KEYPOINT_COLORS == ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
    for (x, y), colour in zip(FRONTAL, KEYPOINT_COLORS, strict=True):
        assert tuple(image[int(y), int(x)]) == colour
    # Radius 10 at full intensity: 10 px left of kp0 is red, 11 px left is black (no limb there).
    x0, y0 = int(FRONTAL[0, 0]), int(FRONTAL[0, 1])
    assert tuple(image[y0, x0 - 10]) == (255, 0, 0)
    assert tuple(image[y0, x0 - 11]) == (0, 0, 0)
    # Limb midpoints: the non-nose endpoint's colour at 60 %, truncated (int(0.6 * 255) = 153).
    for start in (0, 1, 3, 4):
        mid_x = int(np.mean(FRONTAL[[start, 2], 0]))
        mid_y = int(np.mean(FRONTAL[[start, 2], 1]))
        assert tuple(image[mid_y, mid_x]) == tuple(int(0.6 * c) for c in KEYPOINT_COLORS[start])
    assert tuple(image[0, 0]) == (0, 0, 0)
    assert set(np.unique(image)) <= {0, 153, 255}


def test_points_off_canvas_draw_nothing_there_and_do_not_fail():
    kps = np.array([[-500.0, -500.0], [-480.0, -500.0], [-490.0, -490.0], [-495.0, -480.0], [-485.0, -480.0]])
    assert not draw_keypoints(kps, 64, 48).any()


def test_batch_keeps_positions_and_scales_exactly():
    batch = keypoint_image_batch([FRONTAL, None, FRONTAL + np.float32(15)], 640, 640)
    assert batch.shape == (3, 640, 640, 3) and batch.dtype == torch.float32
    first = torch.from_numpy(official_steps(FRONTAL, 640, 640).astype(np.float32) / np.float32(255))
    third = torch.from_numpy(official_steps(FRONTAL + np.float32(15), 640, 640).astype(np.float32) / np.float32(255))
    assert torch.equal(batch[0], first)
    assert torch.equal(batch[2], third)
    assert not batch[1].any()
    x0, y0 = int(FRONTAL[0, 0]), int(FRONTAL[0, 1])
    assert batch[0, y0, x0].tolist() == [1.0, 0.0, 0.0]
    mid_x, mid_y = int(np.mean(FRONTAL[[0, 2], 0])), int(np.mean(FRONTAL[[0, 2], 1]))
    assert batch[0, mid_y, mid_x, 0].item() == np.float32(153) / np.float32(255)


def test_batch_of_only_none_is_black_and_empty_batch_is_refused():
    batch = keypoint_image_batch([None, None], 32, 16)
    assert batch.shape == (2, 16, 32, 3) and not batch.any()
    with pytest.raises(ValueError, match="at least one"):
        keypoint_image_batch([], 32, 16)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((5, 3)), r"shape \(5, 2\).*\(5, 3\)"),
        (np.zeros(10), r"shape \(5, 2\).*\(10,\)"),
        (np.zeros((106, 2)), r"shape \(5, 2\).*\(106, 2\)"),
        (np.array([[0.0, 0.0]] * 4 + [[np.nan, 1.0]]), "finite"),
        (np.full((5, 2), "a"), "integers or floats"),
    ],
)
def test_bad_keypoints_are_refused_clearly(bad, message):
    with pytest.raises(ValueError, match=message):
        draw_keypoints(bad, 64, 64)
    with pytest.raises(ValueError, match=message):
        keypoint_image_batch([None, bad], 64, 64)


@pytest.mark.parametrize("width, height", [(0, 64), (64, -1), (64.5, 64)])
def test_bad_canvas_is_refused(width, height):
    with pytest.raises(ValueError, match="canvas size"):
        draw_keypoints(FRONTAL, width, height)


# ------------------------------------------------------------------------- fitting and mirror --

from instantid.keypoints import FIT_MODES, MIRRORED_ORDER, CanvasFit  # noqa: E402

SQUARE_FACE = np.array([[250.3, 280.7], [390.1, 278.2], [320.5, 350.9], [262.8, 420.4], [380.6, 418.3]], dtype=np.float32)


def relative_geometry(kps):
    """The ten pairwise distances divided by the inter-eye distance."""
    points = np.asarray(kps, dtype=np.float64)
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1)[np.triu_indices(5, 1)]
    return distances / np.linalg.norm(points[0] - points[1])


@pytest.mark.parametrize("width, height", [(896, 1152), (1152, 896)])
def test_pad_keeps_the_face_geometry_inside_the_canvas_and_draws_officially(width, height):
    fitting = CanvasFit(width, height, "pad")
    placed = fitting.points(SQUARE_FACE, 640, 640)
    assert placed.dtype == np.float32  # drawn in insightface's dtype, as upstream draws
    np.testing.assert_allclose(relative_geometry(placed), relative_geometry(SQUARE_FACE), rtol=0, atol=1e-6)
    assert (placed >= 0).all() and (placed[:, 0] < width).all() and (placed[:, 1] < height).all()
    # Independently: 640 -> the shorter side, centred along the longer one.
    side = min(width, height)
    expected = SQUARE_FACE.astype(np.float64) * side / 640 + [(width - side) / 2, (height - side) / 2]
    np.testing.assert_allclose(placed, expected, rtol=0, atol=1e-4)
    batch = keypoint_image_batch([placed], *fitting.size(640, 640))
    assert batch.shape == (1, height, width, 3)
    assert np.array_equal((batch[0].numpy() * 255).round().astype(np.uint8), official_steps(placed, width, height))


def test_crop_fills_the_canvas_as_comfyui_crops_a_hint():
    # A 640x480 source on a 300x300 canvas: scale to the height (300/480), cut (400 - 300) / 2 at each side.
    kps = SQUARE_FACE * np.float32(0.75)
    placed = CanvasFit(300, 300, "crop").points(kps, 640, 480)
    scale = 300 / 480
    np.testing.assert_allclose(placed, kps.astype(np.float64) * scale - [(640 * scale - 300) / 2, 0], rtol=0, atol=1e-4)
    # A point at the source's centre stays at the canvas centre, in every mode.
    for fit in FIT_MODES:
        centre = CanvasFit(300, 200, fit).points(np.tile(np.float32([320, 240]), (5, 1)), 640, 480)
        np.testing.assert_allclose(centre, np.tile([150, 100], (5, 1)), rtol=0, atol=1e-4)


def test_stretch_scales_each_axis_on_its_own():
    placed = CanvasFit(1152, 896, "stretch").points(SQUARE_FACE, 640, 640)
    np.testing.assert_allclose(placed, SQUARE_FACE.astype(np.float64) * [1152 / 640, 896 / 640], rtol=0, atol=1e-4)


def test_zero_size_and_no_mirror_change_nothing():
    fitting = CanvasFit()
    assert fitting.size(640, 480) == (640, 480)
    assert fitting.points(SQUARE_FACE, 640, 480) is SQUARE_FACE
    assert CanvasFit(0, 240, "stretch").size(640, 480) == (640, 240)


def test_mirror_is_the_flipped_drawing_with_swapped_colours():
    """Each keypoint colour: the mirrored drawing's circles are the flipped original's circles of the
    swapped point, pixel for pixel. Limbs are the official rasterisation of a mirrored ellipse, whose
    angle is truncated by int() and whose polygon is not mirror-symmetric, so they agree to 1 px."""
    rng = np.random.default_rng(7)
    template = np.array([[-1.0, -0.6], [1.0, -0.6], [0.0, 0.2], [-0.8, 1.0], [0.8, 1.0]])
    for _ in range(25):
        width, height = (int(v) for v in rng.integers(200, 700, size=2))
        kps = (rng.uniform([60, 60], [width - 60, height - 60]) + rng.uniform(16, 40) * template
               + rng.normal(0, 1, (5, 2))).astype(np.float32)  # circles never overlap: no draw-order effects
        mirrored = draw_keypoints(CanvasFit(mirror=True).points(kps, width, height), width, height)
        flipped = official_steps(kps, width, height)[:, ::-1]
        for index, colour in enumerate(KEYPOINT_COLORS):
            swapped = KEYPOINT_COLORS[MIRRORED_ORDER[index]]
            assert np.array_equal((mirrored == colour).all(-1), (flipped == swapped).all(-1)), index
            limb = (mirrored == tuple(int(0.6 * c) for c in colour)).all(-1).astype(np.uint8)
            limb_flipped = (flipped == tuple(int(0.6 * c) for c in swapped)).all(-1).astype(np.uint8)
            near = np.ones((3, 3), np.uint8)
            assert not (limb & ~cv2.dilate(limb_flipped, near).astype(bool)).any()
            assert not (limb_flipped & ~cv2.dilate(limb, near).astype(bool)).any()
    # The colours keep their meaning: red is still the image-left eye after mirroring.
    placed = CanvasFit(mirror=True).points(SQUARE_FACE, 640, 640)
    assert placed[0, 0] < placed[1, 0] and placed[3, 0] < placed[4, 0]
    np.testing.assert_allclose(placed[0], [640 - SQUARE_FACE[1, 0], SQUARE_FACE[1, 1]], rtol=0, atol=1e-4)


def test_mirror_after_fitting_and_bad_settings():
    placed = CanvasFit(1152, 896, "pad", mirror=True).points(SQUARE_FACE, 640, 640)
    unmirrored = CanvasFit(1152, 896, "pad").points(SQUARE_FACE, 640, 640)
    np.testing.assert_allclose(placed[:, 0], 1152 - unmirrored[list(MIRRORED_ORDER), 0], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="fit is 'zoom'"):
        CanvasFit(64, 64, "zoom")
    with pytest.raises(ValueError, match="0 = the source size"):
        CanvasFit(-8, 64)
