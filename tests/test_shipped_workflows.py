"""The shipped workflows (workflows/*.json, UI format, and workflows/api/, their API twins): they
execute on the test bed, the files are what scripts/build_workflows.py writes, and they carry what
ComfyUI's frontend and ComfyUI-Manager read (node provenance, model links, a layout without overlaps)."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import UNET_NAME
from support.workflows import REPO_ROOT, load_ui_workflow, loaded_image, prepare_for_test_bed

from instantid import __version__
from workflow_tools.builder import (NOTE_TYPE, dumps, model_entries, node_rectangles, overlapping_nodes,
                                   render)
from instantid.commands.workflow_models import MODEL_LOADERS
from workflow_tools.specs import WORKFLOWS

WORKFLOWS_DIR = REPO_ROOT / "workflows"
UI_FILES = sorted(WORKFLOWS_DIR.glob("*.json"))
IDS = [path.name for path in UI_FILES]


def pack_node_ids() -> set[str]:
    """The node ids nodes.py declares (read from its source, so no ComfyUI is needed)."""
    tree = ast.parse((REPO_ROOT / "nodes.py").read_text())
    return {kw.value.value for node in ast.walk(tree) if isinstance(node, ast.Call)
            for kw in node.keywords if kw.arg == "node_id" and isinstance(kw.value, ast.Constant)}


OUTPUT_NODES = ("SaveImage", "PreviewImage", "InstantIDFaceSimilarity", "InstantIDSaveFaceEmbeds")


def executed_kinds(prompt: dict) -> list[str]:
    """Class types of the nodes an output depends on (what ComfyUI executes)."""
    wanted, stack = set(), [i for i, node in prompt.items() if node["class_type"] in OUTPUT_NODES]
    while stack:
        node_id = stack.pop()
        if node_id not in wanted:
            wanted.add(node_id)
            stack += [v[0] for v in prompt[node_id]["inputs"].values() if isinstance(v, list) and len(v) == 2]
    return [prompt[i]["class_type"] for i in sorted(wanted)]


def read_image(comfy, image: dict):
    """An image a node wrote (output or temp), as ComfyUI's LoadImage gives it."""
    return loaded_image(Path(comfy.embedded.folder_paths.get_directory_by_type(image["type"])) / image["subfolder"]
                        / image["filename"])


def controls(entry: dict) -> int:
    """The length of the ControlNet chain on one conditioning entry."""
    count, control = 0, entry[1].get("control")
    while control is not None:
        count, control = count + 1, control.previous_controlnet
    return count


def test_there_are_the_specs_files_and_their_names_read_as_titles():
    assert IDS == sorted(f"{spec.name}.json" for spec in WORKFLOWS)
    assert len(IDS) >= 6
    for name in IDS:
        # Templates titles come from the file name, fetched in a URL as is: letters, digits, spaces, hyphens;
        # the two-digit prefix orders them basic → advanced in the Templates browser's A-Z sort.
        assert re.fullmatch(r"\d\d [A-Z][A-Za-z0-9 -]+\.json", name), name
    assert sorted(p.name for p in (WORKFLOWS_DIR / "api").glob("*.json")) == IDS


@pytest.mark.parametrize("path", UI_FILES, ids=IDS)
def test_shipped_workflow_runs_on_the_test_bed(comfy, sampler_spy, path):
    from instantid.sdxl import ATTN2_KEYS
    prompt = prepare_for_test_bed(comfy.embedded.to_api(load_ui_workflow(path)), UNET_NAME, comfy.base / "input",
                                  steps=1)
    kinds = executed_kinds(prompt)
    # As in a running ComfyUI, the loaders' outputs (same node ids and inputs in most workflows) are
    # reused from the previous workflow: only what differs runs again.
    result = comfy.run(prompt, reuse_outputs=True)
    assert result.success, result.error_text()
    if "KSampler" not in kinds:  # 13 makes an identity file from the photo and draws nothing
        [saved] = [entry for output in result.outputs.values() for entry in output.get("face_embeds", [])]
        assert saved["choice"] == f"{saved['filename']} [output]" and saved["subfolder"] == "instantid_faces"
        folder = Path(comfy.embedded.folder_paths.get_output_directory()) / saved["subfolder"]
        identity = comfy.pack_module("instantid.identity_files").load_identity(folder / saved["filename"])
        assert identity is not None and len(sampler_spy) == 0
        return
    images = [image for output in result.outputs.values() for image in output.get("images", [])]
    saved = [image for image in images if image["type"] == "output"]
    assert saved
    assert len(sampler_spy) == kinds.count("KSampler")
    final = sampler_spy[-1]
    if "ApplyInfiniteYou" in kinds:
        # FLUX: no base-model patch; one InfuseNet control per Apply InfiniteYou on every row.
        from comfy.ldm.flux.model import Flux
        assert isinstance(final["model"].model.diffusion_model, Flux)
        assert "patches_replace" not in final["model"].model_options.get("transformer_options", {})
        for entry in final["positive"] + final["negative"]:
            assert controls(entry) == kinds.count("ApplyInfiniteYou")
        return
    identities = sum(kinds.count(k) for k in ("ApplyInstantID", "ApplyInstantIDAdvanced", "InstantIDAttentionPatch"))
    patches = final["model"].model_options["transformer_options"]["patches_replace"]["attn2"]
    assert set(patches) == set(ATTN2_KEYS)
    assert all(len(patch.branches) == identities for patch in patches.values())
    identitynets = sum(kinds.count(k) for k in ("ApplyInstantID", "ApplyInstantIDAdvanced", "ApplyInstantIDControlNet"))
    for entry in final["positive"] + final["negative"]:
        assert controls(entry) == identitynets + kinds.count("ControlNetApplyAdvanced")
    lora_patched = {key for key in final["model"].patches if key.startswith("diffusion_model.out.2")}
    assert lora_patched == ({"diffusion_model.out.2.weight"} if "LoraLoaderModelOnly" in kinds else set())
    if "InstantIDFacePaste" in kinds:
        # The repaired face is pasted back into the full-size image (the test bed's 320×320 photo).
        assert all(read_image(comfy, image).shape == (1, 320, 320, 3) for image in saved)
    if "InstantIDFaceSimilarity" in kinds:
        # One batch of four, ranked: the saved best image is the first of the ranked preview.
        ranked = [image for image in images if image["type"] == "temp"]
        assert len(ranked) == 4 and len(saved) == 1
        assert torch.equal(read_image(comfy, saved[0]), read_image(comfy, ranked[0]))


@pytest.mark.parametrize("path", UI_FILES, ids=IDS)
def test_api_twin_is_the_converters_output_of_the_ui_file(comfy, path):
    twin = json.loads((WORKFLOWS_DIR / "api" / path.name).read_text())
    assert twin == comfy.embedded.to_api(load_ui_workflow(path))


def test_shipped_files_are_what_the_generator_writes(comfy):
    from instantid.commands.comfy_home import comfyui_version
    files = render(WORKFLOWS, comfy.embedded, __version__, comfyui_version(comfy.embedded.comfyui))
    for name, (workflow, api, picture) in files.items():
        assert (WORKFLOWS_DIR / name).read_text() == dumps(workflow), f"rebuild: python scripts/build_workflows.py ({name})"
        assert (WORKFLOWS_DIR / "api" / name).read_text() == dumps(api), name
        # The Templates thumbnail: a drawing of this graph (the groups' colours, the nodes, the links).
        assert (WORKFLOWS_DIR / name.replace(".json", ".jpg")).read_bytes() == picture, name
    assert sorted(p.name for p in WORKFLOWS_DIR.glob("*.jpg")) == sorted(n.replace(".json", ".jpg") for n in files)


def test_the_thumbnail_is_a_drawing_of_the_graph():
    from workflow_tools import thumbnail
    workflow = load_ui_workflow(WORKFLOWS_DIR / "01 Basic portrait.json")
    picture = thumbnail.draw(workflow, {}, {"ApplyInstantID"})
    assert picture.size == thumbnail.SIZE
    pixels = picture.load()
    colours = {pixels[x, y] for x in range(0, picture.size[0], 2) for y in range(0, picture.size[1], 2)}
    assert thumbnail.PACK_NODE_FILL in colours and thumbnail.NOTE_FILL in colours
    assert thumbnail.LINK_COLORS["MODEL"] in colours and thumbnail.LINK_COLORS["LATENT"] in colours
    # Without the pack's type the pack's colour is gone: the drawing follows the graph, not a fixed picture.
    plain = thumbnail.draw(workflow, {}, set()).load()
    assert thumbnail.PACK_NODE_FILL not in {plain[x, y] for x in range(0, picture.size[0], 2)
                                            for y in range(0, picture.size[1], 2)}


@pytest.mark.parametrize("path", UI_FILES, ids=IDS)
def test_every_node_says_which_pack_it_comes_from(path):
    from conftest import COMFYUI
    from instantid.commands.comfy_home import comfyui_version
    ours = pack_node_ids()
    core_versions = set()
    for node in load_ui_workflow(path)["nodes"]:
        properties = node["properties"]
        if node["type"] in ours:
            assert (properties["cnr_id"], properties["ver"]) == ("instantid-nodes", __version__), node["type"]
        else:
            assert properties["cnr_id"] == "comfy-core", node["type"]
            core_versions.add(properties["ver"])
    # The ComfyUI version the files were built with: the one the tests run with, where there is one.
    assert core_versions == {comfyui_version(COMFYUI)} if COMFYUI else re.fullmatch(r"\d+\.\d+\.\d+", *core_versions)


@pytest.mark.parametrize("path", UI_FILES, ids=IDS)
def test_nodes_do_not_overlap_and_each_sits_in_its_group(path):
    workflow = load_ui_workflow(path)
    assert overlapping_nodes(workflow) == []
    groups = workflow["groups"]
    assert {g["title"] for g in groups} <= {"models", "prompt", "identity", "sampling"}
    # Stages left to right: each group starts right of where the one before it ends.
    assert all(a["bounding"][0] + a["bounding"][2] < b["bounding"][0] for a, b in zip(groups, groups[1:]))
    for node_id, (left, top, right, bottom) in node_rectangles(workflow):
        node = next(n for n in workflow["nodes"] if n["id"] == node_id)
        inside = [g["title"] for g in groups
                  if g["bounding"][0] <= left and right <= g["bounding"][0] + g["bounding"][2]
                  and g["bounding"][1] <= top and bottom <= g["bounding"][1] + g["bounding"][3]]
        assert len(inside) == (0 if node["type"] == NOTE_TYPE else 1), (node["title"], inside)
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            ax, ay, aw, ah = a["bounding"]
            bx, by, bw, bh = b["bounding"]
            assert not (ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah), (a["title"], b["title"])


@pytest.mark.parametrize("path", UI_FILES, ids=IDS)
def test_links_flow_left_to_right(path):
    workflow = load_ui_workflow(path)
    by_id = {node["id"]: node for node in workflow["nodes"]}
    for _, source, _, target, _, _ in workflow["links"]:
        assert by_id[source]["pos"][0] + by_id[source]["size"][0] < by_id[target]["pos"][0], (source, target)


@pytest.mark.parametrize("path", UI_FILES, ids=IDS)
def test_every_loader_carries_its_download_link(path):
    workflow = load_ui_workflow(path)
    known = model_entries()
    expected = []
    for node in workflow["nodes"]:
        links = []
        for model in MODEL_LOADERS.get(node["type"], ()):
            file_name = node["widgets_values"][model.widget]
            entry = known[(model.folder, file_name)]
            links.append({"name": file_name, "directory": model.folder,
                          "url": f"https://huggingface.co/{entry.repo}/resolve/{entry.revision}/{entry.file}"})
        if links:  # a loader of several files (InfiniteYou: projection and recogniser) carries each one
            assert node["properties"]["models"] == links, node.get("title", node["type"])
            expected.extend(links)
    assert expected and workflow["models"] == list({json.dumps(m): m for m in expected}.values())


@pytest.mark.parametrize("path", UI_FILES, ids=IDS)
def test_the_note_links_every_model_file_the_workflow_loads(path):
    """A Markdown note: each model file as a clickable link with its folder (the frontend downloads
    only .safetensors from its missing-models dialog, so the adapter's .bin and antelopev2's .onnx files
    reach the user here), placed above the graph."""
    workflow = load_ui_workflow(path)
    [note] = [node for node in workflow["nodes"] if node["type"] == NOTE_TYPE]
    text = note["widgets_values"][0]
    for entry in workflow["models"]:
        file_name = entry["name"].rpartition("/")[2]
        assert f"[{file_name}]({entry['url']})" in text, entry["name"]
    if any(node["type"] == "InstantIDFaceAnalysis" for node in workflow["nodes"]):
        for file_name in ("scrfd_10g_bnkps.onnx", "glintr100.onnx"):
            assert f"[{file_name}](https://huggingface.co/DIAMONIK7777/antelopev2/resolve/main/{file_name})" in text
        assert "`models/insightface/models/antelopev2/`" in text
    others = [node for node in workflow["nodes"] if node is not note]
    assert note["pos"][1] + note["size"][1] < min(node["pos"][1] for node in others) - 30  # above the graph


# The builder on its own, with node definitions written here (no ComfyUI needed).
SOURCE = {"name": "Src", "display_name": "Source", "python_module": "nodes", "output": ["IMAGE"], "output_name": ["IMAGE"],
          "input": {"required": {"seed": ["INT", {"default": 3, "control_after_generate": True}],
                                 "mode": [["a", "b"], {}]}},
          "input_order": {"required": ["seed", "mode"]}}
SINK = {"name": "Sink", "display_name": "Sink", "python_module": "custom_nodes.instantid-nodes", "output": [],
        "output_name": [], "input": {"required": {"images": ["IMAGE", {}], "text": ["STRING", {"multiline": True}]},
                                     "optional": {"mask": ["MASK", {}]}},
        "input_order": {"required": ["images", "text"], "optional": ["mask"]}}
INFO = {"Src": SOURCE, "Sink": SINK}


def tiny_spec(links=("src.IMAGE -> sink.images",), **values):
    from workflow_tools.builder import NodeSpec, WorkflowSpec
    return WorkflowSpec("99 Test", "a note", (NodeSpec("src", "Src", "", "models", values),
                                               NodeSpec("sink", "Sink", "My sink", "sampling")), tuple(links))


def test_builder_writes_every_widget_in_schema_order_with_the_seed_control():
    from workflow_tools.builder import build
    workflow = build(tiny_spec(mode="b"), INFO, "1.2.3", "0.8.0")
    src, sink, note = workflow["nodes"]
    assert src["widgets_values"] == [3, "fixed", "b"]
    assert sink["widgets_values"] == [""]
    assert [i["name"] for i in sink["inputs"]] == ["images", "mask", "text"]  # sockets first, as the frontend
    assert sink["inputs"][0]["link"] == 1 and src["outputs"][0]["links"] == [1]
    assert workflow["links"] == [[1, 1, 0, 2, 0, "IMAGE"]]
    assert "title" not in src and sink["title"] == "My sink"
    assert (src["properties"]["cnr_id"], src["properties"]["ver"]) == ("comfy-core", "0.8.0")
    assert (sink["properties"]["cnr_id"], sink["properties"]["ver"]) == ("instantid-nodes", "1.2.3")
    assert note["type"] == "MarkdownNote" and note["widgets_values"][0].startswith("a note\n\n**Models**")
    assert src["pos"][0] + src["size"][0] < sink["pos"][0]


@pytest.mark.parametrize("spec_args, message", [
    ({"links": ()}, "99 Test: sink (Sink) has unlinked required inputs ['images']"),
    ({"links": ("src.IMAGE -> sink.mask",)}, "99 Test: link 'src.IMAGE -> sink.mask' joins IMAGE to MASK"),
    ({"links": ("src.IMAGE -> sink.text",)}, "99 Test: link 'src.IMAGE -> sink.text': the input is a widget or already linked"),
    ({"links": ("src.LATENT -> sink.images",)}, "99 Test: link 'src.LATENT -> sink.images': no such output or input"),
    ({"links": ("nowhere.IMAGE -> sink.images",)},
     "99 Test: link 'nowhere.IMAGE -> sink.images' does not read 'node.OUTPUT -> node.input' with known node keys"),
    ({"steps": 3}, "99 Test: src (Src) has no widget ['steps']"),
])
def test_builder_says_what_is_wrong_with_a_spec(spec_args, message):
    from workflow_tools.builder import SpecError, build
    with pytest.raises(SpecError) as error:
        build(tiny_spec(**spec_args), INFO, "1.2.3", "0.8.0")
    assert str(error.value) == message
