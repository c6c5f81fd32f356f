"""The model files a ComfyUI workflow loads, read from the file itself (UI or API format) without
starting ComfyUI, for `python -m instantid doctor --workflow FILE`. A loader is known by its class
type (MODEL_LOADERS); muted and bypassed nodes load nothing and are skipped."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .embedded import MUTED_OR_BYPASSED, is_ui_format


@dataclass(frozen=True)
class ModelInput:
    """A loader input naming a model file: its name, its widget position (the UI format stores widget
    values by position), its folder key (of folder_paths and extra_model_paths.yaml), and the values
    that are not files (built-in choices such as VAELoader's 'taesd')."""

    name: str
    widget: int
    folder: str
    not_files: tuple[str, ...] = ()


_TAESD = ("taesd", "taesdxl", "taesd3", "taef1", "pixel_space")
CHECKPOINT_LOADER = "CheckpointLoaderSimple"  # Load Checkpoint, which the shipped SDXL workflows use

MODEL_LOADERS: dict[str, tuple[ModelInput, ...]] = {
    CHECKPOINT_LOADER: (ModelInput("ckpt_name", 0, "checkpoints"),),
    "CheckpointLoader": (ModelInput("config_name", 0, "configs"), ModelInput("ckpt_name", 1, "checkpoints")),
    "ImageOnlyCheckpointLoader": (ModelInput("ckpt_name", 0, "checkpoints"),),
    "unCLIPCheckpointLoader": (ModelInput("ckpt_name", 0, "checkpoints"),),
    "UNETLoader": (ModelInput("unet_name", 0, "diffusion_models"),),
    "VAELoader": (ModelInput("vae_name", 0, "vae", _TAESD),),
    "CLIPLoader": (ModelInput("clip_name", 0, "text_encoders"),),
    "DualCLIPLoader": (ModelInput("clip_name1", 0, "text_encoders"), ModelInput("clip_name2", 1, "text_encoders")),
    "CLIPVisionLoader": (ModelInput("clip_name", 0, "clip_vision"),),
    "LoraLoader": (ModelInput("lora_name", 0, "loras"),),
    "LoraLoaderModelOnly": (ModelInput("lora_name", 0, "loras"),),
    "ControlNetLoader": (ModelInput("control_net_name", 0, "controlnet"),),
    "DiffControlNetLoader": (ModelInput("control_net_name", 0, "controlnet"),),
    "StyleModelLoader": (ModelInput("style_model_name", 0, "style_models"),),
    "GLIGENLoader": (ModelInput("gligen_name", 0, "gligen"),),
    "UpscaleModelLoader": (ModelInput("model_name", 0, "upscale_models"),),
    "InstantIDModelLoader": (ModelInput("instantid_file", 0, "instantid"),),
    "InfiniteYouModelLoader": (ModelInput("projection_file", 0, "infiniteyou"),
                               ModelInput("recognizer_file", 1, "infiniteyou")),
}
# Nodes that load the antelopev2 face models from models/insightface (no file input).
FACE_ANALYSIS_NODES = ("InstantIDFaceAnalysis",)


@dataclass(frozen=True)
class ModelReference:
    """One file a node loads: `file` as the workflow names it, relative to the `folder` key."""

    node: str
    class_type: str
    input: str
    folder: str
    file: str

    @property
    def relative_path(self) -> str:
        """The file's path inside its folder; workflows saved on Windows use backslashes."""
        return self.file.replace("\\", "/")


@dataclass(frozen=True)
class WorkflowModels:
    files: tuple[ModelReference, ...]
    face_analysis: bool  # a node loads the antelopev2 face models
    loader_nodes: int


def _ui_nodes(workflow: Mapping[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(id, class type, {widget name: value}) of the active nodes of a UI-format workflow and of
    its subgraph definitions."""
    subgraphs = (workflow.get("definitions") or {}).get("subgraphs") or []
    for node in [*workflow.get("nodes", []), *(n for graph in subgraphs for n in graph.get("nodes", []))]:
        kind = node.get("type")
        if node.get("mode") in MUTED_OR_BYPASSED or kind not in MODEL_LOADERS and kind not in FACE_ANALYSIS_NODES:
            continue
        widgets = node.get("widgets_values") or []
        if isinstance(widgets, Mapping):
            values = dict(widgets)
        else:
            values = {spec.name: widgets[spec.widget] for spec in MODEL_LOADERS.get(kind, ()) if spec.widget < len(widgets)}
        yield str(node.get("id")), kind, values


def workflow_models(workflow: Mapping[str, Any]) -> WorkflowModels:
    """The model files the known loaders of `workflow` name, in node id order. An input connected
    to another node (a link, not a file name) cannot be known here and is left out."""
    if is_ui_format(dict(workflow)):
        nodes = list(_ui_nodes(workflow))
    else:
        nodes = [(str(i), node.get("class_type"), dict(node.get("inputs") or {})) for i, node in workflow.items()]
    nodes.sort(key=lambda node: (len(node[0]), node[0]))
    files = []
    loaders = 0
    for node_id, kind, values in nodes:
        specs = MODEL_LOADERS.get(kind, ())
        loaders += bool(specs)
        for spec in specs:
            value = values.get(spec.name)
            if isinstance(value, str) and value and value not in spec.not_files:
                files.append(ModelReference(node_id, kind, spec.name, spec.folder, value))
    face_analysis = any(kind in FACE_ANALYSIS_NODES for _, kind, _ in nodes)
    return WorkflowModels(tuple(files), face_analysis, loaders)
