"""InstantID for ComfyUI: the domain logic, usable without the UI.

Modules, one job each: `adapter` (the adapter file, face tokens), `faces` (InsightFace),
`keypoints` (the five-point image), `attention` (the cross-attention patch), `control`
(the IdentityNet on conditioning), `apply` (what every Apply node calls), `paths` and
`comfy_home` (where ComfyUI and the models are), `cli` (doctor, fetch-models, run).
"""
__version__ = "1.0.0"
