"""InstantID for ComfyUI: the domain logic, usable without the UI.

Modules, one job each:
- `sdxl` (the SDXL cross-attention layout), `adapter` (the adapter file, face tokens, face K/V),
  `faces` (InsightFace), `keypoints` (the five-point image), `drawn_keypoints` (recognising an
  image that already is one), `regions` (face region and identity mask), `attention` (the
  cross-attention patch), `control` (the IdentityNet with its own face-token context), `checks`
  (input checks), `face_inputs` (the faces and keypoint frames a node's inputs give, the no-face
  policy), `apply` (what every Apply node calls), `similarity` (face similarity and ranking),
  `identity` and `identity_files` (FACE_EMBEDS and saved identities), `face_crop` (face crop and
  paste), `resampling` (where the Resampler comes from), `weights_files` (safe weights reading);
- the SDXL back end: `sdxl`, `sdxl_checks`, `adapter`, `attention`, `control` (shared with FLUX),
  `apply`;
- the FLUX back end (InfiniteYou): `irse50` (the IR-SE50 recogniser), `infiniteyou` (projection,
  recogniser, InfuseNet check), `flux_apply` (what ApplyInfiniteYou calls);
- `paths` (the model folders ComfyUI knows), `model_files` (the catalog: each model file and where
  it is published), `file_digest` (a file's sha256);
- `commands/`: the command line and what only it needs (cli, runner, embedded ComfyUI, doctor,
  fetch, ComfyUI discovery). It imports the domain; nothing here imports it.
"""
__version__ = "1.1.0"
