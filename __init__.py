"""InstantID for ComfyUI. ComfyUI loads this package as a custom node pack and calls
comfy_entrypoint() (V3 node API); the nodes live in nodes.py, the work in instantid/."""
from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
