"""Identity where it belongs: the IdentityNet attends to its own face tokens while every other
ControlNet of a chain keeps the text; the face-region mode, identity-only masks and the separate
IdentityNet schedule confine the identity in space and time; two people share one prompt."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ADAPTER_BIN, IDENTITYNET_NAME, UNET_NAME
from support import antelope
from support.old_route import attach_identitynet_through_conditioning
from test_apply import face_photo, load_kit, sample, seeded_conditioning

LATENT = (16, 24)  # a latent whose aspect (3:2) differs from the square keypoint images


@pytest.fixture(scope="module")
def kit(comfy):
    return load_kit(comfy)


@pytest.fixture
def old_route(comfy, monkeypatch):
    """Makes the Apply nodes attach the IdentityNet as the pack did before (tokens on the conditioning)."""
    def use() -> None:
        monkeypatch.setattr(comfy.pack_module("instantid.apply"), "attach_identitynet",
                            attach_identitynet_through_conditioning)
    return use


def bgr(image: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray((image[0].numpy() * 255).round().astype(np.uint8)[..., ::-1])


def tokens_of(kit: Any, image: torch.Tensor) -> Any:
    """The face tokens of an image's face, from the adapter directly."""
    return kit.adapter.face_tokens(torch.tensor(kit.analyzer.detect(bgr(image)).embedding)[None])


def half_mask(side: str, height: int = 40, width: int = 60) -> torch.Tensor:
    mask = torch.zeros(1, height, width)
    if side == "left":
        mask[..., : width // 2] = 1
    else:
        mask[..., width // 2:] = 1
    return mask


def get_control(control: Any, model: Any, sigma: float, rows: int = 2, cond_or_uncond: tuple = (1, 0),
                latent: tuple[int, int] = LATENT) -> dict:
    """The residuals a control object returns for one crafted batched call (seeded inputs)."""
    sampling = model.get_model_object("model_sampling")
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(rows, 4, *latent, generator=generator)
    cond = {"c_crossattn": torch.randn(rows, 77, 2048, generator=generator),
            "y": torch.randn(rows, 2816, generator=generator)}
    control.pre_run(model.model, lambda percent: sampling.percent_to_sigma(percent))
    try:
        with torch.no_grad():
            return control.get_control(x, torch.full((rows,), sigma), cond, len(cond_or_uncond),
                                       {"cond_or_uncond": list(cond_or_uncond)})
    finally:
        control.cleanup()


def residual_list(control: dict) -> list[torch.Tensor]:
    return [x for name in ("input", "middle", "output") for x in control.get(name, []) if x is not None]


def face_term(model: Any, key: tuple, sigma: float, latent: tuple[int, int] = LATENT, latents: int = 1) -> torch.Tensor:
    """What the attn2 patch at `key` adds to the text attention in a crafted call: [2, latents, h, w, width]
    (cond and uncond chunks)."""
    import comfy.ldm.modules.attention as comfy_attention
    from instantid.sdxl import ATTN2_KEYS, attn2_widths
    width = attn2_widths(model.model.diffusion_model)[ATTN2_KEYS.index(key)]
    scale = {"input": {4: 2, 5: 2, 7: 4, 8: 4}, "middle": {0: 4}, "output": {0: 4, 1: 4, 2: 4, 3: 2, 4: 2, 5: 2}}
    h, w = latent[0] // scale[key[0]][key[1]], latent[1] // scale[key[0]][key[1]]
    generator = torch.Generator().manual_seed(9)
    q = torch.randn(2 * latents, h * w, width, generator=generator)
    text = torch.randn(2 * latents, 77, width, generator=generator)
    heads = width // 64
    options = {"n_heads": heads, "cond_or_uncond": [1, 0], "sigmas": torch.full((latents,), sigma),
               "activations_shape": [2 * latents, width, h, w], "original_shape": [2 * latents, 4, *latent],
               "attn_precision": None}
    patch = model.model_options["transformer_options"]["patches_replace"]["attn2"][key]
    term = patch(q, text, text, options) - comfy_attention.optimized_attention(q, text, text, heads)
    return term.reshape(2, latents, h, w, width)


def placed_face_box(bbox: np.ndarray, size: int, latent: tuple[int, int] = LATENT) -> torch.Tensor:
    """The face box of a size x size keypoint image, placed on the latent's pixels by ComfyUI's own
    hint placement (comfy.utils.common_upscale, 'nearest-exact', centre crop): [1, 1, 8h, 8w]."""
    import comfy.utils
    canvas = torch.zeros(1, 1, size, size)
    x1, y1, x2, y2 = (int(v) for v in bbox)
    canvas[..., max(y1, 0):y2, max(x1, 0):x2] = 1
    return comfy.utils.common_upscale(canvas, latent[1] * 8, latent[0] * 8, "nearest-exact", "center")


def sigma_at(kit: Any, percent: float) -> float:
    return float(kit.model.get_model_object("model_sampling").percent_to_sigma(percent))


# ------------------------------------------------------------------ the IdentityNet's context --


@pytest.mark.parametrize("mask", [None, "left"])
def test_plain_case_samples_the_latent_of_the_old_route_bit_for_bit(kit, old_route, mask):
    overrides = {} if mask is None else {"mask": half_mask(mask), "mask_scope": "prompt and identity"}
    control_model = kit.control_net.control_model
    original, contexts = control_model.forward, []

    def forward(*args, **kwargs):
        contexts.append(kwargs["context"])
        return original(*args, **kwargs)
    control_model.forward = forward
    try:
        new = sample(*kit.apply(**overrides))
        old_route()
        (model, positive, negative) = kit.apply(**overrides)
        assert positive[0][1]["cross_attn_controlnet"] is not None  # really the old route
        old = sample(model, positive, negative)
    finally:
        del control_model.forward
    assert torch.equal(new, old)
    assert len(contexts) == 4 and all(c.shape == (2, 16, 2048) for c in contexts)  # the IdentityNet ran on each step
    assert all(torch.equal(a, b) for a, b in zip(contexts[:2], contexts[2:]))


def test_each_controlnet_of_a_chain_attends_to_its_own_context_on_every_step(kit):
    """Text ControlNets before and after two chained InstantIDs (two identities): the IdentityNets see
    their own face tokens on positive rows and uncond tokens on negative rows, the others the text."""
    import nodes as comfy_nodes
    (before,) = comfy_nodes.ControlNetLoader().load_controlnet(IDENTITYNET_NAME)
    (after,) = comfy_nodes.ControlNetLoader().load_controlnet(IDENTITYNET_NAME)
    models = {"before": before.control_model, "identity": kit.control_net.control_model, "after": after.control_model}
    assert len({id(m) for m in models.values()}) == 3
    apply_controlnet = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet
    hints = torch.rand(2, 1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    second_face = face_photo(cell=(6, 5), red=240)
    positive, negative = seeded_conditioning(1), seeded_conditioning(2)
    texts = {"positive text": positive[0][0][0], "negative text": negative[0][0][0]}
    positive, negative = apply_controlnet(positive, negative, before, hints[0], 0.5, 0.0, 1.0)
    (model, positive, negative) = kit.apply(positive=positive, negative=negative)
    (model, positive, negative) = kit.apply(model=model, positive=positive, negative=negative, image=second_face)
    positive, negative = apply_controlnet(positive, negative, after, hints[1], 0.5, 0.0, 1.0)
    first, second = tokens_of(kit, kit.image), tokens_of(kit, second_face)
    assert not torch.allclose(first.cond, second.cond, atol=1e-3)
    known = {"positive text": texts["positive text"], "negative text": texts["negative text"],
             "first face": first.cond[0], "second face": second.cond[0], "uncond": first.uncond[0]}
    calls: list[tuple[str, list[str]]] = []

    def spy(name: str, module: Any) -> Any:
        original = module.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            context = kwargs["context"]
            rows = [next((label for label, value in known.items()
                          if value.shape == row.shape and torch.allclose(row.float(), value, atol=1e-5)), "other")
                    for row in context]
            calls.append((name, rows))
            return original(*args, **kwargs)
        return forward

    for name, module in models.items():
        module.forward = spy(name, module)
    try:
        sample(model, positive, negative, steps=2)
    finally:
        for module in models.values():
            del module.forward
    assert [name for name, _ in calls] == ["before", "identity", "identity", "after"] * 2  # one batched pass per step
    for step in range(2):
        before_rows, first_rows, second_rows, after_rows = (rows for _, rows in calls[4 * step:4 * step + 4])
        assert sorted(before_rows) == ["negative text", "positive text"] and after_rows == before_rows
        positive_rows = [row == "positive text" for row in before_rows]
        assert first_rows == ["first face" if p else "uncond" for p in positive_rows]
        assert second_rows == ["second face" if p else "uncond" for p in positive_rows]


def test_identitynet_copy_keeps_its_tokens_and_region(kit):
    (_, positive, negative) = kit.apply(face_region=True)
    control = positive[0][1]["control"]
    copied = control.copy()
    assert type(copied) is type(control) and copied.face_tokens is not None
    assert all(a is b for a, b in zip(copied.face_tokens, control.face_tokens)) and copied.region is control.region
    assert copied.control_model is control.control_model  # no weight copy
    assert negative[0][1]["control"] is control


# ------------------------------------------------------------------------------- face region --


def test_face_region_confines_identitynet_and_face_attention_to_the_face_box(kit):
    pose = face_photo(cell=(12, 12))  # face off-centre, in a square image
    bbox = kit.analyzer.detect(bgr(pose)).bbox
    (plain_model, plain, _) = kit.apply(image_kps=pose)
    (model, positive, negative) = kit.apply(image_kps=pose, face_region=True)
    assert "mask" not in positive[0][1]  # the text conditioning is untouched
    assert positive[0][1]["control"].region is not None and plain[0][1]["control"].region is None
    placed = placed_face_box(bbox, pose.shape[1])
    sigma = sigma_at(kit, 0.3)
    confined, full = (residual_list(get_control(c[0][1]["control"], kit.model, sigma)) for c in (positive, plain))
    assert len(confined) == 10  # 9 down residuals and the middle block
    resolutions = set()
    for got, unconfined in zip(confined, full):
        region = F.interpolate(placed, size=got.shape[-2:], mode="bilinear", align_corners=False)
        resolutions.add(tuple(got.shape[-2:]))
        assert torch.equal(got, unconfined * region)
        assert (region == 0).any() and not got[(region == 0).expand_as(got)].any()  # exactly zero outside
        inside = (region == 1).expand_as(got)
        assert torch.equal(got[inside], unconfined[inside])  # unchanged inside
    assert resolutions == {LATENT, (8, 12), (4, 6)}
    for key in (("input", 4, 0), ("input", 7, 1), ("middle", 0, 3), ("output", 5, 1)):
        term, plain_term = face_term(model, key, sigma), face_term(plain_model, key, sigma)
        region = F.interpolate(placed, size=term.shape[2:4], mode="nearest")[0, 0]
        assert plain_term.abs().mean() > 1e-3
        assert (region == 0).any() and not term[:, :, region == 0].any()  # exactly zero outside
        assert torch.equal(term[:, :, region == 1], plain_term[:, :, region == 1])


def test_face_region_centre_is_the_drawn_nose_after_comfyui_crop(kit):
    import comfy.utils
    pose = face_photo(cell=(12, 13))
    (_, positive, _) = kit.apply(image_kps=pose, face_region=True)
    control = positive[0][1]["control"]
    region = control.region.factor(LATENT, LATENT, 1, 1, "bilinear", torch.device("cpu"), torch.float32)[0, 0]
    ys, xs = torch.meshgrid(torch.arange(LATENT[0]) + 0.5, torch.arange(LATENT[1]) + 0.5, indexing="ij")
    centre = ((region * xs).sum() / region.sum(), (region * ys).sum() / region.sum())
    hint = comfy.utils.common_upscale(control.cond_hint_original, LATENT[1] * 8, LATENT[0] * 8, "nearest-exact", "center")
    nose = (hint[0, 0] == 0) & (hint[0, 1] == 0) & (hint[0, 2] == 1)  # the blue dot
    nose_y, nose_x = (index.float().mean() + 0.5 for index in torch.nonzero(nose, as_tuple=True))
    assert nose.sum() > 20
    assert abs(float(centre[0]) - float(nose_x) / 8) <= 1 and abs(float(centre[1]) - float(nose_y) / 8) <= 1
    # The crop matters here: placed by stretching instead, the centre would be off by more than a pixel.
    stretched_y = (kit.analyzer.detect(bgr(pose)).bbox[[1, 3]].mean() / pose.shape[1]) * LATENT[0]
    assert abs(stretched_y - float(centre[1])) > 1


def test_controlnet_node_face_region_is_the_extent_of_the_drawn_keypoints(kit):
    (keypoints,) = kit.run_node("FaceKeypointsPreprocessor", faceanalysis=kit.analyzer, image=face_photo(cell=(12, 12)))
    (_, tokens) = kit.apply("InstantIDAttentionPatch")
    common = dict(face_embeds=tokens, control_net=kit.control_net, image_kps=keypoints, positive=seeded_conditioning(1),
                  negative=seeded_conditioning(2), strength=1.0, start_at=0.0, end_at=1.0)
    (positive, _) = kit.run_node("ApplyInstantIDControlNet", face_region=True, **common)
    (plain, _) = kit.run_node("ApplyInstantIDControlNet", **common)
    ys, xs = np.nonzero(keypoints[0].numpy().max(axis=-1) > 0)
    box = np.zeros(keypoints.shape[1:3], np.float32)
    box[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = 1
    assert torch.equal(positive[0][1]["control"].region.face_box[0, 0], torch.from_numpy(box))
    placed = placed_face_box(np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]), keypoints.shape[1])
    sigma = sigma_at(kit, 0.3)
    for got, unconfined in zip(*(residual_list(get_control(c[0][1]["control"], kit.model, sigma)) for c in (positive, plain))):
        assert torch.equal(got, unconfined * F.interpolate(placed, size=got.shape[-2:], mode="bilinear", align_corners=False))


# ------------------------------------------------------------------------------- mask scope --


def test_identity_only_mask_keeps_the_prompt_global_and_confines_the_identity(kit):
    mask = half_mask("left")
    (model, positive, negative) = kit.apply(mask=mask, mask_scope="identity only")
    (regional_model, regional, _) = kit.apply(mask=mask)
    (_, plain, _) = kit.apply()
    assert all("mask" not in entry[1] for entry in positive + negative)
    assert torch.equal(regional[0][1]["mask"], mask)  # the default scope keeps today's regional prompt
    sigma = sigma_at(kit, 0.3)
    confined, full = (residual_list(get_control(c[0][1]["control"], kit.model, sigma)) for c in (positive, plain))
    for got, unconfined in zip(confined, full):
        region = F.interpolate(mask[:, None], size=got.shape[-2:], mode="bilinear", align_corners=False)
        assert torch.equal(got, unconfined * region)
        assert not got[..., got.shape[-1] // 2 + 1:].any()  # the right half: exactly zero
    # The face attention uses the mask the same way in both scopes (zero outside it).
    for key in (("input", 5, 1), ("middle", 0, 0)):
        term = face_term(model, key, sigma)
        assert torch.equal(term, face_term(regional_model, key, sigma))
        assert term[..., : term.shape[3] // 2 - 1, :].abs().mean() > 1e-3
        assert not term[..., term.shape[3] // 2 + 1:, :].any()


def test_face_attention_mask_rows_are_todays(kit, comfy):
    """The mask path of the face attention now goes through the region; its rows equal today's formula."""
    regions = comfy.pack_module("instantid.regions")
    mask = torch.rand(2, 37, 53, generator=torch.Generator().manual_seed(1))
    region = regions.IdentityRegion(mask=mask)
    for size, rows, chunks in (((8, 12), 6, 2), ((4, 6), 2, 2), ((3, 5), 3, 1)):
        per_chunk = rows // chunks
        today = F.interpolate(mask[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        today = torch.cat([today, today[-1:].expand(per_chunk - 2, *size)]) if per_chunk > 2 else today[:per_chunk]
        today = today.reshape(per_chunk, -1, 1, 1).repeat(chunks, 1, 1, 1)
        got = region.factor(size, None, rows, chunks, "nearest", torch.device("cpu"), torch.float32)
        assert torch.equal(got.reshape(rows, -1, 1, 1), today)


def test_face_region_and_mask_together_use_their_product(kit):
    pose = face_photo(cell=(12, 12))
    mask = half_mask("left", 64, 64)
    (_, both, _) = kit.apply(image_kps=pose, face_region=True, mask=mask, mask_scope="identity only")
    (_, plain, _) = kit.apply(image_kps=pose)
    placed = placed_face_box(kit.analyzer.detect(bgr(pose)).bbox, pose.shape[1])
    sigma = sigma_at(kit, 0.3)
    for got, unconfined in zip(*(residual_list(get_control(c[0][1]["control"], kit.model, sigma)) for c in (both, plain))):
        size = got.shape[-2:]
        product = (F.interpolate(mask[:, None], size=size, mode="bilinear", align_corners=False)
                   * F.interpolate(placed, size=size, mode="bilinear", align_corners=False))
        assert torch.equal(got, unconfined * product)


def test_unknown_mask_scope_is_refused(kit):
    with pytest.raises(ValueError, match=r"^mask_scope is 'face only'; choose one of 'prompt and identity', 'identity only'"):
        kit.apply(mask=half_mask("left"), mask_scope="face only")


# ---------------------------------------------------------------------- IdentityNet schedule --


def test_identitynet_and_face_attention_run_exactly_in_their_own_windows(kit):
    import comfy.ldm.modules.attention as comfy_attention
    import comfy.samplers
    steps = 4
    (model, positive, negative) = kit.apply(start_at=0.0, end_at=0.5, cn_start_at=0.4, cn_end_at=1.0)
    assert positive[0][1]["control"].timestep_percent_range == (0.4, 1.0)
    sampling = kit.model.get_model_object("model_sampling")
    sigmas = [float(s) for s in comfy.samplers.calculate_sigmas(sampling, "normal", steps)[:-1]]
    expected_attention = [sigma_at(kit, 0.5) <= s <= sigma_at(kit, 0.0) for s in sigmas]
    expected_identitynet = [sigma_at(kit, 1.0) <= s <= sigma_at(kit, 0.4) for s in sigmas]
    assert expected_attention != expected_identitynet and any(expected_attention) and not all(expected_attention)
    calls = {"identitynet": [], "attention": []}
    probe = model.clone()
    key = ("middle", 0, 0)
    patch = probe.model_options["transformer_options"]["patches_replace"]["attn2"][key]

    def watched(q, k, v, extra_options):
        out = patch(q, k, v, extra_options)
        calls["attention"][-1] |= bool((out - comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"])).any())
        return out
    probe.set_model_attn2_replace(watched, *key)

    identitynet_ran = [False]  # ComfyUI runs the ControlNets of a step before that step's UNet call

    def per_step(apply_model, args):
        calls["identitynet"].append(identitynet_ran[0])
        calls["attention"].append(False)
        identitynet_ran[0] = False
        return apply_model(args["input"], args["timestep"], **args["c"])
    probe.set_model_unet_function_wrapper(per_step)
    control_model = kit.control_net.control_model
    original = control_model.forward

    def forward(*args, **kwargs):
        identitynet_ran[0] = True
        return original(*args, **kwargs)
    control_model.forward = forward
    try:
        sample(probe, positive, negative, steps=steps)
    finally:
        del control_model.forward
    assert calls == {"identitynet": expected_identitynet, "attention": expected_attention}


def test_minus_one_follows_the_shared_schedule(kit):
    (_, positive, _) = kit.apply(start_at=0.2, end_at=0.7)
    assert positive[0][1]["control"].timestep_percent_range == (0.2, 0.7)
    (_, positive, _) = kit.apply(start_at=0.2, end_at=0.7, cn_start_at=0.0, cn_end_at=-1.0)
    assert positive[0][1]["control"].timestep_percent_range == (0.0, 0.7)


# ----------------------------------------------------------------------------- two people --


def write_face(path, cell: tuple[int, int], red: int = 255, size: int = 320) -> str:
    from PIL import Image
    pixels = np.zeros((size, size, 3), np.uint8)
    antelope.draw_face(pixels, cell, 128, antelope.det_scale_for(size, size, 640), red=red)
    Image.fromarray(pixels).save(path, format="PNG")
    return path.name


def two_people_prompt(input_dir) -> dict:
    """One shared prompt, two chained Apply InstantID nodes, each with its own face, pose and
    'identity only' half mask (the graph of "workflows/09 Two people in one image.json", which takes
    both poses from one photo)."""
    input_dir.mkdir(parents=True, exist_ok=True)
    def node(kind: str, **inputs: Any) -> dict:
        return {"class_type": kind, "inputs": inputs}
    prompt = {
        "1": node("TestBedTinyCheckpoint", unet_name=UNET_NAME),
        "2": node("InstantIDModelLoader", instantid_file=ADAPTER_BIN),
        "3": node("InstantIDFaceAnalysis", provider="CPU"),
        "4": node("ControlNetLoader", control_net_name=IDENTITYNET_NAME),
        "5": node("TestBedRandomConditioning", seed=1, tokens=77),
        "6": node("TestBedRandomConditioning", seed=2, tokens=77),
        "7": node("LoadImage", image=write_face(input_dir / "person_a.png", (4, 3))),
        "8": node("LoadImage", image=write_face(input_dir / "person_b.png", (6, 5), red=240)),
        "9": node("LoadImage", image=write_face(input_dir / "pose_left.png", (5, 9))),
        "10": node("LoadImage", image=write_face(input_dir / "pose_right.png", (14, 9))),
        "11": node("SolidMask", value=0.0, width=64, height=64),
        "12": node("SolidMask", value=1.0, width=32, height=64),
        "13": node("MaskComposite", destination=["11", 0], source=["12", 0], x=0, y=0, operation="add"),
        "14": node("MaskComposite", destination=["11", 0], source=["12", 0], x=32, y=0, operation="add"),
        "15": node("ApplyInstantID", instantid=["2", 0], insightface=["3", 0], control_net=["4", 0], image=["7", 0],
                   model=["1", 0], positive=["5", 0], negative=["6", 0], weight=0.8, start_at=0.0, end_at=1.0,
                   image_kps=["9", 0], mask=["13", 0], mask_scope="identity only"),
        "16": node("ApplyInstantID", instantid=["2", 0], insightface=["3", 0], control_net=["4", 0], image=["8", 0],
                   model=["15", 0], positive=["15", 1], negative=["15", 2], weight=0.8, start_at=0.0, end_at=1.0,
                   image_kps=["10", 0], mask=["14", 0], mask_scope="identity only"),
        "17": node("EmptyLatentImage", width=64, height=64, batch_size=1),
        "18": node("KSampler", model=["16", 0], positive=["16", 1], negative=["16", 2], latent_image=["17", 0], seed=3,
                   steps=2, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0),
        "19": node("TestBedLatentStats", samples=["18", 0]),
    }
    return prompt


def test_two_people_share_one_prompt_each_identity_in_its_own_half(comfy, kit, sampler_spy):
    result = comfy.run(two_people_prompt(comfy.base / "input"))
    assert result.success, result.error_text()
    assert result.outputs["19"]["latent"][0]["finite"]
    (seen,) = sampler_spy
    positive, negative = seen["positive"], seen["negative"]
    assert len(positive) == 1 and "mask" not in positive[0][1]  # one global prompt
    second = positive[0][1]["control"]
    first = second.previous_controlnet
    assert negative[0][1]["control"] is second and first.previous_controlnet is None
    assert not torch.allclose(first.face_tokens[0], second.face_tokens[0], atol=1e-3)
    sigma = sigma_at(kit, 0.3)
    first_only = residual_list(get_control(first, seen["model"], sigma, latent=(8, 8)))
    chain = residual_list(get_control(second, seen["model"], sigma, latent=(8, 8)))
    for alone, both in zip(first_only, chain):  # the half masks stay exact halves at 8, 4 and 2 columns
        half = both.shape[-1] // 2
        second_own = both - alone  # exact where either is zero
        assert not alone[..., half:].any() and alone[..., :half].abs().sum() > 0
        assert not second_own[..., :half].any() and second_own[..., half:].abs().sum() > 0
    # The face attention of each identity: zero in the other half.
    face_patch = seen["model"].model_options["transformer_options"]["patches_replace"]["attn2"][("input", 4, 0)]
    assert len(face_patch.branches) == 2
    attention = comfy.pack_module("instantid.attention")
    import comfy.ldm.modules.attention as comfy_attention
    generator = torch.Generator().manual_seed(2)
    q, text = torch.randn(2, 16, 64, generator=generator), torch.randn(2, 77, 64, generator=generator)
    options = {"n_heads": 1, "cond_or_uncond": [0, 1], "sigmas": torch.full((1,), sigma),
               "activations_shape": [2, 64, 4, 4], "original_shape": [2, 4, 8, 8], "attn_precision": None}
    left, right = slice(0, 2), slice(2, 4)  # columns of the 4x4 layer
    for branch, (inside, outside) in zip(face_patch.branches, ((left, right), (right, left))):
        single = attention.FaceAttentionPatch(branches=(branch,))
        term = (single(q, text, text, options) - comfy_attention.optimized_attention(q, text, text, 1)).reshape(2, 4, 4, 64)
        assert term[:, :, inside].abs().mean() > 1e-3 and not term[:, :, outside].any()
