"""The InstantID nodes on the ComfyUI test bed: every cross-attention key fires once per UNet call,
the patched UNet equals an independent computation of the official formula, and the IdentityNet
sees the face tokens."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from conftest import ADAPTER_BIN, IDENTITYNET_NAME, UNET_NAME
from support import antelope
from support.reference import reference_attention, reference_resampler

FACE_CELL, FACE_GREEN, FACE_SIZE = (4, 3), 128, 320


def face_photo(cell: tuple[int, int] = FACE_CELL, g: int = FACE_GREEN, size: int = FACE_SIZE, red: int = 255) -> torch.Tensor:
    """A ComfyUI IMAGE [1, H, W, 3] holding one synthetic face the fake detector finds (its
    embedding depends on the marker's colour, not on where it is)."""
    pixels = np.zeros((size, size, 3), np.uint8)
    antelope.draw_face(pixels, cell, g, antelope.det_scale_for(size, size, 640), red=red)
    return torch.from_numpy(pixels).float()[None] / 255.0


def seeded_conditioning(seed: int, tokens: int = 77) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, 2048, generator=generator), {"pooled_output": torch.randn(1, 1280, generator=generator)}]]


@dataclass
class Kit:
    nodes: Any            # the pack's nodes module as ComfyUI loaded it
    adapter: Any
    analyzer: Any
    control_net: Any
    model: Any
    state: dict           # the adapter file's raw tensors, for the references
    image: torch.Tensor

    def run_node(self, node_id: str, **inputs: Any) -> tuple:
        return tuple(getattr(self.nodes, node_id).execute(**inputs).args)

    def apply(self, node_id: str = "ApplyInstantIDAdvanced", **overrides: Any) -> tuple:
        common = dict(instantid=self.adapter, insightface=self.analyzer, image=self.image, model=self.model,
                      start_at=0.0, end_at=1.0)
        if node_id == "InstantIDAttentionPatch":
            inputs = dict(common, weight=0.8, noise=0.0)
        else:
            inputs = dict(common, control_net=self.control_net, positive=seeded_conditioning(1),
                          negative=seeded_conditioning(2))
            inputs.update(dict(weight=0.8) if node_id == "ApplyInstantID" else
                          dict(ip_weight=0.8, cn_strength=0.8, noise=0.0, combine_embeds="average"))
        inputs.update(overrides)
        return self.run_node(node_id, **inputs)


def load_kit(comfy: Any, kit_class: type[Kit] = Kit, image: torch.Tensor | None = None) -> Kit:
    """The pack's loaders and ComfyUI's on the bed's models, as a graph would run them."""
    import nodes as comfy_nodes
    pack_nodes = comfy.pack_module("nodes")
    (adapter,) = pack_nodes.InstantIDModelLoader.execute(instantid_file=ADAPTER_BIN).args
    (analyzer,) = pack_nodes.InstantIDFaceAnalysis.execute(provider="CPU").args
    (control_net,) = comfy_nodes.ControlNetLoader().load_controlnet(IDENTITYNET_NAME)
    (model,) = comfy_nodes.UNETLoader().load_unet(UNET_NAME, "default")
    state = torch.load(comfy.base / "models" / "instantid" / ADAPTER_BIN, weights_only=True)
    return kit_class(pack_nodes, adapter, analyzer, control_net, model, state, face_photo() if image is None else image)


@pytest.fixture(scope="module")
def kit(comfy) -> Kit:
    return load_kit(comfy)


def attn2_patches(model: Any) -> dict:
    return model.model_options["transformer_options"]["patches_replace"]["attn2"]


def sample(model: Any, positive: list, negative: list, steps: int = 2, seed: int = 0) -> torch.Tensor:
    import comfy.sample
    latent = torch.zeros(1, 4, 8, 8)
    return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, seed), steps, 5.0, "euler", "normal",
                               positive, negative, latent, denoise=1.0, seed=seed, disable_pbar=True)


@pytest.mark.parametrize("node_id", ["ApplyInstantID", "ApplyInstantIDAdvanced", "InstantIDAttentionPatch"])
def test_every_sdxl_cross_attention_key_fires_once_per_unet_call(kit, node_id):
    from instantid.sdxl import ATTN2_KEYS
    outputs = kit.apply(node_id)
    patched = outputs[0]
    positive, negative = (outputs[1], outputs[2]) if node_id != "InstantIDAttentionPatch" else (seeded_conditioning(1), seeded_conditioning(2))
    patches = attn2_patches(patched)
    assert set(patches) == set(ATTN2_KEYS) and len(patches) == 70
    counts = dict.fromkeys(ATTN2_KEYS, 0)
    unet_calls = []

    def counting(key, patch):
        def call(q, k, v, extra_options):
            counts[key] += 1
            return patch(q, k, v, extra_options)
        return call

    probe = patched.clone()
    for key, patch in patches.items():
        probe.set_model_attn2_replace(counting(key, patch), *key)

    def count_unet_calls(apply_model, args):
        unet_calls.append(args["input"].shape[0])
        return apply_model(args["input"], args["timestep"], **args["c"])
    probe.set_model_unet_function_wrapper(count_unet_calls)
    sample(probe, positive, negative, steps=2)
    assert unet_calls == [2, 2]  # cond and uncond batched together, one UNet call per step
    assert counts == dict.fromkeys(ATTN2_KEYS, 2)


@contextlib.contextmanager
def official_cross_attention(diffusion_model: Any, face_kv: list | None, positive_rows: list[bool],
                             weight: float) -> Iterator[None]:
    """Replace the forward of each of the 70 cross-attention modules by the official InstantID
    formula, written independently: to_out(Attn(q, K_text, V_text) + w * Attn(q, K_face, V_face))."""
    from instantid.sdxl import ATTN2_KEYS, attn2_module
    originals = {}
    for position, key in enumerate(ATTN2_KEYS):
        module = attn2_module(diffusion_model, key)

        def forward(x, context=None, value=None, mask=None, transformer_options={}, _m=module, _p=position):
            q, k, v = _m.to_q(x), _m.to_k(context), _m.to_v(context)
            out = reference_attention(q, k, v, _m.heads)
            if face_kv is not None:
                kc, ku, vc, vu = face_kv[_p]
                k_face = torch.stack([kc if pos else ku for pos in positive_rows])
                v_face = torch.stack([vc if pos else vu for pos in positive_rows])
                out = out + weight * reference_attention(q, k_face, v_face, _m.heads)
            return _m.to_out(out.float())
        originals[module] = module.forward
        module.forward = forward
    try:
        yield
    finally:
        for module in originals:
            del module.forward


def reference_face_kv(kit: Kit) -> list:
    """Face K/V per layer from the adapter file's raw tensors and the synthetic recogniser's
    documented output for the drawn face: no pack code involved."""
    bgr = np.ascontiguousarray((kit.image[0].numpy() * 255).round().astype(np.uint8)[..., ::-1])
    _, kps = antelope.expected_face(FACE_CELL, FACE_GREEN, antelope.det_scale_for(FACE_SIZE, FACE_SIZE, 640))
    embedding = torch.from_numpy(antelope.expected_embedding(bgr, kps)).float()[None]
    cond = reference_resampler(kit.state["image_proj"], embedding)[0].double()
    uncond = reference_resampler(kit.state["image_proj"], torch.zeros(1, 512))[0].double()
    kv = []
    for position in range(70):
        wk = kit.state["ip_adapter"][f"{2 * position + 1}.to_k_ip.weight"].double()
        wv = kit.state["ip_adapter"][f"{2 * position + 1}.to_v_ip.weight"].double()
        kv.append((cond @ wk.T, uncond @ wk.T, cond @ wv.T, uncond @ wv.T))
    return kv


def unet_output(model: Any, transformer_options: dict, sigma: float, cond_or_uncond: list[int]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    texts = {0: torch.randn(77, 2048, generator=generator), 1: torch.randn(77, 2048, generator=generator)}
    adm = {0: torch.randn(2816, generator=generator), 1: torch.randn(2816, generator=generator)}
    sigmas = torch.full((2,), sigma)
    options = dict(transformer_options, cond_or_uncond=list(cond_or_uncond), sigmas=sigmas)
    with torch.no_grad():
        return model.model.apply_model(x, sigmas, c_crossattn=torch.stack([texts[i] for i in cond_or_uncond]),
                                       y=torch.stack([adm[i] for i in cond_or_uncond]), transformer_options=options)


@pytest.fixture(params=["comfy-default", "pytorch-sdpa"])
def attention_backend(request, monkeypatch):
    """ComfyUI's CPU default (sub-quadratic attention) takes the patch's generic path; its GPU
    default (pytorch SDPA) takes the fused path. Both must give the official result."""
    if request.param == "pytorch-sdpa":
        import comfy.ldm.modules.attention as attention
        monkeypatch.setattr(attention, "optimized_attention", attention.attention_pytorch)
    return request.param


@pytest.mark.parametrize("cond_or_uncond", [[0, 1], [1, 0]])
@pytest.mark.parametrize("window", ["inside", "outside"])
def test_patched_unet_equals_the_official_formula(kit, cond_or_uncond, window, attention_backend):
    sampling = kit.model.get_model_object("model_sampling")
    sigma = float(sampling.percent_to_sigma(0.3))
    start_at = 0.0 if window == "inside" else 0.5  # the window starts after the sigma of 30 %
    (patched, _, _) = kit.apply(ip_weight=0.8, start_at=start_at, end_at=1.0)
    got = unet_output(patched, patched.model_options["transformer_options"], sigma, cond_or_uncond)
    positive_rows = [i == 0 for i in cond_or_uncond]
    face_kv = reference_face_kv(kit) if window == "inside" else None
    with official_cross_attention(kit.model.model.diffusion_model, face_kv, positive_rows, 0.8):
        expected = unet_output(kit.model, {}, sigma, cond_or_uncond)
    plain = unet_output(kit.model, {}, sigma, cond_or_uncond)
    relative = ((got - expected).norm() / expected.norm()).item()
    assert relative < 1e-5, relative
    if window == "inside":
        assert ((plain - expected).norm() / expected.norm()).item() > 1e-3  # the face attention matters
    else:
        assert ((got - plain).norm() / plain.norm()).item() < 1e-6


def test_identitynet_sees_face_tokens_and_one_control_serves_both(kit):
    (patched, positive, negative) = kit.apply()
    control = positive[0][1]["control"]
    assert negative[0][1]["control"] is control
    assert positive[0][1]["control_apply_to_uncond"] is False
    face = kit.analyzer.detect(np.ascontiguousarray((kit.image[0].numpy() * 255).round().astype(np.uint8)[..., ::-1]))
    tokens = kit.adapter.face_tokens(torch.tensor(face.embedding)[None])
    seen = []
    control_model = control.control_model
    original = control_model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["context"].detach().clone())
        return original(*args, **kwargs)
    control_model.forward = spy
    try:
        sample(patched, positive, negative, steps=2)
    finally:
        del control_model.forward
    assert len(seen) == 2  # one batched ControlNet call per step
    for context in seen:
        assert context.shape == (2, 16, 2048)
        rows = {("cond" if torch.allclose(row, tokens.cond[0], atol=1e-5) else
                 "uncond" if torch.allclose(row, tokens.uncond[0], atol=1e-5) else "other") for row in context}
        assert rows == {"cond", "uncond"}


def test_apply_leaves_its_inputs_untouched(kit):
    positive, negative = seeded_conditioning(1), seeded_conditioning(2)
    before = attn2_patches(kit.model) if "patches_replace" in kit.model.model_options.get("transformer_options", {}) else None
    outputs = kit.apply(positive=positive, negative=negative)
    assert outputs[0] is not kit.model
    assert "control" not in positive[0][1] and "control" not in negative[0][1]
    assert before is None and "patches_replace" not in kit.model.model_options["transformer_options"]


class OtherPackAttn2Replace:
    """The attn2 replacement protocol IPAdapter_plus and PuLID use (`.add(callback, **kwargs)`,
    callbacks return a term to add while sigma_end <= sigma <= sigma_start), written from its
    description for this test."""

    def __init__(self, callback, **kwargs):
        self.callback, self.kwargs = [callback], [kwargs]

    def add(self, callback, **kwargs):
        self.callback.append(callback)
        self.kwargs.append(kwargs)

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention
        out = optimized_attention(q, k, v, extra_options["n_heads"])
        sigma = float(extra_options["sigmas"][0])
        for callback, kwargs in zip(self.callback, self.kwargs):
            if kwargs["sigma_end"] <= sigma <= kwargs["sigma_start"]:
                out = out + callback(out, q, k, v, extra_options, **kwargs)
        return out


def other_pack_term(out, q, k, v, extra_options, **kwargs):
    """A stand-in for another adapter's contribution (large, so it shows through the tiny UNet)."""
    return 500.0 * q


def with_other_pack(model):
    patched = model.clone()
    from instantid.sdxl import ATTN2_KEYS
    for key in ATTN2_KEYS:
        patched.set_model_attn2_replace(OtherPackAttn2Replace(other_pack_term, sigma_start=1e9, sigma_end=0.0), *key)
    return patched


def test_patches_of_other_packs_are_kept_in_either_order(kit):
    sigma = float(kit.model.get_model_object("model_sampling").percent_to_sigma(0.3))
    order = [1, 0]

    def output(model):
        return unet_output(model, model.model_options["transformer_options"], sigma, order)

    plain, other_only = output(kit.model), output(with_other_pack(kit.model))
    (ours_only, _, _) = kit.apply()
    instantid_term = output(ours_only) - plain
    other_term = other_only - plain
    assert other_term.abs().max() > 1e-4 and instantid_term.abs().max() > 1e-4
    # Other pack first, InstantID added through its .add protocol.
    (other_then_ours, _, _) = kit.apply(model=with_other_pack(kit.model))
    # InstantID first, the other pack adds its callback to our patch objects.
    ours_then_other = ours_only.clone()
    for patch in attn2_patches(ours_then_other).values():
        patch.add(other_pack_term, sigma_start=1e9, sigma_end=0.0)
    for combined in (output(other_then_ours), output(ours_then_other)):
        # Both small terms are present and add up (to first order: the UNet is nonlinear).
        assert (combined - plain - other_term - instantid_term).norm() < 0.2 * instantid_term.norm()
    torch.testing.assert_close(output(other_then_ours), output(ours_then_other), rtol=1e-4, atol=1e-4)
    # The source models were not changed by either composition.
    assert len(attn2_patches(ours_only)[("input", 4, 0)].callbacks) == 0


def test_plain_replacement_of_another_pack_is_wrapped_not_overwritten(kit):
    calls = []

    def plain_replacement(q, k, v, extra_options):
        calls.append(1)
        from comfy.ldm.modules.attention import optimized_attention
        return optimized_attention(q, k, v, extra_options["n_heads"])

    model = kit.model.clone()
    model.set_model_attn2_replace(plain_replacement, "middle", 0, 3)
    (patched, _, _) = kit.apply(model=model)
    patch = attn2_patches(patched)[("middle", 0, 3)]
    assert patch.base is plain_replacement and len(patch.branches) == 1
    sample(patched, seeded_conditioning(1), seeded_conditioning(2), steps=1)
    assert calls == [1]


def test_two_identities_stack_on_one_model(kit):
    (first, _, _) = kit.apply()
    (both, _, _) = kit.apply(model=first, image=face_photo(cell=(6, 5), red=240))
    patches = attn2_patches(both)
    assert all(len(patch.branches) == 2 for patch in patches.values())
    assert all(len(patch.branches) == 1 for patch in attn2_patches(first).values())
    k_first, k_second = (branch.k_face for branch in patches[("middle", 0, 0)].branches)
    assert not torch.allclose(k_first, k_second)


def test_changing_only_weight_or_schedule_reuses_faces_tokens_and_face_kv(kit):
    """ComfyUI re-executes Apply when a weight changes: no new detection, Resampler or projection."""
    calls = []
    detector = kit.analyzer.det_model
    real_detect = detector.detect

    def counting(*args, **kwargs):
        calls.append(kwargs.get("input_size"))
        return real_detect(*args, **kwargs)
    photo = face_photo(cell=(3, 6), red=250)  # an image no other test used: the first Apply detects
    detector.detect = counting
    try:
        (first, _, _) = kit.apply(image=photo, ip_weight=0.8)
        (second, _, _) = kit.apply(image=photo, ip_weight=0.5, cn_strength=0.3, start_at=0.2, end_at=0.9)
    finally:
        del detector.detect
    assert len(calls) == 1
    first_branch = attn2_patches(first)[("output", 0, 0)].branches[0]
    second_branch = attn2_patches(second)[("output", 0, 0)].branches[0]
    assert second_branch.k_face is first_branch.k_face  # the same tensors: nothing recomputed
    assert (first_branch.settings.weight, second_branch.settings.weight) == (0.8, 0.5)
