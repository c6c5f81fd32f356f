"""UI-format workflows (what ComfyUI's frontend saves) built from short declarative specs.

A spec names nodes by class type with a title, a group and the widget values that differ from the
node's defaults (by input name), and links by output and input name. The builder reads the node
definitions (ComfyUI's /object_info entries), so widget values come out complete and in schema
order, and lays the graph out as a hand-made one: left to right by graph depth, node sizes as the
frontend's LGraphNode.computeSize gives them, no two nodes overlapping. The spec's groups become
stages that follow the data left to right, each holding only nodes of its group (a group may come
back: prompts before the identity step, sampling after it), so no link runs back into an earlier
stage. The note (Markdown, with a download link for every model) sits above
the graph, and the saved view shows it and the pack's nodes in a 1600x1000 browser window.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from instantid.model_files import ANTELOPEV2, CATALOG, WORKFLOW_MODELS, ModelFile
from instantid.commands.workflow_models import MODEL_LOADERS

from . import thumbnail

PACK_CNR_ID = "instantid-nodes"
CORE_CNR_ID = "comfy-core"
GROUPS = ("models", "prompt", "identity", "sampling")
GROUP_COLORS = {"models": "#3f789e", "prompt": "#a1309b", "identity": "#8A8", "sampling": "#b58b2a"}
NOTE_TYPE = "MarkdownNote"
NOTE_TITLE = "About this workflow"
# Buttons the pack's web extension (web/instantid_node_text.js) adds to a node, beyond its widgets.
EXTENSION_BUTTONS = {"InstantIDLoadFaceEmbeds": 1}
# Room for the text the extension shows on a node after it runs, where it always shows some (the saved
# file's name and how to load it).
EXTENSION_TEXT_HEIGHT = {"InstantIDSaveFaceEmbeds": 70}
FACE_MODEL_NODES = ("InstantIDFaceAnalysis",)

# The frontend's LiteGraph constants (frontend 1.35.9: LiteGraphGlobal.ts, BaseWidget.ts).
TITLE_HEIGHT = 30
SLOT_HEIGHT = 20
WIDGET_HEIGHT = 20
WIDGET_SPACING = 4
WIDGETS_PADDING = 8
NODE_BOTTOM_PADDING = 6  # computeSize's result is 6 px taller than its rows and widgets (measured in 1.35.9)
NODE_WIDTH = 140
MIN_NODE_WIDTH = 180
TITLE_FONT_PX = 14
SLOT_FONT_PX = 12
WIDGET_PADDING = 42 + 2 * (15 + 6 + 10)  # minValueWidth + 2 × (margin + arrowMargin + arrowWidth)
# What the frontend draws below the widgets or inside DOM widgets, beyond computeSize's minimum.
MULTILINE_HEIGHT = 90
IMAGE_PREVIEW_HEIGHT = 250
# Layout spacing.
COLUMN_GAP = 70
ROW_GAP = 30
GROUP_PADDING = 15
GROUP_TITLE_HEIGHT = 40
MAX_STACK_HEIGHT = 1000  # a taller column becomes two side by side, so the first view fits
NOTE_GAP = 60
NOTE_MIN_WIDTH = 700
NOTE_MAX_WIDTH = 800
NOTE_FONT_PX = 9       # the Markdown widget's text: about 4.5 canvas units a character (measured in 1.35.9)
NOTE_LINE_HEIGHT = 12
NOTE_BLOCK_GAP = 8     # between paragraphs and around a list
# The first view (frontend 1.35.9 in a 1600x1000 window): the canvas fills the window; the side bar
# covers x < 59 and the tab bar and breadcrumb y < 90. Below 0.6 the canvas drops text (low quality).
VIEW_AREA = (75, 105, 1585, 985)
VIEW_SCALES = (1.0, 0.6)

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SEED_NAMES = ("seed", "noise_seed")


class SpecError(ValueError):
    """A workflow spec that does not fit the node definitions; the message says where."""


@dataclass(frozen=True)
class NodeSpec:
    """One node: `key` names it in links, `values` holds non-default widget values by input name;
    an empty title shows the node's display name."""
    key: str
    class_type: str
    title: str
    group: str
    values: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkflowSpec:
    """One workflow: `name` is the file name without .json (the Templates title); links read
    "source.OUTPUT -> target.input"; `note` is the text of the Note node."""
    name: str
    note: str
    nodes: tuple[NodeSpec, ...]
    links: tuple[str, ...]
    tag: str = ""


@dataclass(frozen=True)
class Widget:
    name: str
    kind: str
    value: Any
    multiline: bool = False
    control_after_generate: bool = False
    image_upload: bool = False
    advanced: bool = False  # hidden until the node's "Show Advanced" (the pack's web extension)


@dataclass(frozen=True)
class NodeSchema:
    """What the frontend builds from a node definition: sockets, widgets, outputs."""
    class_type: str
    display_name: str
    inputs: tuple[tuple[str, str, bool], ...]        # (name, type, is_widget) in definition order
    widgets: tuple[Widget, ...]
    outputs: tuple[tuple[str, str], ...]             # (name, type)
    core: bool
    required: frozenset[str] = frozenset()

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> "NodeSchema":
        order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
        inputs, widgets = [], []
        for section in ("required", "optional"):
            for name in order.get(section, []):
                spec = info["input"][section][name]
                kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
                if isinstance(kind, list):
                    kind, options = "COMBO", {**options, "options": kind}
                is_widget = kind in WIDGET_TYPES and not options.get("forceInput")
                inputs.append((name, kind, is_widget))
                if is_widget:
                    widgets.append(Widget(name, kind, _default(kind, options), bool(options.get("multiline")),
                                          bool(options.get("control_after_generate",
                                                           kind == "INT" and name in SEED_NAMES)),
                                          bool(options.get("image_upload")), bool(options.get("advanced"))))
        outputs = tuple(zip(info.get("output_name") or info["output"], info["output"]))
        module = str(info.get("python_module", ""))
        return cls(info["name"], info.get("display_name") or info["name"], tuple(inputs), tuple(widgets),
                   outputs, not module.startswith("custom_nodes"), frozenset(order.get("required", [])))


def _default(kind: str, options: Mapping[str, Any]) -> Any:
    if "default" in options:
        return options["default"]
    if kind == "COMBO":
        choices = options.get("options") or []
        return choices[0] if choices else None
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]


def model_entries() -> dict[tuple[str, str], ModelFile]:
    """Every model file a shipped workflow may load, by (ComfyUI folder, file name)."""
    return {(entry.folder, entry.path): entry for entry in (*CATALOG, *WORKFLOW_MODELS)}


def model_link(folder: str, name: str) -> dict[str, str]:
    """The entry the frontend's missing-models dialog reads: file name, download URL, folder."""
    entry = model_entries().get((folder, name))
    if entry is None:
        raise SpecError(f"model file {folder}/{name} is in no catalog (instantid/model_files.py)")
    return {"name": name, "url": entry.url(), "directory": folder}


def text_width(text: str, font_px: int) -> float:
    """Width of text in the frontend's Inter font, from per-character advance classes (em units)."""
    em = 0.0
    for ch in text:
        if ch in "il.,:;'|!j":
            em += 0.28
        elif ch in "ftr()[]/ -_":
            em += 0.4
        elif ch in "mwMW@":
            em += 0.9
        elif ch.isupper():
            em += 0.7
        else:
            em += 0.58
    return em * font_px


def show_advanced(schema: NodeSchema, values: Mapping[str, Any]) -> bool:
    """Whether a node opens with its advanced options shown: where the spec sets one."""
    return any(w.advanced and w.name in values and values[w.name] != w.value for w in schema.widgets)


def node_size(schema: NodeSchema, title: str, values: Mapping[str, Any]) -> list[int]:
    """The size the frontend's computeSize gives, widened so widget values show and taller where
    the frontend draws an image preview or a text box."""
    shown = show_advanced(schema, values)
    sockets = [name for name, _, is_widget in schema.inputs if not is_widget]
    rows = max(len(sockets), len(schema.outputs), 1)
    title_w = TITLE_HEIGHT + text_width(title, TITLE_FONT_PX) + TITLE_HEIGHT * 0.33
    socket_w = max((text_width(n, SLOT_FONT_PX) for n in sockets), default=0)
    output_w = max((text_width(n, SLOT_FONT_PX) for n, _ in schema.outputs), default=0)
    slots_w = socket_w + output_w + 2 * SLOT_HEIGHT + (5 if socket_w and output_w else 0)
    widget_w = 0.0
    height = rows * SLOT_HEIGHT
    widget_rows = []
    for widget in schema.widgets:
        if widget.advanced and not shown:
            continue
        value = values.get(widget.name, widget.value)
        if widget.multiline:
            widget_rows.append(MULTILINE_HEIGHT)
            continue
        label_w = text_width(widget.name, SLOT_FONT_PX) + text_width(_shown(value), SLOT_FONT_PX) + 5
        widget_w = max(widget_w, label_w + WIDGET_PADDING)
        widget_rows.append(WIDGET_HEIGHT)
        if widget.control_after_generate or widget.image_upload:
            widget_rows.append(WIDGET_HEIGHT)
    widget_rows += [WIDGET_HEIGHT] * EXTENSION_BUTTONS.get(schema.class_type, 0)
    if widget_rows:
        height += sum(h + WIDGET_SPACING for h in widget_rows) + WIDGETS_PADDING
    height += NODE_BOTTOM_PADDING + EXTENSION_TEXT_HEIGHT.get(schema.class_type, 0)
    # The frontend's minimum is NODE_WIDTH (× 1.5 with widgets); short titles next to the node badge
    # get cut at that width, so a little more.
    min_w = max(NODE_WIDTH * (1.5 if widget_rows else 1), MIN_NODE_WIDTH)
    width = max(slots_w, widget_w, title_w, min_w)
    if any(w.image_upload for w in schema.widgets) or schema.class_type in ("SaveImage", "PreviewImage"):
        height += IMAGE_PREVIEW_HEIGHT
        width = max(width, 300)
    if any(w.multiline for w in schema.widgets):
        width = max(width, 360)
    return [int(-(-width // 10) * 10), int(height)]


def _shown(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def note_size(text: str, width: int) -> list[int]:
    """The Markdown note's size: wide enough to read, tall enough for its wrapped lines."""
    chars_per_line = int((width - 40) / text_width("n", NOTE_FONT_PX))
    lines = blocks = 0
    for line in text.split("\n"):
        if not line.strip():
            blocks += 1
            continue
        lines += max(1, -(-len(line) // chars_per_line))
    return [width, 40 + lines * NOTE_LINE_HEIGHT + (blocks + 2) * NOTE_BLOCK_GAP]


def model_notes(nodes: list[dict[str, Any]], models: list[dict[str, str]]) -> str:
    """The Markdown the note ends with: each model file with its download link and its folder."""
    lines = ["**Models** (click to download, then put each file in the folder named):", ""]
    for entry in models:
        folder, _, file_name = entry["name"].rpartition("/")
        lines.append(f"- [{file_name}]({entry['url']}) → `models/{entry['directory']}/{folder + '/' if folder else ''}`")
    if any(node["type"] in FACE_MODEL_NODES for node in nodes):
        for entry in ANTELOPEV2:
            lines.append(f"- [{entry.file}]({entry.url()}) (InsightFace antelopev2) → "
                         f"`models/{entry.folder}/{entry.path.rpartition('/')[0]}/`")
    lines += ["", "Or fetch them from a terminal: `python -m instantid fetch-models`."]
    return "\n".join(lines)


def provenance(core: bool, versions: Mapping[str, str]) -> dict[str, str]:
    """The node properties ComfyUI-Manager resolves a missing node by, as the frontend writes them."""
    return ({"cnr_id": CORE_CNR_ID, "ver": versions["comfyui"]} if core
            else {"cnr_id": PACK_CNR_ID, "ver": versions["pack"]})


class _Graph:
    """The UI graph under construction: nodes in spec order, ids from 1."""

    def __init__(self, spec: WorkflowSpec, schemas: Mapping[str, NodeSchema], versions: Mapping[str, str]):
        self.spec, self.schemas, self.versions = spec, schemas, versions
        self.ids = {node.key: index for index, node in enumerate(spec.nodes, start=1)}
        if len(self.ids) != len(spec.nodes):
            raise SpecError(f"{spec.name}: two nodes share a key")
        self.nodes = [self._node(node) for node in spec.nodes]
        self.links: list[list[Any]] = []
        for text in spec.links:
            self._link(text)
        for node, ui in zip(spec.nodes, self.nodes):
            missing = [i["name"] for i in ui["inputs"] if "widget" not in i and i["link"] is None
                       and i["name"] in schemas[node.class_type].required]
            if missing:
                raise SpecError(f"{spec.name}: {node.key} ({node.class_type}) has unlinked required inputs {missing}")

    def _node(self, node: NodeSpec) -> dict[str, Any]:
        if node.group not in GROUPS:
            raise SpecError(f"{self.spec.name}: {node.key} is in group {node.group!r}, not one of {GROUPS}")
        schema = self.schemas.get(node.class_type)
        if schema is None:
            raise SpecError(f"{self.spec.name}: node type {node.class_type} is not installed")
        unknown = set(node.values) - {w.name for w in schema.widgets}
        if unknown:
            raise SpecError(f"{self.spec.name}: {node.key} ({node.class_type}) has no widget {sorted(unknown)}")
        values: list[Any] = []
        for widget in schema.widgets:
            value = node.values.get(widget.name, widget.value)
            if value is None:
                raise SpecError(f"{self.spec.name}: {node.key}.{widget.name} needs a value (the list depends on the "
                                "files installed)")
            values.append(value)
            if widget.control_after_generate:
                values.append("fixed")
            if widget.image_upload:
                values.append("image")
        # The frontend lists the sockets first, then one input per widget (the upload button included).
        inputs = [{"localized_name": name, "name": name, "type": kind, "link": None}
                  for name, kind, is_widget in schema.inputs if not is_widget]
        for widget in schema.widgets:
            inputs.append({"localized_name": widget.name, "name": widget.name, "type": widget.kind,
                           "widget": {"name": widget.name}, "link": None})
            if widget.image_upload:
                inputs.append({"localized_name": "choose file to upload", "name": "upload", "type": "IMAGEUPLOAD",
                               "widget": {"name": "upload"}, "link": None})
        properties: dict[str, Any] = {"Node name for S&R": node.class_type}
        properties.update(provenance(schema.core, self.versions))
        models = [model_link(model.folder, node.values[model.name]) for model in MODEL_LOADERS.get(node.class_type, ())]
        if models:
            properties["models"] = models
        title = node.title or schema.display_name
        ui: dict[str, Any] = {"id": self.ids[node.key], "type": node.class_type, "pos": [0, 0],
                              "size": node_size(schema, title, node.values), "flags": {}, "order": 0, "mode": 0,
                              "inputs": inputs,
                              "outputs": [{"localized_name": name, "name": name, "type": kind, "links": []}
                                          for name, kind in schema.outputs],
                              "properties": properties, "widgets_values": values}
        if title != schema.display_name:
            # As the frontend saves it: a title only where it differs from the display name.
            ui["title"] = title
        if show_advanced(schema, node.values):
            ui["showAdvanced"] = True
        return ui

    def _link(self, text: str) -> None:
        try:
            source, target = (part.strip() for part in text.split("->"))
            source_key, output_name = source.rsplit(".", 1)
            target_key, input_name = target.rsplit(".", 1)
            source_node = self.nodes[self.ids[source_key] - 1]
            target_node = self.nodes[self.ids[target_key] - 1]
        except (ValueError, KeyError):
            raise SpecError(f"{self.spec.name}: link {text!r} does not read 'node.OUTPUT -> node.input' with known "
                            "node keys") from None
        out_slot = next((i for i, o in enumerate(source_node["outputs"]) if o["name"] == output_name), None)
        in_slot = next((i for i, s in enumerate(target_node["inputs"]) if s["name"] == input_name), None)
        if out_slot is None or in_slot is None:
            raise SpecError(f"{self.spec.name}: link {text!r}: no such output or input")
        output, slot = source_node["outputs"][out_slot], target_node["inputs"][in_slot]
        if "widget" in slot or slot["link"] is not None:
            raise SpecError(f"{self.spec.name}: link {text!r}: the input is a widget or already linked")
        # An input may accept several types, comma-separated (as the frontend matches them).
        if not {output["type"], "*"} & set(slot["type"].split(",")) and output["type"] != "*":
            raise SpecError(f"{self.spec.name}: link {text!r} joins {output['type']} to {slot['type']}")
        link_id = len(self.links) + 1
        output["links"].append(link_id)
        output["slot_index"] = out_slot
        slot["link"] = link_id
        self.links.append([link_id, source_node["id"], out_slot, target_node["id"], in_slot, output["type"]])

    def depths(self) -> dict[int, int]:
        """Longest distance from a node without inputs, by node id."""
        incoming: dict[int, list[int]] = {node["id"]: [] for node in self.nodes}
        for _, source, _, target, _, _ in self.links:
            incoming[target].append(source)
        depth: dict[int, int] = {}

        def visit(node_id: int, trail: tuple[int, ...]) -> int:
            if node_id in trail:
                raise SpecError(f"{self.spec.name}: the links form a cycle through node {node_id}")
            if node_id not in depth:
                depth[node_id] = 1 + max((visit(s, trail + (node_id,)) for s in incoming[node_id]), default=-1)
            return depth[node_id]
        for node_id in incoming:
            visit(node_id, ())
        return depth


def build(spec: WorkflowSpec, node_info: Mapping[str, Mapping[str, Any]], pack_version: str,
          comfyui_version: str) -> dict[str, Any]:
    """The UI-format workflow of one spec, against the given node definitions."""
    schemas = {}
    for kind in {node.class_type for node in spec.nodes}:
        if kind not in node_info:
            raise SpecError(f"{spec.name}: node type {kind} is not installed")
        schemas[kind] = NodeSchema.from_info(node_info[kind])
    graph = _Graph(spec, schemas, {"pack": pack_version, "comfyui": comfyui_version})
    groups = _lay_out(graph)
    models = []
    for node in graph.nodes:
        for entry in node["properties"].get("models", []):
            if entry not in models:
                models.append(entry)
    text = f"{spec.note}\n\n{model_notes(graph.nodes, models)}"
    # Above the pack's nodes (the first view shows both), as wide as they spread, within bounds.
    pack_nodes = [ui for node, ui in zip(spec.nodes, graph.nodes) if not schemas[node.class_type].core]
    left = min(ui["pos"][0] for ui in pack_nodes or graph.nodes)
    right = max(ui["pos"][0] + ui["size"][0] for ui in pack_nodes or graph.nodes)
    size = note_size(text, int(min(max(right - left, NOTE_MIN_WIDTH), NOTE_MAX_WIDTH)))
    note_id = len(graph.nodes) + 1
    note = {"id": note_id, "type": NOTE_TYPE, "pos": [left, -size[1] - NOTE_GAP], "size": size,
            "flags": {}, "order": 0, "mode": 0, "inputs": [], "outputs": [], "title": NOTE_TITLE,
            "properties": provenance(True, graph.versions), "widgets_values": [text],
            "color": "#432", "bgcolor": "#653"}
    nodes = [*graph.nodes, note]
    _set_execution_order(nodes, graph.depths())
    return {"id": _stable_id(spec.name), "revision": 0, "last_node_id": note_id, "last_link_id": len(graph.links),
            "nodes": nodes, "links": graph.links, "groups": groups, "config": {},
            "extra": {"ds": first_view([note, *pack_nodes]),
                      **({"instantid_workflow": spec.tag} if spec.tag else {})},
            "models": models, "version": 0.4}


def first_view(nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """The saved canvas view (scale, offset) that puts these nodes, title bars included, inside
    VIEW_AREA of a 1600x1000 window, as large as it fits between VIEW_SCALES."""
    left = min(node["pos"][0] for node in nodes)
    top = min(node["pos"][1] for node in nodes) - TITLE_HEIGHT
    right = max(node["pos"][0] + node["size"][0] for node in nodes)
    bottom = max(node["pos"][1] + node["size"][1] for node in nodes)
    area_left, area_top, area_right, area_bottom = VIEW_AREA
    fit = min((area_right - area_left) / (right - left), (area_bottom - area_top) / (bottom - top))
    scale = max(VIEW_SCALES[1], min(VIEW_SCALES[0], int(fit * 20) / 20))
    # The frontend draws canvas point p at (p + offset) * scale.
    return {"scale": scale, "offset": [round(area_left / scale - left, 1), round(area_top / scale - top, 1)]}


def _stable_id(name: str) -> str:
    """A UUID-shaped id derived from the name, so a rebuild writes the same file."""
    digest = hashlib.sha256(name.encode()).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


def _set_execution_order(nodes: list[dict[str, Any]], depth: Mapping[int, int]) -> None:
    ranked = sorted(nodes, key=lambda n: (depth.get(n["id"], -1), n["id"]))
    for order, node in enumerate(ranked):
        node["order"] = order


def _links_by_node(graph: _Graph) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """(inputs, consumers): the ids each node reads from and feeds, by node id."""
    inputs: dict[int, list[int]] = {node["id"]: [] for node in graph.nodes}
    consumers: dict[int, list[int]] = {node["id"]: [] for node in graph.nodes}
    for _, source, _, target, _, _ in graph.links:
        inputs[target].append(source)
        consumers[source].append(target)
    return inputs, consumers


def _stages(graph: _Graph) -> list[tuple[str, list[int]]]:
    """The stages left to right, each one spec group and its node ids, so that a group holds only its
    own nodes and no link runs back into an earlier stage. From the outputs back: a node stands at its
    first consumer, in that stage or the one just left of it where one of them is of its group, else
    in a new stage of its group just left of it (the loaders a step needs stand right before it, as in
    a hand-made graph); a node that feeds nothing ends the graph."""
    group_of = {ui["id"]: spec.group for spec, ui in zip(graph.spec.nodes, graph.nodes)}
    depth = graph.depths()
    _, consumers = _links_by_node(graph)
    stages: list[tuple[str, list[int]]] = []
    stage_of: dict[int, tuple[str, list[int]]] = {}
    for node_id in sorted(depth, key=lambda n: (-depth[n], n)):
        first = min((next(i for i, stage in enumerate(stages) if stage is stage_of[target])
                     for target in consumers[node_id]), default=len(stages))
        stage = next((s for s in stages[max(first - 1, 0):first + 1][::-1] if s[0] == group_of[node_id]), None)
        if stage is None:
            stage = (group_of[node_id], [])
            stages.insert(first, stage)
        stage[1].append(node_id)
        stage_of[node_id] = stage
    return [(title, sorted(members)) for title, members in stages]


def _stage_columns(graph: _Graph, members: list[int]) -> dict[int, int]:
    """Column of each node within its stage: its depth along the stage's own links, a node without
    inputs just left of its nearest consumer in the stage (an empty latent beside the sampler)."""
    inputs, consumers = _links_by_node(graph)
    inside = set(members)
    depth = graph.depths()
    column: dict[int, int] = {}
    for node_id in sorted(members, key=lambda n: (depth[n], n)):
        column[node_id] = 1 + max((column[s] for s in inputs[node_id] if s in inside), default=-1)
    for node_id in members:
        targets = [column[t] for t in consumers[node_id] if t in inside]
        if not inputs[node_id] and targets:
            column[node_id] = min(targets) - 1
    return column


def _stacks(column: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """A column's nodes in spec order, split into side-by-side stacks no taller than MAX_STACK_HEIGHT
    (nodes of one column never link to each other, so the data still flows left to right)."""
    stacks: list[list[dict[str, Any]]] = [[]]
    height = 0
    for ui in column:
        needed = ui["size"][1] + TITLE_HEIGHT + ROW_GAP
        if stacks[-1] and height + needed > MAX_STACK_HEIGHT:
            stacks.append([])
            height = 0
        stacks[-1].append(ui)
        height += needed
    return stacks


def _lay_out(graph: _Graph) -> list[dict[str, Any]]:
    """Stages left to right, within each its columns, nodes stacked in spec order within a column,
    one group around each stage; returns the groups."""
    by_id = {ui["id"]: ui for ui in graph.nodes}
    top = GROUP_TITLE_HEIGHT + GROUP_PADDING + TITLE_HEIGHT
    groups, x, bottom = [], 0, top
    stages = _stages(graph)
    for title, members in stages:
        column = _stage_columns(graph, members)
        stacks = [stack for c in sorted(set(column.values()))
                  for stack in _stacks([by_id[n] for n in members if column[n] == c])]
        left = x
        for number, stack in enumerate(stacks):
            y = top
            for ui in stack:
                ui["pos"] = [x + GROUP_PADDING, y]
                y += ui["size"][1] + TITLE_HEIGHT + ROW_GAP
                bottom = max(bottom, ui["pos"][1] + ui["size"][1])
            x += GROUP_PADDING + max(ui["size"][0] for ui in stack) + GROUP_PADDING
            if number < len(stacks) - 1:
                x += COLUMN_GAP - 2 * GROUP_PADDING
        groups.append((title, left, x))
        x += COLUMN_GAP
    return [{"id": group_id, "title": title, "bounding": [left, 0, right - left, bottom + GROUP_PADDING],
             "color": GROUP_COLORS[title], "font_size": 24, "flags": {}}
            for group_id, (title, left, right) in enumerate(groups, start=1)]


def dumps(workflow: Mapping[str, Any]) -> str:
    """The file text: stable, readable, one trailing newline."""
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


def node_rectangles(workflow: Mapping[str, Any]) -> list[tuple[int, tuple[float, float, float, float]]]:
    """(id, (left, top, right, bottom)) of each node including its title bar."""
    return [(node["id"], (node["pos"][0], node["pos"][1] - TITLE_HEIGHT,
                          node["pos"][0] + node["size"][0], node["pos"][1] + node["size"][1]))
            for node in workflow["nodes"]]


def overlapping_nodes(workflow: Mapping[str, Any]) -> list[tuple[int, int]]:
    """Pairs of node ids whose rectangles (title bar included) intersect."""
    rects = node_rectangles(workflow)
    return [(a, b) for i, (a, ra) in enumerate(rects) for b, rb in rects[i + 1:]
            if ra[0] < rb[2] and rb[0] < ra[2] and ra[1] < rb[3] and rb[1] < ra[3]]


def node_types(specs: Iterable[WorkflowSpec]) -> set[str]:
    return {node.class_type for spec in specs for node in spec.nodes}


def render(specs: Iterable[WorkflowSpec], comfy: Any, pack_version: str, comfyui_version: str
           ) -> dict[str, tuple[dict[str, Any], dict[str, Any], bytes]]:
    """File name → (UI workflow, its API twin, its Templates thumbnail as JPEG) for each spec; `comfy`
    is an EmbeddedComfyUI (its node definitions and its UI-to-API converter)."""
    specs = list(specs)
    info = {kind: comfy.node_info(kind) for kind in node_types(specs) if kind in comfy.nodes.NODE_CLASS_MAPPINGS}
    schemas = {kind: NodeSchema.from_info(entry) for kind, entry in info.items()}
    names = {kind: schema.display_name for kind, schema in schemas.items()}
    pack_types = {kind for kind, schema in schemas.items() if not schema.core}
    files = {}
    for spec in specs:
        workflow = build(spec, info, pack_version, comfyui_version)
        files[f"{spec.name}.json"] = (workflow, comfy.to_api(workflow), thumbnail.jpeg(workflow, names, pack_types))
    return files
