"""Bad input never crashes the queue cryptically and never corrupts the user's model.

Each test feeds one kind of bad or unusual input (no face, wrong model family, wrong ControlNet,
wrong or hostile adapter file, missing face models, odd images and masks) and asserts the message
the user sees or the exact behaviour; the last ones check that the input model is never modified,
that repeated runs do not leak memory, and that results are deterministic.
"""
from __future__ import annotations

import gc
import os
import pickle
import random
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from instantid.adapter import NARROW_LAYERS, AdapterFileError, load_adapter
from instantid.sdxl import ADAPTER_LAYER_NUMBERS, ATTN2_KEYS, adapter_key_names

from support import antelope
from test_apply import Kit, load_kit, sample, seeded_conditioning, unet_output

TINY_WIDTHS = [64 if i in NARROW_LAYERS else 128 for i in range(len(ATTN2_KEYS))]
LAYOUT_HINT = "Expected an InstantID adapter: 'image_proj'"


def photo(*faces: tuple[tuple[int, int], int], size: int = 320) -> torch.Tensor:
    """A ComfyUI IMAGE [1, size, size, 3] with the synthetic faces (cell, green) the fake detector finds."""
    pixels = np.zeros((size, size, 3), np.uint8)
    for cell, g in faces:
        antelope.draw_face(pixels, cell, g, antelope.det_scale_for(size, size, 640))
    return torch.from_numpy(pixels).float()[None] / 255.0


def blank(size: int = 320) -> torch.Tensor:
    return torch.zeros(1, size, size, 3)


def expected_point(cell: tuple[int, int], g: int, size: int, index: int) -> tuple[int, int]:
    """(x, y) pixel of keypoint `index` the detector should report, from the marker geometry alone."""
    _, kps = antelope.expected_face(cell, g, antelope.det_scale_for(size, size, 640))
    return int(kps[index, 0]), int(kps[index, 1])


def bgr(image: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray((image[0, ..., :3].numpy() * 255).round().astype(np.uint8)[..., ::-1])


# ------------------------------------------------------------------------------ adapter files --
# Pure tests: instantid.adapter.load_adapter, no ComfyUI.


def cheap_adapter_state(widths: list[int] = TINY_WIDTHS) -> dict:
    """The InstantID layout with stride-0 tensors: every shape right, a few KB on disk."""
    from resampler import RESAMPLER_CONFIG, Resampler

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Resampler(**RESAMPLER_CONFIG).state_dict().items()}
    image_proj = {k: torch.zeros(()).expand(shape) for k, shape in shapes.items()}
    ip_adapter = {name: torch.zeros(()).expand(width, 2048)
                  for number, width in zip(ADAPTER_LAYER_NUMBERS, widths) for name in adapter_key_names(number)}
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def test_cheap_adapter_layout_loads(tmp_path: Path) -> None:
    """The fixture the file tests below corrupt is itself accepted, so their errors come from the corruption."""
    path = tmp_path / "ip-adapter.bin"
    torch.save(cheap_adapter_state(), path)
    assert path.stat().st_size < 100_000
    assert load_adapter(path).widths == TINY_WIDTHS


def _safetensors(path: Path, flat: dict) -> Path:
    import safetensors.torch
    safetensors.torch.save_file({k: v.contiguous() for k, v in flat.items()}, str(path))
    return path


def _ip_adapter_plain() -> dict:
    ip = {name: torch.zeros(640, 2048) for name in adapter_key_names(1)}
    return {"image_proj": {"proj.weight": torch.zeros(8192, 1280), "proj.bias": torch.zeros(8192),
                           "norm.weight": torch.zeros(2048), "norm.bias": torch.zeros(2048)}, "ip_adapter": ip}


def _ip_adapter_plus() -> dict:
    state = _ip_adapter_plain()
    state["image_proj"] = {"latents": torch.zeros(1, 16, 1280), "proj_in.weight": torch.zeros(1280, 1280),
                           "proj_in.bias": torch.zeros(1280), "proj_out.weight": torch.zeros(2048, 1280)}
    return state


WRONG_FILES = {
    "ip-adapter_sdxl.bin": (lambda p: torch.save(_ip_adapter_plain(), p),
                            "is an IP-Adapter / IP-Adapter FaceID (its image projection is not InstantID's face Resampler)"),
    "ip-adapter-plus_sdxl.bin": (lambda p: torch.save(_ip_adapter_plus(), p),
                                 "is an IP-Adapter Plus (its Resampler takes 1280-wide image features"),
    "ip-adapter_sd15.bin": (lambda p: torch.save({"image_proj": {"proj.weight": torch.zeros(3072, 1024)},
                                                  "ip_adapter": {"1.to_k_ip.weight": torch.zeros(320, 768)}}, p),
                            "is an adapter for a 768-wide text context (SD1.5), not SDXL's 2048"),
    "sdxl_checkpoint.bin": (lambda p: torch.save({"state_dict": {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(8)}}, p),
        "is a model checkpoint (UNet/ControlNet weights), not an adapter"),
    "sdxl_unet.safetensors": (lambda p: _safetensors(p, {"input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
                                                         "out.2.bias": torch.zeros(4)}),
                              "is a model checkpoint (UNet/ControlNet weights), not an adapter"),
    "face_lora.safetensors": (lambda p: _safetensors(p, {
        "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}), "is a LoRA, not an adapter"),
    "notes.bin": (lambda p: torch.save({"epoch": torch.tensor(3), "optimizer": {}}, p),
                  ("is not an IP-Adapter-style file (no 'image_proj' and 'ip_adapter' sections; it holds 2 entries "
                   "such as epoch, optimizer)")),
}


@pytest.mark.parametrize("name", list(WRONG_FILES))
def test_a_file_that_is_not_an_instantid_adapter_is_named(tmp_path: Path, name: str) -> None:
    write, what = WRONG_FILES[name]
    path = tmp_path / name
    write(path)
    with pytest.raises(AdapterFileError) as error:
        load_adapter(path)
    message = str(error.value)
    assert message.startswith(f"{path} {what}"), message
    assert LAYOUT_HINT in message and "https://huggingface.co/InstantX/InstantID" in message


def _damaged(kind: str, folder: Path) -> tuple[Path, str]:
    good_bin = folder / "good.bin"
    torch.save({"image_proj": {"latents": torch.randn(1, 16, 64)}}, good_bin)
    good_st = _safetensors(folder / "good.safetensors", {"image_proj.latents": torch.randn(1, 16, 64)})
    data = {"truncated.bin": (good_bin.read_bytes()[:400], "could not be read (PytorchStreamReader failed"),
            "random.bin": (np.random.default_rng(0).bytes(3000), "could not be read (not a PyTorch weights file)"),
            "html.bin": (b"<!DOCTYPE html><html>Too Many Requests</html>", "is a web page, not weights"),
            "empty.bin": (b"", "is empty (0 bytes)"),
            "truncated.safetensors": (good_st.read_bytes()[:200], "could not be read (not valid safetensors"),
            "renamed.bin": (good_st.read_bytes(), ("is a safetensors file with a '.bin' name; rename it to "
                                                   "ip-adapter-renamed.safetensors")),
            "html.safetensors": (b"<html>404</html>", "is a web page, not weights")}[kind]
    path = folder / f"ip-adapter-{kind}"
    path.write_bytes(data[0])
    return path, data[1]


@pytest.mark.parametrize("kind", ["truncated.bin", "random.bin", "html.bin", "empty.bin", "truncated.safetensors",
                                  "html.safetensors", "renamed.bin"])
def test_damaged_adapter_file_names_the_file_and_says_download_again(tmp_path: Path, kind: str) -> None:
    path, what = _damaged(kind, tmp_path)
    with pytest.raises(AdapterFileError) as error:
        load_adapter(path)
    message = str(error.value)
    assert message.startswith(str(path)) and what in message, message
    if kind not in ("empty.bin", "renamed.bin"):
        assert f"({path.stat().st_size} bytes)" in message and "Download it again" in message
    assert LAYOUT_HINT in message
    assert "refused" not in message  # a broken download is not reported as an attack


def test_adapter_with_wrong_widths_names_the_tensor_and_the_layout(tmp_path: Path) -> None:
    state = cheap_adapter_state()
    state["ip_adapter"]["3.to_v_ip.weight"] = torch.zeros(()).expand(96, 2048)
    torch.save(state, tmp_path / "wide.bin")
    with pytest.raises(AdapterFileError) as error:
        load_adapter(tmp_path / "wide.bin")
    assert str(error.value).startswith(f"{tmp_path / 'wide.bin'}: 3.to_v_ip.weight is [96, 2048], expected [64, 2048]")
    assert LAYOUT_HINT in str(error.value)

    del state["ip_adapter"]["139.to_v_ip.weight"]
    state["image_proj"]["proj_out.weight"] = torch.zeros(()).expand(1024, 1280)
    torch.save(state, tmp_path / "odd.bin")
    with pytest.raises(AdapterFileError, match=r"proj_out.weight is \[1024, 1280\], expected \[2048, 1280\]"):
        load_adapter(tmp_path / "odd.bin")
    state["image_proj"]["proj_out.weight"] = torch.zeros(()).expand(2048, 1280)
    torch.save(state, tmp_path / "short.bin")
    with pytest.raises(AdapterFileError, match="has 139 per-layer tensors where SDXL InstantID has 140 .*"
                                               "missing 139.to_v_ip.weight"):
        load_adapter(tmp_path / "short.bin")


class _Payload:
    """Unpickling this object opens (creates) the marker file: a stand-in for any code a hostile file runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("container", ["torch zip", "plain pickle"])
def test_adapter_pickle_that_would_run_code_is_refused(tmp_path: Path, container: str) -> None:
    marker = tmp_path / "payload-ran"
    path = tmp_path / "ip-adapter.bin"
    state = {"image_proj": {"latents": _Payload(marker)}, "ip_adapter": {}}
    if container == "torch zip":
        torch.save(state, path)
        assert zipfile.is_zipfile(path)
    else:
        path.write_bytes(pickle.dumps(state, protocol=2))
    with pytest.raises(AdapterFileError) as error:
        load_adapter(path)
    message = str(error.value)
    assert message.startswith(f"{path} was refused and not loaded: it is a pickle that could run code when loaded "
                              "(it would import and call io.open)"), message
    assert "delete this file and use the official ip-adapter.bin" in message
    assert not marker.exists()
    # The payload is live: an unsafe load of the very same file runs it. (It only creates the marker.)
    torch.load(path, weights_only=False) if container == "torch zip" else pickle.loads(path.read_bytes())
    assert marker.exists()


# ------------------------------------------------------------------------------- ComfyUI kit --


class RecordingKit(Kit):
    """test_apply's Kit that also keeps the UI output of the last node run (notes, warnings)."""
    last_ui: dict | None = None

    def run_node(self, node_id: str, **inputs: Any) -> tuple:
        output = getattr(self.nodes, node_id).execute(**inputs)
        ui = output.ui
        self.last_ui = ui.as_dict() if hasattr(ui, "as_dict") else ui
        return tuple(output.args)

    def ui_text(self) -> str:
        return "\n".join(self.last_ui["text"]) if self.last_ui else ""


@pytest.fixture(scope="module")
def kit(comfy) -> RecordingKit:
    return load_kit(comfy, RecordingKit, photo(((4, 3), 128)))


@pytest.fixture(scope="module")
def errors(comfy) -> Any:
    """The pack's exception classes as ComfyUI loaded them."""
    class Errors:
        NoFace = comfy.pack_module("instantid.face_inputs").NoFaceError
        Unsupported = comfy.pack_module("instantid.checks").UnsupportedModelError
        Missing = comfy.pack_module("instantid.faces").FaceModelsMissing
        Invalid = comfy.pack_module("instantid.faces").FaceModelInvalid
    return Errors


def hint_of(positive: list) -> torch.Tensor:
    """The keypoint image attached to the IdentityNet, back as a ComfyUI IMAGE [B, H, W, 3]."""
    return positive[0][1]["control"].cond_hint_original.movedim(1, -1)


def single_keypoints(kit: Kit, image: torch.Tensor) -> torch.Tensor:
    """The keypoint frame of one image on its own (detection + drawing, no batch involved)."""
    from instantid.keypoints import keypoint_image_batch
    face = kit.analyzer.detect(bgr(image))
    assert face is not None
    return keypoint_image_batch([face.kps], image.shape[2], image.shape[1])


# ----------------------------------------------------------------------------------- no face --


@pytest.mark.parametrize(("images", "named"), [(1, "the reference image 1 of 1 (image input)"),
                                               (2, "the reference images 1, 2 of 2 (image input)")])
def test_no_face_in_the_reference_stops_with_the_image_named(kit, errors, images, named):
    with pytest.raises(errors.NoFace) as error:
        kit.apply(image=torch.cat([blank()] * images))
    message = str(error.value)
    assert message.startswith(f"No face found in {named}. Use a photo with one clearly visible"), message
    assert "set on_no_face to 'skip' to pass the model and conditioning through unchanged" in message


@pytest.mark.parametrize("node_id", ["ApplyInstantID", "ApplyInstantIDAdvanced", "InstantIDAttentionPatch"])
def test_skip_passes_model_and_conditioning_through_and_says_so(kit, node_id, caplog):
    positive, negative = seeded_conditioning(1), seeded_conditioning(2)
    extra = {} if node_id == "InstantIDAttentionPatch" else {"positive": positive, "negative": negative}
    outputs = kit.apply(node_id, image=blank(), on_no_face="skip", **extra)
    assert outputs[0] is kit.model
    if node_id == "InstantIDAttentionPatch":
        assert outputs[1] is None  # no face tokens: the ControlNet node downstream passes through too
    else:
        assert outputs[1] is positive and outputs[2] is negative and "control" not in positive[0][1]
    note = ("InstantID skipped (on_no_face='skip'): no face found in the reference image 1 of 1 (image input); "
            "the model and conditioning pass through unchanged")
    assert kit.ui_text() == note
    assert note in caplog.text


def test_reference_batch_uses_only_the_images_with_a_face(kit):
    first, second = photo(((4, 3), 128)), photo(((5, 4), 60))
    (_, positive, _) = kit.apply(image=torch.cat([first, blank(), second]))
    assert kit.ui_text() == ("reference image 2 of 3 had no face and was ignored; the identity comes from the other 2")
    embeddings = [kit.analyzer.detect(bgr(image)).embedding for image in (first, second)]
    expected = kit.adapter.face_tokens(torch.from_numpy(np.mean(np.float64(embeddings), axis=0)).float()[None])
    torch.testing.assert_close(positive[0][1]["control"].face_tokens[0], expected.cond, rtol=0, atol=1e-6)
    (_, only_faces, _) = kit.apply(image=torch.cat([first, second]))
    assert torch.equal(positive[0][1]["control"].face_tokens[0], only_faces[0][1]["control"].face_tokens[0])
    (_, first_only, _) = kit.apply(image=first)
    assert not torch.allclose(first_only[0][1]["control"].face_tokens[0], expected.cond, atol=1e-3)


def test_keypoint_batch_keeps_positions_and_never_uses_the_photo(kit, errors):
    first, second = photo(((3, 3), 128)), photo(((6, 5), 200))
    pose = torch.cat([first, blank() + 0.5, second])  # the middle one is a gray photo without a face
    with pytest.raises(errors.NoFace, match=r"^No face found in the keypoint image 2 of 3 \(image_kps\)\. .*"
                                            "or disconnect image_kps to take the pose from the reference"):
        kit.apply(image_kps=pose)
    (_, positive, _) = kit.apply(image_kps=pose, on_no_face="skip")
    hint = hint_of(positive)
    assert hint.shape == (3, 320, 320, 3)
    assert torch.equal(hint[0:1], single_keypoints(kit, first))
    assert torch.equal(hint[1], torch.zeros(320, 320, 3))  # black frame, not the photo
    assert torch.equal(hint[2:3], single_keypoints(kit, second))
    assert not torch.equal(hint[0], hint[2])
    assert "keypoint image 2 of 3 had no face: black keypoint frames" in kit.ui_text()
    # Preprocessor node: same frames, same positions; a gray batch without faces gives RGB black.
    (frames,) = kit.run_node("FaceKeypointsPreprocessor", faceanalysis=kit.analyzer, image=pose, on_no_face="skip")
    assert torch.equal(frames, hint)
    (black,) = kit.run_node("FaceKeypointsPreprocessor", faceanalysis=kit.analyzer,
                            image=torch.full((2, 64, 48, 1), 0.5), on_no_face="skip")
    assert black.shape == (2, 64, 48, 3) and not black.any()
    with pytest.raises(errors.NoFace, match="^No face found in image 2 of 3 given to Face Keypoints Preprocessor"):
        kit.run_node("FaceKeypointsPreprocessor", faceanalysis=kit.analyzer, image=pose)


def test_no_face_in_any_keypoint_image_skips_the_whole_apply(kit):
    outputs = kit.apply(image_kps=torch.cat([blank(), blank()]), on_no_face="skip")
    assert outputs[0] is kit.model and "control" not in outputs[1][0][1]
    assert kit.ui_text() == ("InstantID skipped (on_no_face='skip'): no face found in the keypoint images 1, 2 of 2 "
                             "(image_kps); the model and conditioning pass through unchanged")


# ---------------------------------------------------------------------------- model checks --


@pytest.mark.parametrize(("family", "named", "problem"), [
    ("sd15", "Stable Diffusion 1.5 (ComfyUI: SD15, BaseModel)", "its cross-attention takes 768-wide text context"),
    ("sd2", "Stable Diffusion 2.x (ComfyUI: SD20, BaseModel)", "its cross-attention takes 1024-wide text context"),
    ("sd3", "Stable Diffusion 3 / 3.5 (ComfyUI: SD3, SD3)", "it is a transformer (DiT) model (OpenAISignatureMMDITWrapper)"),
    ("flux", "Flux (ComfyUI: Flux, Flux)", "it is a transformer (DiT) model (Flux)")])
def test_non_sdxl_model_is_refused_before_anything_is_patched(kit, errors, family, named, problem):
    from support import tiny_models
    model = getattr(tiny_models, f"build_tiny_{family}")()
    options_before = repr(model.model_options)
    for node_id in ("ApplyInstantIDAdvanced", "InstantIDAttentionPatch"):
        with pytest.raises(errors.Unsupported) as error:
            kit.apply(node_id, model=model)
        message = str(error.value)
        assert message.startswith(f"InstantID needs an SDXL model, but the MODEL input is {named}: {problem}"), message
        assert "InstantID weights exist only for SDXL" in message and message.endswith("load an SDXL checkpoint.")
    assert repr(model.model_options) == options_before


@pytest.mark.parametrize(("writer", "named"), [
    ("write_sd15_controlnet", ("an SD1.5 ControlNet (its cross-attention takes 768-wide text context; "
                               "the IdentityNet takes SDXL's 2048)")),
    ("write_control_lora", "a Control-LoRA"),
    ("write_t2i_adapter", "a T2I-Adapter"),
    (None, "empty: the ControlNet file could not be loaded")])
def test_wrong_controlnet_is_named(kit, errors, tmp_path, writer, named):
    import comfy.controlnet

    from support import tiny_models
    control_net = None
    if writer is not None:
        control_net = comfy.controlnet.load_controlnet(str(getattr(tiny_models, writer)(tmp_path / f"{writer}.safetensors")))
        assert control_net is not None
    with pytest.raises(errors.Unsupported) as error:
        kit.apply("ApplyInstantID", control_net=control_net)
    message = str(error.value)
    assert message.startswith(f"The control_net input is {named}"), message
    assert "load the InstantID IdentityNet with 'Load ControlNet Model'" in message
    assert "models/controlnet/instantid/diffusion_pytorch_model.safetensors" in message


# ---------------------------------------------------------------------------- face models --


def _face_tree(kind: str, root: Path) -> Path:
    """An insightface root laid out the way users get it wrong; returns the folder to name in the error."""
    documented = root / "models" / "antelopev2"
    if kind == "missing folder":
        root.mkdir(parents=True)
    elif kind == "nested twice":
        antelope.write_antelopev2(documented / "antelopev2" / "antelopev2")
    elif kind == "one file missing":
        antelope.write_antelopev2(documented)
        (documented / "glintr100.onnx").unlink()
    elif kind in ("corrupt detector", "nested once"):
        folder = antelope.write_antelopev2(documented / "antelopev2" if kind == "nested once" else documented)
        if kind == "corrupt detector":
            (folder / "scrfd_10g_bnkps.onnx").write_bytes(b"<html>rate limited</html>")
        return folder
    return documented


@pytest.mark.parametrize(("kind", "expected"), [
    ("missing folder", ["InsightFace antelopev2 face models not found. Put scrfd_10g_bnkps.onnx and glintr100.onnx in:"]),
    ("nested twice", ["too deeply nested, move it to {folder}/scrfd_10g_bnkps.onnx"]),
    ("one file missing", ["{folder}: has scrfd_10g_bnkps.onnx; missing glintr100.onnx"]),
    ("corrupt detector", ["{folder}/scrfd_10g_bnkps.onnx (25 bytes) is not a usable antelopev2 model"]),
    ("nested once", [])])
def test_face_analysis_node_explains_the_face_model_folder(kit, errors, monkeypatch, tmp_path, kind, expected):
    import folder_paths
    root = tmp_path / "insightface"
    folder = _face_tree(kind, root)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "insightface", ([str(root)], {".onnx"}))
    started = time.monotonic()
    if not expected:  # the layout the official zip unpacks to is accepted
        (analyzer,) = kit.run_node("InstantIDFaceAnalysis", provider="CPU")
        assert analyzer.detect(bgr(photo(((4, 3), 128)))) is not None
        return
    with pytest.raises((errors.Missing, errors.Invalid)) as error:
        kit.run_node("InstantIDFaceAnalysis", provider="CPU")
    message = str(error.value)
    for text in expected:
        assert text.format(folder=folder) in message, message
    assert "python -m instantid fetch-models" in message
    if kind != "corrupt detector":
        assert f"\n  {root / 'models' / 'antelopev2'}\n" in message  # where the files belong
    # conftest makes any insightface download or outside connection raise, which would replace this error.
    assert time.monotonic() - started < 10


def test_provider_problems_are_warned_in_the_log_and_on_the_node(kit, monkeypatch, caplog):
    from importlib import metadata

    import onnxruntime
    installed = {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"}

    def version(name: str) -> str:
        if name not in installed:
            raise metadata.PackageNotFoundError(name)
        return installed[name]
    monkeypatch.setattr(metadata, "version", version)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["AzureExecutionProvider", "CPUExecutionProvider"])
    (analyzer,) = kit.run_node("InstantIDFaceAnalysis", provider="CUDA")
    assert analyzer.providers_in_use == {"detection": ["CPUExecutionProvider"], "recognition": ["CPUExecutionProvider"]}
    expected = [
        ("Face analysis: CUDA was requested but this onnxruntime offers only AzureExecutionProvider, "
         "CPUExecutionProvider; face analysis runs on the CPU instead. For NVIDIA GPUs run: "
         "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"),
        "Several onnxruntime distributions are installed (onnxruntime 1.32.0, onnxruntime-gpu 1.31.1).",
        "Keep one: pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu.",
        "Face analysis is using: detection on CPUExecutionProvider; recognition on CPUExecutionProvider."]
    for text in expected:
        assert text in kit.ui_text(), kit.ui_text()
        assert text in caplog.text


# ----------------------------------------------------------------------------------- images --


def test_rgba_gray_nan_and_out_of_range_images(kit, errors):
    rgb = photo(((4, 3), 128))
    (_, reference, _) = kit.apply(image=rgb)
    tokens = reference[0][1]["control"].face_tokens[0]
    rgba = torch.cat([rgb, torch.rand(1, 320, 320, 1, generator=torch.Generator().manual_seed(0))], dim=-1)
    stretched = torch.where(rgb == 0, -0.5, torch.where(rgb == 1, 1.5, rgb))  # clamps back to the same picture
    with_nan = torch.where(rgb == 0, torch.nan, rgb)
    for image in (rgba, stretched, with_nan):
        (_, positive, _) = kit.apply(image=image)
        assert torch.equal(positive[0][1]["control"].face_tokens[0], tokens)
    kit.apply(image=stretched)
    assert kit.ui_text() == ("the reference image values range from -0.5 to 1.5, outside ComfyUI's 0..1; they were "
                             "clamped")
    kit.apply(image=rgb * 255)
    assert "(values up to 255 mean an upstream node did not divide by 255)" in kit.ui_text()
    # One gray channel is accepted; the synthetic detector only sees red markers, so gray has no face.
    with pytest.raises(errors.NoFace, match=r"^No face found in the reference image 1 of 1"):
        kit.apply(image=rgb[..., :1])


@pytest.mark.parametrize("size", [64, 4096])
def test_tiny_and_huge_images(kit, size):
    cell = (9, 9) if size == 64 else (12, 7)
    image = photo((cell, 128), size=size)
    (_, positive, _) = kit.apply(image=image)
    hint = hint_of(positive)
    assert hint.shape == (1, size, size, 3)
    x, y = expected_point(cell, 128, size, 4)
    assert hint[0, y, x].tolist() == [1.0, 0.0, 1.0]  # the last drawn point (magenta) is where the face is


def test_batch_of_sixteen_reference_images_is_averaged(kit):
    faces = [((2 + i % 4, 2 + i // 4), 40 + 12 * i) for i in range(16)]
    images = torch.cat([photo(face, size=256) for face in faces])
    (_, positive, _) = kit.apply(image=images)
    embeddings = np.float64([kit.analyzer.detect(bgr(images[i:i + 1])).embedding for i in range(16)])
    expected = kit.adapter.face_tokens(torch.from_numpy(embeddings.mean(axis=0)).float()[None])
    torch.testing.assert_close(positive[0][1]["control"].face_tokens[0], expected.cond, rtol=0, atol=1e-6)
    assert kit.ui_text() == ""


def test_face_at_the_border_is_used(kit):
    image = photo(((0, 0), 128))
    face = kit.analyzer.detect(bgr(image))
    bbox, kps = antelope.expected_face((0, 0), 128, antelope.det_scale_for(320, 320, 640))
    np.testing.assert_allclose(face.kps, kps, atol=1e-3)
    assert bbox[0] < 0 and kps[:, 0].min() < 0  # the face really is cut by the border
    (_, positive, _) = kit.apply(image=image, image_kps=image)
    assert torch.equal(hint_of(positive), single_keypoints(kit, image))
    np.testing.assert_allclose(face.embedding, antelope.expected_embedding(bgr(image), face.kps), atol=1e-5)


def test_face_below_the_detector_minimum_says_crop_closer(kit, errors):
    # An 18 px face in a 1280 px photo: 9 detector pixels at 640, below the detector's smallest face.
    pixels = np.zeros((1280, 1280, 3), np.uint8)
    antelope.draw_face(pixels, (40, 40), 128, det_scale=2.0)
    small = torch.from_numpy(pixels).float()[None] / 255
    with pytest.raises(errors.NoFace, match="crop closer if the face is small in the picture"):
        kit.apply(image=small)
    # Following the advice works: in a 320 px crop the same face fills a detector cell.
    assert kit.analyzer.detect(bgr(small[:, 480:800, 480:800])) is not None


# ------------------------------------------------------------------------------------ masks --


def _face_term(patch: Any, q: torch.Tensor, text: torch.Tensor, latents: int, sigma: float) -> torch.Tensor:
    """What an attn2 patch adds to the layer's text attention, for a crafted UNet call: `latents`
    latents, cond and uncond chunks, an 8x12 activation (a non-square layer)."""
    import comfy.ldm.modules.attention as comfy_attention
    heads = q.shape[-1] // 64
    extra_options = {"n_heads": heads, "cond_or_uncond": [1, 0], "sigmas": torch.full((latents,), sigma),
                     "activations_shape": [2 * latents, q.shape[-1], 8, 12], "attn_precision": None}
    return patch(q, text, text, extra_options) - comfy_attention.optimized_attention(q, text, text, heads)


@pytest.mark.parametrize(("mask_shape", "latents", "row_masks"), [
    ((40, 60), 1, ["left"]),                     # 2-D, odd size: resized to each layer's resolution
    ((1, 33, 50), 2, ["left", "left"]),          # one mask shared by the batch
    ((2, 40, 60), 3, ["left", "zero", "zero"]),  # shorter batch than the latents: its last mask repeats
    ((4, 40, 60), 2, ["left", "zero"])])         # longer batch: cut
def test_mask_zeroes_face_attention_outside_and_keeps_it_inside(kit, mask_shape, latents, row_masks):
    mask = torch.zeros(mask_shape)
    mask[..., : mask_shape[-1] // 3] = 1  # the left third
    if mask.ndim == 3 and mask.shape[0] > 1:
        mask[1:] = 0
    key, width = ("input", 4, 0), 64
    (plain, _) = kit.apply("InstantIDAttentionPatch")
    (masked, _) = kit.apply("InstantIDAttentionPatch", mask=mask)
    sigma = float(kit.model.get_model_object("model_sampling").percent_to_sigma(0.5))
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(2 * latents, 8 * 12, width, generator=generator)
    text = torch.randn(2 * latents, 77, width, generator=generator)
    patches = [m.model_options["transformer_options"]["patches_replace"]["attn2"][key] for m in (plain, masked)]
    full, part = (_face_term(patch, q, text, latents, sigma).reshape(2, latents, 8, 12, width) for patch in patches)
    assert full.abs().mean() > 1e-2  # the face attention does act at this layer and sigma
    for latent, kind in enumerate(row_masks):  # both chunks (cond and uncond) of each latent
        if kind == "zero":
            assert not part[:, latent].any()
            continue
        torch.testing.assert_close(part[:, latent, :, :3], full[:, latent, :, :3], rtol=0, atol=1e-6)  # inside
        assert not part[:, latent, :, 6:].any()  # outside: exactly zero
        assert (part[:, latent].abs() <= full[:, latent].abs() + 1e-6).all()  # the edge between is a blend


def test_sigma_window_is_applied_per_latent_in_a_batch(kit, comfy):
    """ComfyUI passes one sigma per latent while a UNet call holds cond and uncond rows of every latent;
    a batch of two latents used to crash the patch ('The expanded size of the tensor (4) must match')."""
    import comfy.ldm.modules.attention as comfy_attention
    sampling = kit.model.get_model_object("model_sampling")
    inside, outside = float(sampling.percent_to_sigma(0.6)), float(sampling.percent_to_sigma(0.1))
    (patched, _) = kit.apply("InstantIDAttentionPatch", start_at=0.5, end_at=1.0)
    patch = patched.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 4, 0)]
    generator = torch.Generator().manual_seed(4)
    q, text = torch.randn(4, 96, 64, generator=generator), torch.randn(4, 77, 64, generator=generator)
    options = {"n_heads": 1, "cond_or_uncond": [1, 0], "sigmas": torch.tensor([inside, outside]),
               "activations_shape": [4, 64, 8, 12], "attn_precision": None}
    plain = comfy_attention.optimized_attention(q, text, text, 1)
    face = (patch(q, text, text, options) - plain).reshape(2, 2, 96, 64)  # [chunk, latent, ...]
    assert face[:, 0].abs().amin(dim=(1, 2)).gt(0).all() and not face[:, 1].any()
    # Another pack's callback on the same key (IPAdapter_plus / PuLID protocol) gets the same per-latent window.
    other = comfy.pack_module("instantid.attention").FaceAttentionPatch()
    other.add(lambda out, q, k, v, extra_options, **kwargs: torch.ones_like(out), sigma_start=inside + 1e-3,
              sigma_end=inside - 1e-3)
    added = (other(q, text, text, options) - plain).reshape(2, 2, 96, 64)
    torch.testing.assert_close(added[:, 0], torch.ones(2, 96, 64), rtol=0, atol=1e-5)
    assert not added[:, 1].any()


@pytest.mark.parametrize(("mask_batch", "latents"), [(2, 3), (1, 2)])
def test_mask_and_latent_batches_that_differ_sample(kit, mask_batch, latents):
    """ComfyUI tiles a conditioning mask batch over the latents; 2 masks for 3 latents used to crash inside
    the sampler ('The size of tensor a (3) must match the size of tensor b (2)')."""
    import comfy.sample
    mask = torch.zeros(mask_batch, 37, 53)
    mask[:, :, :20] = 1
    (model, positive, negative) = kit.apply(mask=mask)
    latent = torch.zeros(latents, 4, 8, 8)
    out = comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 0), 1, 5.0, "euler", "normal", positive, negative,
                              latent, denoise=1.0, seed=0, disable_pbar=True)
    assert out.shape == (latents, 4, 8, 8) and torch.isfinite(out).all()


# ------------------------------------------------------------------ isolation, leaks, determinism --


def test_the_input_model_is_never_modified(kit):
    sampling = kit.model.get_model_object("model_sampling")
    sigma = float(sampling.percent_to_sigma(0.3))
    options_before = repr(kit.model.model_options)
    weights_before = {k: v.clone() for k, v in kit.model.model.diffusion_model.state_dict().items()}
    before = unet_output(kit.model, {}, sigma, [0, 1])
    (patched, positive, negative) = kit.apply()
    after_apply = unet_output(kit.model, {}, sigma, [0, 1])
    sample(patched, positive, negative, steps=1)
    after_sampling = unet_output(kit.model, {}, sigma, [0, 1])
    patched_out = unet_output(patched, patched.model_options["transformer_options"], sigma, [0, 1])
    assert torch.equal(before, after_apply) and torch.equal(before, after_sampling)
    assert not torch.allclose(before, patched_out, atol=1e-4)  # the clone does differ
    assert repr(kit.model.model_options) == options_before
    state = kit.model.model.diffusion_model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights_before.items())


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _live(type_name: str) -> int:
    return sum(1 for obj in gc.get_objects() if type(obj).__name__ == type_name)


def test_a_hundred_apply_and_sample_cycles_do_not_grow_memory(kit, record_property):
    # A short prompt: the cost of a cycle is the text's keys and values in every cross-attention,
    # and what could leak does not depend on the prompt's length.
    prompts = seeded_conditioning(1, tokens=4), seeded_conditioning(2, tokens=4)

    def cycle(i: int) -> None:
        (model, positive, negative) = kit.apply(ip_weight=0.5 + 0.003 * i, cn_strength=0.8 - 0.002 * i,
                                                positive=prompts[0], negative=prompts[1])
        sample(model, positive, negative, steps=1, seed=i)

    for i in range(10):  # warm-up: ComfyUI's model management, allocator pools, caches
        cycle(i)
    gc.collect()
    start, patches_start, patchers_start = _rss_mb(), _live("FaceAttentionPatch"), _live("ModelPatcher")
    for i in range(100):
        cycle(i)
    gc.collect()
    end, patches_end, patchers_end = _rss_mb(), _live("FaceAttentionPatch"), _live("ModelPatcher")
    report = (f"RSS after warm-up {start:.1f} MB, after 100 Apply+sample cycles {end:.1f} MB "
              f"(growth {end - start:+.1f} MB); live FaceAttentionPatch {patches_start} -> {patches_end}, "
              f"ModelPatcher {patchers_start} -> {patchers_end}")
    record_property("memory", report)  # printed in the run's summary
    assert patches_end <= patches_start and patchers_end <= patchers_start, report
    assert end - start < 40, report


def test_same_inputs_same_output_and_global_rng_untouched(kit):
    torch.manual_seed(1234)
    np.random.seed(99)
    random.seed(7)
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    first = kit.apply(noise=0.35)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]
    second = kit.apply(noise=0.35)
    one, two = sample(*first, steps=1, seed=5), sample(*second, steps=1, seed=5)
    assert torch.equal(one, two)
    assert not torch.equal(one, sample(*first, steps=1, seed=6))
