"""InfiniteYou (FLUX) against its reference, on identical random weights, and the FLUX Apply in
ComfyUI. Each parity test prints its figure (run with -s to see them; they are also recorded as
the test's properties): the largest difference over the largest size of the effect compared.

Parity: the IR-SE50 embedding (the pack's module vs the state dict through torch's functional ops);
the identity tokens (the pack's Resampler at InfiniteYou's sizes vs diffusers'
IPAdapterPlusImageProjection loaded by diffusers' own key converter); the InfuseNet residuals and
one full denoising step (the pack's identity ControlNet in ComfyUI vs diffusers' FluxControlNetModel
+ FluxTransformer2DModel called as pipeline_flux_infusenet.py calls them).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from support import flux_reference as fr
from support.infiniteyou_models import write_infiniteyou_files
from support.irse50_reference import irse50_forward

from instantid.infiniteyou import PROJECTION_CONFIG, ProjectionFileError, load_infiniteyou, load_projection
from instantid.irse50 import RecognizerFileError, aligned_face, load_irse50

PARITY = 1e-4


def report(record_property: Any, name: str, difference: float, effect: float) -> float:
    """Record and print one parity figure: the difference relative to the effect's size."""
    ratio = difference / effect
    record_property(name, f"{ratio:.2e}")
    print(f"\nPARITY {name}: max |pack - reference| = {difference:.3e}, effect size {effect:.3e}, ratio {ratio:.2e}")
    return ratio


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_infiniteyou_files(tmp_path_factory.mktemp("infiniteyou"))


# ------------------------------------------------------------------------------------ IR-SE50 --


def test_irse50_embedding_matches_an_independent_forward(files, record_property):
    _, recognizer_path = files
    state = torch.load(recognizer_path, weights_only=True)
    network = load_irse50(recognizer_path)
    generator = torch.Generator().manual_seed(0)
    image = (torch.rand(160, 140, 3, generator=generator) * 255).to(torch.uint8).numpy()
    kps = np.array([[50, 60], [90, 60], [70, 80], [55, 100], [85, 100]], np.float32)
    faces = torch.cat([aligned_face(image, kps), torch.rand(1, 3, 112, 112, generator=generator) * 2 - 1])
    with torch.no_grad():
        ours, reference = network(faces), irse50_forward(state, faces)
    assert ours.shape == (2, 512) and torch.allclose(ours.norm(dim=1), torch.ones(2), atol=1e-5)
    assert report(record_property, "irse50_embedding", float((ours - reference).abs().max()),
                  float(reference.abs().max())) < PARITY
    # The crop is insightface's norm_crop of the BGR pixels, scaled to [-1, 1], channels kept BGR.
    from insightface.utils import face_align
    crop = face_align.norm_crop(image, landmark=kps, image_size=112)
    assert torch.equal(aligned_face(image, kps)[0], torch.from_numpy(crop).permute(2, 0, 1).float() / 255 * 2 - 1)


def test_irse50_loads_safetensors_and_refuses_other_files(files, tmp_path):
    import safetensors.torch
    projection_path, recognizer_path = files
    state = torch.load(recognizer_path, weights_only=True)
    as_safetensors = tmp_path / "irse50.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(as_safetensors))
    loaded = load_irse50(as_safetensors).state_dict()
    assert all(torch.equal(loaded[k], v.float()) for k, v in state.items() if not k.endswith("num_batches_tracked"))
    with pytest.raises(RecognizerFileError, match=r"image_proj_model\.bin is not the IR-SE50 face recogniser.*"
                                                  r"Expected facexlib's ArcFace IR-SE50"):
        load_irse50(projection_path)
    pickled = tmp_path / "evil.pth"
    pickled.write_bytes(pickle.dumps(print))
    with pytest.raises(RecognizerFileError, match="evil.pth could not be read as weights"):
        load_irse50(pickled)


# ----------------------------------------------------------------------------- identity tokens --


def test_identity_tokens_match_diffusers_ip_adapter_plus_projection(files, record_property):
    from diffusers.loaders.unet import UNet2DConditionLoadersMixin
    projection_path, recognizer_path = files
    model = load_infiniteyou(projection_path, recognizer_path)
    state = torch.load(projection_path, weights_only=True)["image_proj"]
    # diffusers' own converter turns the IP-Adapter key names into its IPAdapterPlusImageProjection.
    reference = UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers(
        None, {k: v.clone() for k, v in state.items()}, low_cpu_mem_usage=False).eval()
    embedding = torch.nn.functional.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(1)), dim=1)
    tokens = model.identity_tokens(embedding)
    with torch.no_grad():
        expected = reference(embedding[:, None, :])
    assert tokens.shape == expected.shape == (1, 8, 4096)
    assert report(record_property, "identity_tokens", float((tokens - expected).abs().max()),
                  float(expected.abs().max())) < PARITY
    assert model.identity_tokens(embedding) is tokens  # once per reference, not per step


def test_projection_files_load_in_each_published_form_and_wrong_ones_are_named(files, tmp_path):
    import safetensors.torch
    projection_path, recognizer_path = files
    state = torch.load(projection_path, weights_only=True)["image_proj"]
    plain, prefixed = tmp_path / "plain.safetensors", tmp_path / "prefixed.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(plain))
    safetensors.torch.save_file({f"image_proj.{k}": v.contiguous() for k, v in state.items()}, str(prefixed))
    embedding = torch.randn(1, 1, 512)
    with torch.no_grad():
        expected = load_projection(projection_path)(embedding)
        for path in (plain, prefixed):
            assert torch.equal(load_projection(path)(embedding), expected)
    with pytest.raises(ProjectionFileError, match=r"recognition_arcface_ir_se50\.pth is not InfiniteYou's projection"
                                                  r".*Expected InfiniteYou's image projection"):
        load_projection(recognizer_path)
    sdxl = tmp_path / "ip-adapter.bin"  # the SDXL adapter's sections, cut to what the message needs
    torch.save({"image_proj": {"latents": torch.zeros(1, 16, 1280)},
                "ip_adapter": {"1.to_k_ip.weight": torch.zeros(640, 2048)}}, sdxl)
    with pytest.raises(ProjectionFileError, match="the InstantID \\(SDXL\\) adapter"):
        load_projection(sdxl)
    assert PROJECTION_CONFIG["num_queries"] == 8 and PROJECTION_CONFIG["output_dim"] == 4096


# ------------------------------------------------------------------------------------ InfuseNet --


@pytest.fixture(scope="module")
def flux_pair(comfy) -> dict:
    """diffusers' and ComfyUI's FLUX + InfuseNet on the same weights, plus a seeded step's inputs."""
    transformer, controlnet = fr.diffusers_models()
    flux, control_model = fr.comfy_models(transformer, controlnet)
    g = torch.Generator().manual_seed(3)
    h, w = 8, 12
    return {"transformer": transformer, "controlnet": controlnet, "flux": flux, "control_model": control_model,
            "vae": fr.StandInVAE(), "latent": torch.randn(1, 16, h, w, generator=g),
            "hint": torch.rand(1, h * 8, w * 8, 3, generator=g), "tokens": torch.randn(1, 8, fr.CONTEXT, generator=g),
            "text": torch.randn(1, 12, fr.CONTEXT, generator=g), "pooled": torch.randn(1, fr.POOLED, generator=g),
            "negative_text": torch.randn(1, 12, fr.CONTEXT, generator=g),
            "negative_pooled": torch.randn(1, fr.POOLED, generator=g)}


@pytest.fixture(scope="module")
def reference_step(flux_pair: dict) -> fr.ReferenceStep:
    """The reference pipeline's step at sigma 0.6, conditioning scale 0.7 (computed once: slow)."""
    return reference(flux_pair, 0.6, 0.7)


def infusenet(pair: dict, strength: float, window: tuple[float, float], guidance: float | None, region: Any = None) -> Any:
    """The pack's identity ControlNet around the loaded InfuseNet, as ApplyInfiniteYou builds it."""
    from instantid.control import identitynet_class
    control = identitynet_class()(fr.comfy_controlnet(pair["control_model"]), pair["tokens"], None, region, guidance)
    control.set_cond_hint(pair["hint"].movedim(-1, 1), strength, window, vae=pair["vae"])
    return control


def run_control(control: Any, pair: dict, sigma: float, cond_or_uncond: list[int]) -> dict | None:
    """One batched get_control as ComfyUI's sampler calls it: chunk j is positive (0) or negative (1)."""
    sampling = fr.model_sampling()
    rows = len(cond_or_uncond)
    text = torch.cat([pair["text"] if kind == 0 else pair["negative_text"] for kind in cond_or_uncond])
    pooled = torch.cat([pair["pooled"] if kind == 0 else pair["negative_pooled"] for kind in cond_or_uncond])
    cond = {"c_crossattn": text, "y": pooled, "guidance": torch.full((rows,), 3.5)}
    control.pre_run(type("Model", (), {"model_sampling": sampling})(), sampling.percent_to_sigma)
    try:
        with torch.no_grad():
            return control.get_control(pair["latent"].repeat(rows, 1, 1, 1), torch.full((rows,), sigma), cond, rows,
                                       {"cond_or_uncond": cond_or_uncond})
    finally:
        control.cleanup()


def reference(pair: dict, sigma: float, scale: float) -> fr.ReferenceStep:
    return fr.reference_step(pair["transformer"], pair["controlnet"], pair["vae"], pair["latent"], sigma,
                             pair["hint"].movedim(-1, 1), pair["tokens"], pair["text"], pair["pooled"], 3.5, 1.0, scale)


def reference_residuals(pair: dict, sigma: float, scale: float, guidance: float, keep: float = 1.0) -> tuple[list, list]:
    return fr.reference_residuals(pair["controlnet"], pair["vae"], pair["latent"], sigma, pair["hint"].movedim(-1, 1),
                                  pair["tokens"], pair["pooled"], guidance, scale, keep)


def mapped(step: fr.ReferenceStep) -> list[torch.Tensor]:
    """The reference residual each of FLUX's 19 + 38 blocks gets: block i takes sample i // interval."""
    return ([step.double[i // -(-19 // len(step.double))] for i in range(19)]
            + [step.single[i // -(-38 // len(step.single))] for i in range(38)])


def test_infusenet_residuals_and_a_full_step_match_the_reference_pipeline(flux_pair, reference_step, record_property):
    sigma, strength = 0.6, 0.7
    control = run_control(infusenet(flux_pair, strength, (0.0, 1.0), 1.0), flux_pair, sigma, [0])
    step = reference_step
    ours = [*control["input"], *control["output"]]
    expected = mapped(step)
    assert len(ours) == 57 and all(a.shape == b.shape for a, b in zip(ours, expected))
    residual_gap = max(float((a - b).abs().max()) for a, b in zip(ours, expected))
    assert report(record_property, "infusenet_residuals", residual_gap,
                  max(float(b.abs().max()) for b in expected)) < PARITY
    flux = flux_pair["flux"]
    with torch.no_grad():
        velocity = flux(flux_pair["latent"], torch.full((1,), sigma), flux_pair["text"], y=flux_pair["pooled"],
                        guidance=torch.full((1,), 3.5), control=control, transformer_options={})
        plain = flux(flux_pair["latent"], torch.full((1,), sigma), flux_pair["text"], y=flux_pair["pooled"],
                     guidance=torch.full((1,), 3.5), control=None, transformer_options={})
    sigma_next = 0.45  # one Euler step of the flow: x + (sigma_next - sigma) * v
    ours_next = flux_pair["latent"] + (sigma_next - sigma) * velocity
    expected_next = flux_pair["latent"] + (sigma_next - sigma) * step.velocity
    effect = float(((sigma_next - sigma) * (step.velocity - plain)).abs().max())  # what the InfuseNet changes
    assert effect > 1e-3
    assert report(record_property, "full_step", float((ours_next - expected_next).abs().max()), effect) < PARITY


def test_infusenet_guidance_follows_its_setting(flux_pair):
    """1.0 (the reference) differs from the FluxGuidance value; None (-1 on the node) keeps the
    conditioning's 3.5, which equals the reference run at 3.5 for the ControlNet."""
    own = run_control(infusenet(flux_pair, 1.0, (0.0, 1.0), None), flux_pair, 0.6, [0])
    double, _ = reference_residuals(flux_pair, 0.6, 1.0, guidance=3.5)
    torch.testing.assert_close(own["input"][0], double[0], rtol=0, atol=1e-5)
    at_one = run_control(infusenet(flux_pair, 1.0, (0.0, 1.0), 1.0), flux_pair, 0.6, [0])
    assert not torch.allclose(at_one["input"][0], own["input"][0], atol=1e-4)


def test_window_outside_gives_no_residuals_like_keep_zero(flux_pair):
    sampling = fr.model_sampling()
    late = float(sampling.percent_to_sigma(0.8))  # a sigma past end_at 0.5
    assert run_control(infusenet(flux_pair, 1.0, (0.0, 0.5), 1.0), flux_pair, late, [0]) is None
    double, single = reference_residuals(flux_pair, late, 1.0, 1.0, keep=0.0)
    assert all(float(x.abs().max()) == 0 for x in double + single)  # the reference adds nothing either


def test_true_cfg_negative_rows_get_no_infusenet_like_the_reference(flux_pair, reference_step):
    """cfg > 1: the reference's negative pass runs the transformer without ControlNet samples; here
    the negative rows of the batched call get zero residuals, the positive rows the reference's."""
    sigma = 0.6
    for layout in ([1, 0], [0, 1]):
        control = run_control(infusenet(flux_pair, 0.7, (0.0, 1.0), 1.0), flux_pair, sigma, layout)
        expected = mapped(reference_step)
        positive = layout.index(0)
        for got, want in zip([*control["input"], *control["output"]], expected):
            assert float(got[1 - positive].abs().max()) == 0.0
            torch.testing.assert_close(got[positive:positive + 1], want, rtol=0, atol=1e-5)


def test_face_region_zeroes_infusenet_tokens_outside_the_box(flux_pair):
    from instantid.regions import IdentityRegion, face_box_canvas
    h, w = flux_pair["latent"].shape[-2:]
    box = face_box_canvas([(24, 16, 56, 48)], w * 8, h * 8)  # canvas = the latent's pixel size
    confined = run_control(infusenet(flux_pair, 1.0, (0.0, 1.0), 1.0, IdentityRegion(box)), flux_pair, 0.6, [0])
    full = run_control(infusenet(flux_pair, 1.0, (0.0, 1.0), 1.0), flux_pair, 0.6, [0])
    grid = torch.nn.functional.interpolate(box, size=(h // 2, w // 2), mode="bilinear", align_corners=False).reshape(-1)
    outside, inside = grid == 0, grid == 1
    assert outside.sum() > 10 and inside.sum() > 0
    for got, unconfined in zip([*confined["input"], *confined["output"]], [*full["input"], *full["output"]]):
        assert float(got[0, outside].abs().max()) == 0.0 and float(unconfined[0, outside].abs().max()) > 0
        assert torch.equal(got[0, inside], unconfined[0, inside])
