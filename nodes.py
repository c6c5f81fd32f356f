"""ComfyUI node declarations (V3 schema). Node ids, input names and widget order are those of the
original ComfyUI_InstantID pack, so workflows shared for it load here; new options are appended
as optional inputs with defaults. Each execute() calls into instantid/, where the work happens."""
from __future__ import annotations

from typing import Any

import folder_paths
from comfy_api.latest import ComfyExtension, io, ui
from typing_extensions import override

from .instantid.adapter import ADAPTER_FILE, load_adapter
from .instantid.apply import apply_attention_only, apply_control_only, apply_instantid
from .instantid.checks import NumberInput, float_inputs
from .instantid.face_crop import DEFAULT_FEATHER, DEFAULT_PADDING, DEFAULT_SIZE, crop_faces, paste_faces
from .instantid.face_inputs import ON_NO_FACE, as_face_analyzer, keypoints_image
from .instantid.flux_apply import apply_infiniteyou
from .instantid.faces import COMBINE_MODES, PROVIDER_CHOICES, FaceAnalyzer, find_antelopev2
from .instantid.identity_files import (IDENTITY_FOLDER, describe, file_sha256, list_identity_files, load_identity,
                                       resolve_identity_file, save_identity, save_path, saved_file)
from .instantid.keypoints import FIT_MODES, CanvasFit
from .instantid.infiniteyou import PROJECTION_SOURCE, load_infiniteyou
from .instantid.paths import ADAPTER_FOLDER, INFINITEYOU_FOLDER, face_model_roots, register_model_folders
from .instantid.regions import MASK_SCOPES, PROMPT_AND_IDENTITY
from .instantid.similarity import face_similarity, ranked_images

register_model_folders(folder_paths)

InstantIDType = io.Custom("INSTANTID")
FaceAnalysisType = io.Custom("FACEANALYSIS")
FaceEmbedsType = io.Custom("FACE_EMBEDS")
CropType = io.Custom("INSTANTID_CROP")
InfiniteYouType = io.Custom("INFINITEYOU")
CATEGORY = "InstantID"
# The frontend's advanced-widget flag: options added after the earlier pack's inputs stay hidden until
# "Show Advanced" (node menu), so the earlier pack's workflows open at their saved sizes.
ADVANCED = {"advanced": True}
NO_IDENTITY_FILES = "(none yet: upload one, or run Save Identity)"


def _notes_ui(notes: list[str]) -> dict | None:
    return ui.PreviewText("\n".join(notes)) if notes else None


def _numbers(cls: type[io.ComfyNode], arguments: dict[str, Any]) -> list[NumberInput]:
    """The node's FLOAT inputs with their widget ranges, for the checks in instantid/checks.py; given
    execute()'s locals() so that a FLOAT input added later is checked without being listed."""
    return float_inputs(cls.define_schema().inputs, arguments)


def _reference_check(cls: type[io.ComfyNode], input_types: dict[str, str]) -> bool | str:
    """Checked when the prompt is queued, before any model loads: a reference (photo or saved identity)
    is connected. Asking for input_types turns off ComfyUI's own link type check, so it is redone here."""
    from comfy_execution.validation import validate_node_input
    declared = {item.id: item.get_io_type() for item in cls.define_schema().inputs}
    for name, received in input_types.items():
        if name in declared and not validate_node_input(received, declared[name]):
            return f"{name} is linked to a {received} output; it takes {declared[name]}."
    if "image" not in input_types and "face_embeds" not in input_types:
        return ("No reference: connect a face photo (Load Image) to 'image', or a saved identity "
                "('InstantID Load Identity (Face Embeds)') to 'face_embeds'.")
    return True


def _on_no_face_input(skip: str = "passes the model and conditioning through unchanged and says so on the node"
                      ) -> io.Combo.Input:
    return io.Combo.Input("on_no_face", options=list(ON_NO_FACE), default="error", optional=True, extra_dict=ADVANCED,
                          tooltip=f"What to do when an image has no detectable face: 'error' stops with a message "
                                  f"naming the image; 'skip' {skip}.")


def _noise_input() -> io.Float.Input:
    return io.Float.Input("noise", default=0.0, min=0.0, max=1.0, step=0.05,
                          tooltip="0 = official InstantID: the negative prompt's face tokens come from an empty face. "
                                  "Above 0 they come from seeded noise of this strength, which can reduce burn "
                                  "(0.35 gives the earlier pack's look).")


def _schedule_inputs() -> list[io.Input]:
    return [io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.001,
                           tooltip="Fraction of the sampling schedule where InstantID starts acting (0 = first step)."),
            io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.001,
                           tooltip="Fraction of the sampling schedule where InstantID stops acting (1 = last step).")]


def _insightface_input() -> io.Input:
    return FaceAnalysisType.Input("insightface", optional=True,
                                  tooltip="Face detection and recognition from 'InstantID InsightFace (antelopev2)'. May stay "
                                          "unconnected when face_embeds replaces the photo and image_kps is not used.")


def _face_index_input(what: str) -> io.Int.Input:
    return io.Int.Input("face_index", default=0, min=0, max=64, step=1, optional=True, extra_dict=ADVANCED,
                        tooltip=f"Which face of {what} to use: 0 = the largest (the official rule), 1, 2, 3 … = the "
                                "first, second, third face counted from the left.")


def _face_embeds_input() -> io.Input:
    return FaceEmbedsType.Input("face_embeds", optional=True,
                                tooltip="A saved identity ('InstantID Load Identity (Face Embeds)') used instead of image; without "
                                        "image_kps its stored keypoints set the pose. The face tokens are made by this "
                                        "node's adapter.")


def _apply_head_inputs() -> list[io.Input]:
    return [InstantIDType.Input("instantid", tooltip="The InstantID adapter from 'Load InstantID Model'."),
            _insightface_input(),
            io.ControlNet.Input("control_net", tooltip="The InstantID IdentityNet, loaded with 'Load ControlNet Model'."),
            io.Image.Input("image", optional=True,
                           tooltip="Reference photo(s) of the person. Several images are combined into one identity. "
                                   "Not needed when face_embeds (a saved identity) is connected."),
            io.Model.Input("model", tooltip="An SDXL model. It is not modified: a patched copy is returned."),
            io.Conditioning.Input("positive", tooltip="Positive conditioning (your prompt)."),
            io.Conditioning.Input("negative", tooltip="Negative conditioning.")]


def _apply_tail_inputs() -> list[io.Input]:
    return [io.Image.Input("image_kps", optional=True,
                           tooltip="Optional pose: a photo (its face keypoints set the face position and angle) "
                                   "or a keypoint drawing, used as is. Without it the pose of the reference photo "
                                   "is used."),
            io.Mask.Input("mask", optional=True,
                          tooltip="Optional mask: the identity (and, with mask_scope 'prompt and identity', this "
                                  "positive prompt) act only inside it; combine two masked Apply nodes for two people."),
            _on_no_face_input()]


def _apply_identity_inputs() -> list[io.Input]:
    return [_face_index_input("each reference photo (not of image_kps, which uses its largest)"), _face_embeds_input()]


def _region_inputs(identity: str = "face attention and IdentityNet", control: str = "IdentityNet") -> list[io.Input]:
    """face_region and mask_scope of an Apply node; `identity`: what carries the identity there."""
    return [io.Boolean.Input("face_region", default=False, optional=True, extra_dict=ADVANCED,
                             tooltip=f"The identity ({identity}) acts only inside the face's bounding box on the "
                                     "keypoint image, placed on the latent as ComfyUI places the keypoints; the prompt "
                                     "still acts everywhere (InstantID's official 'enhance non-face region' mode). "
                                     "With a mask, the region is their product."),
            io.Combo.Input("mask_scope", options=list(MASK_SCOPES), default=PROMPT_AND_IDENTITY, optional=True,
                           extra_dict=ADVANCED,
                           tooltip=f"What the mask limits. 'prompt and identity': this positive prompt and the "
                                   f"{control} act only inside it (the earlier pack's behaviour). 'identity only': "
                                   f"the {identity} act only inside it and the prompt stays global, so two Apply "
                                   "nodes can share one prompt (two people).")]


def _apply_outputs() -> list[io.Output]:
    return [io.Model.Output(display_name="MODEL", tooltip="The model with InstantID face attention."),
            io.Conditioning.Output(display_name="positive", tooltip="Positive conditioning with the IdentityNet."),
            io.Conditioning.Output(display_name="negative", tooltip="Negative conditioning with the IdentityNet.")]


class InstantIDModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstantIDModelLoader", display_name="Load InstantID Model (IPAdapter)", category=CATEGORY,
            description="Loads the InstantID adapter, the IP-Adapter-style part that turns a face into tokens the "
                        "model attends to (ip-adapter.bin or a .safetensors copy, in models/instantid).",
            inputs=[io.Combo.Input("instantid_file", options=folder_paths.get_filename_list(ADAPTER_FOLDER),
                                   tooltip=f"The adapter file in ComfyUI/models/{ADAPTER_FOLDER} ({ADAPTER_FILE.source}).")],
            outputs=[InstantIDType.Output(display_name="INSTANTID", tooltip="The loaded adapter.")])

    @classmethod
    def execute(cls, instantid_file: str) -> io.NodeOutput:
        return io.NodeOutput(load_adapter(folder_paths.get_full_path_or_raise(ADAPTER_FOLDER, instantid_file)))


class InstantIDFaceAnalysis(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstantIDFaceAnalysis", display_name="InstantID InsightFace (antelopev2)", category=CATEGORY,
            description="Loads InsightFace's antelopev2 face detector and recognizer (scrfd_10g_bnkps.onnx and "
                        "glintr100.onnx in models/insightface/models/antelopev2), which find the face and read who it "
                        "is. Never downloads anything: the error says where to get the files.",
            inputs=[io.Combo.Input("provider", options=PROVIDER_CHOICES, default="auto",
                                   tooltip="Where face analysis runs. 'auto' picks the best available onnxruntime "
                                           "provider and falls back to CPU.")],
            outputs=[FaceAnalysisType.Output(display_name="FACEANALYSIS", tooltip="Face detection and recognition.")])

    @classmethod
    def execute(cls, provider: str) -> io.NodeOutput:
        analyzer = FaceAnalyzer.load(find_antelopev2(face_model_roots(folder_paths)), provider)
        return io.NodeOutput(analyzer, ui=_notes_ui(analyzer.warnings))


class FaceKeypointsPreprocessor(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceKeypointsPreprocessor", display_name="InstantID Face Keypoints (Pose)", category=CATEGORY,
            description="Draws the five face keypoints (eyes, nose, mouth corners) of the chosen face of each image, as "
                        "the IdentityNet expects them, optionally fitted to another canvas size and mirrored. Batch "
                        "positions are kept.",
            inputs=[FaceAnalysisType.Input("faceanalysis", tooltip="Face detection from 'InstantID InsightFace (antelopev2)'."),
                    io.Image.Input("image", tooltip="Image(s) whose face pose to extract."),
                    _on_no_face_input("gives a black frame (no pose constraint) for each image without a face and "
                                      "says so on the node"),
                    io.Int.Input("width", default=0, min=0, max=16384, step=8, optional=True, extra_dict=ADVANCED,
                                 tooltip="Width of the keypoint image, e.g. your latent's width; 0 = the input's width."),
                    io.Int.Input("height", default=0, min=0, max=16384, step=8, optional=True, extra_dict=ADVANCED,
                                 tooltip="Height of the keypoint image; 0 = the input's height."),
                    io.Combo.Input("fit", options=list(FIT_MODES), default="pad", optional=True, extra_dict=ADVANCED,
                                   tooltip="How the photo's frame goes onto another aspect: 'pad' keeps all of it "
                                           "(black borders), 'crop' fills the canvas and cuts the overflow (what ComfyUI "
                                           "does to a hint), 'stretch' scales each side on its own. The points are "
                                           "moved, then drawn at the new size."),
                    io.Boolean.Input("mirror", default=False, optional=True, extra_dict=ADVANCED,
                                     tooltip="Mirror the pose left-right; the eye and mouth-corner colours are swapped so "
                                             "each colour still marks the image-left or image-right point."),
                    _face_index_input("each image")],
            outputs=[io.Image.Output(display_name="IMAGE",
                                     tooltip="The keypoint image(s): the input's size, or width x height.")])

    @classmethod
    def execute(cls, faceanalysis: Any, image: Any, on_no_face: str = "error", width: int = 0, height: int = 0,
                fit: str = "pad", mirror: bool = False, face_index: int = 0) -> io.NodeOutput:
        keypoints, notes = keypoints_image(faceanalysis, image, on_no_face, CanvasFit(width, height, fit, mirror),
                                           face_index)
        return io.NodeOutput(keypoints, ui=_notes_ui(notes))


class ApplyInstantID(io.ComfyNode):
    @classmethod
    def validate_inputs(cls, input_types: dict[str, str]) -> bool | str:
        return _reference_check(cls, input_types)

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ApplyInstantID", display_name="Apply InstantID", category=CATEGORY,
            description="Makes the SDXL model draw the person in the reference photo: face attention on all 70 "
                        "cross-attention layers plus the IdentityNet, one strength for both.",
            inputs=[*_apply_head_inputs(),
                    io.Float.Input("weight", default=0.8, min=0.0, max=5.0, step=0.01,
                                   tooltip="Strength of both the face attention and the IdentityNet (0.8 recommended)."),
                    *_schedule_inputs(), *_apply_tail_inputs(), *_region_inputs(), *_apply_identity_inputs()],
            outputs=_apply_outputs())

    @classmethod
    def execute(cls, instantid: Any, control_net: Any, model: Any, positive: Any, negative: Any, weight: float,
                start_at: float, end_at: float, insightface: Any = None, image: Any = None, image_kps: Any = None,
                mask: Any = None, on_no_face: str = "error", face_region: bool = False,
                mask_scope: str = PROMPT_AND_IDENTITY, face_index: int = 0, face_embeds: Any = None) -> io.NodeOutput:
        outcome = apply_instantid(adapter=instantid, face_analysis=insightface, control_net=control_net, image=image,
                                  model=model, positive=positive, negative=negative, ip_weight=weight,
                                  cn_strength=weight, start_at=start_at, end_at=end_at, image_kps=image_kps,
                                  mask=mask, on_no_face=on_no_face, face_region=face_region, mask_scope=mask_scope,
                                  face_index=face_index, face_embeds=face_embeds, numbers=_numbers(cls, locals()))
        return io.NodeOutput(outcome.model, outcome.positive, outcome.negative, ui=_notes_ui(outcome.notes))


class ApplyInstantIDAdvanced(io.ComfyNode):
    @classmethod
    def validate_inputs(cls, input_types: dict[str, str]) -> bool | str:
        return _reference_check(cls, input_types)

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ApplyInstantIDAdvanced", display_name="Apply InstantID Advanced", category=CATEGORY,
            description="Apply InstantID with separate strengths for the face attention and the IdentityNet, "
                        "noise for the negative face tokens, and the way several reference photos are combined.",
            inputs=[*_apply_head_inputs(),
                    io.Float.Input("ip_weight", default=0.8, min=0.0, max=3.0, step=0.01,
                                   tooltip="Strength of the face attention (identity detail)."),
                    io.Float.Input("cn_strength", default=0.8, min=0.0, max=10.0, step=0.01,
                                   tooltip="Strength of the IdentityNet (identity and pose)."),
                    *_schedule_inputs(),
                    _noise_input(),
                    io.Combo.Input("combine_embeds", options=list(COMBINE_MODES), default="average",
                                   tooltip="How several reference photos combine: average of the embeddings, "
                                           "average of their directions ('norm average'), or all faces' tokens ('concat')."),
                    *_apply_tail_inputs(), *_region_inputs(),
                    io.Float.Input("cn_start_at", default=-1.0, min=-1.0, max=1.0, step=0.001, optional=True,
                                   extra_dict=ADVANCED,
                                   tooltip="Fraction of the schedule where the IdentityNet starts acting, apart from "
                                           "the face attention. -1 (default) follows start_at."),
                    io.Float.Input("cn_end_at", default=-1.0, min=-1.0, max=1.0, step=0.001, optional=True,
                                   extra_dict=ADVANCED,
                                   tooltip="Fraction of the schedule where the IdentityNet stops acting, apart from "
                                           "the face attention. -1 (default) follows end_at."),
                    *_apply_identity_inputs()],
            outputs=_apply_outputs())

    @classmethod
    def execute(cls, instantid: Any, control_net: Any, model: Any, positive: Any, negative: Any, ip_weight: float,
                cn_strength: float, start_at: float, end_at: float, noise: float, combine_embeds: str,
                insightface: Any = None, image: Any = None, image_kps: Any = None, mask: Any = None,
                on_no_face: str = "error", face_region: bool = False, mask_scope: str = PROMPT_AND_IDENTITY,
                cn_start_at: float = -1.0, cn_end_at: float = -1.0, face_index: int = 0,
                face_embeds: Any = None) -> io.NodeOutput:
        outcome = apply_instantid(adapter=instantid, face_analysis=insightface, control_net=control_net, image=image,
                                  model=model, positive=positive, negative=negative, ip_weight=ip_weight,
                                  cn_strength=cn_strength, start_at=start_at, end_at=end_at, noise=noise,
                                  combine=combine_embeds, image_kps=image_kps, mask=mask, on_no_face=on_no_face,
                                  face_region=face_region, mask_scope=mask_scope, cn_start_at=cn_start_at,
                                  cn_end_at=cn_end_at, face_index=face_index, face_embeds=face_embeds,
                                  numbers=_numbers(cls, locals()))
        return io.NodeOutput(outcome.model, outcome.positive, outcome.negative, ui=_notes_ui(outcome.notes))


class InstantIDAttentionPatch(io.ComfyNode):
    @classmethod
    def validate_inputs(cls, input_types: dict[str, str]) -> bool | str:
        return _reference_check(cls, input_types)

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstantIDAttentionPatch", display_name="InstantID Patch Attention", category=CATEGORY,
            description="Only the face attention part of InstantID (IP-Adapter style, no IdentityNet): the prompt "
                        "alone decides the pose. Its FACE_EMBEDS output feeds 'InstantID Apply ControlNet' or "
                        "'InstantID Save Identity (Face Embeds)'.",
            inputs=[InstantIDType.Input("instantid", tooltip="The InstantID adapter from 'Load InstantID Model'."),
                    _insightface_input(),
                    io.Image.Input("image", optional=True,
                                   tooltip="Reference photo(s) of the person (averaged). Not needed when face_embeds "
                                           "is connected."),
                    io.Model.Input("model", tooltip="An SDXL model. It is not modified: a patched copy is returned."),
                    io.Float.Input("weight", default=1.0, min=-1.0, max=3.0, step=0.01,
                                   tooltip="Strength of the face attention."),
                    *_schedule_inputs(),
                    _noise_input(),
                    io.Mask.Input("mask", optional=True, tooltip="Optional mask: the face attention acts only inside it."),
                    _on_no_face_input("passes the model through unchanged and says so on the node"),
                    _face_index_input("each reference photo"), _face_embeds_input()],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with InstantID face attention."),
                     FaceEmbedsType.Output(display_name="FACE_EMBEDS",
                                           tooltip="The identity and its face tokens, for 'InstantID Apply ControlNet' "
                                                   "and 'InstantID Save Identity (Face Embeds)'.")])

    @classmethod
    def execute(cls, instantid: Any, model: Any, weight: float, start_at: float, end_at: float, noise: float,
                insightface: Any = None, image: Any = None, mask: Any = None, on_no_face: str = "error",
                face_index: int = 0, face_embeds: Any = None) -> io.NodeOutput:
        outcome = apply_attention_only(adapter=instantid, face_analysis=insightface, image=image, model=model,
                                       weight=weight, start_at=start_at, end_at=end_at, noise=noise, mask=mask,
                                       on_no_face=on_no_face, face_index=face_index, face_embeds=face_embeds,
                                       numbers=_numbers(cls, locals()))
        return io.NodeOutput(outcome.model, outcome.face_embeds, ui=_notes_ui(outcome.notes))


class ApplyInstantIDControlNet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ApplyInstantIDControlNet", display_name="InstantID Apply ControlNet", category=CATEGORY,
            description="Only the IdentityNet part of InstantID, driven by face tokens from 'InstantID Patch Attention' "
                        "and a keypoint image from 'InstantID Face Keypoints (Pose)'.",
            inputs=[FaceEmbedsType.Input("face_embeds", tooltip="Face tokens from 'InstantID Patch Attention' (a loaded "
                                                                "identity goes through it first: the tokens need an adapter)."),
                    io.ControlNet.Input("control_net", tooltip="The InstantID IdentityNet, loaded with 'Load ControlNet Model'."),
                    io.Image.Input("image_kps", tooltip="The keypoint image (output of 'InstantID Face Keypoints (Pose)'), used as is."),
                    io.Conditioning.Input("positive", tooltip="Positive conditioning."),
                    io.Conditioning.Input("negative", tooltip="Negative conditioning."),
                    io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01,
                                   tooltip="Strength of the IdentityNet (0 passes the conditioning through)."),
                    *_schedule_inputs(),
                    io.Mask.Input("mask", optional=True, tooltip="Optional mask: this positive prompt and the "
                                                                  "IdentityNet act only inside it (see mask_scope)."),
                    io.Boolean.Input("face_region", default=False, optional=True, extra_dict=ADVANCED,
                                     tooltip="The IdentityNet acts only inside the box around the drawn keypoints of "
                                             "image_kps (eyes to mouth, tighter than a detected face box), placed on "
                                             "the latent as ComfyUI places the keypoints; the prompt acts everywhere."),
                    io.Combo.Input("mask_scope", options=list(MASK_SCOPES), default=PROMPT_AND_IDENTITY, optional=True,
                                   extra_dict=ADVANCED,
                                   tooltip="What the mask limits. 'prompt and identity': this positive prompt and the "
                                           "IdentityNet. 'identity only': only the IdentityNet; the prompt stays global.")],
            outputs=[io.Conditioning.Output(display_name="positive", tooltip="Positive conditioning with the IdentityNet."),
                     io.Conditioning.Output(display_name="negative", tooltip="Negative conditioning with the IdentityNet.")])

    @classmethod
    def execute(cls, face_embeds: Any, control_net: Any, image_kps: Any, positive: Any, negative: Any,
                strength: float, start_at: float, end_at: float, mask: Any = None, face_region: bool = False,
                mask_scope: str = PROMPT_AND_IDENTITY) -> io.NodeOutput:
        return io.NodeOutput(*apply_control_only(face_embeds=face_embeds, control_net=control_net, image_kps=image_kps,
                                                 positive=positive, negative=negative, strength=strength,
                                                 start_at=start_at, end_at=end_at, mask=mask, face_region=face_region,
                                                 mask_scope=mask_scope, numbers=_numbers(cls, locals())))


class InstantIDFaceSimilarity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstantIDFaceSimilarity", display_name="InstantID Face Similarity", category=CATEGORY,
            description="How much the face in 'image' looks like the face in 'reference': cosine similarity of their "
                        "ArcFace (antelopev2) embeddings, largest face of each image. 1.0 is identical; different "
                        "people usually score below 0.3. The scores are shown on the node. "
                        "A batch is also ranked (best image, all images best first); an image without a face "
                        "scores 0 and ranks last.",
            inputs=[FaceAnalysisType.Input("faceanalysis",
                                           tooltip="Face detection and recognition from 'InstantID InsightFace (antelopev2)'."),
                    io.MultiType.Input("reference", types=[io.Image, FaceEmbedsType],
                                       tooltip="Photo(s) of the person, or a saved identity (FACE_EMBEDS); with several "
                                               "faces, each image is compared with every reference and the scores "
                                               "are averaged."),
                    io.Image.Input("image", tooltip="The image(s) to score against the reference, e.g. the VAE Decode output. "
                                                    "With a batch, the output is the mean of the per-image scores; an "
                                                    "image without a face scores 0."),
                    InfiniteYouType.Input("recognizer", optional=True,
                                          tooltip="Optional: 'FLUX Load InfiniteYou Model (InstantID)' here scores with its "
                                                  "IR-SE50 recogniser (what InfiniteYou was trained on) instead of "
                                                  "antelopev2's; faces are still found by antelopev2. The text says "
                                                  "which recogniser scored.")],
            outputs=[io.Float.Output(display_name="similarity", tooltip="Cosine similarity of the face embeddings, -1 to 1."),
                     io.String.Output(display_name="scores", tooltip="The text shown on the node: the mean and, for a "
                                                                    "batch, each image's score, best first."),
                     io.Image.Output(display_name="best_image", tooltip="The image with the highest score."),
                     io.Image.Output(display_name="ranked", tooltip="The batch sorted by score, best first (ties keep "
                                                                   "their order; images without a face last).")],
            is_output_node=True)

    @classmethod
    def execute(cls, faceanalysis: Any, reference: Any, image: Any, recognizer: Any = None) -> io.NodeOutput:
        result = face_similarity(as_face_analyzer(faceanalysis), reference, image,
                                 None if recognizer is None else recognizer.recognizer)
        best, ranked = ranked_images(image, result)
        return io.NodeOutput(result.mean, result.text(), best, ranked,
                             ui={"text": [result.text()], "face_similarity": list(result.per_image)})


class InstantIDFaceCrop(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstantIDFaceCrop", display_name="InstantID Face Crop", category=CATEGORY,
            description="Crops the face with some context and upscales it, so a small face (a full-body shot) can be "
                        "redrawn at full resolution, e.g. by InstantID img2img; 'InstantID Face Paste' puts it back. "
                        "The face stays centred: near the border the crop is padded with the edge pixels. Batch "
                        "positions are kept; an image without a face passes through unchanged.",
            inputs=[io.Image.Input("image", tooltip="The image(s) with a face to repair."),
                    FaceAnalysisType.Input("faceanalysis", tooltip="Face detection from 'InstantID InsightFace (antelopev2)'."),
                    io.Int.Input("face_index", default=0, min=0, max=64,
                                 tooltip="Which face: 0 = the largest, 1 = the first from the left, 2 = the second…"),
                    io.Float.Input("padding", default=DEFAULT_PADDING, min=0.0, max=4.0, step=0.05,
                                   tooltip="Context around the face, as a fraction of the face box added on each side."),
                    io.Int.Input("size", default=DEFAULT_SIZE, min=64, max=4096, step=8,
                                 tooltip="Long side of the crop in pixels (a multiple of 8); the aspect is kept. "
                                         "1024 suits SDXL.")],
            outputs=[io.Image.Output(display_name="crop", tooltip="The face crop(s), upscaled to 'size'."),
                     CropType.Output(display_name="CROP", tooltip="Where each crop came from, for 'InstantID Face Paste'."),
                     io.Mask.Output(display_name="mask", tooltip="The crop's feathered mask (the paste's blend at the "
                                                                 "default feather); empty for an image without a face.")])

    @classmethod
    def execute(cls, image: Any, faceanalysis: Any, face_index: int, padding: float, size: int) -> io.NodeOutput:
        result = crop_faces(as_face_analyzer(faceanalysis), image, face_index, padding, size,
                            numbers=_numbers(cls, locals()))
        return io.NodeOutput(result.image, result.crops, result.mask, ui=_notes_ui(result.notes))


class InstantIDFacePaste(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstantIDFacePaste", display_name="InstantID Face Paste", category=CATEGORY,
            description="Puts the processed face crop back into the original image: the change made to the crop is "
                        "resized back and blended in with a feathered edge. Pixels outside the crop box are never "
                        "changed, and an unchanged crop gives back the original exactly.",
            inputs=[io.Image.Input("image", tooltip="The original image(s), as given to 'InstantID Face Crop'."),
                    io.Image.Input("processed", tooltip="The crop after processing (e.g. VAE Decode of an img2img on it)."),
                    CropType.Input("crop", tooltip="The CROP output of 'InstantID Face Crop'."),
                    io.Int.Input("feather", default=DEFAULT_FEATHER, min=0, max=1024,
                                 tooltip="Width in image pixels of the band along the crop edge over which the new face "
                                         "fades into the original (at most half the crop box).")],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="The original with the processed face pasted in.")])

    @classmethod
    def execute(cls, image: Any, processed: Any, crop: Any, feather: int) -> io.NodeOutput:
        pasted, notes = paste_faces(image, processed, crop, feather)
        return io.NodeOutput(pasted, ui=_notes_ui(notes))


class InstantIDSaveFaceEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstantIDSaveFaceEmbeds", display_name="InstantID Save Identity (Face Embeds)", category=CATEGORY,
            description=f"Saves who the person is as a small identity file in output/{IDENTITY_FOLDER}/ (the face "
                        "embedding, the face keypoints and a label you choose), so later workflows can use the person "
                        "without the photo or the face models. It appears at once in 'InstantID Load Identity (Face "
                        "Embeds)', marked [output].",
            inputs=[FaceEmbedsType.Input("face_embeds", tooltip="The identity, e.g. the FACE_EMBEDS output of "
                                                                "'InstantID Patch Attention'."),
                    io.String.Input("filename_prefix", default="identity",
                                    tooltip=f"File name start inside output/{IDENTITY_FOLDER}/ (subfolders allowed); a "
                                            "number is added as Save Image does."),
                    io.String.Input("label", default="", optional=True,
                                    tooltip="A human label stored in the file (who this is, which photos).")],
            outputs=[], is_output_node=True)

    @classmethod
    def execute(cls, face_embeds: Any, filename_prefix: str, label: str = "") -> io.NodeOutput:
        path = save_identity(face_embeds, save_path(folder_paths, filename_prefix), label)
        saved = saved_file(path, folder_paths.get_output_directory())
        return io.NodeOutput(ui={"text": [f"saved {saved['subfolder']}/{saved['filename']}; load it as "
                                          f"'{saved['choice']}'"], "face_embeds": [saved]})


def _identity_file(name: str) -> Any:
    return resolve_identity_file(name, folder_paths.get_input_directory(), folder_paths.get_output_directory())


class InstantIDLoadFaceEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstantIDLoadFaceEmbeds", display_name="InstantID Load Identity (Face Embeds)", category=CATEGORY,
            description=f"Loads a saved identity file (.safetensors) from input/{IDENTITY_FOLDER}/ or output/"
                        f"{IDENTITY_FOLDER}/; the upload button adds one from your computer. Connect it to face_embeds "
                        "of an Apply node: no photo and no face models are needed then.",
            inputs=[io.Combo.Input("face_embeds_file",
                                   options=list_identity_files(folder_paths.get_input_directory(),
                                                               folder_paths.get_output_directory())
                                   or [NO_IDENTITY_FILES],
                                   tooltip=f"A file saved by 'InstantID Save Identity (Face Embeds)' ('[output]': in "
                                           f"output/{IDENTITY_FOLDER}/, else in input/{IDENTITY_FOLDER}/).")],
            outputs=[FaceEmbedsType.Output(display_name="FACE_EMBEDS",
                                           tooltip="The saved identity; the Apply node's adapter makes its face tokens.")])

    @classmethod
    def validate_inputs(cls, face_embeds_file: str) -> bool | str:
        if face_embeds_file == NO_IDENTITY_FILES:
            return ("No saved identity yet: add a .safetensors identity with the node's upload button, or run a "
                    "workflow with 'InstantID Save Identity (Face Embeds)' first (e.g. '13 Save an identity from a "
                    "photo').")
        if face_embeds_file not in list_identity_files(folder_paths.get_input_directory(),
                                                       folder_paths.get_output_directory()):
            return (f"face_embeds_file '{face_embeds_file}' is not a saved identity in input/{IDENTITY_FOLDER}/ or "
                    f"output/{IDENTITY_FOLDER}/: choose one from the list, or add the file with the upload button.")
        return True

    @classmethod
    def fingerprint_inputs(cls, face_embeds_file: str) -> Any:
        # Runs again when the file's content changes under the same name.
        try:
            return file_sha256(_identity_file(face_embeds_file))
        except (ValueError, OSError):
            return face_embeds_file

    @classmethod
    def execute(cls, face_embeds_file: str) -> io.NodeOutput:
        face_embeds = load_identity(_identity_file(face_embeds_file))
        return io.NodeOutput(face_embeds, ui=_notes_ui([describe(face_embeds)]))


class InfiniteYouModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        files = folder_paths.get_filename_list(INFINITEYOU_FOLDER)
        return io.Schema(
            node_id="InfiniteYouModelLoader", display_name="FLUX Load InfiniteYou Model (InstantID)", category=CATEGORY,
            description="Loads InfiniteYou (InstantID's identity on FLUX) from models/infiniteyou: the image projection "
                        "(identity tokens from a face embedding) and the ArcFace IR-SE50 face recogniser it was trained "
                        "with, each checked by its layout. The InfuseNet itself loads with 'Load ControlNet Model'.",
            inputs=[io.Combo.Input("projection_file", options=files,
                                   tooltip=f"InfiniteYou's image projection (or a .safetensors of it): {PROJECTION_SOURCE}."),
                    io.Combo.Input("recognizer_file", options=files,
                                   tooltip="recognition_arcface_ir_se50.pth (facexlib's IR-SE50, or a .safetensors of "
                                           "it), in ComfyUI/models/infiniteyou.")],
            outputs=[InfiniteYouType.Output(display_name="INFINITEYOU", tooltip="The projection and the IR-SE50 recogniser.")])

    @classmethod
    def execute(cls, projection_file: str, recognizer_file: str) -> io.NodeOutput:
        return io.NodeOutput(load_infiniteyou(folder_paths.get_full_path_or_raise(INFINITEYOU_FOLDER, projection_file),
                                              folder_paths.get_full_path_or_raise(INFINITEYOU_FOLDER, recognizer_file)))


class ApplyInfiniteYou(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ApplyInfiniteYou", display_name="FLUX Apply InfiniteYou (InstantID)", category=CATEGORY,
            description="Makes a FLUX model draw the person in the reference photo: the InfuseNet (a FLUX ControlNet) "
                        "attends to 8 identity tokens made from the face's IR-SE50 embedding, posed by the five "
                        "keypoints; other ControlNets of the chain keep the prompt. The model itself is not patched. "
                        "Face choice, face region, masks, saved identities and on_no_face work as in Apply InstantID.",
            inputs=[InfiniteYouType.Input("infiniteyou", tooltip="From 'FLUX Load InfiniteYou Model (InstantID)'."),
                    io.ControlNet.Input("control_net", tooltip="The InfuseNet (infusenet_*.safetensors), loaded with "
                                                               "'Load ControlNet Model'."),
                    io.Vae.Input("vae", tooltip="The FLUX VAE: the InfuseNet's keypoint hint is VAE-encoded."),
                    io.Conditioning.Input("positive", tooltip="Positive conditioning (your prompt, e.g. after FluxGuidance)."),
                    io.Conditioning.Input("negative", tooltip="Negative conditioning. With cfg 1 (usual for FLUX-dev) it "
                                                              "is not used; with cfg > 1 it gets no InfuseNet, as in the "
                                                              "reference pipeline's true CFG."),
                    _insightface_input(),
                    io.Image.Input("image", optional=True,
                                   tooltip="Reference photo(s) of the person (averaged). Not needed when face_embeds "
                                           "(an identity saved from an InfiniteYou run) is connected."),
                    io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01,
                                   tooltip="InfuseNet strength (the reference's conditioning scale, 1.0; its README "
                                           "suggests 0.9 when the look is off)."),
                    io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.001,
                                   tooltip="Fraction of the schedule where the InfuseNet starts acting (0 = first step; "
                                           "the reference suggests 0.1 when the look is off)."),
                    io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.001,
                                   tooltip="Fraction of the schedule where the InfuseNet stops acting (1 = last step)."),
                    io.Image.Input("image_kps", optional=True,
                                   tooltip="Optional pose: a photo (its face keypoints are drawn) or a keypoint drawing, "
                                           "used as is. Without it the hint is black (no pose constraint), as in the "
                                           "reference pipeline."),
                    io.Mask.Input("mask", optional=True,
                                  tooltip="Optional mask: the identity (and, with mask_scope 'prompt and identity', this "
                                          "positive prompt) act only inside it; chain two for two people."),
                    _on_no_face_input("passes the conditioning through unchanged and says so on the node"),
                    _face_index_input("each reference photo (not of image_kps, which uses its largest)"),
                    *_region_inputs("InfuseNet", "InfuseNet"),
                    FaceEmbedsType.Input("face_embeds", optional=True,
                                         tooltip="A saved identity ('InstantID Load Identity (Face Embeds)') used instead of image. "
                                                 "It must hold the IR-SE50 embedding: save it from an InfiniteYou run."),
                    io.Float.Input("infusenet_guidance", default=1.0, min=-1.0, max=100.0, step=0.1, optional=True,
                                   tooltip="The guidance the InfuseNet sees: 1.0 as in the reference pipeline (the model "
                                           "keeps the FluxGuidance value); -1 gives it ComfyUI's FluxGuidance value too.")],
            outputs=[io.Conditioning.Output(display_name="positive", tooltip="Positive conditioning with the InfuseNet."),
                     io.Conditioning.Output(display_name="negative", tooltip="Negative conditioning with the InfuseNet "
                                                                             "(no residuals on its rows)."),
                     FaceEmbedsType.Output(display_name="FACE_EMBEDS",
                                           tooltip="The identity with its IR-SE50 embedding and identity tokens, for "
                                                   "'InstantID Save Identity (Face Embeds)' and Face Similarity.")])

    @classmethod
    def execute(cls, infiniteyou: Any, control_net: Any, vae: Any, positive: Any, negative: Any, strength: float,
                start_at: float, end_at: float, insightface: Any = None, image: Any = None, image_kps: Any = None,
                mask: Any = None, on_no_face: str = "error", face_index: int = 0, face_region: bool = False,
                mask_scope: str = PROMPT_AND_IDENTITY, face_embeds: Any = None,
                infusenet_guidance: float = 1.0) -> io.NodeOutput:
        outcome = apply_infiniteyou(model=infiniteyou, control_net=control_net, vae=vae, positive=positive,
                                    negative=negative, face_analysis=insightface, image=image, strength=strength,
                                    start_at=start_at, end_at=end_at, image_kps=image_kps, mask=mask,
                                    on_no_face=on_no_face, face_index=face_index, face_region=face_region,
                                    mask_scope=mask_scope, face_embeds=face_embeds,
                                    infusenet_guidance=infusenet_guidance, numbers=_numbers(cls, locals()))
        return io.NodeOutput(outcome.positive, outcome.negative, outcome.face_embeds, ui=_notes_ui(outcome.notes))


NODES: list[type[io.ComfyNode]] = [InstantIDModelLoader, InstantIDFaceAnalysis, FaceKeypointsPreprocessor, ApplyInstantID,
                                   ApplyInstantIDAdvanced, InstantIDAttentionPatch, ApplyInstantIDControlNet,
                                   InstantIDFaceSimilarity, InstantIDFaceCrop, InstantIDFacePaste, InstantIDSaveFaceEmbeds,
                                   InstantIDLoadFaceEmbeds, InfiniteYouModelLoader, ApplyInfiniteYou]


class InstantIDExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> InstantIDExtension:
    return InstantIDExtension()
