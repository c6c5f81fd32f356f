"""Independent implementations of the official InstantID math, written from its description and
used only as references in tests: they share no code with the pack."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reference_resampler(state: dict, embedding: torch.Tensor) -> torch.Tensor:
    """The InstantID Resampler written out from its published description, straight from the
    state dict: proj_in, 4 x (perceiver attention + feed-forward, both residual), proj_out, norm."""
    s = {k: v.double() for k, v in state.items()}
    x = embedding.double()[:, None, :] @ s["proj_in.weight"].T + s["proj_in.bias"]
    latents = s["latents"].expand(x.shape[0], -1, -1)
    heads, head_dim = 20, 64
    for i in range(4):
        p = f"layers.{i}."
        xn = F.layer_norm(x, (1280,), s[p + "0.norm1.weight"], s[p + "0.norm1.bias"])
        ln = F.layer_norm(latents, (1280,), s[p + "0.norm2.weight"], s[p + "0.norm2.bias"])
        q = ln @ s[p + "0.to_q.weight"].T
        kv = torch.cat([xn, ln], dim=1) @ s[p + "0.to_kv.weight"].T
        k, v = kv[..., :1280], kv[..., 1280:]
        outs = []
        for h in range(heads):
            sl = slice(h * head_dim, (h + 1) * head_dim)
            scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(head_dim)
            outs.append(scores.softmax(-1) @ v[..., sl])
        latents = torch.cat(outs, dim=-1) @ s[p + "0.to_out.weight"].T + latents
        hidden = F.layer_norm(latents, (1280,), s[p + "1.0.weight"], s[p + "1.0.bias"]) @ s[p + "1.1.weight"].T
        latents = F.gelu(hidden) @ s[p + "1.3.weight"].T + latents
    out = latents @ s["proj_out.weight"].T + s["proj_out.bias"]
    return F.layer_norm(out, (2048,), s["norm_out.weight"], s["norm_out.bias"]).float()


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head, in float64, for [B, L, heads*d] tensors."""
    b, lq, width = q.shape
    d = width // heads
    split = [t.double().reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v)]
    weights = (split[0] @ split[1].transpose(-1, -2) / math.sqrt(d)).softmax(-1)
    return (weights @ split[2]).transpose(1, 2).reshape(b, lq, width)
