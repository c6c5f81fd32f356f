"""`python -m instantid run`: a workflow runs with ComfyUI embedded in this process (the test bed's
instance, reused) or on a ComfyUI server (a fake one on 127.0.0.1); --set overrides widgets; the
images land in --out; the InstantID Face Similarity node's value is printed."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import UNET_NAME
from instantid.commands import cli, runner
from instantid.commands.portrait import BASIC_WORKFLOW_FILE
from support import antelope
from support.headless import (SIMILARITY_NODE_ID, FakeComfyUI, bed_workflow, finishes_within, png_bytes, serve,
                              silent_server)
from support.workflows import REPO_ROOT, load_ui_workflow, write_face_photo

REFERENCE = dict(cell=(4, 3), g=128)
PHOTO = dict(cell=(3, 5), g=200)


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """urllib would send the loopback requests to a proxy from the environment."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def expected_similarity(reference: Path, photo: Path) -> float:
    return antelope.expected_photo_similarity(((reference, REFERENCE), (photo, PHOTO)))


@pytest.fixture
def bed_run(comfy, tmp_path):
    """A workflow file for the bed: the reference photo in ComfyUI's input folder (by name), the
    other photo anywhere (by absolute path, as a user would pass it with --set)."""
    reference = write_face_photo(comfy.base / "input" / "cli_reference.png", **REFERENCE)
    photo = write_face_photo(tmp_path / "photos" / "photo.png", **PHOTO)
    workflow = tmp_path / "workflow.json"
    workflow.write_text(json.dumps(bed_workflow(UNET_NAME, reference.name, reference.name)))
    return workflow, reference, photo


def run_cli(*args: str) -> int:
    return cli.main(["run", *map(str, args)])


def test_embedded_run_writes_the_png_applies_set_and_prints_the_similarity(comfy, bed_run, tmp_path, capsys):
    workflow, reference, photo = bed_run
    out = tmp_path / "out"
    code = run_cli(workflow, "--base-directory", comfy.base, "--out", out,
                   "--set", f"Photo.image={photo}",          # by title; an absolute path works in-process
                   "--set", "EmptyLatentImage.width=96",     # by class type
                   "--set", "5.seed=123")                    # by node id
    captured = capsys.readouterr()
    assert code == 0, captured.err
    [png] = sorted(out.glob("*.png"))
    assert png.name.startswith("instantid_cli_")
    assert Image.open(png).size == (96, 64)  # the workflow says 64 x 64: --set width took effect
    lines = captured.out.splitlines()
    assert lines[0] == f"wrote {png}"
    assert lines[1] == f"face similarity: {expected_similarity(reference, photo):.3f}"
    assert 0.0 < expected_similarity(reference, photo) < 0.99  # two different faces, a real comparison
    assert "KSampler" in captured.err and "1/1" in captured.err  # the progress bar over the sampling step


@pytest.mark.parametrize("setting, message", [
    ("Nope.seed=1", "the workflow has no node 'Nope'. Name a node by id, title or class type; its nodes are: "
                    "1 TestBedTinyCheckpoint; 2 CLIPTextEncode ('Positive'); 3 CLIPTextEncode ('Negative'); "
                    "4 EmptyLatentImage; 5 KSampler;"),
    ("CLIPTextEncode.text=x", "2 nodes have the class type 'CLIPTextEncode' (2 CLIPTextEncode ('Positive'), "
                              "3 CLIPTextEncode ('Negative')); use the node id"),
    ("KSampler.sed=1", "node 5 KSampler has no input 'sed'; the inputs --set can change are: cfg, denoise, "
                       "sampler_name, scheduler, seed, steps"),
    ("KSampler.model=1", "input 'model' of node 5 KSampler is connected to node 1; --set changes widget values only"),
    ("KSampler-seed", "expected NODE.INPUT=VALUE"),
])
def test_unknown_node_or_input_is_a_clear_error(comfy, bed_run, tmp_path, capsys, setting, message):
    workflow, _, _ = bed_run
    assert run_cli(workflow, "--base-directory", comfy.base, "--out", tmp_path / "out", "--set", setting) == 1
    line = capsys.readouterr().err.splitlines()[-1]  # after the log lines (e.g. 'no GPU, running on the CPU')
    assert line.startswith(f"python -m instantid run: error: --set {setting!r}: ")
    assert message in line
    assert not (tmp_path / "out").exists()


def test_invalid_workflow_is_refused_with_the_node_and_the_reason(comfy, bed_run, tmp_path, capsys):
    workflow, _, _ = bed_run
    assert run_cli(workflow, "--base-directory", comfy.base, "--out", tmp_path / "out",
                   "--set", "Reference.image=nobody.png") == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "python -m instantid run: error: ComfyUI refused the workflow: Prompt outputs failed validation; "
        "node 9 (LoadImage): Custom validation failed for node: image - Invalid image file: nobody.png")


def test_ui_workflow_with_a_node_type_that_is_not_installed(comfy, tmp_path, capsys):
    workflow = load_ui_workflow(REPO_ROOT / "workflows" / BASIC_WORKFLOW_FILE)
    workflow["nodes"][0]["type"] = "SomePackLoader"
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(workflow))
    assert run_cli(path, "--base-directory", comfy.base) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "python -m instantid run: error: the workflow uses node types that this ComfyUI does not have: SomePackLoader; "
        "install the custom node packs that provide them (ComfyUI-Manager can find them)")


def test_set_keeps_text_inputs_as_text_and_parses_json_otherwise():
    prompt = bed_workflow(UNET_NAME, "a.png", "b.png")
    changed = runner.apply_overrides(prompt, [runner.parse_override(t) for t in
                                              ("Positive.text=1990", "KSampler.cfg=4.5", "Negative.text=\"x=y\"",
                                               "4.batch_size=2")])
    assert changed["2"]["inputs"]["text"] == "1990"
    assert changed["5"]["inputs"]["cfg"] == 4.5
    assert changed["3"]["inputs"]["text"] == "x=y"
    assert changed["4"]["inputs"]["batch_size"] == 2
    assert prompt["5"]["inputs"]["cfg"] == 2.0  # the original is not modified


def test_similarity_node_scores_an_image_without_a_face_0_and_says_so(comfy):
    faceless = {"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
                "2": {"class_type": "InstantIDFaceAnalysis", "inputs": {"provider": "CPU"}},
                "3": {"class_type": "LoadImage", "inputs": {"image": "cli_face.png"}},
                "4": {"class_type": "InstantIDFaceSimilarity",
                      "inputs": {"faceanalysis": ["2", 0], "reference": ["3", 0], "image": ["1", 0]}}}
    write_face_photo(comfy.base / "input" / "cli_face.png")
    result = comfy.run(faceless)
    assert result.success, result.error_text()
    assert result.outputs["4"]["face_similarity"] == [0.0]
    assert result.outputs["4"]["text"] == ["face similarity: 0.000\n"
                                           "scored image 1 of 1 had no face: scored 0 and ranked last"]


def test_comfyui_url_posts_the_api_graph_and_fetches_the_images(tmp_path, capsys):
    workflow = bed_workflow(UNET_NAME, "ref.png", "photo.png")
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(workflow))
    fake = FakeComfyUI(outputs={"7": {"images": [{"filename": "instantid_cli_00001_.png", "subfolder": "",
                                                  "type": "output"}]},
                                SIMILARITY_NODE_ID: {"text": ["face similarity: 0.812"], "face_similarity": [0.8123]}})
    fake.images["instantid_cli_00001_.png"] = png_bytes()
    fake.history_after = 2  # two polls see it still queued
    with serve(fake) as url:
        code = finishes_within(20, run_cli, path, "--comfyui", url, "--out", tmp_path / "out", "--set", "KSampler.seed=9")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    expected = json.loads(json.dumps(workflow))
    expected["5"]["inputs"]["seed"] = 9
    [posted] = fake.posted
    assert posted["prompt"] == expected
    assert fake.history_polls() == 3
    written = tmp_path / "out" / "instantid_cli_00001_.png"
    assert written.read_bytes() == fake.images["instantid_cli_00001_.png"]
    assert captured.out.splitlines() == [f"wrote {written}", "face similarity: 0.812"]


def test_comfyui_url_converts_a_ui_workflow_with_the_servers_object_info(comfy, tmp_path):
    workflow = load_ui_workflow(REPO_ROOT / "workflows" / BASIC_WORKFLOW_FILE)
    # What a server's /object_info holds: no frontend-only types such as the workflow's Note.
    kinds = {node["type"] for node in workflow["nodes"]} & set(comfy.embedded.nodes.NODE_CLASS_MAPPINGS)
    fake = FakeComfyUI(object_info={kind: comfy.embedded.node_info(kind) for kind in kinds})
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(workflow))
    with serve(fake) as url:
        assert finishes_within(20, run_cli, path, "--comfyui", url, "--out", tmp_path / "out") == 0
    [posted] = fake.posted
    assert posted["prompt"] == comfy.embedded.to_api(workflow)
    assert fake.requests[0] == "/object_info"


def test_comfyui_url_that_never_answers_times_out(tmp_path, capsys):
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(bed_workflow(UNET_NAME, "ref.png", "photo.png")))
    started = time.monotonic()
    with silent_server() as url:
        code = finishes_within(10, run_cli, path, "--comfyui", url, "--timeout", "1")
    assert code == 1
    assert time.monotonic() - started < 5
    [line] = capsys.readouterr().err.splitlines()
    assert line == (f"python -m instantid run: error: ComfyUI at {url} did not answer /prompt within 1.0 s; "
                    "it may be busy or stuck: check its console, or raise --timeout")


def test_comfyui_url_bounds_the_total_wait_and_cancels_the_prompt(tmp_path, capsys):
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(bed_workflow(UNET_NAME, "ref.png", "photo.png")))
    fake = FakeComfyUI()
    fake.history_after = None  # queued forever
    started = time.monotonic()
    with serve(fake) as url:
        code = finishes_within(10, run_cli, path, "--comfyui", url, "--max-wait", "1")
    assert code == 1
    assert 0.9 < time.monotonic() - started < 5
    assert fake.history_polls() >= 2
    queued, line = capsys.readouterr().err.splitlines()
    assert queued == f"queued on {url} as prompt {fake.prompt_id}; waiting at most 1 s"
    assert line == (f"python -m instantid run: error: prompt {fake.prompt_id} did not finish within 1 s (--max-wait); "
                    f"it was cancelled on {url}; wait longer with --max-wait")
    # Cancelled on the server: out of its queue, interrupted should it be the running prompt, and gone.
    assert fake.posted[1:] == [{"delete": [fake.prompt_id]}, {"prompt_id": fake.prompt_id}]
    assert [path for path in fake.requests if path in ("/queue", "/interrupt")] == ["/queue", "/interrupt", "/queue"]
    assert fake.running == []


def test_an_interrupt_comfyui_drops_as_the_prompt_starts_is_sent_again():
    """ComfyUI clears its interrupt flag when a prompt starts, so an interrupt landing then is lost:
    cancel sends it again while the queue still shows the prompt running."""
    fake = FakeComfyUI()
    fake.running, fake.lost_interrupts = [fake.prompt_id], 1
    with serve(fake) as url:
        finishes_within(10, runner.ComfyServer(url).cancel, fake.prompt_id)
    assert fake.running == [] and fake.requests.count("/interrupt") == 2


def test_cancel_of_a_prompt_that_keeps_running_gives_up_after_the_settle_time():
    fake = FakeComfyUI()
    fake.running, fake.lost_interrupts = [fake.prompt_id], 10_000
    with serve(fake) as url:
        started = time.monotonic()
        finishes_within(10, runner.ComfyServer(url).cancel, fake.prompt_id)
    assert runner.CANCEL_SETTLE <= time.monotonic() - started < runner.CANCEL_SETTLE + 5
    assert fake.running == [fake.prompt_id] and fake.requests.count("/interrupt") > 2


@pytest.mark.parametrize("failure, message", [
    ("refused", "ComfyUI refused the workflow: Prompt outputs failed validation; "
                "node 5 (KSampler): Value not in list: sampler_name: 'nope' not in [...]"),
    ("failed", "the workflow failed at node 11 (InstantIDFaceSimilarity): FaceNotFound: no face found"),
])
def test_comfyui_url_reports_refusals_and_failures(tmp_path, capsys, failure, message):
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(bed_workflow(UNET_NAME, "ref.png", "photo.png")))
    fake = FakeComfyUI()
    if failure == "refused":
        fake.refusal = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                                  "details": ""},
                        "node_errors": {"5": {"class_type": "KSampler", "errors": [
                            {"message": "Value not in list", "details": "sampler_name: 'nope' not in [...]"}]}}}
    else:
        fake.status = {"status_str": "error", "completed": False, "messages": [
            ["execution_start", {"prompt_id": fake.prompt_id}],
            ["execution_error", {"node_id": "11", "node_type": "InstantIDFaceSimilarity", "exception_type": "FaceNotFound",
                                 "exception_message": "no face found"}]]}
    with serve(fake) as url:
        assert finishes_within(10, run_cli, path, "--comfyui", url) == 1
    line = capsys.readouterr().err.splitlines()[-1]
    assert line == f"python -m instantid run: error: {message}"


def test_workflow_that_is_not_json_or_not_a_workflow(tmp_path, capsys):
    (tmp_path / "a.json").write_text("{nope")
    (tmp_path / "b.json").write_text(json.dumps({"x": 1}))
    assert run_cli(tmp_path / "a.json", "--comfyui", "http://127.0.0.1:9") == 1
    assert run_cli(tmp_path / "b.json", "--comfyui", "http://127.0.0.1:9") == 1
    first, second = capsys.readouterr().err.splitlines()
    assert "a.json is not JSON" in first
    assert "b.json is not a ComfyUI workflow" in second and "Export (API)" in second
