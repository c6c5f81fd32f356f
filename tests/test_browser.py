"""The pack in ComfyUI's real web UI: ComfyUI's HTTP server on 127.0.0.1 with the test bed's models,
its frontend in headless Chromium (Playwright over the DevTools protocol).

(a) every shipped workflow loads as a drag-and-drop does, with no error dialog and every widget value
    where the file puts it; (b) a graph run from the Run button shows the similarity text and a skipped
    Apply's note ON the nodes (the pack's frontend extension); (c) no two nodes of a shipped workflow
    overlap. One server and one browser for the whole module."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ADAPTER_BIN, COMFYUI, IDENTITYNET_NAME, REPO_ROOT, UNET_NAME
from support.browser import (LOAD_WORKFLOW, TITLE_HEIGHT, VISIBLE_DIALOGS, open_comfyui, skip_first_run_dialogs,
                             start_browser, why_no_browser)
from support.server import start_server
from support.workflows import write_face_photo

WORKFLOWS = sorted((REPO_ROOT / "workflows").glob("*.json"))
SCREENSHOT_DIR = Path(os.environ.get("INSTANTID_SCREENSHOTS", "")) if os.environ.get("INSTANTID_SCREENSHOTS") else None
TEXT_WIDGET = "instantid_text"

pytestmark = pytest.mark.skipif(why_no_browser() is not None, reason=why_no_browser() or "")


def mirror_models(source: Path, target: Path) -> None:
    """target/models with real folders and the source's files linked in, so that placeholders can be
    added without touching the session's model folders."""
    for path in sorted((source / "models").rglob("*")):
        destination = target / "models" / path.relative_to(source / "models")
        if path.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
        elif not destination.exists():
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.symlink_to(path.resolve())


def add_placeholder_models(base: Path, workflows: list[Path]) -> None:
    """An empty file for each model a shipped workflow links (node properties or the workflow's
    `models` list) that the test bed does not have: the server then lists every model the workflow
    names, so a missing-models dialog on load would be an error. Nothing ever loads these files."""
    for path in workflows:
        workflow = json.loads(path.read_text())
        entries = list(workflow.get("models") or [])
        for node in workflow.get("nodes", []):
            entries += (node.get("properties") or {}).get("models") or []
        for entry in entries:
            target = base / "models" / entry["directory"] / entry["name"]
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(b"")


@pytest.fixture(scope="module")
def server(comfy, tmp_path_factory):
    base = tmp_path_factory.mktemp("browser-base")
    mirror_models(comfy.base, base)
    add_placeholder_models(base, WORKFLOWS)
    inputs = base / "input"
    inputs.mkdir(exist_ok=True)
    write_face_photo(inputs / "browser-face.png")
    Image.fromarray(np.zeros((320, 320, 3), np.uint8)).save(inputs / "browser-no-face.png")
    for path in WORKFLOWS:  # the images the shipped workflows load, so their combos hold known values
        for node in json.loads(path.read_text()).get("nodes", []):
            if node.get("type") == "LoadImage" and node.get("widgets_values"):
                write_face_photo(inputs / node["widgets_values"][0])
    skip_first_run_dialogs(base)
    running = start_server(COMFYUI, base)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def page(server):
    browser = start_browser()
    try:
        yield open_comfyui(browser, server.url)
    finally:
        browser.stop()


@pytest.fixture(scope="module")
def loaded_workflows(page) -> dict[str, dict]:
    """Each shipped workflow loaded once: the nodes as the frontend holds them, and what went wrong."""
    results = {}
    for path in WORKFLOWS:
        errors_before = len(page.console_errors)
        nodes = page.evaluate(LOAD_WORKFLOW, json.loads(path.read_text()))
        page.wait_for_timeout(300)  # dialogs open asynchronously after the load
        dialogs = page.evaluate(VISIBLE_DIALOGS)
        if dialogs:
            page.keyboard.press("Escape")
        results[path.name] = {"nodes": nodes, "dialogs": dialogs, "page_errors": page.console_errors[errors_before:]}
    return results


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_shipped_workflow_loads_with_every_widget_value_in_place(loaded_workflows, path):
    loaded = loaded_workflows[path.name]
    assert loaded["dialogs"] == [] and loaded["page_errors"] == []
    in_file = {node["id"]: node for node in json.loads(path.read_text())["nodes"]}
    in_page = {node["id"]: node for node in loaded["nodes"]}
    assert set(in_page) == set(in_file)
    for node_id, node in in_file.items():
        values = [widget["value"] for widget in in_page[node_id]["widgets"]]
        # A seed's control_after_generate ('fixed', 'randomize', ...) is a widget too, saved in its place.
        assert values == node.get("widgets_values", []), f"node {node_id} ({node['type']})"


def overlaps(nodes: list[dict], title_height: float) -> list[tuple[str, str]]:
    """Pairs of nodes whose boxes (title bar included: pos is below it) intersect."""
    boxes = []
    for node in nodes:
        x, y = node["pos"]
        width, height = node["size"]
        boxes.append((f"{node['title']} #{node['id']}", x, y - title_height, x + width, y + height))
    return [(a[0], b[0]) for i, a in enumerate(boxes) for b in boxes[i + 1:]
            if min(a[3], b[3]) > max(a[1], b[1]) and min(a[4], b[4]) > max(a[2], b[2])]


def test_overlap_check_sees_the_title_bar():
    below = {"title": "B", "id": 2, "pos": [0, 130], "size": [100, 50]}
    above = {"title": "A", "id": 1, "pos": [0, 30], "size": [100, 80]}
    assert overlaps([above, below], title_height=30) == [("A #1", "B #2")]  # B's title bar covers A's bottom
    assert overlaps([above, below], title_height=20) == []
    assert overlaps([above, {**below, "pos": [101, 30]}], title_height=30) == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_no_two_nodes_of_a_shipped_workflow_overlap(loaded_workflows, page, path):
    found = overlaps(loaded_workflows[path.name]["nodes"], page.evaluate(TITLE_HEIGHT))
    assert found == [], f"{len(found)} overlapping node pairs in {path.name}: {found}"


BUILD_GRAPH = """async (names) => {
  const graph = window.app.graph;
  graph.clear();
  const add = (type, x, y, values = {}) => {
    const node = window.LiteGraph.createNode(type);
    if (!node) throw new Error(`no node type ${type}`);
    node.pos = [x, y];
    graph.add(node);
    for (const [name, value] of Object.entries(values)) {
      const widget = node.widgets.find((w) => w.name === name);
      if (!widget) throw new Error(`${type} has no widget ${name}`);
      widget.value = value;
    }
    return node;
  };
  const link = (from, output, to, input) => {
    const slot = to.findInputSlot(input);
    if (slot < 0) throw new Error(`${to.type} has no input ${input}`);
    from.connect(output, to, slot);
  };
  // The two nodes whose text is checked sit in view; the rest are further right and below.
  const apply = add("ApplyInstantID", 120, 160, {on_no_face: "skip"});
  const similarity = add("InstantIDFaceSimilarity", 560, 160);
  const checkpoint = add("TestBedTinyCheckpoint", 40, 700, {unet_name: names.unet});
  const positive = add("CLIPTextEncode", 400, 700, {text: "a photo of a person"});
  const negative = add("CLIPTextEncode", 400, 900, {text: "blurry"});
  const latent = add("EmptyLatentImage", 800, 700, {width: 64, height: 64, batch_size: 1});
  const adapter = add("InstantIDModelLoader", 1200, 700, {instantid_file: names.adapter});
  const faces = add("InstantIDFaceAnalysis", 1200, 850, {provider: "CPU"});
  const identitynet = add("ControlNetLoader", 1200, 1000, {control_net_name: names.identitynet});
  const face = add("LoadImage", 1600, 700, {image: names.face});
  const noFace = add("LoadImage", 1600, 1100, {image: names.noFace});
  const sampler = add("KSampler", 2000, 700, {seed: 1, steps: 1, cfg: 2.0});
  const decode = add("VAEDecode", 2400, 700);
  const preview = add("PreviewImage", 2400, 850);
  link(checkpoint, 1, positive, "clip"); link(checkpoint, 1, negative, "clip");
  link(adapter, 0, apply, "instantid"); link(faces, 0, apply, "insightface");
  link(identitynet, 0, apply, "control_net"); link(noFace, 0, apply, "image");
  link(checkpoint, 0, apply, "model"); link(positive, 0, apply, "positive"); link(negative, 0, apply, "negative");
  link(apply, 0, sampler, "model"); link(apply, 1, sampler, "positive"); link(apply, 2, sampler, "negative");
  link(latent, 0, sampler, "latent_image"); link(sampler, 0, decode, "samples"); link(checkpoint, 2, decode, "vae");
  link(decode, 0, preview, "images");
  link(faces, 0, similarity, "faceanalysis"); link(face, 0, similarity, "reference"); link(face, 0, similarity, "image");
  window.app.canvas.ds.scale = 1;
  window.app.canvas.ds.offset = [0, 0];
  window.app.canvas.setDirty(true, true);
  window.__instantid_events = [];
  for (const name of ["execution_start", "executed", "execution_success", "execution_error"]) {
    window.app.api.addEventListener(name, (e) => window.__instantid_events.push({name, detail: e.detail}));
  }
  return {apply: apply.id, similarity: similarity.id};
}"""

NODE_TEXT = """(nodeId) => {
  const node = window.app.graph.getNodeById(nodeId);
  const widget = node.widgets?.find((w) => w.name === "instantid_text");
  if (!widget) return null;
  const element = widget.inputEl ?? widget.element;
  const box = element?.getBoundingClientRect();
  const style = element ? getComputedStyle(element) : null;
  return {value: widget.value, domValue: element?.value ?? null, serialize: widget.serialize,
          visible: !!box && box.width > 20 && box.height > 10 && style.display !== "none"
                   && style.visibility !== "hidden" && box.right > 0 && box.bottom > 0
                   && box.left < window.innerWidth && box.top < window.innerHeight,
          readOnly: element?.readOnly ?? null};
}"""


def test_run_button_shows_the_similarity_and_a_skip_note_on_the_nodes(page, tmp_path):
    ids = page.evaluate(BUILD_GRAPH, {"unet": UNET_NAME, "adapter": ADAPTER_BIN, "identitynet": IDENTITYNET_NAME,
                                      "face": "browser-face.png", "noFace": "browser-no-face.png"})
    page.get_by_role("button", name="Run", exact=True).click()
    page.wait_for_function("() => window.__instantid_events.some((e) => e.name === 'execution_success' "
                           "|| e.name === 'execution_error')", timeout=120_000)
    events = page.evaluate("() => window.__instantid_events.map((e) => e.name)")
    assert "execution_success" in events, page.evaluate("() => JSON.stringify(window.__instantid_events)")
    page.wait_for_timeout(300)  # the DOM widgets are placed on the next frame
    shot = (SCREENSHOT_DIR or tmp_path) / "browser-run.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot))

    similarity = page.evaluate(NODE_TEXT, ids["similarity"])
    assert similarity is not None, "no text widget on InstantID Face Similarity: is the web/ extension loaded?"
    assert similarity["value"] == similarity["domValue"] == "face similarity: 1.000"
    assert similarity["visible"] and similarity["readOnly"] and similarity["serialize"] is False
    note = page.evaluate(NODE_TEXT, ids["apply"])
    expected = ("InstantID skipped (on_no_face='skip'): no face found in the reference image 1 of 1 (image input); "
                "the model and conditioning pass through unchanged")
    assert note is not None and note["value"] == note["domValue"] == expected and note["visible"]
    assert any(expected in line for line in page.console_lines)  # the notes reach the browser console too
    # The saved workflow keeps its widget values as before: the text widget is not saved.
    saved = page.evaluate("(id) => window.app.graph.getNodeById(id).serialize().widgets_values", ids["apply"])
    assert saved == [0.8, 0, 1, "skip", False, "prompt and identity", 0]

    # A re-run replaces the text; the similarity text is also a STRING output.
    page.evaluate("""(id) => {
      const node = window.app.graph.getNodeById(id);
      const noFace = window.app.graph.nodes.find(
        (n) => n.type === "LoadImage" && n.widgets[0].value === "browser-no-face.png");
      noFace.connect(0, node, node.findInputSlot("image"));
      window.__instantid_events = [];
    }""", ids["similarity"])
    page.get_by_role("button", name="Run", exact=True).click()
    page.wait_for_function("() => window.__instantid_events.some((e) => e.name === 'execution_success' "
                           "|| e.name === 'execution_error')", timeout=120_000)
    rerun = page.evaluate(NODE_TEXT, ids["similarity"])
    assert rerun["value"] == rerun["domValue"] == ("face similarity: 0.000\n"
                                                   "generated image 1 of 1 had no face: scored 0 and ranked last")


def open_search_box(page, attempts: int = 3) -> None:
    """Double-click the empty canvas, as a user does; the search box opens with its input focused
    (a double-click right after the canvas was cleared is sometimes taken as two clicks: retry)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    for attempt in range(attempts):
        page.wait_for_timeout(200)
        page.mouse.dblclick(900, 600)
        try:
            page.wait_for_selector("input:focus", timeout=3_000)
            return
        except PlaywrightTimeout:
            if attempt == attempts - 1:
                raise


@pytest.mark.parametrize(("query", "expected"), [
    ("instantid", {"Load InstantID Model", "InstantID Face Analysis (InsightFace)", "InstantID Face Keypoints (Pose)",
                   "Apply InstantID", "Apply InstantID Advanced", "InstantID Patch Attention",
                   "InstantID Apply ControlNet", "InstantID Face Similarity"}),
    ("insightface", {"InstantID Face Analysis (InsightFace)"}),
    ("pose", {"InstantID Face Keypoints (Pose)"}),
    ("keypoints", {"InstantID Face Keypoints (Pose)"}),
    ("face keypoints preprocessor", {"InstantID Face Keypoints (Pose)"}),
    ("infiniteyou", {"InstantID Load InfiniteYou Model (FLUX)", "InstantID Apply InfiniteYou (FLUX)"}),
])
def test_node_search_finds_what_users_type(page, query, expected):
    page.evaluate("() => window.app.graph.clear()")
    open_search_box(page)
    page.keyboard.type(query)
    page.wait_for_function("() => document.querySelectorAll('[role=option]').length > 1", timeout=10_000)
    page.wait_for_timeout(300)  # the list settles after the last keystroke
    shown = page.evaluate("() => [...document.querySelectorAll('[role=option]')].map((e) => e.innerText)")
    page.keyboard.press("Escape")
    names = {option.split("\n")[0].strip() for option in shown}
    assert expected <= names, shown
