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
