"""The shipped workflows (workflows/*.json) as declarative specs; scripts/build_workflows.py writes
them with workflow_tools.builder. File names read as titles in ComfyUI's Templates browser and their
two-digit prefix sorts them basic → advanced."""
from __future__ import annotations

from typing import Any

from instantid.model_files import CATALOG, WORKFLOW_MODELS
from instantid.commands.portrait import BASIC_WORKFLOW_FILE, POSED_WORKFLOW_FILE

from .builder import NodeSpec, WorkflowSpec

_FILES = {entry.id: entry.path for entry in (*CATALOG, *WORKFLOW_MODELS)}
SDXL_CHECKPOINT = next(entry.path for entry in (*CATALOG, *WORKFLOW_MODELS) if entry.folder == "checkpoints")
ADAPTER = _FILES["adapter"]
IDENTITYNET = _FILES["identitynet"]
CANNY_CONTROLNET = _FILES["controlnet-canny-sdxl"]
STYLE_LORA = _FILES["lora-pixel-art-xl"]
SAVED_IDENTITY_FILE = "identity.safetensors"  # in input/instantid_faces/

PROMPT = "analog film photo of a man in a denim jacket, city street at dusk, detailed skin, 35mm"
NEGATIVE = "blurry, lowres, deformed, cartoon, watermark, text"
SAMPLER = {"seed": 42, "steps": 30, "cfg": 4.5, "sampler_name": "dpmpp_2m", "scheduler": "karras"}
# The builder ends each note with the download links of the workflow's models; this line sits above them.
MODELS_TEXT = "Any SDXL checkpoint works in place of the one named below."


def _node(key: str, class_type: str, group: str, title: str = "", **values: Any) -> NodeSpec:
    return NodeSpec(key, class_type, title, group, values)



def two_people_regions(height: int) -> tuple[NodeSpec, ...]:
    """Two people on a 1152-wide canvas: each face's keypoints from the two-person pose photo
    (face_index 1 = left, 2 = right) and a mask for each half (core Solid Mask + Mask Composite)."""
    return (_node("kps_left", "FaceKeypointsPreprocessor", "identity", title="Keypoints, left face", width=1152,
                  height=height, face_index=1),
            _node("kps_right", "FaceKeypointsPreprocessor", "identity", title="Keypoints, right face", width=1152,
                  height=height, face_index=2),
            _node("empty_mask", "SolidMask", "identity", title="Empty mask", value=0.0, width=1152, height=height),
            _node("half_mask", "SolidMask", "identity", title="Half mask", value=1.0, width=576, height=height),
            _node("mask_left", "MaskComposite", "identity", title="Left half", x=0, y=0, operation="add"),
            _node("mask_right", "MaskComposite", "identity", title="Right half", x=576, y=0, operation="add"))


# The regions' links into the Apply nodes keyed "apply" (left) and "apply_right".
TWO_PEOPLE_REGION_LINKS = (
    "faces.FACEANALYSIS -> kps_left.faceanalysis", "faces.FACEANALYSIS -> kps_right.faceanalysis",
    "pose.IMAGE -> kps_left.image", "pose.IMAGE -> kps_right.image", "kps_left.IMAGE -> apply.image_kps",
    "kps_right.IMAGE -> apply_right.image_kps", "empty_mask.MASK -> mask_left.destination",
    "half_mask.MASK -> mask_left.source", "empty_mask.MASK -> mask_right.destination",
    "half_mask.MASK -> mask_right.source", "mask_left.MASK -> apply.mask", "mask_right.MASK -> apply_right.mask")

def checkpoint() -> NodeSpec:
    return _node("checkpoint", "CheckpointLoaderSimple", "models", ckpt_name=SDXL_CHECKPOINT)


def prompts(text: str = PROMPT) -> tuple[NodeSpec, ...]:
    return (_node("positive", "CLIPTextEncode", "prompt", title="Positive prompt", text=text),
            _node("negative", "CLIPTextEncode", "prompt", title="Negative prompt", text=NEGATIVE))


def adapter() -> NodeSpec:
    return _node("adapter", "InstantIDModelLoader", "models", instantid_file=ADAPTER)


def face_analysis() -> NodeSpec:
    return _node("faces", "InstantIDFaceAnalysis", "models")


def identitynet() -> NodeSpec:
    return _node("identitynet", "ControlNetLoader", "models", title="Load IdentityNet", control_net_name=IDENTITYNET)


def image(key: str, title: str, file_name: str) -> NodeSpec:
    return _node(key, "LoadImage", "identity", title=title, image=file_name)


def sampling(width: int, height: int, batch_size: int = 1, prefix: str = "instantid") -> tuple[NodeSpec, ...]:
    return (_node("latent", "EmptyLatentImage", "sampling", width=width, height=height,
                  batch_size=batch_size),
            _node("sampler", "KSampler", "sampling", **SAMPLER),
            _node("decode", "VAEDecode", "sampling"),
            _node("save", "SaveImage", "sampling", filename_prefix=prefix))


CLIP_LINKS = ("checkpoint.CLIP -> positive.clip", "checkpoint.CLIP -> negative.clip")
SAMPLING_LINKS = ("latent.LATENT -> sampler.latent_image", "sampler.LATENT -> decode.samples",
                  "checkpoint.VAE -> decode.vae", "decode.IMAGE -> save.images")


def apply_links(apply: str, model: str = "checkpoint.MODEL") -> tuple[str, ...]:
    """An Apply InstantID node fed by the shared loaders and prompts, feeding the sampler."""
    return (f"adapter.INSTANTID -> {apply}.instantid", f"faces.FACEANALYSIS -> {apply}.insightface",
            f"identitynet.CONTROL_NET -> {apply}.control_net", f"reference.IMAGE -> {apply}.image",
            f"{model} -> {apply}.model", f"positive.CONDITIONING -> {apply}.positive",
            f"negative.CONDITIONING -> {apply}.negative")


def sampler_links(model: str, conditioning: str) -> tuple[str, ...]:
    return (f"{model} -> sampler.model", f"{conditioning}.positive -> sampler.positive",
            f"{conditioning}.negative -> sampler.negative")


BASIC = WorkflowSpec(
    name=BASIC_WORKFLOW_FILE.removesuffix(".json"),
    tag="basic",
    note="One face photo and a prompt: SDXL draws that person, posed as in the photo.\n"
         "Put a face photo in 'Reference face', write the prompt, Run. Apply InstantID weight 0.8, "
         "CFG 4-5, 1016x1016 (avoid exactly 1024x1024).\n\n" + MODELS_TEXT,
    nodes=(checkpoint(), *prompts(), adapter(), face_analysis(), identitynet(),
           image("reference", "Reference face", "face.png"),
           _node("apply", "ApplyInstantID", "identity"),
           *sampling(1016, 1016)),
    links=(*CLIP_LINKS, *apply_links("apply"), *sampler_links("apply.MODEL", "apply"), *SAMPLING_LINKS))

POSED = WorkflowSpec(
    name=POSED_WORKFLOW_FILE.removesuffix(".json"),
    tag="posed",
    note="The identity from 'Reference face', the head position and angle from 'Pose photo' (its five face "
         "keypoints drive the IdentityNet). Use a pose photo of the output's aspect ratio (here 896x1152). "
         "Apply InstantID Advanced sets the face attention (ip_weight) and the IdentityNet (cn_strength) "
         "separately.\n\n" + MODELS_TEXT,
    nodes=(checkpoint(), *prompts(), adapter(), face_analysis(), identitynet(),
           image("reference", "Reference face", "face.png"), image("pose", "Pose photo", "pose.png"),
           _node("apply", "ApplyInstantIDAdvanced", "identity"),
           *sampling(896, 1152)),
    links=(*CLIP_LINKS, *apply_links("apply"), "pose.IMAGE -> apply.image_kps",
           *sampler_links("apply.MODEL", "apply"), *SAMPLING_LINKS))

POSE_FREE = WorkflowSpec(
    name="03 Pose-free identity",
    tag="pose-free",
    note="Identity without the IdentityNet: only InstantID's face attention (InstantID Patch Attention), so "
         "the prompt alone decides pose, framing and composition; the likeness is looser than with the "
         "IdentityNet. Weight 0.8-1.0, CFG 4-5. No IdentityNet needed.\n\n" + MODELS_TEXT,
    nodes=(checkpoint(), *prompts("photo of a man hiking on a mountain ridge, wide shot, golden hour"),
           adapter(), face_analysis(), image("reference", "Reference face", "face.png"),
           _node("patch", "InstantIDAttentionPatch", "identity", weight=0.8),
           *sampling(1152, 896)),
    links=(*CLIP_LINKS, "adapter.INSTANTID -> patch.instantid", "faces.FACEANALYSIS -> patch.insightface",
           "reference.IMAGE -> patch.image", "checkpoint.MODEL -> patch.model",
           "patch.MODEL -> sampler.model", "positive.CONDITIONING -> sampler.positive",
           "negative.CONDITIONING -> sampler.negative", *SAMPLING_LINKS))

SPLIT = WorkflowSpec(
    name="04 Split nodes",
    tag="split",
    note="InstantID in its two parts: Patch Attention (face attention on the model) and Apply ControlNet "
         "(the IdentityNet on the conditioning, with the keypoints of 'Pose photo' from Face Keypoints "
         "Preprocessor). Useful to place other model patches or ControlNets between them.\n\n" + MODELS_TEXT,
    nodes=(checkpoint(), *prompts(), adapter(), face_analysis(), identitynet(),
           image("reference", "Reference face", "face.png"), image("pose", "Pose photo", "pose.png"),
           _node("patch", "InstantIDAttentionPatch", "identity", weight=0.8),
           _node("keypoints", "FaceKeypointsPreprocessor", "identity"),
           _node("control", "ApplyInstantIDControlNet", "identity", strength=0.8),
           *sampling(896, 1152)),
    links=(*CLIP_LINKS, "adapter.INSTANTID -> patch.instantid", "faces.FACEANALYSIS -> patch.insightface",
           "reference.IMAGE -> patch.image", "checkpoint.MODEL -> patch.model",
           "faces.FACEANALYSIS -> keypoints.faceanalysis", "pose.IMAGE -> keypoints.image",
           "patch.FACE_EMBEDS -> control.face_embeds", "identitynet.CONTROL_NET -> control.control_net",
           "keypoints.IMAGE -> control.image_kps", "positive.CONDITIONING -> control.positive",
           "negative.CONDITIONING -> control.negative",
           *sampler_links("patch.MODEL", "control"), *SAMPLING_LINKS))

STYLE_LORA_WORKFLOW = WorkflowSpec(
    name="05 Style LoRA",
    tag="lora",
    note="A style LoRA on the checkpoint, then InstantID: the person in the LoRA's style. Any SDXL LoRA fits "
         "the 'Style LoRA' slot; lower strength_model (0.6-0.8) if the face drifts, or raise Apply InstantID's "
         "weight.\n\n" + MODELS_TEXT,
    nodes=(checkpoint(),
           _node("lora", "LoraLoader", "models", title="Style LoRA", lora_name=STYLE_LORA, strength_model=0.8,
                 strength_clip=0.8),
           *prompts("pixel art portrait of a man in a denim jacket, city street at dusk"),
           adapter(), face_analysis(), identitynet(),
           image("reference", "Reference face", "face.png"),
           _node("apply", "ApplyInstantID", "identity"),
           *sampling(1016, 1016)),
    links=("checkpoint.MODEL -> lora.model", "checkpoint.CLIP -> lora.clip",
           "lora.CLIP -> positive.clip", "lora.CLIP -> negative.clip", *apply_links("apply", "lora.MODEL"),
           *sampler_links("apply.MODEL", "apply"), *SAMPLING_LINKS))

CANNY = WorkflowSpec(
    name="06 InstantID with a canny ControlNet",
    tag="canny",
    note="InstantID for the identity, a canny-edge ControlNet chained after it for the composition of "
         "'Composition photo' (its edges from the core Canny node). Keep the canny strength moderate "
         "(0.4-0.6) and end it early (end_percent 0.6) so the face stays the reference's.\n\n" + MODELS_TEXT,
    nodes=(checkpoint(), *prompts(), adapter(), face_analysis(), identitynet(),
           _node("canny_net", "ControlNetLoader", "models", title="Load canny ControlNet",
                 control_net_name=CANNY_CONTROLNET),
           image("reference", "Reference face", "face.png"),
           _node("composition", "LoadImage", "sampling", title="Composition photo", image="composition.png"),
           _node("apply", "ApplyInstantID", "identity"),
           _node("edges", "Canny", "sampling", low_threshold=0.3, high_threshold=0.6),
           _node("canny", "ControlNetApplyAdvanced", "sampling", title="Apply canny ControlNet", strength=0.5,
                 end_percent=0.6),
           *sampling(896, 1152)),
    links=(*CLIP_LINKS, *apply_links("apply"), "composition.IMAGE -> edges.image",
           "apply.positive -> canny.positive", "apply.negative -> canny.negative",
           "canny_net.CONTROL_NET -> canny.control_net", "edges.IMAGE -> canny.image", "checkpoint.VAE -> canny.vae",
           *sampler_links("apply.MODEL", "canny"), *SAMPLING_LINKS))

BEST_OF_FOUR = WorkflowSpec(
    name="07 Best of four seeds by likeness",
    tag="best-of-four",
    note="Likeness varies from seed to seed: this draws four images in one batch (four different noises), scores "
         "each against 'Reference face' with InstantID Face Similarity (ArcFace cosine similarity, shown on the "
         "node) and saves the best one; the preview shows all four, best first. An image without a face "
         "scores 0 and ranks last.\n\n" + MODELS_TEXT,
    nodes=(checkpoint(), *prompts(), adapter(), face_analysis(), identitynet(),
           image("reference", "Reference face", "face.png"),
           _node("apply", "ApplyInstantID", "identity"),
           _node("similarity", "InstantIDFaceSimilarity", "identity"),
           *sampling(1016, 1016, batch_size=4, prefix="instantid_best"),
           _node("ranked", "PreviewImage", "sampling", title="All four, best first")),
    links=(*CLIP_LINKS, *apply_links("apply"), *sampler_links("apply.MODEL", "apply"),
           "latent.LATENT -> sampler.latent_image", "sampler.LATENT -> decode.samples", "checkpoint.VAE -> decode.vae",
           "faces.FACEANALYSIS -> similarity.faceanalysis", "reference.IMAGE -> similarity.reference",
           "decode.IMAGE -> similarity.image", "similarity.best_image -> save.images",
           "similarity.ranked -> ranked.images"))

SAVED_IDENTITY = WorkflowSpec(
    name="08 Saved identity",
    tag="saved-identity",
    note="Generate from a saved identity instead of a photo: InstantID Load Identity reads a small identity "
         "file (face embedding, keypoints) and Apply InstantID uses it through face_embeds: no reference photo and "
         "no face models.\n\n"
         "No identity yet? Run '13 Save an identity from a photo' once (its file then appears in the list, marked "
         "[output]), or add a .safetensors identity with the node's upload button. " + MODELS_TEXT,
    nodes=(checkpoint(), *prompts(), adapter(), identitynet(),
           _node("identity", "InstantIDLoadFaceEmbeds", "identity", face_embeds_file=SAVED_IDENTITY_FILE),
           _node("apply", "ApplyInstantID", "identity"),
           *sampling(1016, 1016)),
    links=(*CLIP_LINKS, "adapter.INSTANTID -> apply.instantid", "identitynet.CONTROL_NET -> apply.control_net",
           "identity.FACE_EMBEDS -> apply.face_embeds", "checkpoint.MODEL -> apply.model",
           "positive.CONDITIONING -> apply.positive", "negative.CONDITIONING -> apply.negative",
           *sampler_links("apply.MODEL", "apply"), *SAMPLING_LINKS))

TWO_PEOPLE = WorkflowSpec(
    name="09 Two people in one image",
    tag="two-people",
    note="Two identities in one picture: two Apply InstantID nodes in a chain, one shared prompt. 'Two-person pose "
         "photo' gives both poses (Face Keypoints with face_index 1 = the left face, 2 = the right one); each "
         "identity acts only in its half of the image (mask_scope 'identity only': the masks limit the identity, "
         "the prompt stays global). The keypoints are drawn on a 1152x896 canvas (fit 'pad'), the output's size, so "
         "they line up with the masks. Move the masks if the faces are elsewhere.\n\n" + MODELS_TEXT,
    nodes=(checkpoint(), *prompts("photo of two friends sitting at a cafe table, city street at dusk, 35mm"),
           adapter(), face_analysis(), identitynet(),
           image("reference", "First person (left)", "face_left.png"),
           image("reference_right", "Second person (right)", "face_right.png"),
           image("pose", "Two-person pose photo", "two_people.png"),
           *two_people_regions(896),
           _node("apply", "ApplyInstantID", "identity", title="Apply InstantID (left)", mask_scope="identity only"),
           _node("apply_right", "ApplyInstantID", "identity", title="Apply InstantID (right)",
                 mask_scope="identity only"),
           *sampling(1152, 896)),
    links=(*CLIP_LINKS, *apply_links("apply"), *TWO_PEOPLE_REGION_LINKS,
           "adapter.INSTANTID -> apply_right.instantid", "faces.FACEANALYSIS -> apply_right.insightface",
           "identitynet.CONTROL_NET -> apply_right.control_net", "reference_right.IMAGE -> apply_right.image",
           "apply.MODEL -> apply_right.model", "apply.positive -> apply_right.positive",
           "apply.negative -> apply_right.negative",
           *sampler_links("apply_right.MODEL", "apply_right"), *SAMPLING_LINKS))

FACE_REPAIR = WorkflowSpec(
    name="10 Full-body shot with face repair",
    tag="face-repair",
    note="Small faces lose the identity: this draws a full-body shot, then repairs the face at full resolution. "
         "InstantID Face Crop cuts the face out with some context and upscales it to 1024 px; a second KSampler "
         "redraws it as img2img (denoise 0.45) with Apply InstantID, the pose taken from the crop itself; "
         "InstantID Face Paste blends the new face back (pixels outside the crop box are unchanged). Raise denoise "
         "(0.5-0.6) for more likeness, lower it to keep more of the first face.\n\n" + MODELS_TEXT,
    nodes=(checkpoint(), *prompts("full-body photo of a man in a denim jacket walking down a city street at dusk, "
                                  "35mm"),
           adapter(), face_analysis(), identitynet(),
           image("reference", "Reference face", "face.png"),
           _node("crop", "InstantIDFaceCrop", "identity"),
           _node("apply", "ApplyInstantID", "identity"),
           _node("paste", "InstantIDFacePaste", "identity"),
           _node("latent", "EmptyLatentImage", "sampling", width=832, height=1216),
           _node("sampler", "KSampler", "sampling", title="KSampler (full body)", **SAMPLER),
           _node("decode", "VAEDecode", "sampling"),
           _node("encode", "VAEEncode", "sampling", title="VAE Encode (face crop)"),
           _node("repair", "KSampler", "sampling", title="KSampler (face, img2img)", **{**SAMPLER, "denoise": 0.45}),
           _node("decode_face", "VAEDecode", "sampling", title="VAE Decode (face)"),
           _node("save", "SaveImage", "sampling", filename_prefix="instantid_repaired")),
    links=(*CLIP_LINKS, "latent.LATENT -> sampler.latent_image", "checkpoint.MODEL -> sampler.model",
           "positive.CONDITIONING -> sampler.positive", "negative.CONDITIONING -> sampler.negative",
           "sampler.LATENT -> decode.samples", "checkpoint.VAE -> decode.vae",
           "decode.IMAGE -> crop.image", "faces.FACEANALYSIS -> crop.faceanalysis",
           *apply_links("apply"), "crop.crop -> apply.image_kps",
           "crop.crop -> encode.pixels", "checkpoint.VAE -> encode.vae",
           "apply.MODEL -> repair.model", "apply.positive -> repair.positive", "apply.negative -> repair.negative",
           "encode.LATENT -> repair.latent_image", "repair.LATENT -> decode_face.samples",
           "checkpoint.VAE -> decode_face.vae", "decode.IMAGE -> paste.image", "decode_face.IMAGE -> paste.processed",
           "crop.CROP -> paste.crop", "paste.IMAGE -> save.images"))

SAVE_IDENTITY = WorkflowSpec(
    name="13 Save an identity from a photo",
    tag="save-identity",
    note="Makes a reusable identity from a face photo: put the photo in 'Reference face', set a label (who this "
         "is) and Run. InstantID Save Identity writes a small file to output/instantid_faces/ (the face embedding "
         "and keypoints, no image); it then appears in the list of InstantID Load Identity, marked [output], "
         "ready for '08 Saved identity', which needs neither the photo nor the face models. The preview shows the "
         "face keypoints that were found, to check the right face was used.\n\n"
         "Nothing is drawn here and no IdentityNet is needed: Patch Attention only needs a model to attach to, "
         "and its adapter makes the identity's face tokens. " + MODELS_TEXT,
    nodes=(checkpoint(), adapter(), face_analysis(), image("reference", "Reference face", "face.png"),
           _node("patch", "InstantIDAttentionPatch", "identity"),
           _node("keypoints", "FaceKeypointsPreprocessor", "identity"),
           _node("save", "InstantIDSaveFaceEmbeds", "identity", filename_prefix="identity", label="my face"),
           _node("preview", "PreviewImage", "identity", title="Face keypoints found")),
    links=("adapter.INSTANTID -> patch.instantid", "faces.FACEANALYSIS -> patch.insightface",
           "reference.IMAGE -> patch.image", "checkpoint.MODEL -> patch.model", "faces.FACEANALYSIS -> keypoints.faceanalysis",
           "reference.IMAGE -> keypoints.image", "patch.FACE_EMBEDS -> save.face_embeds",
           "keypoints.IMAGE -> preview.images"))

WORKFLOWS: tuple[WorkflowSpec, ...] = (BASIC, POSED, POSE_FREE, SPLIT, STYLE_LORA_WORKFLOW, CANNY, BEST_OF_FOUR, SAVED_IDENTITY,
                                        TWO_PEOPLE, FACE_REPAIR)

# ------------------------------------------------------------------------------ FLUX (InfiniteYou) --
_FLUX = {entry.id: entry.path for entry in CATALOG}
FLUX_CHECKPOINT = _FLUX["flux1-dev-fp8"]
INFUSENET = _FLUX["infusenet-aes-fp8"]
PROJECTION = _FLUX["infiniteyou-projection-aes"]
RECOGNIZER = _FLUX["irse50"]
FLUX_PROMPT = "analog film photo of a man in a denim jacket, city street at dusk, detailed skin, 35mm"
# The reference pipeline's defaults: 30 steps, guidance 3.5 (FluxGuidance), cfg 1 (FLUX-dev is guidance-distilled).
FLUX_SAMPLER = {"seed": 42, "steps": 30, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"}
FLUX_MODELS_TEXT = (f"Models: {FLUX_CHECKPOINT} (FLUX.1-dev single file) in models/checkpoints; {INFUSENET} in "
                    f"models/controlnet; {PROJECTION} and {RECOGNIZER} in models/infiniteyou; antelopev2 in "
                    "models/insightface/models/antelopev2. `python -m instantid fetch-models --only infusenet-aes-fp8 "
                    "--only infiniteyou-projection-aes --only irse50 --only flux1-dev-fp8` fetches them. InfiniteYou "
                    "weights: CC-BY-NC-4.0; FLUX.1-dev: non-commercial licence.")


def flux_models() -> tuple[NodeSpec, ...]:
    return (_node("checkpoint", "CheckpointLoaderSimple", "models", ckpt_name=FLUX_CHECKPOINT),
            _node("infiniteyou", "InfiniteYouModelLoader", "models", projection_file=PROJECTION,
                  recognizer_file=RECOGNIZER),
            face_analysis(),
            _node("infusenet", "ControlNetLoader", "models", title="Load InfuseNet", control_net_name=INFUSENET))


def flux_prompts(text: str) -> tuple[NodeSpec, ...]:
    return (_node("positive", "CLIPTextEncode", "prompt", title="Prompt", text=text),
            _node("guidance", "FluxGuidance", "prompt", guidance=3.5),
            _node("negative", "ConditioningZeroOut", "prompt", title="Negative (zero: cfg 1)"))


def flux_sampling(width: int, height: int, prefix: str) -> tuple[NodeSpec, ...]:
    return (_node("latent", "EmptySD3LatentImage", "sampling", width=width, height=height, batch_size=1),
            _node("sampler", "KSampler", "sampling", **FLUX_SAMPLER),
            _node("decode", "VAEDecode", "sampling"),
            _node("save", "SaveImage", "sampling", filename_prefix=prefix))


FLUX_PROMPT_LINKS = ("checkpoint.CLIP -> positive.clip", "positive.CONDITIONING -> guidance.conditioning",
                     "positive.CONDITIONING -> negative.conditioning")


def flux_apply_links(apply: str, reference: str = "reference") -> tuple[str, ...]:
    """An Apply InfiniteYou node fed by the shared loaders (its hint encoded by the checkpoint's VAE)."""
    return (f"infiniteyou.INFINITEYOU -> {apply}.infiniteyou", f"infusenet.CONTROL_NET -> {apply}.control_net",
            f"checkpoint.VAE -> {apply}.vae", f"faces.FACEANALYSIS -> {apply}.insightface",
            f"{reference}.IMAGE -> {apply}.image")


FLUX_SAMPLING_LINKS = ("checkpoint.MODEL -> sampler.model", *SAMPLING_LINKS)

FLUX_PORTRAIT = WorkflowSpec(
    name="11 FLUX portrait InfiniteYou",
    tag="flux-portrait",
    note="One face photo and a prompt: FLUX.1-dev draws that person (InfiniteYou's InfuseNet, the IdentityNet "
         "carried to FLUX). Apply InfiniteYou strength 1.0, FluxGuidance 3.5, cfg 1, 30 steps, 864x1152 (the "
         "reference pipeline's defaults). Likeness or look off: start_at 0.1, then strength 0.9; the sim_stage1 "
         "files give more likeness.\n" + FLUX_MODELS_TEXT,
    nodes=(*flux_models(), *flux_prompts(FLUX_PROMPT), image("reference", "Reference face", "face.png"),
           _node("apply", "ApplyInfiniteYou", "identity"), *flux_sampling(864, 1152, "instantid_flux")),
    links=(*FLUX_PROMPT_LINKS, *flux_apply_links("apply"), "guidance.CONDITIONING -> apply.positive",
           "negative.CONDITIONING -> apply.negative", "apply.positive -> sampler.positive",
           "apply.negative -> sampler.negative", *FLUX_SAMPLING_LINKS))

FLUX_TWO_PEOPLE = WorkflowSpec(
    name="12 FLUX two people InfiniteYou",
    tag="flux-two-people",
    note="Two people, two identities on FLUX: each Apply InfiniteYou draws its face in its half of the picture "
         "(mask, mask_scope 'identity only': the InfuseNet acts only inside its mask, the prompt everywhere). "
         "Each keeps its own identity tokens; the keypoints come from the two-person pose photo (face_index 1 = "
         "left, 2 = right).\n" + FLUX_MODELS_TEXT,
    nodes=(*flux_models(), *flux_prompts("photo of two friends side by side in a park, natural light, 35mm"),
           image("reference", "Left person's face", "face.png"),
           image("reference_right", "Right person's face", "face_right.png"),
           image("pose", "Two-person pose photo", "two_people.png"),
           *two_people_regions(864),
           _node("apply", "ApplyInfiniteYou", "identity", title="Apply InfiniteYou (left)", mask_scope="identity only"),
           _node("apply_right", "ApplyInfiniteYou", "identity", title="Apply InfiniteYou (right)",
                 mask_scope="identity only"),
           *flux_sampling(1152, 864, "instantid_flux_two")),
    links=(*FLUX_PROMPT_LINKS, *flux_apply_links("apply"), *flux_apply_links("apply_right", "reference_right"),
           *TWO_PEOPLE_REGION_LINKS,
           "guidance.CONDITIONING -> apply.positive", "negative.CONDITIONING -> apply.negative",
           "apply.positive -> apply_right.positive", "apply.negative -> apply_right.negative",
           "apply_right.positive -> sampler.positive", "apply_right.negative -> sampler.negative",
           *FLUX_SAMPLING_LINKS))

WORKFLOWS += (FLUX_PORTRAIT, FLUX_TWO_PEOPLE, SAVE_IDENTITY)
