"""The InstantID cross-attention patch.

At every SDXL cross-attention layer the official InstantID computes

    out = Attention(q, K_text, V_text) + weight * Attention(q, K_face, V_face)

with a separate softmax for the 16 face tokens, K_face = to_k_ip(face tokens) and V_face =
to_v_ip(face tokens) using that layer's adapter weights; positive rows use the face tokens and
negative rows the uncond tokens. The face tokens are constant during sampling, so K_face/V_face
are computed once per Apply (see adapter.py) and this module only attends to them.

Hot-path rules: no host-device synchronisation (the sigma window is a device-side 0/1 factor),
nothing recomputed per layer that can be computed once per step, and patch objects that deep-copy
in O(1) (ComfyUI deep-copies transformer options on every model clone).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .sdxl import ATTN2_KEYS, AttentionKey

ExtraOptions = dict[str, Any]


def _comfy_attention() -> Callable | None:
    """ComfyUI's current attention function, when ComfyUI is running (looked up per call: some
    packs swap it at run time). Never imports ComfyUI itself."""
    module = sys.modules.get("comfy.ldm.modules.attention")
    return None if module is None else module.optimized_attention


def _text_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: ExtraOptions) -> torch.Tensor:
    """The layer's own attention, as ComfyUI computes it unpatched: its selected backend, precision
    and any attention override in the transformer options (plain SDPA outside ComfyUI)."""
    comfy_attention = _comfy_attention()
    if comfy_attention is None:
        split = [t.unflatten(-1, (extra_options["n_heads"], -1)).transpose(1, 2) for t in (q, k, v)]
        return F.scaled_dot_product_attention(*split).transpose(1, 2).flatten(-2)
    return comfy_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                           transformer_options=extra_options)


class FaceAttentionSettings:
    """What one Apply decided, shared by its 70 layer patches: the weight, the sigma window and the
    optional mask. Caches the per-step row factors so they are built once per UNet call, not per layer."""

    def __init__(self, weight: float, sigma_start: float, sigma_end: float, mask: torch.Tensor | None = None) -> None:
        self.weight = float(weight)
        self.sigma_start = float(sigma_start)
        self.sigma_end = float(sigma_end)
        self.mask = None if mask is None else mask.detach().float().cpu()  # [N, H, W] in 0..1
        self._step_key: tuple | None = None
        self._step_sigmas: torch.Tensor | None = None
        self._step_factors: dict[tuple[int, int] | None, torch.Tensor] = {}
        self._mask_rows_cache: dict[tuple, torch.Tensor] = {}

    def __deepcopy__(self, memo: dict) -> "FaceAttentionSettings":
        return self  # immutable apart from caches that depend only on their inputs

    def row_factors(self, q: torch.Tensor, extra_options: ExtraOptions) -> torch.Tensor:
        """weight x (sigma inside the window) x mask, per row: [B, 1, 1], or [B, h*w, 1] with a mask."""
        sigmas = extra_options["sigmas"]
        key = (q.device, q.dtype, q.shape[0], tuple(extra_options["cond_or_uncond"]))
        if sigmas is not self._step_sigmas or key != self._step_key:
            self._step_sigmas, self._step_key, self._step_factors = sigmas, key, {}
        size = tuple(extra_options["activations_shape"][-2:]) if self.mask is not None else None
        factors = self._step_factors.get(size)
        if factors is None:
            inside = (sigmas <= self.sigma_start) & (sigmas >= self.sigma_end)
            factors = (inside.to(q.dtype) * self.weight).reshape(-1, 1, 1).to(q.device)
            if factors.shape[0] != q.shape[0]:
                factors = factors.expand(q.shape[0], 1, 1)
            if size is not None:
                factors = factors * self._mask_rows(size, q, len(extra_options["cond_or_uncond"]))
            self._step_factors[size] = factors
        return factors

    def _mask_rows(self, size: tuple[int, int], q: torch.Tensor, chunks: int) -> torch.Tensor:
        """The mask at this layer's resolution, one row per batch row: [B, h*w, 1] (built once per
        resolution and batch layout, not per step)."""
        key = (size, q.shape[0], chunks, q.device, q.dtype)
        rows = self._mask_rows_cache.get(key)
        if rows is None:
            per_chunk = q.shape[0] // chunks
            mask = F.interpolate(self.mask[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
            mask = mask_for_batch(mask, per_chunk)
            rows = mask.reshape(per_chunk, -1, 1).repeat(chunks, 1, 1).to(device=q.device, dtype=q.dtype)
            self._mask_rows_cache[key] = rows
        return rows


def mask_for_batch(mask: torch.Tensor, batch: int) -> torch.Tensor:
    """One mask per latent: a single mask is shared, a shorter batch repeats its last mask, a longer
    one is cut (as ComfyUI does for other per-image inputs)."""
    if mask.shape[0] == batch or mask.shape[0] == 1:
        return mask.expand(batch, *mask.shape[1:])
    if mask.shape[0] < batch:
        return torch.cat([mask, mask[-1:].expand(batch - mask.shape[0], *mask.shape[1:])])
    return mask[:batch]


@dataclass(eq=False)
class FaceBranch:
    """The face-token attention of one Apply at one layer. k_face/v_face: [2, T, C] holding
    (positive, negative) rows. Immutable: deep copies share it."""
    settings: FaceAttentionSettings
    k_face: torch.Tensor
    v_face: torch.Tensor

    def __post_init__(self) -> None:
        self._rows: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __deepcopy__(self, memo: dict) -> "FaceBranch":
        return self

    def _heads_for(self, q: torch.Tensor, extra_options: ExtraOptions) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V rows for this batch, split into heads: [B, heads, T, dim], cached per batch layout."""
        heads, cond_or_uncond = extra_options["n_heads"], extra_options["cond_or_uncond"]
        key = (q.device, q.dtype, q.shape[0], heads, tuple(cond_or_uncond))
        rows = self._rows.get(key)
        if rows is None:
            # Chunk j of the batch belongs to cond_or_uncond[j] (0 positive, 1 negative).
            index = torch.tensor(cond_or_uncond).repeat_interleave(q.shape[0] // len(cond_or_uncond))
            rows = tuple(t[index].to(device=q.device, dtype=q.dtype).unflatten(-1, (heads, -1)).transpose(1, 2).contiguous()
                         for t in (self.k_face, self.v_face))
            if len(self._rows) > 8:
                self._rows.clear()
            self._rows[key] = rows
        return rows

    def _face_attention(self, q: torch.Tensor, extra_options: ExtraOptions) -> torch.Tensor:
        """Attention of q over this face's tokens, [B, L, heads, dim] (a strided view)."""
        # 16 keys per face: torch's fused attention directly (ComfyUI's CPU fallback, sub-quadratic
        # attention, queries free memory on every call, which costs more than the attention itself).
        k_heads, v_heads = self._heads_for(q, extra_options)
        q_heads = q.unflatten(-1, (k_heads.shape[1], -1)).transpose(1, 2)
        return F.scaled_dot_product_attention(q_heads, k_heads, v_heads).transpose(1, 2)

    def add_to(self, out: torch.Tensor, q: torch.Tensor, extra_options: ExtraOptions) -> torch.Tensor:
        """out + weight * window * mask * Attention(q, K_face, V_face), in one fused kernel."""
        face = self._face_attention(q, extra_options)
        factors = self.settings.row_factors(q, extra_options).unsqueeze(-1)
        return torch.addcmul(out.reshape(face.shape), face, factors).flatten(-2)

    def __call__(self, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 extra_options: ExtraOptions, **kwargs: Any) -> torch.Tensor:
        """The callback protocol of IPAdapter_plus / PuLID's Attn2Replace (`.add(callback, **kwargs)`):
        returns the face attention term to add."""
        face = self._face_attention(q, extra_options)
        return (face * self.settings.row_factors(q, extra_options).unsqueeze(-1)).flatten(-2)


class FaceAttentionPatch:
    """The attn2 replacement at one key: the text attention (or the replacement that was there
    before) plus every face branch, plus callbacks other packs add through `.add`."""

    instantid_face_attention = True  # lets a later Apply recognise and extend this object

    def __init__(self, base: Callable | None = None, branches: tuple[FaceBranch, ...] = (),
                 callbacks: tuple[tuple[Callable, dict], ...] = ()) -> None:
        self.base = base
        self.branches = list(branches)
        self.callbacks = list(callbacks)

    def __deepcopy__(self, memo: dict) -> "FaceAttentionPatch":
        # Branches and callbacks are shared, the lists are not: a clone can be extended on its own.
        return FaceAttentionPatch(self.base, tuple(self.branches), tuple(self.callbacks))

    def add(self, callback: Callable, **kwargs: Any) -> None:
        """IPAdapter_plus / PuLID protocol: callback(out, q, k, v, extra_options, **kwargs) -> delta,
        active while sigma_end <= sigma <= sigma_start."""
        self.callbacks.append((callback, kwargs))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: ExtraOptions) -> torch.Tensor:
        out = self.base(q, k, v, extra_options) if self.base is not None else _text_attention(q, k, v, extra_options)
        base_out = out
        for branch in self.branches:
            out = branch.add_to(out, q, extra_options)
        for callback, kwargs in self.callbacks:
            sigmas = extra_options["sigmas"]
            inside = (sigmas <= kwargs.get("sigma_start", float("inf"))) & (sigmas >= kwargs.get("sigma_end", float("-inf")))
            delta = callback(base_out, q, k, v, extra_options, **kwargs)
            out = out + delta * inside.to(q.dtype).reshape(-1, 1, 1)
        return out.to(q.dtype)


def install_face_attention(model: Any, layer_kv: list[tuple[torch.Tensor, torch.Tensor]],
                           settings: FaceAttentionSettings) -> None:
    """Add the face attention to all 70 SDXL cross-attention layers of `model` (a ComfyUI
    ModelPatcher the caller has cloned). Whatever another pack (or an earlier Apply) placed at a
    key is kept: extended through its `.add` protocol, or wrapped as the base attention."""
    if len(layer_kv) != len(ATTN2_KEYS):
        raise ValueError(f"expected {len(ATTN2_KEYS)} per-layer face keys/values, got {len(layer_kv)}")
    existing = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for key, (k_face, v_face) in zip(ATTN2_KEYS, layer_kv):
        branch = FaceBranch(settings, k_face, v_face)
        previous = existing.get(key)
        if previous is None:
            patch = FaceAttentionPatch(branches=(branch,))
        elif getattr(previous, "instantid_face_attention", False):
            patch = FaceAttentionPatch(previous.base, (*previous.branches, branch), tuple(previous.callbacks))
        elif hasattr(previous, "add"):
            # Another pack's object, already deep-copied by the caller's clone(): extend it in place.
            previous.add(branch, sigma_start=settings.sigma_start, sigma_end=settings.sigma_end)
            continue
        else:
            patch = FaceAttentionPatch(base=previous, branches=(branch,))
        _set_attn2(model, patch, key)


def _set_attn2(model: Any, patch: Callable, key: AttentionKey) -> None:
    block, block_id, index = key
    model.set_model_attn2_replace(patch, block, block_id, index)
