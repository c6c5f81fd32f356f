"""The pack in ComfyUI's real web UI: ComfyUI's HTTP server on 127.0.0.1 with the test bed's models,
its frontend in headless Chromium (Playwright over the DevTools protocol).

(a) every shipped workflow loads as a drag-and-drop does, with no error dialog and every widget value
    where the file puts it; (b) a graph run from the Run button shows the similarity text and a skipped
    Apply's note ON the nodes (the pack's frontend extension); (c) no two nodes of a shipped workflow,
    nor of the earlier pack's shared workflows, overlap; (d) the first view of each shipped workflow
    shows its note and its InstantID nodes at 1600x1000; (e) saved identities from the UI: upload, a
    save from workflow 13, the list refreshed without a reload; (f) each workflow's Templates thumbnail
    is served. One server and one browser for the whole module."""
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
from support.workflows import OLD_PACK_WORKFLOWS, write_face_photo, write_identity_file

WORKFLOWS = sorted((REPO_ROOT / "workflows").glob("*.json"))
OLD_PACK_NAMES = ["InstantID_basic.json", "InstantID_posed.json", "InstantID_depth.json", "InstantID_IPAdapter.json",
                  "InstantID_multi_id.json"]
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
    write_identity_file(base / "to-upload" / "uploaded person.safetensors")
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
        results[path.name] = {"nodes": nodes, "dialogs": dialogs, "page_errors": page.console_errors[errors_before:],
                              "view": page.evaluate(VIEW_BOXES), "scale": page.evaluate("() => window.app.canvas.ds.scale")}
        if SCREENSHOT_DIR:
            SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT_DIR / f"first-view-{path.stem[:2]}.png"))
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
                                                   "scored image 1 of 1 had no face: scored 0 and ranked last")


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


SEARCH_RESULTS = """() => {
  // Each listed node as the search box shows it, whether it is in view without scrolling (inside the
  // list's scrolling box), and its node id (the frontend's node classes carry the display name as title).
  const ids = Object.fromEntries(Object.entries(window.LiteGraph.registered_node_types).map(([id, c]) => [c.title, id]));
  const options = [...document.querySelectorAll('.p-autocomplete-list [role=option]')];
  let box = options[0]?.parentElement;
  while (box && !['auto', 'scroll'].includes(getComputedStyle(box).overflowY)) box = box.parentElement;
  const area = box.getBoundingClientRect();
  return options.map((option) => {
    const rect = option.getBoundingClientRect();
    const name = option.innerText.split('\\n')[0].trim();
    return {name, id: ids[name] ?? name, inView: rect.top >= area.top && rect.bottom <= area.bottom};
  });
}"""


def search(page, query: str) -> list[dict]:
    """What the node search box lists for `query`, typed as a user does, best first."""
    page.evaluate("() => window.app.graph.clear()")
    open_search_box(page)
    page.keyboard.type(query)
    page.wait_for_function("() => document.querySelectorAll('[role=option]').length > 1", timeout=10_000)
    page.wait_for_timeout(300)  # the list settles after the last keystroke
    results = page.evaluate(SEARCH_RESULTS)
    if SCREENSHOT_DIR:
        page.screenshot(path=str(SCREENSHOT_DIR / f"search-{query.replace(' ', '-')}.png"))
    page.keyboard.press("Escape")
    return results


FLUX_NODES = {"FLUX Load InfiniteYou Model (InstantID)", "FLUX Apply InfiniteYou (InstantID)"}


@pytest.mark.parametrize(("query", "expected"), [
    ("insightface", {"InstantID InsightFace (antelopev2)"}),
    ("antelopev2", {"InstantID InsightFace (antelopev2)"}),
    ("ipadapter", {"Load InstantID Model (IPAdapter)"}),
    ("identity", {"InstantID Save Identity (Face Embeds)", "InstantID Load Identity (Face Embeds)"}),
    ("pose", {"InstantID Face Keypoints (Pose)"}),
    ("keypoints", {"InstantID Face Keypoints (Pose)"}),
    ("face keypoints preprocessor", {"InstantID Face Keypoints (Pose)"}),
    ("infiniteyou", FLUX_NODES),
    ("flux infiniteyou", FLUX_NODES),
])
def test_node_search_shows_what_users_type_without_scrolling(page, query, expected):
    results = search(page, query)
    assert expected <= {r["name"] for r in results if r["inView"]}, results


def test_node_search_for_instantid_lists_the_earlier_packs_nodes(page):
    names = {r["name"] for r in search(page, "instantid")}
    assert {"Load InstantID Model (IPAdapter)", "InstantID InsightFace (antelopev2)", "InstantID Face Keypoints (Pose)",
            "Apply InstantID", "Apply InstantID Advanced", "InstantID Patch Attention", "InstantID Apply ControlNet",
            "InstantID Face Similarity"} <= names


def test_node_search_for_flux_lists_both_flux_nodes_right_after_the_core_flux_nodes(page):
    """Frontend 1.35.9 ranks a name (id or display name) that starts with the typed word before one that
    only contains it, and among those the nodes most used in published workflows first (its bundled
    usage counts; a new node has none). Names starting with "FLUX" put both nodes right after the core
    nodes whose names start with "Flux" (about a dozen with the API nodes, one scroll down); with
    "FLUX" at the end, 31 characters in, the loader was not listed at all (the match is too far
    from the start of the name)."""
    results = search(page, "flux")
    names = [r["name"] for r in results]
    assert FLUX_NODES <= set(names), names
    above = results[:max(names.index(name) for name in FLUX_NODES)]
    assert all(r["name"] in FLUX_NODES or r["name"].lower().startswith("flux") or r["id"].lower().startswith("flux")
               for r in above), above


LOAD_OLD_WORKFLOW = LOAD_WORKFLOW.replace("pos: [node.pos[0]", "installed: !!window.LiteGraph.registered_node_types[node.type], pos: [node.pos[0]")


@pytest.mark.parametrize("name", OLD_PACK_NAMES)
def test_earlier_pack_workflow_opens_without_overlaps_and_with_its_values(page, name):
    """The options added since the earlier pack hide behind "Show Advanced", so its shared workflows open at
    their saved sizes (Apply InstantID grows by the face_embeds socket only). Nodes of packs not installed
    here (IPAdapter, essentials, controlnet_aux) are the frontend's placeholders, sized by it: left out."""
    path = OLD_PACK_WORKFLOWS / name
    if not path.is_file():
        pytest.skip(f"the shared old-pack workflows are not at {OLD_PACK_WORKFLOWS} (set INSTANTID_OLD_PACK_WORKFLOWS)")
    workflow = json.loads(path.read_text())
    nodes = page.evaluate(LOAD_OLD_WORKFLOW, workflow)
    page.wait_for_timeout(200)
    if page.evaluate(VISIBLE_DIALOGS):
        page.keyboard.press("Escape")  # the missing-nodes dialog of the packs not installed here
    installed = [node for node in nodes if node["installed"]]
    assert overlaps(installed, page.evaluate(TITLE_HEIGHT)) == []
    in_file = {node["id"]: node.get("widgets_values") or [] for node in workflow["nodes"]}
    for node in installed:
        values = [widget["value"] for widget in node["widgets"]]
        assert values[:len(in_file[node["id"]])] == in_file[node["id"]], (name, node["id"], node["type"])
    applies = [node for node in installed if node["type"] == "ApplyInstantID"]
    assert applies and all(node["size"][1] <= 266 + 20 for node in applies)  # saved 266, + the face_embeds row
    advanced = page.evaluate("""(id) => {
      const node = window.app.graph.getNodeById(id);
      const hidden = node.widgets.filter((w) => w.hidden).map((w) => w.name);
      node.toggleAdvanced();  // the node menu's "Show Advanced"
      const shown = node.widgets.filter((w) => !w.hidden).map((w) => w.name);
      const size = node.size[1];
      node.toggleAdvanced();
      return {hidden, shown, size, after: node.size[1]};
    }""", applies[0]["id"])
    assert advanced["hidden"] == ["on_no_face", "face_region", "mask_scope", "face_index"]
    assert advanced["shown"][-4:] == advanced["hidden"] and advanced["size"] > applies[0]["size"][1]
    assert advanced["after"] == applies[0]["size"][1]


def test_noise_takes_035_and_keeps_it_through_save_and_load(page):
    """The Advanced node's noise as a user sets it (the widget's own rounding), saved and loaded back."""
    result = page.evaluate("""async () => {
      window.app.graph.clear();
      const node = window.LiteGraph.createNode("ApplyInstantIDAdvanced");
      window.app.graph.add(node);
      const widget = node.widgets.find((w) => w.name === "noise");
      widget.setValue(0.35, {node, canvas: window.app.canvas});
      const saved = JSON.parse(JSON.stringify(window.app.graph.serialize()));
      await window.app.loadGraphData(saved);
      const loaded = window.app.graph.nodes.find((n) => n.type === "ApplyInstantIDAdvanced");
      return {set: widget.value, loaded: loaded.widgets.find((w) => w.name === "noise").value};
    }""")
    assert result == {"set": 0.35, "loaded": 0.35}


VIEW_BOXES = """() => {
  const {scale, offset} = window.app.canvas.ds;
  const title = window.LiteGraph.NODE_TITLE_HEIGHT;
  return window.app.graph.nodes.map((node) => ({type: node.type, title: node.title, box: [
    (node.pos[0] + offset[0]) * scale, (node.pos[1] - title + offset[1]) * scale,
    (node.pos[0] + node.size[0] + offset[0]) * scale, (node.pos[1] + node.size[1] + offset[1]) * scale]}));
}"""
# What covers the canvas at 1600x1000 (frontend 1.35.9): the side bar (x < 59), tab bar and breadcrumb (y < 90).
FREE_AREA = (59, 90, 1600, 1000)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_first_view_shows_the_note_and_the_instantid_nodes(loaded_workflows, path):
    from test_shipped_workflows import pack_node_ids
    boxes = loaded_workflows[path.name]["view"]
    wanted = [b for b in boxes if b["type"] in pack_node_ids() or b["type"] == "MarkdownNote"]
    assert any(b["type"] == "MarkdownNote" for b in wanted)
    outside = [(b["title"], [round(v) for v in b["box"]]) for b in wanted
               if not (b["box"][0] >= FREE_AREA[0] and b["box"][1] >= FREE_AREA[1]
                       and b["box"][2] <= FREE_AREA[2] and b["box"][3] <= FREE_AREA[3])]
    assert outside == [], outside
    assert loaded_workflows[path.name]["scale"] >= 0.6  # below it the canvas drops all text


NOTE_LINKS = """() => {
  const note = window.app.graph.nodes.find((n) => n.type === "MarkdownNote");
  const element = note.widgets.find((w) => w.element)?.element;
  return [...(element?.querySelectorAll("a") ?? [])].map((a) => ({text: a.innerText, href: a.href}));
}"""


def test_the_note_of_workflow_01_links_every_model_antelopev2_included(page):
    """The frontend downloads only .safetensors from its missing-models dialog; the note's rendered
    Markdown gives a link for every model, the adapter's .bin and antelopev2's two files included."""
    path = next(p for p in WORKFLOWS if p.name.startswith("01 "))
    workflow = json.loads(path.read_text())
    page.evaluate(LOAD_WORKFLOW, workflow)
    page.wait_for_timeout(300)
    links = {link["text"]: link["href"] for link in page.evaluate(NOTE_LINKS)}
    wanted = {entry["name"].rpartition("/")[2]: entry["url"] for entry in workflow["models"]}
    antelope = "https://huggingface.co/DIAMONIK7777/antelopev2/resolve/main/"
    wanted.update({name: antelope + name for name in ("scrfd_10g_bnkps.onnx", "glintr100.onnx")})
    assert {"ip-adapter.bin", "sd_xl_base_1.0.safetensors"} <= set(wanted)
    assert links == wanted


def test_each_workflow_has_a_thumbnail_the_templates_browser_serves(page):
    """The Templates browser lists the pack's workflows and asks for '<name>.jpg' beside each (frontend
    1.35.9: /api/workflow_templates/<pack folder>/<name>.jpg); each is a JPEG, none a 404."""
    found = page.evaluate("""async () => {
      const listing = await (await window.app.api.fetchApi("/workflow_templates")).json();
      const results = [];
      for (const [pack, names] of Object.entries(listing)) {
        for (const name of names) {
          const response = await fetch(window.app.api.apiURL(`/workflow_templates/${pack}/${name}`) + ".jpg");
          const bytes = new Uint8Array(await response.arrayBuffer());
          results.push({pack, name, status: response.status, type: response.headers.get("content-type"),
                        jpeg: bytes[0] === 0xff && bytes[1] === 0xd8});
        }
      }
      return results;
    }""")
    ours = [entry for entry in found if entry["pack"] == "instantid-nodes"]
    assert sorted(entry["name"] for entry in ours) == sorted(p.stem for p in WORKFLOWS)
    assert all(entry["status"] == 200 and entry["type"] == "image/jpeg" and entry["jpeg"] for entry in ours), ours
    if SCREENSHOT_DIR is None:
        return
    # The Templates browser itself (opened only for screenshots: it loads every core template's picture
    # too, about 10 s here): the pack's thumbnails load without a 404.
    failed = []
    page.on("response", lambda r: failed.append(r.url) if r.status >= 400 and ".jpg" in r.url else None)
    page.get_by_role("button", name="Templates").first.click()
    page.get_by_text("instantid-nodes", exact=True).first.click()
    page.wait_for_timeout(1000)
    page.screenshot(path=str(SCREENSHOT_DIR / "templates-browser.png"))
    # Close it with its X (the top-right button of the dialog; Escape leaves it open).
    page.evaluate("""() => [...document.querySelectorAll('[role=dialog] button')]
      .sort((a, b) => b.getBoundingClientRect().right - a.getBoundingClientRect().right)[0].click()""")
    page.wait_for_function(f"() => ({VISIBLE_DIALOGS})().length === 0", timeout=5_000)
    assert [url for url in failed if "instantid-nodes" in url] == []


IDENTITY_CHOICES = """() => window.app.graph.nodes.filter((n) => n.type === "InstantIDLoadFaceEmbeds").map((n) => {
  const widget = n.widgets.find((w) => w.name === "face_embeds_file");
  return {value: widget.value, choices: [...widget.options.values]};
})"""


def test_identities_from_the_ui_upload_and_save_refresh_the_list(page, server):
    """Upload with Load Identity's button → the file is in the list (and chosen) without a reload; then
    workflow 13 runs on the test bed's models (its checkpoint swapped for the tiny one) and the identity
    it saves is in the list too."""
    page.evaluate("() => window.app.graph.clear()")
    page.evaluate("""() => { const node = window.LiteGraph.createNode("InstantIDLoadFaceEmbeds");
                             node.pos = [100, 120]; window.app.graph.add(node); }""")
    [before] = page.evaluate(IDENTITY_CHOICES)
    assert before["choices"] == ["(none yet: upload one, or run Save Identity)"] == [before["value"]]
    with page.expect_file_chooser() as chooser:
        page.evaluate("""() => window.app.graph.nodes.find((n) => n.type === "InstantIDLoadFaceEmbeds")
                         .widgets.find((w) => w.type === "button").callback()""")
    chooser.value.set_files(str(server.base / "to-upload" / "uploaded person.safetensors"))
    page.wait_for_function("""() => window.app.graph.nodes.find((n) => n.type === "InstantIDLoadFaceEmbeds")
                              .widgets.find((w) => w.name === "face_embeds_file")
                              .options.values.includes("uploaded person.safetensors")""", timeout=10_000)
    [uploaded] = page.evaluate(IDENTITY_CHOICES)
    assert uploaded == {"value": "uploaded person.safetensors", "choices": ["uploaded person.safetensors"]}
    assert (server.base / "input" / "instantid_faces" / "uploaded person.safetensors").is_file()

    workflow = json.loads(next(p for p in WORKFLOWS if p.name.startswith("13 ")).read_text())
    page.evaluate(LOAD_WORKFLOW, workflow)
    page.evaluate("""(unet) => {
      const graph = window.app.graph;
      const old = graph.nodes.find((n) => n.type === "CheckpointLoaderSimple");
      const tiny = window.LiteGraph.createNode("TestBedTinyCheckpoint");
      tiny.pos = [old.pos[0], old.pos[1]];
      graph.add(tiny);
      tiny.widgets.find((w) => w.name === "unet_name").value = unet;
      const patch = graph.nodes.find((n) => n.type === "InstantIDAttentionPatch");
      tiny.connect(0, patch, patch.findInputSlot("model"));
      graph.remove(old);
      const load = window.LiteGraph.createNode("InstantIDLoadFaceEmbeds");
      load.pos = [0, 1200];
      graph.add(load);
      window.__instantid_events = [];
      if (!window.__instantid_identity_listeners) {
        window.__instantid_identity_listeners = true;
        for (const name of ["executed", "execution_success", "execution_error"]) {
          window.app.api.addEventListener(name, (e) => window.__instantid_events.push({name, detail: e.detail}));
        }
      }
    }""", UNET_NAME)
    page.get_by_role("button", name="Run", exact=True).click()
    page.wait_for_function("() => window.__instantid_events.some((e) => e.name === 'execution_success' "
                           "|| e.name === 'execution_error')", timeout=120_000)
    events = page.evaluate("() => window.__instantid_events")
    assert "execution_success" in [e["name"] for e in events], events
    saved = next(e["detail"]["output"]["face_embeds"][0] for e in events
                 if e["name"] == "executed" and "face_embeds" in (e["detail"].get("output") or {}))
    page.wait_for_function("""(choice) => window.app.graph.nodes.some((n) => n.type === "InstantIDLoadFaceEmbeds"
                              && n.widgets.find((w) => w.name === "face_embeds_file").options.values.includes(choice))""",
                           arg=saved["choice"], timeout=10_000)
    [after] = page.evaluate(IDENTITY_CHOICES)
    assert set(after["choices"]) == {"uploaded person.safetensors", saved["choice"]}
    assert saved["choice"].endswith(" [output]")
    if SCREENSHOT_DIR:
        page.screenshot(path=str(SCREENSHOT_DIR / "identity-saved.png"))
