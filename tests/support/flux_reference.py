"""The FLUX side of the parity tests: ComfyUI's FLUX model and FLUX ControlNet next to diffusers'
`FluxTransformer2DModel` and `FluxControlNetModel` (the classes InfiniteYou's reference pipeline
runs), built at a small width with identical random weights, and the reference pipeline's steps
(hint encoding, packing, ids, guidance, block mapping, conditioning scale) written out as
`pipeline_flux_infusenet.py` performs them.

Depths are the real ones (the InfuseNet: 4 double + 10 single blocks; FLUX.1: 19 + 38): ComfyUI's
ControlNetFlux spreads its residuals over 19 and 38 blocks, so only at FLUX's depth do both
block mappings meet. Widths are small (hidden 32) so that a forward takes milliseconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

HIDDEN, HEADS, HEAD_DIM, AXES = 32, 2, 16, (4, 6, 6)
CONTEXT, POOLED = 4096, 768  # the real text/identity token and pooled widths (cheap at hidden 32)
WEIGHT_SCALE = 0.05  # small enough that 57 random blocks keep the activations in a sane range
LATENT_CHANNELS = 16
FLUX_SHIFT, FLUX_SCALE = 0.1159, 0.3611  # comfy.latent_formats.Flux (= FLUX's VAE config)


SHARED = dict(patch_size=1, in_channels=4 * LATENT_CHANNELS, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
              joint_attention_dim=CONTEXT, pooled_projection_dim=POOLED, guidance_embeds=True, axes_dims_rope=AXES)


def _randomised(model: Any, seed: int) -> Any:
    # Every weight random, the ControlNet's zero-initialised output blocks included (else all residuals are 0).
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * WEIGHT_SCALE)
    return model.eval()


def diffusers_controlnet(seed: int = 0) -> Any:
    """FluxControlNetModel with the InfuseNet's depth (4 + 10) and random weights."""
    from diffusers import FluxControlNetModel
    return _randomised(FluxControlNetModel(num_layers=4, num_single_layers=10, **SHARED), seed + 1)


def diffusers_models(seed: int = 0) -> tuple[Any, Any]:
    """(FluxTransformer2DModel 19 + 38, FluxControlNetModel 4 + 10) with random weights."""
    from diffusers import FluxTransformer2DModel
    return _randomised(FluxTransformer2DModel(num_layers=19, num_single_layers=38, **SHARED), seed + 2), \
        diffusers_controlnet(seed)


def flux_params(depth: int, depth_single: int) -> dict:
    return dict(in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, vec_in_dim=POOLED, context_in_dim=CONTEXT,
                hidden_size=HIDDEN, mlp_ratio=4.0, num_heads=HEADS, depth=depth, depth_single_blocks=depth_single,
                axes_dim=list(AXES), theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])


def comfy_models(transformer: Any, controlnet: Any) -> tuple[Any, Any]:
    """ComfyUI's Flux and ControlNetFlux holding the same weights (comfy_flux, comfy_control_model)."""
    return comfy_flux(transformer), comfy_control_model(controlnet)


def comfy_flux(transformer: Any) -> Any:
    """ComfyUI's Flux with the transformer's weights, converted by ComfyUI's diffusers-to-FLUX key map."""
    import comfy.ldm.flux.model
    import comfy.model_detection
    import comfy.ops

    flux = comfy.ldm.flux.model.Flux(operations=comfy.ops.disable_weight_init, **flux_params(19, 38)).eval()
    missing, unexpected = flux.load_state_dict(comfy.model_detection.convert_diffusers_mmdit(_detached(transformer), ""),
                                               strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return flux


def comfy_control_model(controlnet: Any) -> Any:
    """ControlNetFlux as load_controlnet_flux_instantx builds it (latent hint) with the same weights."""
    import comfy.ldm.flux.controlnet
    import comfy.model_detection
    import comfy.ops

    control_sd = _detached(controlnet)
    control_model = comfy.ldm.flux.controlnet.ControlNetFlux(latent_input=True, control_latent_channels=LATENT_CHANNELS,
                                                              operations=comfy.ops.disable_weight_init,
                                                              **flux_params(4, 10)).eval()
    converted = comfy.model_detection.convert_diffusers_mmdit(control_sd, "")
    converted.update(control_sd)  # what the loader does: the ControlNet's own keys kept as they are
    missing, _ = control_model.load_state_dict(converted, strict=False)
    assert not missing, missing
    return control_model


def _detached(module: Any) -> dict[str, torch.Tensor]:
    # ComfyUI's converter swaps scale/shift halves in place, which would change the diffusers model.
    return {k: v.clone() for k, v in module.state_dict().items()}


def comfy_controlnet(control_model: Any) -> Any:
    """The CONTROL_NET value ComfyUI's loader returns for the InfuseNet (InstantX FLUX path)."""
    import comfy.controlnet
    import comfy.latent_formats

    return comfy.controlnet.ControlNet(control_model, compression_ratio=1, latent_format=comfy.latent_formats.Flux(),
                                       load_device=torch.device("cpu"), manual_cast_dtype=None,
                                       extra_conds=["y", "guidance"])


class StandInVAE:
    """A deterministic 'VAE' both routes share: 8x8 average pooling and a fixed 1x1 mixing to 16
    channels. ComfyUI's VAE.encode takes [B, H, W, 3] in 0..1 and scales to [-1, 1] itself; the
    reference pipeline's image processor does that scaling before vae.encode."""

    def __init__(self, seed: int = 7) -> None:
        self.mixing = torch.randn(LATENT_CHANNELS, 3, generator=torch.Generator().manual_seed(seed))

    def encode_signed(self, pixels_signed: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(pixels_signed, 8)
        return torch.einsum("oc,bchw->bohw", self.mixing, pooled)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:  # ComfyUI's interface
        return self.encode_signed(pixels.movedim(-1, 1) * 2 - 1)

    def spacial_compression_encode(self) -> int:  # ComfyUI's interface
        return 8


def model_sampling() -> Any:
    """ComfyUI's FLUX model sampling (flow, sigma = t)."""
    import comfy.model_sampling

    class Sampling(comfy.model_sampling.ModelSamplingFlux, comfy.model_sampling.CONST):
        pass

    return Sampling(SimpleNamespace(sampling_settings={"shift": 1.15}))


def pack(latent: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C], the reference pipeline's _pack_latents."""
    b, c, h, w = latent.shape
    return latent.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, c4 = tokens.shape
    return tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


@dataclass
class ReferenceStep:
    """One step of the reference pipeline: the InfuseNet residuals and the transformer's output."""
    double: list[torch.Tensor]
    single: list[torch.Tensor]
    velocity: torch.Tensor  # unpacked [B, 16, h, w]


def reference_residuals(controlnet: Any, vae: StandInVAE, latent: torch.Tensor, sigma: float, hint_pixels: torch.Tensor,
                        identity_tokens: torch.Tensor, pooled: torch.Tensor, infusenet_guidance: float, scale: float,
                        keep: float = 1.0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The reference pipeline's ControlNet call: hint VAE-encoded, shifted, scaled and packed; the
    ControlNet on the identity tokens (txt_ids zeros of their length) at its own guidance, residuals
    times conditioning scale x keep (the start/end window)."""
    b, _, h, w = latent.shape
    hint = (vae.encode_signed(hint_pixels * 2 - 1) - FLUX_SHIFT) * FLUX_SCALE
    with torch.no_grad():
        double, single = controlnet(hidden_states=pack(latent), controlnet_cond=pack(hint), conditioning_scale=scale * keep,
                                    timestep=torch.full((b,), sigma * 1000) / 1000,
                                    guidance=torch.full((b,), infusenet_guidance), pooled_projections=pooled,
                                    encoder_hidden_states=identity_tokens, txt_ids=torch.zeros(identity_tokens.shape[1], 3),
                                    img_ids=image_ids(h, w), return_dict=False)
    return list(double), list(single)


def reference_step(transformer: Any, controlnet: Any, vae: StandInVAE, latent: torch.Tensor, sigma: float,
                   hint_pixels: torch.Tensor, identity_tokens: torch.Tensor, text: torch.Tensor,
                   pooled: torch.Tensor, guidance: float, infusenet_guidance: float, scale: float) -> ReferenceStep:
    """pipeline_flux_infusenet.py's denoising step: the ControlNet call (reference_residuals), then
    the transformer on the text at the model guidance with those residuals (blocks mapped i // interval)."""
    b, _, h, w = latent.shape
    double, single = reference_residuals(controlnet, vae, latent, sigma, hint_pixels, identity_tokens, pooled,
                                         infusenet_guidance, scale)
    with torch.no_grad():
        velocity = transformer(hidden_states=pack(latent), timestep=torch.full((b,), sigma * 1000) / 1000,
                               guidance=torch.full((b,), guidance), pooled_projections=pooled, encoder_hidden_states=text,
                               controlnet_block_samples=double, controlnet_single_block_samples=single,
                               txt_ids=torch.zeros(text.shape[1], 3), img_ids=image_ids(h, w), return_dict=False,
                               controlnet_blocks_repeat=False)[0]
    return ReferenceStep(double, single, unpack(velocity, h, w))
