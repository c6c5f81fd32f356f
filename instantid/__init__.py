"""InstantID for ComfyUI: the domain logic, usable without the UI.

Modules, one job each:
- `sdxl` (the SDXL cross-attention layout), `adapter` (the adapter file, face tokens, face K/V),
  `faces` (InsightFace), `keypoints` (the five-point image), `attention` (the cross-attention
  patch), `control` (the IdentityNet on conditioning), `checks` (input checks), `apply` (what
  every Apply node calls), `similarity` (face similarity);
- `paths`, `comfy_home` and `catalog` (where ComfyUI and the models are, which models);
- `embedded` (ComfyUI in this process), `fetch`, `doctor`, `runner` and `cli` (the commands).
"""
__version__ = "1.0.0"
