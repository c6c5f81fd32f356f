"""InstantID for ComfyUI. ComfyUI loads this package as a custom node pack and calls
comfy_entrypoint() (V3 node API); the nodes live in nodes.py, the work in instantid/."""
from .nodes import comfy_entrypoint

# The frontend extension (web/*.js) that shows the nodes' notes and scores on the nodes.
WEB_DIRECTORY = "./web"

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
