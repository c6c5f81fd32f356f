"""ApplyInfiniteYou in ComfyUI: the nodes as a graph runs them, on the test bed's synthetic face
models, InfiniteYou files with the real layout (models/infiniteyou) and a FLUX InfuseNet built at a
small width in ComfyUI's own ControlNet wrapper (what 'Load ControlNet Model' returns for it).

Acceptance lines of issue 18 tested here: a chained canny-style ControlNet after ApplyInfiniteYou
receives the text while the InfuseNet receives 8 identity tokens (recorded inside the forwards); a
second ApplyInfiniteYou keeps its own tokens; face_region makes the InfuseNet residuals zero outside
the face box; a photo without a face behaves as on_no_face says; the Apply copies no weights; IR-SE50
and the projection run once per reference, not per sampling step (issue 18, point 9).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from support import flux_reference as fr
from support.infiniteyou_models import write_infiniteyou_files
from test_apply import face_photo
from test_infiniteyou import run_control
from test_regions import bgr

LATENT = (8, 12)


@dataclass
class FluxKit:
    nodes: Any
    infiniteyou: Any
    analyzer: Any
    infusenet: Any      # CONTROL_NET: the InfuseNet as ComfyUI's loader wraps it
    canny: Any          # another FLUX ControlNet (InstantX layout), as a canny/depth one would be
    pair: dict          # the seeded step inputs (text, pooled, latent) the forwards run on

    def run_node(self, node_id: str, **inputs: Any) -> tuple:
        output = getattr(self.nodes, node_id).execute(**inputs)
        return tuple(output.args) + (output.ui,)

    def apply(self, **overrides: Any) -> tuple:
        inputs = dict(infiniteyou=self.infiniteyou, control_net=self.infusenet, vae=fr.StandInVAE(),
                      positive=[[self.pair["text"], {"pooled_output": self.pair["pooled"], "guidance": 3.5}]],
                      negative=[[self.pair["negative_text"], {"pooled_output": self.pair["negative_pooled"]}]],
                      insightface=self.analyzer, image=face_photo(), strength=1.0, start_at=0.0, end_at=1.0)
        inputs.update(overrides)
        return self.run_node("ApplyInfiniteYou", **inputs)

    def identity_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """The tokens of the image's largest face, computed here step by step."""
        face = self.analyzer.detect(bgr(image))
        embedding = self.infiniteyou.recognizer.embed(bgr(image), face.kps)
        return self.infiniteyou.identity_tokens(torch.from_numpy(embedding)[None])


@pytest.fixture(scope="module")
def kit(comfy) -> FluxKit:
    write_infiniteyou_files(comfy.base / "models" / "infiniteyou")
    nodes = comfy.pack_module("nodes")
    (infiniteyou, _) = FluxKit(nodes, None, None, None, None, {}).run_node(
        "InfiniteYouModelLoader", projection_file="image_proj_model.bin", recognizer_file="recognition_arcface_ir_se50.pth")
    (analyzer,) = nodes.InstantIDFaceAnalysis.execute(provider="CPU").args
    infusenet_model = fr.comfy_control_model(fr.diffusers_controlnet())
    canny_model = fr.comfy_control_model(fr.diffusers_controlnet(seed=11))
    g = torch.Generator().manual_seed(3)
    pair = {"latent": torch.randn(1, 16, *LATENT, generator=g), "text": torch.randn(1, 12, fr.CONTEXT, generator=g),
            "pooled": torch.randn(1, fr.POOLED, generator=g), "negative_text": torch.randn(1, 12, fr.CONTEXT, generator=g),
            "negative_pooled": torch.randn(1, fr.POOLED, generator=g)}
    return FluxKit(nodes, infiniteyou, analyzer, fr.comfy_controlnet(infusenet_model), fr.comfy_controlnet(canny_model),
                   pair)


class ContextSpy:
    """Records the context each ControlNet's forward receives, by name."""

    def __init__(self, models: dict[str, Any]) -> None:
        self.models, self.seen = models, []

    def __enter__(self) -> "ContextSpy":
        for name, model in self.models.items():
            def forward(*args: Any, _name: str = name, _real: Any = model.forward, **kwargs: Any) -> Any:
                self.seen.append((_name, kwargs["context"].clone()))
                return _real(*args, **kwargs)
            model.forward = forward
        return self

    def __exit__(self, *exc: Any) -> None:
        for model in self.models.values():
            del model.forward


def step_inputs(kit: FluxKit) -> dict:
    return {"latent": kit.pair["latent"], "text": kit.pair["text"], "pooled": kit.pair["pooled"],
            "negative_text": kit.pair["negative_text"], "negative_pooled": kit.pair["negative_pooled"]}


def test_chained_canny_gets_the_text_and_the_infusenet_eight_identity_tokens(kit):
    import nodes as comfy_nodes
    positive, negative, face_embeds, _ = kit.apply()
    hint = torch.rand(1, LATENT[0] * 8, LATENT[1] * 8, 3)
    positive, negative = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
        positive, negative, kit.canny, hint, 0.8, 0.0, 1.0, vae=fr.StandInVAE())
    chain = positive[0][1]["control"]
    assert chain.previous_controlnet is not None and chain.previous_controlnet.instantid_identitynet
    with ContextSpy({"canny": kit.canny.control_model, "infusenet": kit.infusenet.control_model}) as spy:
        run_control(chain, step_inputs(kit), 0.6, [0])
    assert [name for name, _ in spy.seen] == ["infusenet", "canny"]
    contexts = dict(spy.seen)
    assert torch.equal(contexts["canny"], kit.pair["text"])
    assert contexts["infusenet"].shape == (1, 8, 4096)
    torch.testing.assert_close(contexts["infusenet"], kit.identity_tokens(face_photo()), rtol=0, atol=1e-6)
    assert face_embeds.made_by == "infiniteyou" and torch.equal(face_embeds.tokens, contexts["infusenet"])


def test_a_second_apply_keeps_its_own_tokens(kit):
    second_face = face_photo(cell=(1, 1), g=40)
    positive, negative, _, _ = kit.apply()
    positive, negative, _, _ = kit.apply(positive=positive, negative=negative, image=second_face)
    second = positive[0][1]["control"]
    with ContextSpy({"infusenet": kit.infusenet.control_model}) as spy:
        run_control(second, step_inputs(kit), 0.6, [0])
    first_tokens, second_tokens = (context for _, context in spy.seen)
    torch.testing.assert_close(first_tokens, kit.identity_tokens(face_photo()), rtol=0, atol=1e-6)
    torch.testing.assert_close(second_tokens, kit.identity_tokens(second_face), rtol=0, atol=1e-6)
    assert not torch.allclose(first_tokens, second_tokens, atol=1e-3)


def test_face_region_makes_infusenet_residuals_zero_outside_the_face_box(kit, comfy):
    regions = comfy.pack_module("instantid.regions")
    pose = face_photo(cell=(1, 4))  # face off-centre
    confined, _, _, _ = kit.apply(image_kps=pose, face_region=True)
    plain, _, _, _ = kit.apply(image_kps=pose)
    got = run_control(confined[0][1]["control"], step_inputs(kit), 0.6, [0])
    full = run_control(plain[0][1]["control"], step_inputs(kit), 0.6, [0])
    box = kit.analyzer.detect(bgr(pose)).bbox
    placed = regions.place_like_hint(regions.face_box_canvas([box], pose.shape[2], pose.shape[1]), LATENT)
    grid = torch.nn.functional.interpolate(placed, size=regions.token_grid(LATENT), mode="bilinear",
                                           align_corners=False).reshape(-1)
    outside = grid == 0
    assert 0 < int(outside.sum()) < grid.numel()
    for confined_x, full_x in zip([*got["input"], *got["output"]], [*full["input"], *full["output"]]):
        assert float(confined_x[0, outside].abs().max()) == 0.0 < float(full_x[0, outside].abs().max())
        torch.testing.assert_close(confined_x[0], full_x[0] * grid[:, None], rtol=0, atol=1e-6)


def test_a_photo_without_a_face_does_what_on_no_face_says(kit, comfy):
    blank = torch.zeros(1, 128, 128, 3)
    with pytest.raises(comfy.pack_module("instantid.face_inputs").NoFaceError, match="on_no_face to 'skip'"):
        kit.apply(image=blank)
    positive = [[kit.pair["text"], {"pooled_output": kit.pair["pooled"]}]]
    negative = [[kit.pair["negative_text"], {}]]
    out_positive, out_negative, face_embeds, ui = kit.apply(image=blank, on_no_face="skip", positive=positive,
                                                            negative=negative)
    assert out_positive is positive and out_negative is negative and face_embeds is None
    assert "skipped" in ui.as_dict()["text"][0]


def test_apply_copies_no_weights_and_leaves_its_inputs_untouched(kit):
    positive = [[kit.pair["text"], {"pooled_output": kit.pair["pooled"]}]]
    negative = [[kit.pair["negative_text"], {}]]
    out_positive, out_negative, _, _ = kit.apply(positive=positive, negative=negative)
    control = out_positive[0][1]["control"]
    assert out_negative[0][1]["control"] is control  # one control object: ComfyUI batches both in one pass
    assert control.control_model is kit.infusenet.control_model
    assert control.control_model_wrapped is kit.infusenet.control_model_wrapped
    assert positive[0][1] == {"pooled_output": kit.pair["pooled"]} and negative[0][1] == {}


def test_irse50_and_projection_run_once_per_reference_not_per_step_and_no_weight_is_copied(kit):
    import comfy.sample
    from support.call_meter import CallMeter, copied_bytes
    from support.tiny_models import build_tiny_flux
    model = build_tiny_flux(**fr.flux_params(1, 1))  # ComfyUI's FLUX at the kit InfuseNet's width
    steps, latent = 4, torch.zeros(1, 16, *LATENT)
    infusenet = kit.infusenet.control_model
    metered = {"irse50": (kit.infiniteyou.recognizer.network, "forward"),
               "projection": (kit.infiniteyou.projection, "forward"), "infusenet": (infusenet, "forward")}
    with CallMeter(metered) as meter:
        positive, negative, _, _ = kit.apply(image=face_photo(g=90))  # a face no other test embeds: no cache hit
        applied = dict(meter.calls)
        comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 0), steps, 1.0, "euler", "simple", positive,
                            negative, latent, denoise=1.0, seed=0, disable_pbar=True)
    assert applied == {"irse50": 1, "projection": 1, "infusenet": 0}
    assert meter.calls == {"irse50": 1, "projection": 1, "infusenet": steps}  # the sampling run added forwards only
    control = positive[0][1]["control"]
    weights = sum(p.nbytes for p in infusenet.parameters())
    assert weights > 0 and copied_bytes(control.control_model, infusenet) == 0
    assert copied_bytes(control.control_model, fr.comfy_control_model(fr.diffusers_controlnet())) == weights


def test_saved_identities_carry_the_irse50_embedding_or_say_how_to_make_one(kit, comfy, tmp_path):
    files = comfy.pack_module("instantid.identity_files")
    _, _, face_embeds, _ = kit.apply()
    saved = files.save_identity(face_embeds, tmp_path / "flux.safetensors", label="Ada")
    loaded = files.load_identity(saved)
    assert set(loaded.identity.recognized) == {"arcface_ir_se50"}
    positive, _, _, _ = kit.apply(image=None, insightface=None, face_embeds=loaded)
    torch.testing.assert_close(positive[0][1]["control"].face_tokens[0], face_embeds.tokens, rtol=0, atol=0)
    identity = comfy.pack_module("instantid.identity")
    sdxl_embeds = identity.FaceEmbeds(dataclasses.replace(face_embeds.identity, recognized={}))  # as SDXL saves it
    sdxl_file = files.load_identity(files.save_identity(sdxl_embeds, tmp_path / "sdxl.safetensors"))
    with pytest.raises(ValueError, match="holds no arcface_ir_se50 face embedding.*Apply InfiniteYou"):
        kit.apply(image=None, face_embeds=sdxl_file)


def test_similarity_scores_with_irse50_when_given_the_recognizer(kit):
    photo, other = face_photo(), face_photo(cell=(1, 1), g=40)
    score, text, _, _, _ = kit.run_node("InstantIDFaceSimilarity", faceanalysis=kit.analyzer, reference=photo,
                                        image=other, recognizer=kit.infiniteyou)
    embed = kit.infiniteyou.recognizer.embed
    a, b = (embed(bgr(image), kit.analyzer.detect(bgr(image)).kps) for image in (photo, other))
    assert score == pytest.approx(float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)), abs=1e-6)
    assert text.startswith("face similarity by ArcFace IR-SE50 (InfiniteYou): ")
    antelope_score, antelope_text, _, _, _ = kit.run_node("InstantIDFaceSimilarity", faceanalysis=kit.analyzer,
                                                          reference=photo, image=other)
    assert antelope_text == f"face similarity: {antelope_score:.3f}" and antelope_score != pytest.approx(score)


def test_wrong_controlnet_and_guidance_are_refused_with_the_fix(kit, comfy):
    import nodes as comfy_nodes
    from support.server import IDENTITYNET_NAME
    (identitynet,) = comfy_nodes.ControlNetLoader().load_controlnet(IDENTITYNET_NAME)
    with pytest.raises(comfy.pack_module("instantid.checks").UnsupportedModelError,
                       match="an SDXL ControlNet.*not the InfiniteYou InfuseNet; load the InfuseNet"):
        kit.apply(control_net=identitynet)
    with pytest.raises(comfy.pack_module("instantid.checks").SettingError, match="infusenet_guidance is -0.5"):
        kit.apply(infusenet_guidance=-0.5)
    (positive, _, _, _) = kit.apply(infusenet_guidance=-1.0)
    assert positive[0][1]["control"].guidance is None  # the InfuseNet then sees the FluxGuidance value
