"""A keypoint image that is already drawn (a saved keypoint PNG, Face Keypoints Preprocessor's output)
given to Apply InstantID's image_kps is used as the IdentityNet hint as is; photos never are.

The recogniser is tested directly on drawings made by the pack's own drawing code (resized, JPEG
compressed, any size) and on photos: every test-bed face photo, real photographs bundled with
scikit-image (an insightface dependency) in several brightness/saturation variants, colour bars,
coloured dots and random saturated shapes. The graph tests run the executor and capture the hint
the IdentityNet's control object gets."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ADAPTER_BIN, IDENTITYNET_NAME, UNET_NAME
from instantid.drawn_keypoints import is_keypoint_drawing, keypoint_drawings
from instantid.keypoints import KEYPOINT_COLORS, draw_keypoints
from support import antelope
from support.workflows import loaded_image, preview_images, write_face_photo

def face_keypoints(width: int, height: int, half_size: float, seed: int) -> np.ndarray:
    """Five points of a face of half box size `half_size` somewhere in the canvas, slightly turned."""
    rng = np.random.default_rng(seed)
    centre = np.array([width * rng.uniform(0.3, 0.7), height * rng.uniform(0.3, 0.7)])
    angle = rng.uniform(-0.5, 0.5)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return (centre + antelope.FACE_TEMPLATE @ rotation.T * half_size).astype(np.float32)


def jpeg(rgb: np.ndarray, quality: int = 75) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def resized(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.BICUBIC))


def drawn_pose(width: int = 1024, height: int = 1024, half_size: float = 180, seed: int = 0) -> np.ndarray:
    return draw_keypoints(face_keypoints(width, height, half_size, seed), width, height)


def as_image(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(rgb)).float()[None] / 255.0


# ------------------------------------------------------------------------- the recogniser alone --

DRAWING_CASES = [(w, h, fraction) for w, h in ((1024, 1024), (896, 1152), (1536, 1024), (512, 512), (320, 320))
                 for fraction in (0.1, 0.2, 0.35)]


@pytest.mark.parametrize(("width", "height", "fraction"), DRAWING_CASES)
def test_drawings_are_recognised_resized_and_jpeg_compressed(width, height, fraction):
    drawing = drawn_pose(width, height, fraction * min(width, height), seed=width + int(100 * fraction))
    variants = {"as drawn": drawing, "jpeg 75": jpeg(drawing),
                "jpeg 75, resized to 896x1152": resized(jpeg(drawing), 896, 1152),
                "resized to half, jpeg 75": jpeg(resized(drawing, width // 2, height // 2)),
                "jpeg 60, resized to 1.5x": resized(jpeg(drawing, 60), width * 3 // 2, height * 3 // 2)}
    assert {name: is_keypoint_drawing(image) for name, image in variants.items()} == dict.fromkeys(variants, True)


def test_the_batch_helper_reads_comfyui_images_and_extra_channels():
    drawing, photo = as_image(jpeg(drawn_pose(320, 320, 90))), as_image(scikit_photos()["astronaut"][:320, :320])
    assert keypoint_drawings(torch.cat([drawing, photo, drawing])) == [True, False, True]
    with_alpha = torch.cat([drawing, torch.ones_like(drawing[..., :1])], dim=-1)
    assert keypoint_drawings(with_alpha) == [True]


def scikit_photos() -> dict[str, np.ndarray]:
    import skimage.data
    photos = {}
    for name in ("astronaut", "coffee", "chelsea", "rocket", "retina", "hubble_deep_field", "immunohistochemistry",
                 "logo", "colorwheel"):
        image = getattr(skimage.data, name)()
        photos[name] = np.ascontiguousarray(image[..., :3]).astype(np.uint8)
    return photos


def not_drawings() -> dict[str, np.ndarray]:
    """Photos and natural-ish images a recogniser could fall for: dark, saturated, primaries on black."""
    images: dict[str, np.ndarray] = {}
    for name, image in scikit_photos().items():
        images[name] = image
        images[f"{name} at 25 %"] = (image * 0.25).astype(np.uint8)
        images[f"{name} at 12 %"] = (image * 0.12).astype(np.uint8)
        hsv = np.asarray(Image.fromarray(image).convert("HSV")).astype(int)
        hsv[..., 1] = np.minimum(hsv[..., 1] * 3, 255)
        images[f"{name} saturated"] = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"))
    for size in (64, 128, 320, 640, 1024):
        for g in (0, 64, 128, 255):
            pixels = np.zeros((size, size, 3), np.uint8)
            antelope.draw_face(pixels, (1, 1), g, antelope.det_scale_for(size, size, 640))
            images[f"test-bed face {size}px g={g}"] = pixels
    bars = np.zeros((480, 640, 3), np.uint8)
    for i, colour in enumerate([(255, 255, 255), (255, 255, 0), (0, 255, 255), (0, 255, 0), (255, 0, 255),
                                (255, 0, 0), (0, 0, 255), (0, 0, 0)]):
        bars[:, 80 * i:80 * (i + 1)] = colour
    images["colour bars"] = bars
    dots = np.zeros((512, 512, 3), np.uint8)
    yy, xx = np.mgrid[:512, :512]
    for i, colour in enumerate(KEYPOINT_COLORS):  # the five point colours, no limbs
        dots[(xx - 80 - 80 * i) ** 2 + (yy - 256) ** 2 <= 100] = colour
    images["five coloured dots"] = dots
    drawing = drawn_pose(512, 512, 120)
    images["keypoints drawn over a photo at 25 %"] = np.maximum(images["astronaut at 25 %"], drawing)
    images["keypoints drawn over a photo at 12 %"] = np.maximum(images["astronaut at 12 %"], drawing)
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:512, :512]
    for k in range(12):
        canvas = np.zeros((512, 512, 3), np.uint8)
        for _ in range(int(rng.integers(3, 30))):
            colour = rng.choice([0, 153, 255], 3)
            cx, cy, r = rng.integers(0, 512), rng.integers(0, 512), rng.integers(3, 30)
            canvas[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = colour
        images[f"random saturated discs {k}"] = canvas
    return images


def test_photos_and_natural_images_are_never_taken_for_drawings():
    taken = [name + suffix for name, image in not_drawings().items()
             for suffix, variant in (("", image), (" (jpeg)", jpeg(image))) if is_keypoint_drawing(variant)]
    assert taken == []


# ---------------------------------------------------------------------------- in the executor --


@pytest.fixture
def control_spy(monkeypatch):
    """Records the IdentityNet control objects that reach KSampler and the hint they resize for sampling."""
    import comfy.controlnet
    import nodes
    seen = {"controls": [], "sampled_hints": []}
    real_sampler, real_get_control = nodes.common_ksampler, comfy.controlnet.ControlNet.get_control

    def sampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, **kwargs):
        seen["controls"] += [entry[1]["control"] for entry in positive + negative if "control" in entry[1]]
        return real_sampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, **kwargs)

    def get_control(self, x_noisy, *args, **kwargs):
        result = real_get_control(self, x_noisy, *args, **kwargs)
        seen["sampled_hints"].append(self.cond_hint.detach().clone())
        return result
    monkeypatch.setattr(nodes, "common_ksampler", sampler)
    monkeypatch.setattr(comfy.controlnet.ControlNet, "get_control", get_control)
    return seen


def apply_graph(image_kps: list, extra: dict | None = None) -> dict:
    """API prompt: tiny checkpoint, reference face, Apply InstantID with `image_kps`, sampled at 64x64."""
    def node(kind: str, **inputs) -> dict:
        return {"class_type": kind, "inputs": inputs}
    return {
        "1": node("TestBedTinyCheckpoint", unet_name=UNET_NAME),
        "2": node("CLIPTextEncode", text="a photo of a person", clip=["1", 1]),
        "3": node("CLIPTextEncode", text="blurry", clip=["1", 1]),
        "4": node("EmptyLatentImage", width=64, height=64, batch_size=1),
        "5": node("InstantIDModelLoader", instantid_file=ADAPTER_BIN),
        "6": node("InstantIDFaceAnalysis", provider="CPU"),
        "7": node("ControlNetLoader", control_net_name=IDENTITYNET_NAME),
        "8": node("LoadImage", image="drawn-kps-reference.png"),
        "9": node("ApplyInstantID", instantid=["5", 0], insightface=["6", 0], control_net=["7", 0], image=["8", 0],
                  model=["1", 0], positive=["2", 0], negative=["3", 0], weight=0.8, start_at=0.0, end_at=1.0,
                  image_kps=image_kps),
        "10": node("KSampler", seed=1, steps=1, cfg=2.0, sampler_name="euler", scheduler="normal", denoise=1.0,
                   model=["9", 0], positive=["9", 1], negative=["9", 2], latent_image=["4", 0]),
        "11": node("TestBedLatentStats", samples=["10", 0]),
        **(extra or {}),
    }


def load_image(name: str) -> dict:
    return {"class_type": "LoadImage", "inputs": {"image": name}}


def assert_hint_is(seen: dict, expected: torch.Tensor) -> None:
    import comfy.utils
    assert seen["controls"] and all(control is seen["controls"][0] for control in seen["controls"])
    hint = seen["controls"][0].cond_hint_original
    assert torch.equal(hint.movedim(1, -1).cpu(), expected)
    # During sampling the hint is ComfyUI's centre-cropped resize of exactly that image to 64x64.
    resized_expected = comfy.utils.common_upscale(expected.movedim(-1, 1), 64, 64, "nearest-exact", "center")
    assert seen["sampled_hints"] and all(torch.equal(h.cpu().float(), resized_expected) for h in seen["sampled_hints"])


def test_a_drawn_keypoint_png_is_the_hint_as_is(comfy, control_spy):
    inputs = comfy.base / "input"
    write_face_photo(inputs / "drawn-kps-reference.png")
    drawing = resized(jpeg(drawn_pose(1024, 1024, 220, seed=3)), 896, 1152)
    Image.fromarray(drawing).save(inputs / "drawn-kps-pose.png")
    result = comfy.run(apply_graph(["12", 0], {"12": load_image("drawn-kps-pose.png")}))
    assert result.success, result.error_text()
    assert_hint_is(control_spy, loaded_image(inputs / "drawn-kps-pose.png"))
    assert result.outputs["9"]["text"] == ["keypoint image 1 of 1 (image_kps) is a keypoint drawing, used as the hint as is"]


def test_face_keypoints_preprocessor_into_apply_runs(comfy, control_spy):
    inputs = comfy.base / "input"
    write_face_photo(inputs / "drawn-kps-reference.png")
    write_face_photo(inputs / "drawn-kps-pose-photo.png", cell=(6, 5), g=200)
    extra = {"12": load_image("drawn-kps-pose-photo.png"),
             "13": {"class_type": "FaceKeypointsPreprocessor", "inputs": {"faceanalysis": ["6", 0], "image": ["12", 0]}},
             "14": {"class_type": "PreviewImage", "inputs": {"images": ["13", 0]}}}
    result = comfy.run(apply_graph(["13", 0], extra))
    assert result.success, result.error_text()
    keypoints = preview_images(result.outputs, "14")
    assert keypoints.sum() > 0 and keypoints.shape == (1, 320, 320, 3)
    assert_hint_is(control_spy, keypoints)
    # Independently: the points the fake detector reports for that marker, drawn by the pack's drawing code.
    _, kps = antelope.expected_face((6, 5), 200, antelope.det_scale_for(320, 320, 640))
    expected = torch.from_numpy(draw_keypoints(kps.astype(np.float32), 320, 320)).float()[None] / 255.0
    assert (keypoints - expected).abs().gt(0.01).float().mean() < 0.01  # truncation may move an edge by a pixel


def test_a_photo_without_a_face_still_stops_with_the_message(comfy, control_spy):
    inputs = comfy.base / "input"
    write_face_photo(inputs / "drawn-kps-reference.png")
    Image.fromarray(np.full((320, 320, 3), 128, np.uint8)).save(inputs / "drawn-kps-gray.png")
    result = comfy.run(apply_graph(["12", 0], {"12": load_image("drawn-kps-gray.png")}))
    assert not result.success
    message = result.error_text()
    assert "No face found in the keypoint image 1 of 1 (image_kps)" in message
    assert ("a keypoint drawing, black with the five coloured points as InstantID Face Keypoints (Pose) draws them, "
            "is used as is") in message
    assert control_spy["controls"] == []


def test_a_batch_may_mix_drawings_and_photos(comfy):
    from test_apply import face_photo, load_kit
    from test_robustness import bgr
    kit = load_kit(comfy)
    drawing = as_image(jpeg(drawn_pose(320, 320, 100, seed=5)))
    photo = face_photo(cell=(6, 5), g=200)
    (_, positive, _) = kit.apply(image_kps=torch.cat([drawing, photo]))
    hint = positive[0][1]["control"].cond_hint_original.movedim(1, -1)
    assert torch.equal(hint[0], drawing[0])
    face = kit.analyzer.detect(bgr(photo))
    assert torch.equal(hint[1], torch.from_numpy(draw_keypoints(face.kps, 320, 320)).float() / 255.0)
