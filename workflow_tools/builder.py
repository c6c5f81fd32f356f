"""UI-format workflows (what ComfyUI's frontend saves) built from short declarative specs.

A spec names nodes by class type with a title, a group and the widget values that differ from the
node's defaults (by input name), and links by output and input name. The builder reads the node
definitions (ComfyUI's /object_info entries), so widget values come out complete and in schema
order, and lays the graph out as a hand-made one: left to right by graph depth, one horizontal band
per group, node sizes as the frontend's LGraphNode.computeSize gives them, no two nodes overlapping.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from instantid.commands.catalog import CATALOG, WORKFLOW_MODELS, ModelFile
from instantid.commands.fetch import DEFAULT_ENDPOINT, file_url
from instantid.commands.workflow_models import MODEL_LOADERS

PACK_CNR_ID = "instantid-nodes"
CORE_CNR_ID = "comfy-core"
GROUPS = ("models", "identity", "sampling")
GROUP_COLORS = {"models": "#3f789e", "identity": "#8A8", "sampling": "#b58b2a"}
NOTE_TYPE = "Note"

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
BAND_GAP = 40
NOTE_WIDTH = 400

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
                                          bool(options.get("image_upload"))))
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
        raise SpecError(f"model file {folder}/{name} is in no catalog (instantid/commands/catalog.py)")
    return {"name": name, "url": file_url(entry, DEFAULT_ENDPOINT), "directory": folder}


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


def node_size(schema: NodeSchema, title: str, values: Mapping[str, Any]) -> list[int]:
    """The size the frontend's computeSize gives, widened so widget values show and taller where
    the frontend draws an image preview or a text box."""
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
        value = values.get(widget.name, widget.value)
        if widget.multiline:
            widget_rows.append(MULTILINE_HEIGHT)
            continue
        label_w = text_width(widget.name, SLOT_FONT_PX) + text_width(_shown(value), SLOT_FONT_PX) + 5
        widget_w = max(widget_w, label_w + WIDGET_PADDING)
        widget_rows.append(WIDGET_HEIGHT)
        if widget.control_after_generate or widget.image_upload:
            widget_rows.append(WIDGET_HEIGHT)
    if widget_rows:
        height += sum(h + WIDGET_SPACING for h in widget_rows) + WIDGETS_PADDING
    height += NODE_BOTTOM_PADDING
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


def note_size(text: str) -> list[int]:
    chars_per_line = int((NOTE_WIDTH - 20) / text_width("n", 14))
    lines = sum(max(1, -(-len(line) // chars_per_line)) for line in text.split("\n"))
    return [NOTE_WIDTH, 30 + lines * 18]


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
    note_id = len(graph.nodes) + 1
    note = {"id": note_id, "type": NOTE_TYPE, "pos": [-NOTE_WIDTH - COLUMN_GAP, 0], "size": note_size(spec.note),
            "flags": {}, "order": 0, "mode": 0, "inputs": [], "outputs": [], "title": "About this workflow",
            "properties": {"text": "", **provenance(True, graph.versions)}, "widgets_values": [spec.note],
            "color": "#432", "bgcolor": "#653"}
    nodes = [*graph.nodes, note]
    _set_execution_order(nodes, graph.depths())
    models = []
    for node in graph.nodes:
        for entry in node["properties"].get("models", []):
            if entry not in models:
                models.append(entry)
    return {"id": _stable_id(spec.name), "revision": 0, "last_node_id": note_id, "last_link_id": len(graph.links),
            "nodes": nodes, "links": graph.links, "groups": groups, "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [NOTE_WIDTH + COLUMN_GAP + 40, 80]},
                      **({"instantid_workflow": spec.tag} if spec.tag else {})},
            "models": models, "version": 0.4}


def _stable_id(name: str) -> str:
    """A UUID-shaped id derived from the name, so a rebuild writes the same file."""
    digest = hashlib.sha256(name.encode()).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


def _set_execution_order(nodes: list[dict[str, Any]], depth: Mapping[int, int]) -> None:
    ranked = sorted(nodes, key=lambda n: (depth.get(n["id"], -1), n["id"]))
    for order, node in enumerate(ranked):
        node["order"] = order


def _lay_out(graph: _Graph) -> list[dict[str, Any]]:
    """Columns by depth (shared by all groups, so links flow left to right), one horizontal band
    per group, nodes stacked in spec order within a band's column; returns the groups."""
    depth = graph.depths()
    columns = sorted(set(depth.values()))
    col_width = {c: max(n["size"][0] for n in graph.nodes if depth[n["id"]] == c) for c in columns}
    col_x, x = {}, 0
    for c in columns:
        col_x[c] = x
        x += col_width[c] + COLUMN_GAP
    groups, band_top, group_id = [], 0, 1
    for group in GROUPS:
        members = [(spec, ui) for spec, ui in zip(graph.spec.nodes, graph.nodes) if spec.group == group]
        if not members:
            continue
        top = band_top + GROUP_TITLE_HEIGHT + GROUP_PADDING + TITLE_HEIGHT
        bottom = top
        for c in columns:
            y = top
            for _, ui in (m for m in members if depth[m[1]["id"]] == c):
                ui["pos"] = [col_x[c], y]
                y += ui["size"][1] + TITLE_HEIGHT + ROW_GAP
                bottom = max(bottom, ui["pos"][1] + ui["size"][1])
        left = min(ui["pos"][0] for _, ui in members) - GROUP_PADDING
        right = max(ui["pos"][0] + ui["size"][0] for _, ui in members) + GROUP_PADDING
        height = bottom + GROUP_PADDING - band_top
        groups.append({"id": group_id, "title": group, "bounding": [left, band_top, right - left, height],
                       "color": GROUP_COLORS[group], "font_size": 24, "flags": {}})
        group_id += 1
        band_top += height + BAND_GAP
    return groups


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
           ) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """File name → (UI workflow, its API twin) for each spec; `comfy` is an EmbeddedComfyUI (its
    node definitions and its UI-to-API converter)."""
    specs = list(specs)
    info = {kind: comfy.node_info(kind) for kind in node_types(specs) if kind in comfy.nodes.NODE_CLASS_MAPPINGS}
    files = {}
    for spec in specs:
        workflow = build(spec, info, pack_version, comfyui_version)
        files[f"{spec.name}.json"] = (workflow, comfy.to_api(workflow))
    return files
