"""ComfyUI embedded in this process: boot once, convert UI-format workflows to API format, run
API-format prompts with ComfyUI's own executor (no server). Used by `python -m instantid run` and
by the test suite, so both exercise the same path.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

ProgressHook = Callable[[int, int, str | None], None]


@dataclass
class RunResult:
    """What one prompt execution produced."""
    prompt_id: str
    success: bool
    outputs: dict[str, Any] = field(default_factory=dict)       # node id -> UI output (images, text, ...)
    error: dict[str, Any] | None = None                         # ComfyUI's execution_error payload
    node_errors: dict[str, Any] = field(default_factory=dict)   # validation errors per node

    def error_text(self) -> str:
        if self.error:
            return (f"node {self.error.get('node_id')} ({self.error.get('node_type')}): "
                    f"{self.error.get('exception_type')}: {self.error.get('exception_message')}")
        if self.node_errors:
            return "; ".join(f"node {node}: " + ", ".join(f"{e.get('message')}: {e.get('details')}" for e in info["errors"])
                             for node, info in self.node_errors.items())
        return ""


class _NullServer:
    """The parts of ComfyUI's PromptServer that the executor and progress reporting touch."""
    client_id = None
    last_node_id = None
    last_prompt_id = None
    sockets_metadata: dict = {}

    def __init__(self) -> None:
        self.messages: list[tuple[str, Any]] = []

    def send_sync(self, event: str, data: Any, sid: Any = None) -> None:
        self.messages.append((event, data))

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
        """API format as is; UI format (what the frontend saves) converted with comfy-cli's converter."""
        if "nodes" not in workflow or "links" not in workflow:
            return workflow
        unknown = sorted({n["type"] for n in workflow["nodes"]
                          if n.get("type") not in self.nodes.NODE_CLASS_MAPPINGS and n.get("type") not in ("Reroute", "Note", "MarkdownNote", "PrimitiveNode")
                          and n.get("mode", 0) not in (2, 4)})
        if unknown:
            raise ValueError(f"the workflow uses node types that are not installed: {', '.join(unknown)}; "
                             "install the custom node packs that provide them (ComfyUI-Manager can find them)")
        try:
            from comfy_cli.workflow_to_api import convert_ui_to_api
        except ImportError as e:
            raise RuntimeError("converting a UI-format workflow needs comfy-cli: pip install comfy-cli "
                               "(or export the workflow in API format from ComfyUI)") from e
        object_info = {t: self.node_info(t) for t in self.nodes.NODE_CLASS_MAPPINGS
                       if t in {n.get("type") for n in workflow["nodes"]}}
        return convert_ui_to_api(workflow, object_info)

    def run(self, prompt: dict, progress: ProgressHook | None = None, reuse_outputs: bool = True) -> RunResult:
        """Validate and execute an API-format prompt. Outputs of unchanged nodes are reused from the
        previous run, as in a running ComfyUI, unless reuse_outputs is False."""
        import comfy.utils
        import execution
        prompt_id = str(uuid.uuid4())
        ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not ok:
            details = error.get("details") or error.get("message") if isinstance(error, dict) else error
            return RunResult(prompt_id, False, error={"node_id": None, "node_type": None, "exception_type": "ValidationError",
                                                      "exception_message": details}, node_errors=node_errors)

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
