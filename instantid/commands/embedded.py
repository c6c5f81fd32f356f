"""ComfyUI embedded in this process: boot once, convert UI-format workflows to API format, run
API-format prompts with ComfyUI's own executor (no server). Used by `python -m instantid run` and
by the test suite, so both exercise the same path.
"""
from __future__ import annotations

import asyncio
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ProgressHook = Callable[[int, int, str | None], None]


@dataclass
class RunResult:
    """What one prompt execution produced."""
    prompt_id: str
    success: bool
    outputs: dict[str, Any] = field(default_factory=dict)       # node id -> UI output (images, text, ...)
    error: dict[str, Any] | None = None                         # ComfyUI's execution_error payload
    node_errors: dict[str, Any] = field(default_factory=dict)   # validation errors per node
    refused: dict[str, Any] | None = None                       # validation's own error, when ComfyUI refused the prompt

    def error_text(self) -> str:
        if self.refused is not None or self.node_errors:
            return refusal_text(self.refused, self.node_errors)
        if self.error:
            return node_failure_text(self.error)
        return ""


def node_failure_text(error: dict[str, Any]) -> str:
    """ComfyUI's execution_error payload as one line: the node, the exception's own class name
    (ComfyUI prefixes it with the module, which for a custom node pack is a file path) and message."""
    name = str(error.get("exception_type") or "Exception").rsplit(".", 1)[-1]
    message = " ".join(str(error.get("exception_message") or "").split())
    return f"node {error.get('node_id')} ({error.get('node_type')}): {name}: {message}"


def refusal_text(error: Any, node_errors: dict[str, Any] | None) -> str:
    """ComfyUI's validation answer (its `error` and per-node `node_errors`) as one line."""
    if isinstance(error, dict):
        parts = [": ".join(str(p) for p in (error.get("message"), error.get("details")) if p)]
    else:
        parts = [str(error or "")]
    for node_id, info in (node_errors or {}).items():
        problems = ", ".join(f"{e.get('message')}: {e.get('details')}" for e in info.get("errors", []))
        parts.append(f"node {node_id} ({info.get('class_type', '?')}): {problems}")
    return "; ".join(p for p in parts if p) or "no details given"


FRONTEND_ONLY_TYPES = ("Reroute", "Note", "MarkdownNote", "PrimitiveNode")  # the converter resolves these
MUTED_OR_BYPASSED = (2, 4)


class WorkflowError(ValueError):
    """A workflow file that cannot be run as it is; the message says why and what to do."""


def is_ui_format(workflow: dict) -> bool:
    return isinstance(workflow.get("nodes"), list) and isinstance(workflow.get("links"), list)


def ui_to_api(workflow: dict, object_info: dict[str, Any]) -> dict:
    """A UI-format workflow (what the frontend saves) in API format, converted with comfy-cli's
    converter against the node schemas of the ComfyUI that will run it (its /object_info)."""
    unknown = sorted({str(node.get("type")) for node in workflow["nodes"]
                      if node.get("type") not in object_info and node.get("type") not in FRONTEND_ONLY_TYPES
                      and node.get("mode", 0) not in MUTED_OR_BYPASSED})
    if unknown:
        raise WorkflowError(f"the workflow uses node types that this ComfyUI does not have: {', '.join(unknown)}; "
                            "install the custom node packs that provide them (ComfyUI-Manager can find them)")
    try:
        from comfy_cli.workflow_to_api import convert_ui_to_api
    except ImportError:
        raise WorkflowError("converting a UI-format workflow needs comfy-cli: pip install comfy-cli (or export the "
                            "workflow in API format from ComfyUI: Workflow > Export (API))") from None
    return convert_ui_to_api(workflow, dict(object_info))


class _NullServer:
    """The parts of ComfyUI's PromptServer that the executor and progress reporting touch."""
    client_id = None
    last_node_id = None
    last_prompt_id = None
    sockets_metadata: dict = {}

    def send_sync(self, event: str, data: Any, sid: Any = None) -> None:
        pass

    def queue_updated(self) -> None:
        pass


class EmbeddedComfyUI:
    """One ComfyUI per process (its modules are global): create it once and reuse it."""

    _instance: "EmbeddedComfyUI | None" = None

    def __init__(self, comfyui: Path, *, cpu: bool, base_directory: Path | None,
                 extra_model_paths_configs: list[Path], load_custom_nodes: bool, extra_node_dirs: list[Path]) -> None:
        self.comfyui = comfyui
        if str(comfyui) not in sys.path:
            sys.path.insert(0, str(comfyui))
        from comfy.cli_args import args
        args.cpu = cpu or args.cpu
        args.disable_api_nodes = True
        if base_directory is not None:
            # folder_paths reads it at import, so it must be set first.
            args.base_directory = str(base_directory)
        import utils.extra_config  # before `nodes`: ComfyUI's nodes.py shadows a bare `utils`
        import folder_paths
        for config in [comfyui / "extra_model_paths.yaml", *extra_model_paths_configs]:
            if config.is_file():
                utils.extra_config.load_extra_path_config(str(config))
        import execution
        import nodes
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=load_custom_nodes, init_api_nodes=False))
        loaded = {Path(d).resolve() for d in nodes.LOADED_MODULE_DIRS.values()}
        for node_dir in extra_node_dirs:
            if node_dir.resolve() not in loaded and not asyncio.run(nodes.load_custom_node(str(node_dir))):
                raise RuntimeError(f"ComfyUI could not load the custom nodes in {node_dir}; see the log above")
        self.folder_paths = folder_paths
        self.nodes = nodes
        self.server = _NullServer()
        self.executor = execution.PromptExecutor(self.server, cache_args={"lru": 0, "ram": 0})

    @classmethod
    def start(cls, comfyui: Path, *, cpu: bool = False, base_directory: Path | None = None,
              extra_model_paths_configs: list[Path] | None = None, load_custom_nodes: bool = True,
              extra_node_dirs: list[Path] | None = None) -> "EmbeddedComfyUI":
        """Boot ComfyUI (first call) or return the running one; a second boot with another folder
        is refused, since ComfyUI's modules cannot be loaded twice in one process."""
        if cls._instance is None:
            cls._instance = cls(comfyui.resolve(), cpu=cpu, base_directory=base_directory,
                                extra_model_paths_configs=list(extra_model_paths_configs or []),
                                load_custom_nodes=load_custom_nodes, extra_node_dirs=list(extra_node_dirs or []))
        elif cls._instance.comfyui != comfyui.resolve():
            raise RuntimeError(f"ComfyUI from {cls._instance.comfyui} is already running in this process")
        return cls._instance

    def node_info(self, class_type: str) -> dict:
        """The schema the frontend sees for one node type (as ComfyUI's /object_info builds it)."""
        from comfy_api.internal import _ComfyNodeInternal
        cls = self.nodes.NODE_CLASS_MAPPINGS[class_type]
        if issubclass(cls, _ComfyNodeInternal):
            return cls.GET_NODE_INFO_V1()
        inputs = cls.INPUT_TYPES()
        return {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()},
                "output": cls.RETURN_TYPES, "output_is_list": getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES)),
                "output_name": getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES), "name": class_type,
                "display_name": self.nodes.NODE_DISPLAY_NAME_MAPPINGS.get(class_type, class_type),
                "description": getattr(cls, "DESCRIPTION", ""), "category": getattr(cls, "CATEGORY", "sd"),
                "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
                "python_module": getattr(cls, "RELATIVE_PYTHON_MODULE", "nodes")}

    def to_api(self, workflow: dict) -> dict:
        """API format as is; UI format (what the frontend saves) converted with this ComfyUI's schemas."""
        if not is_ui_format(workflow):
            return workflow
        types = {node.get("type") for node in workflow["nodes"]}
        return ui_to_api(workflow, {t: self.node_info(t) for t in self.nodes.NODE_CLASS_MAPPINGS if t in types})

    def run(self, prompt: dict, progress: ProgressHook | None = None, reuse_outputs: bool = True) -> RunResult:
        """Validate and execute an API-format prompt. Outputs of unchanged nodes are reused from the
        previous run, as in a running ComfyUI, unless reuse_outputs is False."""
        import comfy.utils
        import execution
        prompt_id = str(uuid.uuid4())
        ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not ok or node_errors:
            # ComfyUI would run the valid outputs and silently drop the others; refuse the whole prompt.
            refused = error if isinstance(error, dict) and error else {"message": "Prompt outputs failed validation"}
            return RunResult(prompt_id, False, node_errors=node_errors, refused=refused)

        def hook(value: int, total: int, preview: Any, prompt_id: str | None = None, node_id: str | None = None) -> None:
            if progress is not None:
                progress(value, total, node_id)
        if not reuse_outputs:
            self.executor.reset()
        comfy.utils.set_progress_bar_global_hook(hook)
        try:
            self.executor.execute(prompt, prompt_id, {}, outputs)
        finally:
            comfy.utils.set_progress_bar_global_hook(None)
        error_payload = next((data for event, data in self.executor.status_messages if event == "execution_error"), None)
        return RunResult(prompt_id, self.executor.success and error_payload is None,
                         outputs=dict(self.executor.history_result.get("outputs", {})), error=error_payload)
