"""The FLUX test bed as a user's ComfyUI sees it: the FLUX model and the InfuseNet load from files
through ComfyUI's own loaders (detected as FLUX and as the InstantX-path ControlNetFlux), and a FLUX
graph with ApplyInfiniteYou samples on them. One graph, one load: the files are ~0.5 G parameters each."""
from __future__ import annotations

import torch
from support.flux_bed import FLUX_NAME, INFUSENET_NAME
from support.workflows import write_face_photo

GRAPH = {
    "ckpt": {"class_type": "TestBedFluxCheckpoint", "inputs": {"unet_name": FLUX_NAME}},
    "text": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "portrait photo"}},
    "guidance": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["text", 0], "guidance": 3.5}},
    "zero": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["text", 0]}},
    "infusenet": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": INFUSENET_NAME}},
    "iu": {"class_type": "InfiniteYouModelLoader", "inputs": {"projection_file": "image_proj_model.bin",
                                                             "recognizer_file": "recognition_arcface_ir_se50.pth"}},
    "faces": {"class_type": "InstantIDFaceAnalysis", "inputs": {"provider": "CPU"}},
    "face": {"class_type": "LoadImage", "inputs": {"image": "flux_bed_face.png"}},
    "apply": {"class_type": "ApplyInfiniteYou", "inputs": {
        "infiniteyou": ["iu", 0], "control_net": ["infusenet", 0], "vae": ["ckpt", 2], "positive": ["guidance", 0],
        "negative": ["zero", 0], "insightface": ["faces", 0], "image": ["face", 0], "strength": 1.0, "start_at": 0.0,
        "end_at": 1.0}},
    "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "sampler": {"class_type": "KSampler", "inputs": {
        "model": ["ckpt", 0], "positive": ["apply", 0], "negative": ["apply", 1], "latent_image": ["latent", 0],
        "seed": 1, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
    "stats": {"class_type": "TestBedLatentStats", "inputs": {"samples": ["sampler", 0]}},
}


def test_flux_bed_loads_through_comfyuis_loaders_and_samples_with_infiniteyou(comfy, sampler_spy):
    from comfy.ldm.flux.controlnet import ControlNetFlux
    from comfy.ldm.flux.model import Flux
    write_face_photo(comfy.base / "input" / "flux_bed_face.png")
    result = comfy.run(GRAPH, reuse_outputs=True)
    assert result.success, result.error_text()
    (call,) = sampler_spy
    flux = call["model"].model.diffusion_model
    assert isinstance(flux, Flux)
    assert (flux.hidden_size, flux.num_heads, len(flux.double_blocks), len(flux.single_blocks)) == (3072, 24, 1, 1)
    assert flux.params.guidance_embed  # detected as FLUX.1-dev (guidance embedding)
    (entry,) = call["positive"]
    control = entry[1]["control"]
    assert isinstance(control.control_model, ControlNetFlux)
    assert control.latent_format is not None and control.extra_conds == ["y", "guidance"]
    # diffusers zero-initialises the output blocks: the bed's are random, so the residuals are not all zero.
    assert all(block.weight.detach().abs().sum() > 0 for block in control.control_model.controlnet_blocks)
    (stats,) = result.outputs["stats"]["latent"]
    assert stats["shape"] == [1, 16, 8, 8] and stats["finite"]
    assert torch.tensor(stats["values"]).std() > 0
