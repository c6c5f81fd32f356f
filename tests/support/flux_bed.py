"""The FLUX test bed's two big files, with random weights, that ComfyUI's own loaders detect and load
as a user's files: a FLUX.1 diffusion model (ComfyUI's single-file keys, as Load Diffusion Model reads
it) and an InfuseNet (diffusers `FluxControlNetModel` keys with the InfuseNet config, as the released
`infusenet_*.safetensors`; Load ControlNet Model takes it through the InstantX FLUX path).

ComfyUI's FLUX detection fixes hidden size 3072 and 24 heads, so both keep the real widths and cut the
depth to 1 double + 1 single block: ~0.5 G parameters each, ~1.1 GB each in bf16. Built once per
machine (about half a minute) under the user cache, keyed by LAYOUT_VERSION, by one process at a time
and written atomically, so that concurrent test sessions never read half a file nor build twice; test
bases link to them.
"""
from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

import torch

LAYOUT_VERSION = "flux-bed-v1"
FLUX_NAME = "test_flux1.safetensors"  # under models/diffusion_models
INFUSENET_NAME = "infiniteyou/test_infusenet.safetensors"  # under models/controlnet
HIDDEN, HEADS, HEAD_DIM, AXES = 3072, 24, 128, (16, 56, 56)  # FLUX.1's, fixed by ComfyUI's detection
CONTEXT, POOLED, LATENT_CHANNELS = 4096, 768, 16
WEIGHT_SCALE = 0.02


def cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "instantid-nodes" / "test-models" / LAYOUT_VERSION


def _randomise(module: torch.nn.Module, seed: int) -> None:
    # Every weight random, diffusers' zero-initialised ControlNet output blocks included (else all residuals are 0).
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * WEIGHT_SCALE)


def flux_state(seed: int = 20) -> dict[str, torch.Tensor]:
    """ComfyUI's Flux (FLUX.1-dev: guidance embedding) at real widths, 1 + 1 blocks, in bf16."""
    import comfy.ldm.flux.model
    import comfy.ops
    flux = comfy.ldm.flux.model.Flux(
        operations=comfy.ops.disable_weight_init, dtype=torch.bfloat16, in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS, vec_in_dim=POOLED, context_in_dim=CONTEXT, hidden_size=HIDDEN, mlp_ratio=4.0,
        num_heads=HEADS, depth=1, depth_single_blocks=1, axes_dim=list(AXES), theta=10000, patch_size=2, qkv_bias=True,
        guidance_embed=True, txt_ids_dims=[])
    _randomise(flux, seed)
    return {k: v.contiguous() for k, v in flux.state_dict().items()}


def infusenet_state(seed: int = 21) -> dict[str, torch.Tensor]:
    """diffusers' FluxControlNetModel with the InfuseNet config (guidance embedding, 64 packed input
    channels, 4096-wide context, 768 pooled) cut to 1 double + 1 single block, in bf16."""
    from diffusers import FluxControlNetModel
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: half the memory of an fp32 build
    try:
        controlnet = FluxControlNetModel(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1,
                                         attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=CONTEXT,
                                         pooled_projection_dim=POOLED, guidance_embeds=True, axes_dims_rope=AXES)
    finally:
        torch.set_default_dtype(previous)
    _randomise(controlnet, seed)
    return {k: v.contiguous() for k, v in controlnet.state_dict().items()}


def _cached(name: str, build) -> Path:
    from safetensors.torch import save_file
    path = cache_dir() / name
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time (the suite's two workers both need the files): the other waits, then finds them.
    with open(path.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=".partial")
            os.close(handle)
            try:
                save_file(build(), partial)
                os.replace(partial, path)
            finally:
                Path(partial).unlink(missing_ok=True)
    return path


def cached_flux_files() -> tuple[Path, Path]:
    """(FLUX model file, InfuseNet file) in this machine's cache, built on first use."""
    return _cached("flux1.safetensors", flux_state), _cached("infusenet.safetensors", infusenet_state)


def load_flux_model(path: Path) -> object:
    """The bed's FLUX model as Load Diffusion Model reads it, weights kept in bf16 (cast per layer
    on the CPU): ~1 GB of memory for the 0.5 G parameters. A ComfyUI ModelPatcher."""
    import comfy.sd
    return comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.bfloat16})


def link_flux_models(models: Path) -> None:
    """Link the cached files into a ComfyUI models folder under the test bed's names."""
    flux, infusenet = cached_flux_files()
    for source, target in ((flux, models / "diffusion_models" / FLUX_NAME), (infusenet, models / "controlnet" / INFUSENET_NAME)):
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(source)
