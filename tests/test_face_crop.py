"""Face crop and paste (instantid.face_crop and the two nodes): an unmodified crop pastes back to the
exact input, a processed crop changes only its box and blends along the feathered mask, a face at
the border is padded rather than shifted, and face_index picks the asked face."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from instantid.face_crop import (FaceCrop, crop_dimensions, crop_faces, paste_faces, resample,
                                 source_region)
from instantid.faces import FaceAnalyzer
from support import antelope

SIZE = 320  # the photos; the fake detector letterboxes them to 640 (det_scale 2)
DET_SCALE = antelope.det_scale_for(SIZE, SIZE, 640)


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory: pytest.TempPathFactory) -> FaceAnalyzer:
    folder = tmp_path_factory.mktemp("insightface") / "models" / "antelopev2"
    antelope.write_antelopev2(folder)
    return FaceAnalyzer.load(folder, "CPU")


def photo(*faces: tuple[tuple[int, int], int], seed: int = 0) -> np.ndarray:
    """A SIZE x SIZE RGB uint8 photo: a noisy background (so resampling can never round-trip it
    exactly) with a synthetic face per (cell, green)."""
    pixels = np.random.default_rng(seed).integers(0, 150, (SIZE, SIZE, 3)).astype(np.uint8)
    for cell, green in faces:
        antelope.draw_face(pixels, cell, green, DET_SCALE)
    return pixels


def batch(*photos: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(photos)).float() / 255.0


def face_centre(cell: tuple[int, int], green: int) -> np.ndarray:
    bbox, _ = antelope.expected_face(cell, green, DET_SCALE)
    return (bbox[:2] + bbox[2:]) / 2


def box_centre(crop: FaceCrop) -> np.ndarray:
    x0, y0, x1, y1 = crop.box
    return np.array([(x0 + x1) / 2, (y0 + y1) / 2])


def reference_mask(crop: FaceCrop, feather: float) -> np.ndarray:
    """The paste's blend weight over the box, written out pixel by pixel: distance of the pixel
    centre to the nearest box edge over the feather (at most half the short side), capped at 1."""
    box_h, box_w = crop.box_size
    ramp = min(feather, min(box_h, box_w) / 2)
    mask = np.empty((box_h, box_w))
    for y in range(box_h):
        for x in range(box_w):
            distance = min(x + 0.5, box_w - x - 0.5, y + 0.5, box_h - y - 0.5)
            mask[y, x] = 1.0 if ramp == 0 else min(1.0, distance / ramp)
    return mask


# ------------------------------------------------------------------------------------- domain --


def test_unmodified_crop_pastes_back_to_the_exact_input(analyzer):
    images = batch(photo(((4, 3), 128)), photo(((1, 5), 90), seed=1), photo(seed=2), photo(((7, 8), 220), seed=3))
    result = crop_faces(analyzer, images, size=256)
    assert result.image.shape == (4, 256, 256, 3) and result.mask.shape == (4, 256, 256)
    pasted, _ = paste_faces(images, result.image, result.crops)
    assert torch.equal(pasted, images)  # max abs diff 0
    # Not trivially so: putting the resampled crop back would change the pixels.
    crop = result.crops[0]
    naive = resample(result.image[0], crop.box_size)
    assert float((naive - source_region(images[0], crop.box)).abs().max()) > 0.05


def test_processed_crop_changes_only_its_box_and_blends_along_the_mask(analyzer):
    image = batch(photo(((9, 7), 128)))
    result = crop_faces(analyzer, image, size=256)
    (crop,) = result.crops
    pasted, notes = paste_faces(image, result.image + 0.1, result.crops, feather=20)
    assert notes == []
    x0, y0, x1, y1 = crop.box
    assert 0 < x0 and 0 < y0 and x1 < SIZE and y1 < SIZE
    outside = torch.ones(SIZE, SIZE, dtype=torch.bool)
    outside[y0:y1, x0:x1] = False
    assert torch.equal(pasted[0][outside], image[0][outside])
    # A uniform change of 0.1 resizes to 0.1 everywhere, so inside the box the result is the
    # original plus 0.1 times the mask.
    expected = image[0, y0:y1, x0:x1].numpy() + 0.1 * reference_mask(crop, 20)[..., None]
    np.testing.assert_allclose(pasted[0, y0:y1, x0:x1].numpy(), np.clip(expected, 0, 1), atol=2e-6)


def test_face_index_picks_the_largest_or_the_kth_from_the_left(analyzer):
    faces = {1: ((2, 4), 60), 2: ((6, 4), 200), 3: ((10, 4), 120)}  # left to right; the middle one is largest
    image = batch(photo(*faces.values()))
    for face_index, (cell, green) in [(0, faces[2]), *faces.items()]:
        result = crop_faces(analyzer, image, face_index=face_index, size=128)
        (crop,) = result.crops
        assert crop.face_found
        np.testing.assert_allclose(box_centre(crop), face_centre(cell, green), atol=0.5)
        bbox, _ = antelope.expected_face(cell, green, DET_SCALE)
        assert crop.box_size[1] == pytest.approx((bbox[2] - bbox[0]) * 2.2, abs=1)  # padding 0.6 on each side
    beyond = crop_faces(analyzer, image, face_index=4, size=128)
    assert not beyond.crops[0].face_found and float(beyond.mask.max()) == 0
    assert beyond.notes == ["image 1 of 1: face_index 4 asks for face 4 from the left, but 3 faces were found; its "
                            "crop is the whole image with an empty mask, and InstantID Face Paste returns it unchanged"]


def test_face_at_the_border_is_padded_not_shifted(analyzer):
    cell, green = (1, 5), 128  # about 15 px from the left edge
    image = batch(photo((cell, green)))
    result = crop_faces(analyzer, image, size=256)
    (crop,) = result.crops
    x0, y0, x1, y1 = crop.box
    assert x0 < 0  # reaches past the left edge instead of being moved inside
    np.testing.assert_allclose(box_centre(crop), face_centre(cell, green), atol=0.5)
    scale_x, _ = crop.scale
    # The face marker (saturated red) sits in the middle of the crop.
    red = (result.image[0, ..., 0] > 0.9) & (result.image[0, ..., 2] < 0.1)
    columns = torch.nonzero(red)[:, 1].float()
    assert abs(float(columns.mean()) + 0.5 - 128) < scale_x
    # Left of the image the crop repeats the edge column, and the mask is zero there.
    outside = int(-x0 * scale_x) - 2
    padded = result.image[0, :, :outside]
    torch.testing.assert_close(padded, padded[:, :1].expand(-1, outside, -1), atol=1e-6, rtol=0)  # all columns alike
    edge = resample(image[0, y0:y1, :1].expand(-1, 4, -1), (256, 4))[:, :1].clamp(0, 1)  # the image's edge column
    np.testing.assert_allclose(padded[:, :1].numpy(), edge.numpy(), atol=1e-6)
    assert float(result.mask[0, :, :outside].max()) == 0 and float(result.mask[0, 128, 128]) == 1
    pasted, _ = paste_faces(image, result.image, result.crops)
    assert torch.equal(pasted, image)


def test_batch_keeps_positions_and_an_image_without_a_face_passes_through(analyzer):
    images = batch(photo(((4, 3), 128)), photo(seed=5), photo(((8, 6), 40), seed=6))
    result = crop_faces(analyzer, images, size=256)
    assert [crop.face_found for crop in result.crops] == [True, False, True]
    assert result.notes == ["image 2 of 3: no face found; its crop is the whole image with an empty mask, and "
                            "InstantID Face Paste returns it unchanged"]
    assert result.crops[1].box == (0, 0, SIZE, SIZE) and float(result.mask[1].max()) == 0
    np.testing.assert_allclose(box_centre(result.crops[2]), face_centre((8, 6), 40), atol=0.5)
    pasted, notes = paste_faces(images, result.image * 0.5, result.crops)
    assert notes == ["image 2 of 3 had no face at the crop and is returned unchanged"]
    assert torch.equal(pasted[1], images[1])
    assert not torch.equal(pasted[0], images[0]) and not torch.equal(pasted[2], images[2])


def test_crop_keeps_the_aspect_in_multiples_of_eight():
    assert crop_dimensions(100, 150, 1024) == (1024, 680)
    assert crop_dimensions(150, 100, 1024) == (680, 1024)
    assert crop_dimensions(10, 1000, 64) == (64, 8)


@pytest.mark.parametrize("change, message", [
    (dict(size=1020), "size is 1020; use a multiple of 8"),
    (dict(padding=-0.1), "padding is -0.1; use 0 or more"),
])
def test_bad_crop_settings_are_named(analyzer, change, message):
    settings = dict(face_index=0, padding=0.6, size=256) | change
    with pytest.raises(ValueError, match=message):
        crop_faces(analyzer, batch(photo(((4, 3), 128))), **settings)


def test_mismatched_paste_inputs_are_named(analyzer):
    image = batch(photo(((4, 3), 128)))
    result = crop_faces(analyzer, image, size=256)
    with pytest.raises(ValueError, match=r"The image is 160x320 but the crop was taken from a 320x320 image"):
        paste_faces(image[:, :, :160], result.image, result.crops)
    with pytest.raises(ValueError, match=r"The processed crop is 256x128 but the crop was 256x256"):
        paste_faces(image, result.image[:, :128], result.crops)
    with pytest.raises(ValueError, match=r"Batch sizes differ: 1 original image\(s\), 2 processed"):
        paste_faces(image, result.image.expand(2, -1, -1, -1), result.crops)
    with pytest.raises(ValueError, match="must be the CROP output of InstantID Face Crop"):
        paste_faces(image, result.image, ["not a crop"])
    # An upscaled processed crop (same shape, twice the size) is resized to the crop first.
    doubled = resample(result.image[0], (512, 512))[None]
    pasted, _ = paste_faces(image, doubled, result.crops)
    assert torch.equal(pasted, paste_faces(image, resample(doubled[0], (256, 256))[None], result.crops)[0])


# -------------------------------------------------------------------------------------- nodes --


def test_nodes_are_registered_after_the_earlier_packs_with_descriptions_and_tooltips(comfy):
    pack_nodes = comfy.pack_module("nodes")
    ids = [node.define_schema().node_id for node in pack_nodes.NODES]
    assert {"InstantIDFaceCrop", "InstantIDFacePaste"} <= set(ids[8:])
    for node_id in ("InstantIDFaceCrop", "InstantIDFacePaste"):
        info = comfy.embedded.node_info(node_id)
        assert info["display_name"].startswith("InstantID") and info["description"] and info["category"] == "InstantID"
        for name, spec in info["input"]["required"].items():
            assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    crop = comfy.embedded.node_info("InstantIDFaceCrop")["input"]["required"]
    assert (crop["face_index"][1]["default"], crop["padding"][1]["default"], crop["size"][1]["default"]) == (0, 0.6, 1024)
    assert comfy.embedded.node_info("InstantIDFacePaste")["input"]["required"]["feather"][1]["default"] == 32


def test_crop_and_paste_nodes_round_trip_and_note_a_faceless_image(comfy):
    pack_nodes = comfy.pack_module("nodes")
    (analyzer,) = pack_nodes.InstantIDFaceAnalysis.execute(provider="CPU").args
    images = batch(photo(((4, 3), 128)), photo(seed=4))
    cropped = pack_nodes.InstantIDFaceCrop.execute(image=images, faceanalysis=analyzer, face_index=0, padding=0.6,
                                                   size=128)
    crop_image, crops, mask = cropped.args
    assert crop_image.shape == (2, 128, 128, 3) and mask.shape == (2, 128, 128)
    assert "image 2 of 2: no face found" in cropped.ui.as_dict()["text"][0]
    pasted = pack_nodes.InstantIDFacePaste.execute(image=images, processed=crop_image, crop=crops, feather=32)
    assert torch.equal(pasted.args[0], images)
    assert list(pasted.ui.as_dict()["text"]) == ["image 2 of 2 had no face at the crop and is returned unchanged"]


def _saved(comfy, result) -> np.ndarray:
    assert result.success, result.error_text()
    [image] = [image for output in result.outputs.values() for image in output.get("images", [])]
    return np.asarray(Image.open(comfy.base / "output" / image["subfolder"] / image["filename"]))


def face_repair_graph(photo_name: str, reference_name: str, denoise: float) -> dict:
    """The full-body repair: crop the face, InstantID img2img on the crop, paste the result back;
    denoise 0 makes the middle an identity. The shipped workflow also feeds the crop to image_kps
    (the pose of the face being repaired); here the pose comes from the reference, because the fake
    detector cannot see a face centred in a crop (it fires only on a marker filling one 32-px cell,
    and a crop's centre always falls on a cell corner)."""
    from comfy_execution.graph_utils import GraphBuilder

    from conftest import ADAPTER_BIN, IDENTITYNET_NAME, UNET_NAME
    g = GraphBuilder()
    checkpoint = g.node("TestBedTinyCheckpoint", unet_name=UNET_NAME)
    faces = g.node("InstantIDFaceAnalysis", provider="CPU")
    photo_node = g.node("LoadImage", image=photo_name)
    reference = g.node("LoadImage", image=reference_name)
    crop = g.node("InstantIDFaceCrop", image=photo_node.out(0), faceanalysis=faces.out(0), face_index=0, padding=0.6,
                  size=64)
    apply = g.node("ApplyInstantID", instantid=g.node("InstantIDModelLoader", instantid_file=ADAPTER_BIN).out(0),
                   insightface=faces.out(0), control_net=g.node("ControlNetLoader", control_net_name=IDENTITYNET_NAME).out(0),
                   image=reference.out(0), model=checkpoint.out(0),
                   positive=g.node("CLIPTextEncode", text="a face", clip=checkpoint.out(1)).out(0),
                   negative=g.node("CLIPTextEncode", text="blurry", clip=checkpoint.out(1)).out(0),
                   weight=0.8, start_at=0.0, end_at=1.0)
    latent = g.node("VAEEncode", pixels=crop.out(0), vae=checkpoint.out(2))
    sampled = g.node("KSampler", model=apply.out(0), positive=apply.out(1), negative=apply.out(2), latent_image=latent.out(0),
                     seed=1, steps=2, cfg=3.0, sampler_name="euler", scheduler="normal", denoise=denoise)
    decoded = g.node("VAEDecode", samples=sampled.out(0), vae=checkpoint.out(2))
    processed = decoded.out(0) if denoise > 0 else crop.out(0)
    paste = g.node("InstantIDFacePaste", image=photo_node.out(0), processed=processed, crop=crop.out(1), feather=32)
    g.node("SaveImage", images=paste.out(0), filename_prefix=f"face_repair_{denoise}")
    return g.finalize()


def write_photo(path: Path, pixels: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")
    return path.name


def test_face_repair_graph_runs_and_changes_only_the_face_box(comfy):
    original = photo(((4, 3), 128), seed=7)
    name = write_photo(comfy.base / "input" / "full_body.png", original)
    reference = write_photo(comfy.base / "input" / "repair_reference.png", photo(((4, 3), 128)))
    untouched = _saved(comfy, comfy.run(face_repair_graph(name, reference, denoise=0.0)))
    assert np.array_equal(untouched, original)
    repaired = _saved(comfy, comfy.run(face_repair_graph(name, reference, denoise=0.45))).astype(int)
    changed = np.nonzero(np.abs(repaired - original.astype(int)).max(axis=2))
    bbox, _ = antelope.expected_face((4, 3), 128, DET_SCALE)
    half = (bbox[2] - bbox[0]) * 1.1  # the padded box: 2.2 face widths
    centre = (bbox[:2] + bbox[2:]) / 2
    assert changed[0].size > 0
    assert changed[1].min() >= centre[0] - half - 1 and changed[1].max() <= centre[0] + half
    assert changed[0].min() >= centre[1] - half - 1 and changed[0].max() <= centre[1] + half
