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

from .regions import ATTENTION, IdentityRegion
from .sdxl import ATTN2_KEYS, AttentionKey

ExtraOptions = dict[str, Any]


def _plain_sdpa(extra_options: ExtraOptions, batch: int) -> Callable | None:
    """The SDPA function the layer's own attention would run, when it is plain SDPA: outside
    ComfyUI, or ComfyUI's pytorch attention (its default on GPUs) with no attention override.
    Looked up per call: some packs swap ComfyUI's attention function at run time."""
    module = sys.modules.get("comfy.ldm.modules.attention")
    if module is None:
        return F.scaled_dot_product_attention
    if (module.optimized_attention is module.attention_pytorch and batch <= module.SDP_BATCH_LIMIT
            and "optimized_attention_override" not in extra_options):
        return sys.modules["comfy.ops"].scaled_dot_product_attention
    return None


def _text_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: ExtraOptions) -> torch.Tensor:
    """The layer's own attention through ComfyUI's selected backend, precision and any attention
    override in the transformer options, as ComfyUI computes it unpatched."""
    attention = sys.modules["comfy.ldm.modules.attention"].optimized_attention
    return attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                     transformer_options=extra_options)


class FaceAttentionSettings:
    """What one Apply decided, shared by its 70 layer patches: the weight, the sigma window and the
    optional mask. The per-row factors are built at the first patched layer of each UNet call and
    reused by the other 69 (the sigmas tensor and cond_or_uncond list are the same objects
    throughout one call), so a layer's Python work is a couple of identity checks."""

    def __init__(self, weight: float, sigma_start: float, sigma_end: float, mask: torch.Tensor | None = None,
                 face_box: torch.Tensor | None = None) -> None:
        self.weight = float(weight)
        self.sigma_start = float(sigma_start)
        self.sigma_end = float(sigma_end)
        # The mask ([N, H, W] in 0..1) and the face region (regions.py) scale the face term per pixel.
        self.region = None if mask is None and face_box is None else IdentityRegion(face_box, mask)
        self._sigmas: torch.Tensor | None = None
        self._cond_or_uncond: list[int] | None = None
        self.layout: tuple = ()
        self._gate: torch.Tensor | None = None
        self._masked: dict[tuple[int, int], torch.Tensor] = {}

    def __deepcopy__(self, memo: dict) -> "FaceAttentionSettings":
        return self  # immutable apart from caches that depend only on their inputs

    def factors(self, q: torch.Tensor, extra_options: ExtraOptions) -> torch.Tensor:
        """weight x (sigma inside the window) x mask, per row and head-split: [B, 1, 1, 1], or
        [B, h*w, 1, 1] with a mask. Device-side: no host synchronisation."""
        sigmas, cond_or_uncond = extra_options["sigmas"], extra_options["cond_or_uncond"]
        if sigmas is not self._sigmas or cond_or_uncond is not self._cond_or_uncond or self._gate.shape[0] != q.shape[0]:
            inside = (sigmas <= self.sigma_start) & (sigmas >= self.sigma_end)
            gate = (inside.to(q.dtype) * self.weight).reshape(-1, 1, 1, 1).to(q.device)
            self._gate = per_row(gate, q.shape[0])
            self._sigmas, self._cond_or_uncond, self._masked = sigmas, cond_or_uncond, {}
            layout = (q.device, q.dtype, q.shape[0], tuple(cond_or_uncond))
            if layout != self.layout:  # keep the same object while the layout stays: branches compare by identity
                self.layout = layout
        if self.region is None:
            return self._gate
        size = tuple(extra_options["activations_shape"][-2:])
        masked = self._masked.get(size)
        if masked is None:
            # The region at this layer's resolution, one row per batch row: [B, h*w, 1, 1] (the region
            # caches it per resolution and batch layout, so only the product is per step).
            latent = extra_options.get("original_shape")
            rows = self.region.factor(size, None if latent is None else latent[-2:], q.shape[0], len(cond_or_uncond),
                                      ATTENTION, q.device, q.dtype)
            masked = self._masked[size] = self._gate * rows.reshape(q.shape[0], -1, 1, 1)
        return masked


def per_row(per_latent: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-latent values [N, 1, 1] for the rows of one UNet call. ComfyUI's `sigmas` has one entry
    per latent, while the call's batch is len(cond_or_uncond) chunks of those N latents, chunk-major."""
    if per_latent.shape[0] == rows:
        return per_latent
    if per_latent.shape[0] == 1:
        return per_latent.expand(rows, *per_latent.shape[1:])
    return per_latent.repeat(rows // per_latent.shape[0], *([1] * (per_latent.ndim - 1)))


@dataclass(eq=False)
class FaceBranch:
    """The face-token attention of one Apply at one layer. k_face/v_face: [2, T, C] holding
    (positive, negative) rows. Immutable: deep copies share it."""
    settings: FaceAttentionSettings
    k_face: torch.Tensor
    v_face: torch.Tensor

    def __post_init__(self) -> None:
        self._rows: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._last_layout: tuple | None = None
        self._last_rows: tuple[torch.Tensor, torch.Tensor] = ()

    def __deepcopy__(self, memo: dict) -> "FaceBranch":
        return self

    def _heads_for(self, layout: tuple, q: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V rows for this batch layout, split into heads: [B, heads, T, dim], built once per layout."""
        if layout is self._last_layout:  # the layout of the previous UNet call: no hashing per layer
            return self._last_rows
        rows = self._rows.get(layout)
        if rows is None:
            # Chunk j of the batch belongs to cond_or_uncond[j] (0 positive, 1 negative).
            cond_or_uncond = layout[3]
            index = torch.tensor(cond_or_uncond).repeat_interleave(q.shape[0] // len(cond_or_uncond))
            rows = tuple(t[index].to(device=q.device, dtype=q.dtype).unflatten(-1, (heads, -1)).transpose(1, 2).contiguous()
                         for t in (self.k_face, self.v_face))
            if len(self._rows) > 8:
                self._rows.clear()
            self._rows[layout] = rows
        self._last_layout, self._last_rows = layout, rows
        return rows

    def attend(self, q: torch.Tensor, q_heads: torch.Tensor) -> torch.Tensor:
        """Attention of the queries over this face's tokens: [B, L, heads, dim] (a transposed view;
        contiguous when the kernel writes that layout). Call settings.factors() first: it sets the
        batch layout this uses."""
        # 16 keys per face: torch's fused attention directly (ComfyUI's CPU fallback, sub-quadratic
        # attention, queries free memory on every call, which costs more than the attention itself).
        k_heads, v_heads = self._heads_for(self.settings.layout, q, q_heads.shape[1])
        return F.scaled_dot_product_attention(q_heads, k_heads, v_heads).transpose(1, 2)

    def add_to(self, out: torch.Tensor, q: torch.Tensor, extra_options: ExtraOptions) -> torch.Tensor:
        """out + weight * window * mask * Attention(q, K_face, V_face), the sum in one fused kernel."""
        factors = self.settings.factors(q, extra_options)
        b, length, width = q.shape
        heads = extra_options["n_heads"]
        face = self.attend(q, q.reshape(b, length, heads, -1).transpose(1, 2))
        return torch.addcmul(out.reshape(face.shape), face, factors).reshape(b, length, width)

    def __call__(self, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 extra_options: ExtraOptions, **kwargs: Any) -> torch.Tensor:
        """The callback protocol of IPAdapter_plus / PuLID's Attn2Replace (`.add(callback, **kwargs)`):
        returns the face attention term to add."""
        factors = self.settings.factors(q, extra_options)
        b, length, width = q.shape
        face = self.attend(q, q.reshape(b, length, extra_options["n_heads"], -1).transpose(1, 2))
        return (face * factors).reshape(b, length, width)


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
        sdpa = _plain_sdpa(extra_options, q.shape[0]) if self.base is None else None
        if sdpa is not None:
            out = self._fused(q, k, v, extra_options, sdpa)
        else:
            out = self.base(q, k, v, extra_options) if self.base is not None else _text_attention(q, k, v, extra_options)
            for branch in self.branches:
                out = branch.add_to(out, q, extra_options)
        if self.callbacks:
            out = self._add_callbacks(out, q, k, v, extra_options)
        return out if out.dtype == q.dtype else out.to(q.dtype)

    def _fused(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: ExtraOptions,
               sdpa: Callable) -> torch.Tensor:
        """Text attention (exactly what ComfyUI's pytorch attention computes) and the face terms on
        one head-split view of q, so the face attention costs one kernel and one fused add per face.
        On GPUs sampling is launch-bound, so kernels and Python calls per layer are what count."""
        b, length, width = q.shape
        heads = extra_options["n_heads"]
        q_heads = q.reshape(b, length, heads, -1).transpose(1, 2)
        out = sdpa(q_heads, k.reshape(b, -1, heads, width // heads).transpose(1, 2),
                   v.reshape(b, -1, heads, width // heads).transpose(1, 2)).transpose(1, 2)
        for branch in self.branches:
            factors = branch.settings.factors(q, extra_options)
            out = torch.addcmul(out, branch.attend(q, q_heads), factors)
        return out.reshape(b, length, width)

    def _add_callbacks(self, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       extra_options: ExtraOptions) -> torch.Tensor:
        """Other packs' callbacks, each gated on the device by its own sigma window."""
        base_out = out
        sigmas = extra_options["sigmas"]
        for callback, kwargs in self.callbacks:
            inside = (sigmas <= kwargs.get("sigma_start", float("inf"))) & (sigmas >= kwargs.get("sigma_end", float("-inf")))
            delta = callback(base_out, q, k, v, extra_options, **kwargs)
            out = out + delta * per_row(inside.to(q.dtype).reshape(-1, 1, 1).to(q.device), q.shape[0])
        return out


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
