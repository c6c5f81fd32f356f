"""The model files the pack uses: what each is, where it goes in ComfyUI, where it is published, its
licence. One table for the messages and tooltips that say where to get a file, `fetch-models`,
`doctor`, the shipped workflows' download links and the README. Standard library only: the command
line reads it before the pack's packages are installed. The IdentityNet needs no config.json:
ComfyUI's ControlNet loader infers the SDXL ControlNet layout from the safetensors keys.
"""
from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

HUB = "https://huggingface.co"
INSTANTID_REPO = "InstantX/InstantID"
# insightface's own download URL for antelopev2 is dead; this public mirror holds the same files
# loose at the repository root.
ANTELOPEV2_REPO = "DIAMONIK7777/antelopev2"
DEFAULT_CHECKPOINT = "sdxl-base-1.0"

INSTANTID_LICENSE = (
    "Apache-2.0 per the InstantX/InstantID model card; released as a research project, "
    "so read the model card before commercial use"
)
INSTANTID_LICENSE_URL = f"{HUB}/{INSTANTID_REPO}"
ANTELOPEV2_LICENSE = "InsightFace pretrained models: non-commercial research purposes only"
ANTELOPEV2_LICENSE_URL = "https://github.com/deepinsight/insightface#license"
SDXL_BASE_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_LICENSE = "CreativeML Open RAIL++-M (use-based restrictions; read it before use)"
SDXL_LICENSE_URL = "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/LICENSE.md"
INFINITEYOU_REPO = "ByteDance/InfiniteYou"
INFINITEYOU_LICENSE = "CC-BY-NC-4.0 (weights; non-commercial use only)"
INFINITEYOU_LICENSE_URL = f"{HUB}/{INFINITEYOU_REPO}"
# facexlib publishes the IR-SE50 only as a GitHub release asset; this public Hub copy holds the same file name.
IRSE50_REPO = "camenduru/PuLID"
FLUX_DEV_REPO = "Comfy-Org/flux1-dev"
FLUX_DEV_LICENSE = "FLUX.1 [dev] Non-Commercial License (Black Forest Labs)"
FLUX_DEV_LICENSE_URL = "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md"


@dataclass(frozen=True)
class ModelFile:
    """One file: `folder` is the ComfyUI folder key (models/<folder>/ or extra_model_paths.yaml),
    `path` the location inside it; `repo`/`file`/`revision` the Hugging Face source. `sha256`,
    when set, pins the content: huggingface.co must publish that digest (a mirror given with
    --endpoint/HF_ENDPOINT is trusted with its own listing)."""

    id: str
    description: str
    folder: str
    path: str
    repo: str
    file: str
    approx_bytes: int
    license: str
    license_url: str
    required: bool
    revision: str = "main"
    sha256: str | None = None

    @property
    def approx_size(self) -> str:
        """The size for display, e.g. '1.7 GB'."""
        return format_size(self.approx_bytes)

    def url(self, endpoint: str = HUB) -> str:
        """The download link, on huggingface.co or the mirror `endpoint`."""
        return f"{endpoint}/{self.repo}/resolve/{self.revision}/{urllib.parse.quote(self.file)}"

    @property
    def source(self) -> str:
        """Where a message sends the user: 'ip-adapter.bin from https://huggingface.co/InstantX/InstantID',
        with the folder inside the repository after it."""
        folder, _, name = self.file.rpartition("/")
        return f"{name} from {HUB}/{self.repo}" + (f" {folder}/" if folder else "")


def format_size(num_bytes: int) -> str:
    """A byte count for display, e.g. '1.7 GB' (decimal units, as Hugging Face shows them)."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"


CATALOG: tuple[ModelFile, ...] = (
    ModelFile(id="adapter", description="InstantID adapter: face-embedding Resampler and the 70 IP cross-attention layers",
              folder="instantid", path="ip-adapter.bin", repo=INSTANTID_REPO, file="ip-adapter.bin",
              approx_bytes=1_690_000_000, license=INSTANTID_LICENSE, license_url=INSTANTID_LICENSE_URL, required=True),
    # The controlnet subfolder the shared example workflows of the earlier pack use, so they load unchanged.
    ModelFile(id="identitynet", description="IdentityNet: the SDXL ControlNet driven by face tokens and the keypoint image",
              folder="controlnet", path="instantid/diffusion_pytorch_model.safetensors", repo=INSTANTID_REPO,
              file="ControlNetModel/diffusion_pytorch_model.safetensors", approx_bytes=2_500_000_000,
              license=INSTANTID_LICENSE, license_url=INSTANTID_LICENSE_URL, required=True),
    ModelFile(id="antelopev2-detector", description="antelopev2 SCRFD-10G face detector with five keypoints",
              folder="insightface", path="models/antelopev2/scrfd_10g_bnkps.onnx", repo=ANTELOPEV2_REPO,
              file="scrfd_10g_bnkps.onnx", approx_bytes=16_900_000, license=ANTELOPEV2_LICENSE,
              license_url=ANTELOPEV2_LICENSE_URL, required=True),
    ModelFile(id="antelopev2-recognizer", description="antelopev2 ArcFace R100 (Glint360K) face embedding, 512-d",
              folder="insightface", path="models/antelopev2/glintr100.onnx", repo=ANTELOPEV2_REPO, file="glintr100.onnx",
              approx_bytes=261_000_000, license=ANTELOPEV2_LICENSE, license_url=ANTELOPEV2_LICENSE_URL, required=True),
    # Not required: fetch-models serves the pack; portrait asks for a checkpoint by id. The size is the exact one
    # huggingface.co publishes.
    ModelFile(id=DEFAULT_CHECKPOINT, description="SDXL base 1.0 checkpoint (UNet, both text encoders, VAE): the model "
              "`portrait` draws with", folder="checkpoints", path="sd_xl_base_1.0.safetensors", repo=SDXL_BASE_REPO,
              file="sd_xl_base_1.0.safetensors", approx_bytes=6_938_078_334, license=SDXL_LICENSE,
              license_url=SDXL_LICENSE_URL, required=False,
              sha256="31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b"),
)


def _infiniteyou(id: str, description: str, file: str, approx_bytes: int, folder: str = "controlnet",
                 sha256: str | None = None) -> ModelFile:
    return ModelFile(id=id, description=description, folder=folder,
                     path=f"infiniteyou/{file.split('/')[-1]}" if folder == "controlnet" else file,
                     repo=INFINITEYOU_REPO, file=f"infu_flux_v1.0/{file}", approx_bytes=approx_bytes,
                     license=INFINITEYOU_LICENSE, license_url=INFINITEYOU_LICENSE_URL, required=False, sha256=sha256)


# InfiniteYou on FLUX (ApplyInfiniteYou): `fetch-models --only ID` for each; FLUX_DEFAULT is the set the
# FLUX workflows load (aes_stage2 InfuseNet in fp8). The fp8 InfuseNets, the projections and the FLUX
# checkpoint carry the sizes and sha256 digests of the published files; the bf16 InfuseNets' digests
# were not at hand (sizes approximate, fetch checks the Hub's listing), nor the IR-SE50 mirror's.
FLUX_CATALOG: tuple[ModelFile, ...] = (
    _infiniteyou("infusenet-aes-fp8", "InfiniteYou InfuseNet, aes_stage2 (prompt-following, looks), fp8: the FLUX "
                 "ControlNet driven by identity tokens", "aes_stage2/infusenet_aes_fp8e4m3fn.safetensors", 2_952_691_776,
                 sha256="7f6526ae545731182f95e5ff2f1dedddfe4adb3895ba727f332029e7df8395a7"),
    _infiniteyou("infusenet-aes-bf16", "InfiniteYou InfuseNet, aes_stage2, bf16",
                 "aes_stage2/infusenet_aes_bf16.safetensors", 5_910_000_000),
    _infiniteyou("infusenet-sim-fp8", "InfiniteYou InfuseNet, sim_stage1 (more likeness), fp8",
                 "sim_stage1/infusenet_sim_fp8e4m3fn.safetensors", 2_952_691_776,
                 sha256="de810f98f99ff103ea2529a141cdbe62c856177851d1660b33c3ade7ff0dba56"),
    _infiniteyou("infusenet-sim-bf16", "InfiniteYou InfuseNet, sim_stage1, bf16",
                 "sim_stage1/infusenet_sim_bf16.safetensors", 5_910_000_000),
    _infiniteyou("infiniteyou-projection-aes", "InfiniteYou projection (face embedding to 8 identity tokens), aes_stage2",
                 "aes_stage2/image_proj_model.bin", 338_413_026, folder="infiniteyou",
                 sha256="f85518431d7367de30b9558a939c003462a7e331e8c8b929146916dc27e471d6"),
    _infiniteyou("infiniteyou-projection-sim", "InfiniteYou projection, sim_stage1",
                 "sim_stage1/image_proj_model.bin", 338_413_026, folder="infiniteyou",
                 sha256="b7a8a1b6fecf2731b2ac64bde33a1885014949c8c08f3efaebd0665bb0e8ad8f"),
    # facexlib's release file (43.8 M float32 parameters).
    ModelFile(id="irse50", description="facexlib's ArcFace IR-SE50, the face embedding InfiniteYou's projection reads",
              folder="infiniteyou", path="recognition_arcface_ir_se50.pth", repo=IRSE50_REPO,
              file="facexlib/recognition_arcface_ir_se50.pth", approx_bytes=175_367_323,
              license="MIT (facexlib); the weights come from InsightFace's ArcFace training",
              license_url="https://github.com/xinntao/facexlib", required=False),
    ModelFile(id="flux1-dev-fp8", description="FLUX.1-dev checkpoint in ComfyUI's single-file layout (model, CLIP-L, "
              "T5-XXL, VAE), fp8", folder="checkpoints", path="flux1-dev-fp8.safetensors", repo=FLUX_DEV_REPO,
              file="flux1-dev-fp8.safetensors", approx_bytes=17_246_524_772, license=FLUX_DEV_LICENSE,
              license_url=FLUX_DEV_LICENSE_URL, required=False,
              sha256="8e91b68084b53a7fc44ed2a3756d821e355ac1a7b6fe29be760c1db532f3d88a"),
)
FLUX_DEFAULT: tuple[str, ...] = ("infusenet-aes-fp8", "infiniteyou-projection-aes", "irse50", "flux1-dev-fp8")
CATALOG += FLUX_CATALOG

# SDXL checkpoints only: `portrait` draws with InstantID on SDXL.
CHECKPOINTS: tuple[ModelFile, ...] = tuple(entry for entry in CATALOG
                                           if entry.folder == "checkpoints" and entry not in FLUX_CATALOG)

REQUIRED: tuple[ModelFile, ...] = tuple(entry for entry in CATALOG if entry.required)
ANTELOPEV2: tuple[ModelFile, ...] = tuple(entry for entry in CATALOG if entry.folder == "insightface")

OPENRAIL_PLUS = "CreativeML Open RAIL++-M (use restrictions in the licence)"
OPENRAIL_M = "CreativeML Open RAIL-M (use restrictions in the licence)"

# Files the shipped workflows load besides the catalog's: the canny ControlNet of the ControlNet
# example and the style LoRA of the LoRA example. `fetch-models` does not fetch them; the workflows
# carry their links for ComfyUI's missing-models dialog.
WORKFLOW_MODELS: tuple[ModelFile, ...] = (
    ModelFile(id="controlnet-canny-sdxl", description="SDXL canny-edge ControlNet (diffusers' controlnet-canny-sdxl-1.0, "
              "fp16)", folder="controlnet", path="diffusers_xl_canny_full.safetensors",
              repo="lllyasviel/sd_control_collection", file="diffusers_xl_canny_full.safetensors",
              approx_bytes=2_500_000_000, license=OPENRAIL_PLUS,
              license_url="https://huggingface.co/diffusers/controlnet-canny-sdxl-1.0", required=False),
    ModelFile(id="lora-pixel-art-xl", description="Pixel Art XL, an SDXL style LoRA (any SDXL LoRA works)", folder="loras",
              path="pixel-art-xl.safetensors", repo="nerijs/pixel-art-xl", file="pixel-art-xl.safetensors",
              approx_bytes=171_000_000, license=OPENRAIL_M, license_url="https://huggingface.co/nerijs/pixel-art-xl",
              required=False),
)


def model_file(id: str) -> ModelFile:
    """The entry of the catalog or of WORKFLOW_MODELS with this id (KeyError when none has it)."""
    return {entry.id: entry for entry in (*CATALOG, *WORKFLOW_MODELS)}[id]
