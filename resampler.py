"""The InstantID image projection: a Perceiver resampler that turns one 512-d face embedding into
16 face tokens of the UNet's cross-attention width (2048 for SDXL).

Parameter names follow the `image_proj` section of the published `ip-adapter.bin`, so its state
dict loads strictly. Pure torch: no ComfyUI import.
"""
from __future__ import annotations

import math

import torch
from torch import nn

# Hyper-parameters of the published InstantID adapter (SDXL).
RESAMPLER_CONFIG = dict(dim=1280, depth=4, dim_head=64, heads=20, num_queries=16,
                        embedding_dim=512, output_dim=2048, ff_mult=4)


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    # Indices 0,1,2,3 give the checkpoint keys `.0.*` (norm), `.1.weight`, `.3.weight`.
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class PerceiverAttention(nn.Module):
    """Latents attend to [face features; latents]."""

    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features = self.norm1(features)
        latents = self.norm2(latents)
        q = self._heads(self.to_q(latents))
        k, v = self.to_kv(torch.cat((features, latents), dim=-2)).chunk(2, dim=-1)
        k, v = self._heads(k), self._heads(v)
        # Scale q and k separately (as trained) and take the softmax in fp32 for fp16 stability.
        scale = 1.0 / math.sqrt(math.sqrt(self.dim_head))
        weights = ((q * scale) @ (k * scale).transpose(-2, -1)).float().softmax(dim=-1).to(q.dtype)
        out = (weights @ v).transpose(1, 2).reshape(latents.shape[0], latents.shape[1], -1)
        return self.to_out(out)


class Resampler(nn.Module):
    """face embedding [B, N, embedding_dim] -> face tokens [B, num_queries, output_dim]."""

    def __init__(self, dim: int = 1280, depth: int = 4, dim_head: int = 64, heads: int = 20,
                 num_queries: int = 16, embedding_dim: int = 512, output_dim: int = 2048,
                 ff_mult: int = 4) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim ** 0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), _feed_forward(dim, ff_mult)])
            for _ in range(depth))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        features = self.proj_in(embedding)
        latents = self.latents.expand(embedding.shape[0], -1, -1)
        for attention, feed_forward in self.layers:
            latents = attention(features, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))
