"""Identity tools on the test bed: choosing the face in a group photo, the keypoint image fitted to
another canvas, saved identities (Save -> Load gives the same latent bit for bit, with no face
models), and the face similarity against a saved identity."""
from __future__ import annotations

import hashlib
import json
import pickle
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ADAPTER_BIN, ADAPTER_SAFETENSORS, COMFYUI, IDENTITYNET_NAME, UNET_NAME
from support import antelope
from test_apply import face_photo, load_kit, sample, seeded_conditioning

# Three faces of different sizes on a 640x640 photo (detector scale 1): (cell, green); the green
# value sets the size. From the left: small, largest, middle-sized.
GROUP = {"left": ((3, 10), 0), "middle": ((10, 4), 255), "right": ((16, 12), 128)}


def group_photo() -> torch.Tensor:
    pixels = np.zeros((640, 640, 3), np.uint8)
    for cell, green in GROUP.values():
        antelope.draw_face(pixels, cell, green)
    return torch.from_numpy(pixels).float()[None] / 255.0


def expected_kps(name: str) -> np.ndarray:
    return antelope.expected_face(*GROUP[name])[1]


@pytest.fixture(scope="module")
def kit(comfy):
    return load_kit(comfy)


@pytest.fixture(scope="module")
def identity_files(comfy):
    return comfy.pack_module("instantid.identity_files")


def bgr(image: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray((image[0].numpy() * 255).round().astype(np.uint8)[..., ::-1])


# ------------------------------------------------------------------------------- face choice --


@pytest.mark.parametrize("face_index, name", [(0, "middle"), (1, "left"), (2, "middle"), (3, "right")])
def test_face_index_picks_the_largest_or_the_kth_from_the_left(kit, face_index, name):
    photo = group_photo()
    (_, face_embeds) = kit.apply("InstantIDAttentionPatch", image=photo, face_index=face_index)
    identity = face_embeds.identity
    np.testing.assert_allclose(identity.kps, expected_kps(name), rtol=0, atol=1e-3)
    np.testing.assert_allclose(identity.embeddings[0].numpy(), antelope.expected_embedding(bgr(photo), identity.kps),
                               rtol=0, atol=1e-5)
    assert identity.face_index == face_index and identity.image_size == (640, 640)
    # The Apply node's pose comes from the same face, and the preprocessor draws only that face.
    (keypoints,) = kit.run_node("FaceKeypointsPreprocessor", faceanalysis=kit.analyzer, image=photo,
                                face_index=face_index)
    from instantid.keypoints import keypoint_image_batch
    assert torch.equal(keypoints, keypoint_image_batch([identity.kps], 640, 640))


@pytest.mark.parametrize("node_id", ["ApplyInstantID", "ApplyInstantIDAdvanced", "InstantIDAttentionPatch",
                                     "FaceKeypointsPreprocessor"])
def test_face_index_beyond_the_faces_names_the_count_and_the_image(kit, node_id):
    photos = torch.cat([face_photo(size=640), group_photo()])
    with pytest.raises(ValueError) as error:
        if node_id == "FaceKeypointsPreprocessor":
            kit.run_node(node_id, faceanalysis=kit.analyzer, image=group_photo(), face_index=4)
        else:
            kit.apply(node_id, image=photos, face_index=2)
    message = str(error.value)
    if node_id == "FaceKeypointsPreprocessor":
        assert "face_index 4" in message and "only 3 faces were found in image 1 of 1" in message
    else:
        # The first photo has one face: the message names it and says how many there are.
        assert "face_index 2" in message and "only 1 face was found in image 1 of 2 (reference image)" in message
    assert "0 (the largest face)" in message


# -------------------------------------------------------------------------- fitted keypoints --


def test_preprocessor_fits_and_mirrors_the_chosen_face(kit):
    from instantid.keypoints import CanvasFit, keypoint_image_batch
    photo = group_photo()
    (plain,) = kit.run_node("FaceKeypointsPreprocessor", faceanalysis=kit.analyzer, image=photo)
    (same,) = kit.run_node("FaceKeypointsPreprocessor", faceanalysis=kit.analyzer, image=photo, width=0, height=0,
                           fit="crop", mirror=False)
    assert torch.equal(plain, same)  # the defaults keep today's image
    (fitted,) = kit.run_node("FaceKeypointsPreprocessor", faceanalysis=kit.analyzer, image=photo, width=896,
                             height=1152, fit="pad", mirror=True, face_index=3)
    assert fitted.shape == (1, 1152, 896, 3)
    kps = kit.analyzer.detect(bgr(photo), 3).kps
    expected = keypoint_image_batch([CanvasFit(896, 1152, "pad", True).points(kps, 640, 640)], 896, 1152)
    assert torch.equal(fitted, expected)
    # Mirrored, the right face's red (image-left eye) circle sits on the left half of the pad area.
    red = (fitted[0] == torch.tensor([1.0, 0.0, 0.0])).all(-1).nonzero()
    assert red[:, 1].float().mean() < 896 / 2


# ---------------------------------------------------------------------------- saved identities --


def save_node(kit, face_embeds, prefix: str, label: str = "") -> dict:
    output = kit.nodes.InstantIDSaveFaceEmbeds.execute(face_embeds=face_embeds, filename_prefix=prefix, label=label)
    return output.ui["face_embeds"][0]


def load_node(kit, choice: str):
    (face_embeds,) = kit.run_node("InstantIDLoadFaceEmbeds", face_embeds_file=choice)
    return face_embeds


def test_save_load_round_trip_gives_the_same_latent_bit_for_bit(kit, comfy):
    import safetensors.torch
    from safetensors import safe_open

    import instantid
    photo = face_photo(cell=(5, 2), g=90)
    (_, face_embeds) = kit.apply("InstantIDAttentionPatch", image=photo)
    saved = save_node(kit, face_embeds, "round/trip", label="Ada, two photos")
    path = comfy.base / "output" / saved["subfolder"] / saved["filename"]
    assert saved["subfolder"] == "instantid_faces/round" and saved["filename"] == "trip_00001_.safetensors"
    assert saved["choice"] == "round/trip_00001_.safetensors [output]"
    assert save_node(kit, face_embeds, "round/trip")["filename"] == "trip_00002_.safetensors"  # counted like SaveImage
    tensors = safetensors.torch.load_file(str(path))  # plain safetensors
    assert set(tensors) == {"embeddings", "kps", "bbox", "image_size"}
    assert tensors["embeddings"].dtype == torch.float32 and tensors["embeddings"].shape == (1, 512)
    assert tensors["image_size"].tolist() == [320, 320]
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
    with open(comfy.base / "models" / "instantid" / ADAPTER_BIN, "rb") as adapter_file:
        adapter_sha256 = hashlib.file_digest(adapter_file, "sha256").hexdigest()
    assert metadata == {"format": "instantid-face-embeds", "format_version": "1", "combine": "average",
                        "face_index": "0", "label": "Ada, two photos", "pack_version": instantid.__version__,
                        "adapter_name": ADAPTER_BIN,
                        "adapter_sha256": adapter_sha256}

    loaded = load_node(kit, saved["choice"])
    assert loaded.tokens is None and torch.equal(loaded.identity.embeddings, face_embeds.identity.embeddings)
    original = kit.apply("ApplyInstantID", image=photo)
    restored = kit.apply("ApplyInstantID", image=None, insightface=None, face_embeds=loaded)
    assert torch.equal(sample(*original, seed=3), sample(*restored, seed=3))
    # The stored keypoints were drawn at the stored image size: the same IdentityNet hint.
    assert torch.equal(original[1][0][1]["control"].cond_hint_original, restored[1][0][1]["control"].cond_hint_original)


def test_a_saved_identity_works_with_another_adapter(kit, comfy):
    (other_adapter,) = kit.nodes.InstantIDModelLoader.execute(instantid_file=ADAPTER_SAFETENSORS).args
    (_, face_embeds) = kit.apply("InstantIDAttentionPatch", image=face_photo(cell=(2, 6), g=60))
    loaded = load_node(kit, save_node(kit, face_embeds, "other_adapter")["choice"])
    (_, remade) = kit.apply("InstantIDAttentionPatch", instantid=other_adapter, image=None, insightface=None,
                            face_embeds=loaded)
    expected = other_adapter.face_tokens(face_embeds.identity.embeddings)
    assert torch.equal(remade.tokens.cond, expected.cond)
    assert not torch.allclose(remade.tokens.cond, face_embeds.tokens.cond)  # fp16 file: other tokens
    # Saved again after the other adapter: the file names the adapter that made the tokens.
    saved = save_node(kit, remade, "other_adapter")
    from safetensors import safe_open
    with safe_open(str(comfy.base / "output" / saved["subfolder"] / saved["filename"]), framework="pt") as file:
        assert file.metadata()["adapter_name"] == ADAPTER_SAFETENSORS


def test_loaded_identity_needs_tokens_before_apply_controlnet(kit):
    (_, face_embeds) = kit.apply("InstantIDAttentionPatch")
    loaded = load_node(kit, save_node(kit, face_embeds, "split")["choice"])
    (keypoints,) = kit.run_node("FaceKeypointsPreprocessor", faceanalysis=kit.analyzer, image=kit.image)
    common = dict(control_net=kit.control_net, image_kps=keypoints, positive=seeded_conditioning(1),
                  negative=seeded_conditioning(2), strength=0.8, start_at=0.0, end_at=1.0)
    with pytest.raises(ValueError, match="no face tokens yet.*'InstantID Patch Attention'"):
        kit.run_node("ApplyInstantIDControlNet", face_embeds=loaded, **common)
    (_, with_tokens) = kit.apply("InstantIDAttentionPatch", image=None, insightface=None, face_embeds=loaded)
    (positive, _) = kit.run_node("ApplyInstantIDControlNet", face_embeds=with_tokens, **common)
    assert torch.equal(positive[0][1]["control"].face_tokens[0], face_embeds.tokens.cond)


def test_missing_face_analysis_or_reference_is_explained(kit):
    (_, face_embeds) = kit.apply("InstantIDAttentionPatch")
    with pytest.raises(ValueError, match="insightface input is not connected, but the reference image needs"):
        kit.apply("ApplyInstantID", insightface=None)
    with pytest.raises(ValueError, match="insightface input is not connected, but the pose image .image_kps. needs"):
        kit.apply("ApplyInstantID", insightface=None, image=None, face_embeds=face_embeds, image_kps=kit.image)
    with pytest.raises(ValueError, match="No reference: connect a photo of the person to image, or a saved identity"):
        kit.apply("ApplyInstantIDAdvanced", image=None)


def test_identity_file_names_that_leave_the_folders_are_refused(identity_files, comfy):
    base = comfy.base
    for name in ("../../x.safetensors", "../instantid_faces/../../x.safetensors [output]", "/etc/passwd",
                 "a/../../b.safetensors"):
        with pytest.raises(ValueError, match="points outside instantid_faces/"):
            identity_files.resolve_identity_file(name, base / "input", base / "output")
    with pytest.raises(ValueError, match="no identity file 'nobody.safetensors'"):
        identity_files.resolve_identity_file("nobody.safetensors", base / "input", base / "output")


def test_a_pickle_renamed_safetensors_is_refused_and_never_runs(identity_files, comfy, tmp_path):
    marker = tmp_path / "pickle-ran"

    class Payload:
        def __reduce__(self):
            return (Path.mkdir, (marker,))
    folder = comfy.base / "input" / "instantid_faces"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "renamed.safetensors").write_bytes(pickle.dumps(Payload(), protocol=4))
    torch.save({"embeddings": torch.zeros(1, 512)}, folder / "torch_saved.safetensors")
    for name in ("renamed.safetensors", "torch_saved.safetensors"):
        path = identity_files.resolve_identity_file(name, comfy.base / "input", comfy.base / "output")
        with pytest.raises(ValueError, match="refused and not loaded: it is a pickle.*never unpickled"):
            identity_files.load_identity(path)
    assert not marker.exists()


def test_other_safetensors_files_are_named_not_used(identity_files, comfy):
    import safetensors.torch
    folder = comfy.base / "input" / "instantid_faces"
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({"lora_unet_down.weight": torch.zeros(2)}, str(folder / "a_lora.safetensors"))
    with pytest.raises(ValueError, match="not an InstantID identity .it holds lora_unet_down.weight"):
        identity_files.load_identity(folder / "a_lora.safetensors")


# ------------------------------------------------------------------------------------ similarity --


def test_similarity_with_a_saved_identity_equals_similarity_with_the_photo(kit):
    reference = torch.cat([face_photo(cell=(5, 2), g=90), face_photo(cell=(3, 3), g=200)])
    generated = torch.cat([face_photo(cell=(6, 6), g=100), face_photo(cell=(1, 7), g=30)])
    (_, face_embeds) = kit.apply("InstantIDAttentionPatch", image=reference)
    loaded = load_node(kit, save_node(kit, face_embeds, "similarity")["choice"])
    by_photo = kit.run_node("InstantIDFaceSimilarity", faceanalysis=kit.analyzer, reference=reference, image=generated)
    by_identity = kit.run_node("InstantIDFaceSimilarity", faceanalysis=kit.analyzer, reference=loaded, image=generated)
    assert by_identity[0] == by_photo[0]
    assert -1.0 < by_photo[0] < 0.999  # a real comparison, not the same face


# ------------------------------------------------------------------- a client with no face models --


def identity_prompt(choice: str) -> dict:
    """API format: Load Face Embeds + Apply InstantID (attention and IdentityNet), no face analysis."""
    def node(kind: str, **inputs):
        return {"class_type": kind, "inputs": inputs}
    return {
        "1": node("TestBedTinyCheckpoint", unet_name=UNET_NAME),
        "2": node("InstantIDModelLoader", instantid_file=ADAPTER_BIN),
        "3": node("ControlNetLoader", control_net_name=IDENTITYNET_NAME),
        "4": node("InstantIDLoadFaceEmbeds", face_embeds_file=choice),
        "5": node("CLIPTextEncode", text="a portrait", clip=["1", 1]),
        "6": node("CLIPTextEncode", text="blurry", clip=["1", 1]),
        "7": node("ApplyInstantID", instantid=["2", 0], control_net=["3", 0], model=["1", 0], positive=["5", 0],
                  negative=["6", 0], weight=0.8, start_at=0.0, end_at=1.0, face_embeds=["4", 0]),
        "8": node("EmptyLatentImage", width=64, height=64, batch_size=1),
        "9": node("KSampler", seed=1, steps=1, cfg=4.0, sampler_name="euler", scheduler="normal", denoise=1.0,
                  model=["7", 0], positive=["7", 1], negative=["7", 2], latent_image=["8", 0]),
        "10": node("TestBedLatentStats", samples=["9", 0]),
    }


def test_api_graph_with_a_loaded_identity_runs_without_face_models(kit, comfy, monkeypatch):
    (_, face_embeds) = kit.apply("InstantIDAttentionPatch")
    choice = save_node(kit, face_embeds, "api_client")["choice"]
    faces = comfy.pack_module("instantid.faces")

    def no_face_models(*args, **kwargs):
        raise AssertionError("face models were loaded")
    monkeypatch.setattr(faces.FaceAnalyzer, "load", no_face_models)
    monkeypatch.setattr(faces.FaceAnalyzer, "detect", no_face_models)
    prompt = identity_prompt(choice)
    assert not any("FaceAnalysis" in node["class_type"] for node in prompt.values())
    result = comfy.run(prompt, reuse_outputs=False)
    assert result.success, result.error_text()
    assert result.outputs["10"]["latent"][0]["finite"] is True
    refused = comfy.run(identity_prompt("../../x.safetensors"), reuse_outputs=False)
    assert not refused.success and "face_embeds_file" in refused.error_text()


def test_a_file_written_from_the_documented_format_runs_as_a_workflow_would(comfy):
    """prepare_for_test_bed puts a saved identity (written by the test, from the format's description)
    under the name a workflow's Load Face Embeds asks for, as the shipped workflows are run."""
    from support.workflows import prepare_for_test_bed
    prompt = prepare_for_test_bed(identity_prompt("from_format.safetensors"), UNET_NAME, comfy.base / "input")
    result = comfy.run(prompt, reuse_outputs=False)
    assert result.success, result.error_text()
    assert "synthetic test face" in result.outputs["4"]["text"][0]


def test_save_needs_face_embeds_and_a_prefix_inside_the_folder(kit):
    save = kit.nodes.InstantIDSaveFaceEmbeds.execute
    with pytest.raises(TypeError, match="face_embeds is empty .an 'on_no_face: skip' upstream found no face"):
        save(face_embeds=None, filename_prefix="x")
    (_, face_embeds) = kit.apply("InstantIDAttentionPatch")
    for prefix in ("../../escape", "/tmp/abs", ""):
        with pytest.raises(ValueError, match="must be a name inside output/instantid_faces/"):
            save(face_embeds=face_embeds, filename_prefix=prefix)


def test_a_saved_group_of_faces_keeps_its_combine_mode(kit, comfy):
    """Basic Apply and Patch Attention use the mode the identity was saved with; Advanced's
    combine_embeds, an explicit choice on the node, recombines the raw rows and says so."""
    identity_module = comfy.pack_module("instantid.identity")
    FaceEmbeds, FaceIdentity = identity_module.FaceEmbeds, identity_module.FaceIdentity
    rows = torch.randn(2, 512, generator=torch.Generator().manual_seed(5)) * 20
    identity = FaceIdentity(rows, "concat", antelope.expected_face((4, 3), 128)[1].astype(np.float32),
                            np.zeros(4, np.float32), (128, 128))
    (_, kept) = kit.apply("InstantIDAttentionPatch", image=None, insightface=None, face_embeds=FaceEmbeds(identity))
    assert kept.tokens.cond.shape == (1, 32, 2048)
    output = kit.nodes.ApplyInstantIDAdvanced.execute(
        instantid=kit.adapter, control_net=kit.control_net, model=kit.model, positive=seeded_conditioning(1),
        negative=seeded_conditioning(2), ip_weight=0.8, cn_strength=0.8, start_at=0.0, end_at=1.0, noise=0.0,
        combine_embeds="average", face_embeds=FaceEmbeds(identity))
    assert torch.equal(output.args[1][0][1]["control"].face_tokens[0],
                       kit.adapter.face_tokens(rows.double().mean(0, keepdim=True).float()).cond)
    assert "combined with 'concat' when saved; here combine_embeds 'average'" in output.ui.as_dict()["text"][0]


@pytest.mark.skipif(COMFYUI is None, reason="ComfyUI not found")
def test_a_client_uploads_an_identity_and_runs_it_over_http(kit, comfy, tmp_path):
    """ComfyUI's real server: upload the file with POST /upload/image (subfolder instantid_faces),
    see it listed by /object_info, queue the Load + Apply graph, read the result from /history."""
    from support.server import comfyui_server, copy_models
    (_, face_embeds) = kit.apply("InstantIDAttentionPatch")
    saved = save_node(kit, face_embeds, "upload")
    data = (comfy.base / "output" / saved["subfolder"] / saved["filename"]).read_bytes()
    base = tmp_path / "server"
    copy_models(comfy.base, base)
    with comfyui_server(COMFYUI, base) as server:
        boundary = uuid.uuid4().hex
        body = b"".join([
            f'--{boundary}\r\nContent-Disposition: form-data; name="subfolder"\r\n\r\ninstantid_faces\r\n'.encode(),
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="alice.safetensors"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n".encode(), data, f"\r\n--{boundary}--\r\n".encode()])
        request = urllib.request.Request(server.url + "/upload/image", data=body, method="POST",
                                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.load(response)["subfolder"] == "instantid_faces"
        with urllib.request.urlopen(server.url + "/object_info/InstantIDLoadFaceEmbeds", timeout=30) as response:
            options = json.load(response)["InstantIDLoadFaceEmbeds"]["input"]["required"]["face_embeds_file"]
        assert "alice.safetensors" in json.dumps(options)
        request = urllib.request.Request(server.url + "/prompt", method="POST",
                                         data=json.dumps({"prompt": identity_prompt("alice.safetensors")}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            prompt_id = json.load(response)["prompt_id"]
        import time
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"{server.url}/history/{prompt_id}", timeout=30) as response:
                entry = json.load(response).get(prompt_id)
            if entry and entry["status"].get("completed") or entry and entry["status"].get("status_str") == "error":
                break
            time.sleep(0.2)
        assert entry and entry["status"]["status_str"] == "success", (entry, server.log()[-3000:])
        assert entry["outputs"]["10"]["latent"][0]["finite"] is True
