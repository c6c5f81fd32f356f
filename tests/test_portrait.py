"""`python -m instantid portrait` from an empty HOME, in a subprocess as a new user runs it: ComfyUI
is installed through comfy-cli from a local git repository (a copy of the test bed's ComfyUI), the
fixture models are fetched from a loopback Hugging Face stand-in, and the image is drawn with
ComfyUI embedded. A second run downloads and installs nothing; a wrong checksum and an unreachable
ComfyUI repository each stop with a message naming the step.

The tiny SDXL-layout UNet cannot go through CheckpointLoaderSimple (a real checkpoint carries both
CLIP text encoders), so the run uses the shipped basic workflow with the loader swapped for the
test bed's (tests/support/workflows.py), passed with --workflow. The served "checkpoint" is the tiny
UNet, and the repository's extra_model_paths.yaml lists models/checkpoints as a diffusion_models
folder, so the fetched checkpoint file is the one that draws."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from instantid.commands import portrait
from instantid.model_files import CATALOG, DEFAULT_CHECKPOINT, FLUX_CATALOG
from instantid.commands.runner import RunError
from support.comfy_repo import make_comfyui_repository
from support.hub import serve_hub
from support.server import FIXTURE_PACK, TESTS, UNET_NAME, free_port
from support.workflows import REPO_ROOT, load_ui_workflow, prepare_for_test_bed, score_face_against, write_face_photo
from test_cli_run import PHOTO, REFERENCE, expected_similarity

ENTRIES = {entry.id: entry for entry in CATALOG}
CHECKPOINT = ENTRIES[DEFAULT_CHECKPOINT]
PROXIES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
BED_YAML = "test_bed:\n  base_path: .\n  diffusion_models: models/checkpoints\n"


@pytest.fixture(scope="module")
def bed_repository(comfy, tmp_path_factory) -> Path:
    from conftest import COMFYUI
    return make_comfyui_repository(COMFYUI, tmp_path_factory.mktemp("repo") / "ComfyUI.git", "0.8.0",
                                   files={"extra_model_paths.yaml": BED_YAML},
                                   links={"custom_nodes/test-bed-nodes": FIXTURE_PACK})


@pytest.fixture(scope="module")
def bed_workflow_file(comfy, tmp_path_factory) -> Path:
    """The shipped basic workflow on the test bed, with a face similarity between the face and a
    second photo (the tiny UNet draws no face to score)."""
    folder = tmp_path_factory.mktemp("bed-workflow")
    prompt = comfy.embedded.to_api(load_ui_workflow(portrait.shipped_workflow(posed=False)))
    prompt = prepare_for_test_bed(prompt, CHECKPOINT.path, folder, steps=1)
    prompt = score_face_against(prompt, str(write_face_photo(folder / "photo.png", **PHOTO)))
    path = folder / "bed.json"
    path.write_text(json.dumps(prompt))
    return path


@pytest.fixture
def hub(comfy):
    """The loopback hub serving the test bed's model files (the checkpoint is the tiny UNet)."""
    with serve_hub() as state:
        models = comfy.base / "models"
        for entry in (entry for entry in CATALOG if entry not in FLUX_CATALOG):  # portrait is SDXL-only
            source = models / "diffusion_models" / UNET_NAME if entry is CHECKPOINT else models / entry.folder / entry.path
            state.files[(entry.repo, entry.file)] = source.read_bytes()
        yield state


def run_portrait(home: Path, repository: str, endpoint: str, *args: str) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if name not in (*PROXIES, "COMFYUI_PATH")}
    env.update(HOME=str(home), INSTANTID_COMFYUI_REPO=repository, HF_ENDPOINT=endpoint,
               PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO_ROOT)]))
    return subprocess.run([sys.executable, "-m", "instantid", "portrait", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_portrait_from_an_empty_home_then_again_with_nothing_to_do(bed_repository, bed_workflow_file, hub, tmp_path):
    home, out = tmp_path / "home", tmp_path / "out"
    face = write_face_photo(tmp_path / "me.png", **REFERENCE)
    args = (str(face), "a portrait in the rain", "--seed", "7", "--out", str(out), "--workflow", str(bed_workflow_file))
    first = run_portrait(home, str(bed_repository), hub.endpoint, *args)
    assert first.returncode == 0, first.stderr[-3000:]

    comfyui = home / "comfy" / "ComfyUI"  # comfy-cli's default workspace under the new HOME
    assert 'version__ = "0.8.0"' in (comfyui / "comfyui_version.py").read_text()
    assert (comfyui / "custom_nodes" / "instantid-nodes").resolve() == REPO_ROOT
    for entry in [e for e in CATALOG if e.required] + [CHECKPOINT]:
        assert (comfyui / "models" / entry.folder / entry.path).read_bytes() == hub.files[(entry.repo, entry.file)]
    assert len(hub.file_gets()) == 5
    [png] = sorted(out.glob("*.png"))
    assert Image.open(png).size == (64, 64)
    assert first.stdout.splitlines() == [f"wrote {png}",
                                         f"face similarity: {expected_similarity(face, bed_workflow_file.parent / 'photo.png'):.3f}"]
    for step in ("[1/7] check the inputs", "[2/7] find ComfyUI", "[3/7] install ComfyUI 0.8.0 for",
                 "[4/7] link this pack", "[5/7] install the Python packages", "[6/7] fetch the models",
                 "[7/7] draw the portrait with bed.json"):
        assert step in first.stderr
    assert "Cloning into" in first.stderr and "torch 2" in first.stderr  # comfy-cli ran; this torch is kept
    assert "KSampler" in first.stderr  # the sampler's progress bar

    # Again, with the repository and the hub unreachable: nothing is downloaded or installed.
    hub.requests.clear()
    dead = f"http://127.0.0.1:{free_port()}"
    png.unlink()
    second = run_portrait(home, f"{dead}/ComfyUI.git", dead, *args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert hub.requests == []
    [again] = sorted(out.glob("*.png"))
    assert second.stdout.splitlines() == [f"wrote {again}", first.stdout.splitlines()[1]]
    for done in ("[3/7] install ComfyUI: not needed", "already in", "ComfyUI: already installed",
                 "pack: already installed", "all present"):
        assert done in second.stderr
    assert "Cloning" not in second.stderr


def test_unreachable_comfyui_repository_stops_at_the_install_step(hub, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/ComfyUI.git"
    face = write_face_photo(tmp_path / "me.png")
    result = run_portrait(tmp_path / "home", dead, hub.endpoint, str(face), "a portrait")
    assert result.returncode == 1
    error = last_line(result.stderr)
    assert error.startswith("python -m instantid portrait: error: step 'install ComfyUI' failed: `git ls-remote")
    assert dead in error and "INSTANTID_COMFYUI_REPO" in error and "To fix:" in error
    assert not (tmp_path / "home" / "comfy").exists() and hub.requests == []


def test_wrong_checksum_stops_at_the_fetch_step_and_installs_no_model(bed_repository, hub, tmp_path):
    adapter = ENTRIES["adapter"]
    hub.published_sha256[(adapter.repo, adapter.file)] = "0" * 64
    face = write_face_photo(tmp_path / "me.png")
    result = run_portrait(tmp_path / "home", str(bed_repository), hub.endpoint, str(face), "a portrait")
    assert result.returncode == 1
    error = last_line(result.stderr)
    assert error.startswith("python -m instantid portrait: error: step 'fetch the models' failed: ")
    assert f"sha256 mismatch: expected {'0' * 64}" in error
    comfyui = tmp_path / "home" / "comfy" / "ComfyUI"
    assert f"fetch-models --base-directory {comfyui} --only adapter --only identitynet" in error
    assert not (comfyui / "models" / "instantid" / "ip-adapter.bin").exists()
    assert not (comfyui / "models" / "instantid" / "ip-adapter.bin.part").exists()


# ----------------------------------------------------------------- filling a workflow's graph --


def shipped_api(comfy, posed: bool) -> dict:
    return comfy.embedded.to_api(load_ui_workflow(portrait.shipped_workflow(posed)))


def test_fill_portrait_sets_face_pose_prompt_seed_and_checkpoint_through_the_graph(comfy):
    prompt = shipped_api(comfy, posed=True)
    filled = portrait.fill_portrait(prompt, portrait.PortraitInputs(face="f.png", prompt="a knight", pose="p.png", seed=9,
                                                                    checkpoint="mine.safetensors"))
    by_type = {node["class_type"]: node for node in filled.values()}
    apply = by_type["ApplyInstantIDAdvanced"]["inputs"]
    assert filled[apply["image"][0]]["inputs"]["image"] == "f.png"
    assert filled[apply["image_kps"][0]]["inputs"]["image"] == "p.png"
    assert filled[apply["positive"][0]]["inputs"]["text"] == "a knight"
    assert filled[apply["negative"][0]]["inputs"]["text"] == prompt[apply["negative"][0]]["inputs"]["text"]
    assert by_type["KSampler"]["inputs"]["seed"] == 9
    assert by_type["CheckpointLoaderSimple"]["inputs"]["ckpt_name"] == "mine.safetensors"
    assert prompt[apply["image"][0]]["inputs"]["image"] == "face.png"  # the original is untouched


def test_with_similarity_adds_one_node_comparing_the_face_with_the_saved_image(comfy):
    prompt = shipped_api(comfy, posed=False)
    added = portrait.with_similarity(prompt)
    [(node_id, node)] = [(i, n) for i, n in added.items() if i not in prompt]
    _, apply = portrait.apply_node(prompt)
    saved = next(n for n in prompt.values() if n["class_type"] == "SaveImage")
    assert node["class_type"] == "InstantIDFaceSimilarity" and int(node_id) == max(map(int, prompt)) + 1
    assert node["inputs"] == {"faceanalysis": apply["inputs"]["insightface"], "reference": apply["inputs"]["image"],
                              "image": saved["inputs"]["images"]}
    assert portrait.with_similarity(added) == added  # a workflow with one already keeps it


def test_on_no_face_goes_to_the_apply_node_and_skip_adds_no_similarity(comfy):
    prompt = shipped_api(comfy, posed=False)
    apply_id, _ = portrait.apply_node(prompt)
    skipped = portrait.portrait_prompt(prompt, portrait.PortraitInputs(face="f.png", on_no_face="skip"))
    assert skipped[apply_id]["inputs"]["on_no_face"] == "skip" and set(skipped) == set(prompt)
    strict = portrait.portrait_prompt(prompt, portrait.PortraitInputs(face="f.png", on_no_face="error"))
    assert strict[apply_id]["inputs"]["on_no_face"] == "error"
    assert [n["class_type"] for i, n in strict.items() if i not in prompt] == ["InstantIDFaceSimilarity"]


def test_a_pose_for_a_workflow_without_keypoint_input_is_refused(comfy):
    with pytest.raises(RunError, match="has no keypoint image .image_kps. connected; use the posed workflow"):
        portrait.fill_portrait(shipped_api(comfy, posed=False), portrait.PortraitInputs(face="f.png", pose="p.png"))


def test_checkpoint_choice(tmp_path):
    from instantid.commands.bootstrap import StepFailed, Steps
    checkpoints = tmp_path / "models" / "checkpoints"
    assert portrait.choose_checkpoint(None, [checkpoints]) == portrait.CheckpointChoice(CHECKPOINT.path, entry=CHECKPOINT)
    own = tmp_path / "elsewhere" / "own.safetensors"
    own.parent.mkdir()
    own.write_bytes(b"weights")
    choice = portrait.choose_checkpoint(str(own), [checkpoints])
    assert choice == portrait.CheckpointChoice("own.safetensors", file=own)
    portrait.link_checkpoint(choice.file, checkpoints, Steps(1, stream=open(os.devnull, "w")))
    assert (checkpoints / "own.safetensors").resolve() == own  # linked, so ComfyUI lists it
    assert portrait.choose_checkpoint("own.safetensors", [checkpoints]) == portrait.CheckpointChoice("own.safetensors")
    with pytest.raises(StepFailed, match=f"not a catalog name .{DEFAULT_CHECKPOINT}."):
        portrait.choose_checkpoint("nope.safetensors", [checkpoints])
