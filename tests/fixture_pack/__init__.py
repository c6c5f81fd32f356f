"""Test-only ComfyUI nodes, loaded beside the pack: what a weightless test cannot get from a real
checkpoint. The UNet still comes through ComfyUI's real UNETLoader; only text encoding and the VAE
are replaced by seeded stand-ins with SDXL's shapes (2048-wide tokens, 1280 pooled), or for the FLUX
bed FLUX's (T5 tokens 4096 wide, CLIP-L pooled 768, 16 latent channels)."""
from __future__ import annotations

import hashlib

import torch
from typing_extensions import override

import folder_paths
import nodes as comfy_nodes
from comfy_api.latest import ComfyExtension, io
from support.flux_bed import load_flux_model
from support.tiny_models import register_tiny_sdxl

register_tiny_sdxl()


def _seed_of(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def seeded_sdxl_conditioning(seed: int, tokens: int = 77) -> list:
    generator = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, tokens, 2048, generator=generator)
    pooled = torch.randn(1, 1280, generator=generator)
    return [[cond, {"pooled_output": pooled}]]


class SeededTextEncoder:
    """Stands in for SDXL's CLIP in CLIPTextEncode: the same text always gives the same tokens."""

    def tokenize(self, text: str) -> str:
        return text

    def encode_from_tokens_scheduled(self, tokens: str) -> list:
        return seeded_sdxl_conditioning(_seed_of(tokens))


class LatentPreviewDecoder:
    """Stands in for the SDXL VAE in VAEDecode (and VAEEncode): first three latent channels, squashed
    to 0..1 and upscaled 8x, so different latents give different images."""

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        rgb = torch.sigmoid(latent[:, :3].float())
        return torch.nn.functional.interpolate(rgb, scale_factor=8, mode="nearest").movedim(1, -1)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Stands in for VAEEncode (img2img): 8x8 means of the RGB, through the inverse of decode's
        sigmoid, and a zero fourth channel; decode(encode(x)) is x pooled and upscaled."""
        rgb = torch.nn.functional.avg_pool2d(pixels[..., :3].movedim(-1, 1).float(), 8).clamp(1e-4, 1 - 1e-4)
        return torch.cat([torch.logit(rgb), torch.zeros_like(rgb[:, :1])], dim=1)


class SeededFluxTextEncoder(SeededTextEncoder):
    """Stands in for FLUX's T5 + CLIP-L in CLIPTextEncode: [1, 32, 4096] tokens, a [1, 768] pooled vector."""

    def encode_from_tokens_scheduled(self, tokens: str) -> list:
        generator = torch.Generator().manual_seed(_seed_of(tokens))
        return [[torch.randn(1, 32, 4096, generator=generator), {"pooled_output": torch.randn(1, 768, generator=generator)}]]


class FluxLatentPreviewDecoder:
    """Stands in for FLUX's VAE (16 latent channels): decode shows the first three channels (as the SDXL
    stand-in), encode (VAEEncode, and a FLUX ControlNet's hint) maps 8x8 means through a fixed seeded
    3 -> 16 mixing, so different pictures give different latents."""

    def __init__(self) -> None:
        self.mixing = torch.randn(16, 3, generator=torch.Generator().manual_seed(16))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return LatentPreviewDecoder().decode(latent)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(pixels[..., :3].movedim(-1, 1).float() * 2 - 1, 8)
        return torch.einsum("oc,bchw->bohw", self.mixing, pooled)

    def spacial_compression_encode(self) -> int:
        return 8


class TinyCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TestBedTinyCheckpoint", category="testing", description="Tiny SDXL UNet (via UNETLoader) with stand-in text encoder and VAE.",
            inputs=[io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models"))],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()])

    @classmethod
    def execute(cls, unet_name: str) -> io.NodeOutput:
        (model,) = comfy_nodes.UNETLoader().load_unet(unet_name, "default")
        return io.NodeOutput(model, SeededTextEncoder(), LatentPreviewDecoder())


class FluxCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TestBedFluxCheckpoint", category="testing",
            description="FLUX-layout model (1 + 1 blocks, via ComfyUI's diffusion model loader, weights kept in bf16) with stand-in text encoder and VAE.",
            inputs=[io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models"))],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()])

    @classmethod
    def execute(cls, unet_name: str) -> io.NodeOutput:
        model = load_flux_model(folder_paths.get_full_path_or_raise("diffusion_models", unet_name))
        return io.NodeOutput(model, SeededFluxTextEncoder(), FluxLatentPreviewDecoder())


class RandomConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TestBedRandomConditioning", category="testing", description="Seeded SDXL-shaped conditioning.",
            inputs=[io.Int.Input("seed", default=0), io.Int.Input("tokens", default=77, min=1)],
            outputs=[io.Conditioning.Output()])

    @classmethod
    def execute(cls, seed: int, tokens: int) -> io.NodeOutput:
        return io.NodeOutput(seeded_sdxl_conditioning(seed, tokens))


def output_node_schema(node_id: str, description: str, source: io.Input) -> io.Schema:
    """A test-only output node with one input."""
    return io.Schema(node_id=node_id, category="testing", description=description, inputs=[source], outputs=[],
                     is_output_node=True)


class LatentStats(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return output_node_schema("TestBedLatentStats", "Reports a latent's values to the UI output.",
                                  io.Latent.Input("samples"))

    @classmethod
    def execute(cls, samples: dict) -> io.NodeOutput:
        latent = samples["samples"]
        return io.NodeOutput(ui={"latent": [{"shape": list(latent.shape), "finite": bool(torch.isfinite(latent).all()),
                                             "values": latent.flatten().tolist()}]})


class CrashComfyUI(io.ComfyNode):
    """Ends the ComfyUI process at once, as a crash in a GPU driver would (the Ray batch tests)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return output_node_schema("TestBedCrash", "Kills the ComfyUI process that runs it.", io.Image.Input("images"))

    @classmethod
    def execute(cls, images: torch.Tensor) -> io.NodeOutput:
        import os
        import sys
        sys.stdout.write("test bed: crashing ComfyUI on purpose\n")  # test_batch_ray.CRASH_LINE counts it
        sys.stdout.flush()
        os._exit(3)


class FixtureExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [TinyCheckpoint, FluxCheckpoint, RandomConditioning, LatentStats, CrashComfyUI]


async def comfy_entrypoint() -> FixtureExtension:
    return FixtureExtension()
