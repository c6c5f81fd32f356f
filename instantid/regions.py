"""Where an identity acts on the image: the face region and the identity mask.

The official "enhance non-face region" mode confines the identity to the face's bounding box: the
IdentityNet residuals are multiplied by the box resized bilinearly to each residual's resolution,
the face-attention output by the box resized nearest to each layer's resolution; the prompt keeps
acting everywhere. Here the box is drawn on the keypoint image's canvas and placed on the latent
exactly as ComfyUI places the keypoint hint (same resize, same centre crop), so box and keypoints
line up for any latent aspect. A user mask ("identity only" scope) is stretched to the latent like
ComfyUI's conditioning masks and the face attention's mask; with both, the factor is their product.

Placement needs the latent size, which is known only while sampling, so a region keeps the
canvas-sized inputs and builds each factor once per resolution and batch layout (cached).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

MASK_SCOPES = ("prompt and identity", "identity only")
PROMPT_AND_IDENTITY, IDENTITY_ONLY = MASK_SCOPES
# How ComfyUI's ControlNet scales a hint to the latent (ControlBase defaults: latent pixels x 8,
# 'nearest-exact' resize, then a 'center' crop in comfy.utils.common_upscale).
LATENT_SCALE = 8
HINT_UPSCALE = "nearest-exact"
# Interpolation of the face box to a layer's resolution (the official full pipeline's choices).
RESIDUALS, ATTENTION = "bilinear", "nearest"


def check_mask_scope(mask_scope: str) -> None:
    if mask_scope not in MASK_SCOPES:
        raise ValueError(f"mask_scope is {mask_scope!r}; choose one of {', '.join(repr(s) for s in MASK_SCOPES)}.")


def face_box_canvas(boxes: Sequence[Sequence[float] | None], width: int, height: int) -> torch.Tensor:
    """[B, 1, H, W] float, 1 inside each image's face box (x1, y1, x2, y2 in canvas pixels, truncated
    to whole pixels as the official pipeline does, clipped to the canvas), 0 elsewhere. A None box (no
    face in that image) gives an empty region: that image gets no identity."""
    canvas = torch.zeros(len(boxes), 1, int(height), int(width))
    for index, box in enumerate(boxes):
        if box is None:
            continue
        x1, y1, x2, y2 = (int(v) for v in box)
        canvas[index, 0, max(y1, 0):max(y2, 0), max(x1, 0):max(x2, 0)] = 1.0
    return canvas


DRAWN_THRESHOLD = 0.1


def drawn_extent_boxes(keypoint_image: torch.Tensor) -> list[tuple[int, int, int, int] | None]:
    """The bounding box of the drawn (non-black) pixels of each keypoint image [B, H, W, C], as
    (x1, y1, x2, y2) with exclusive ends; None for an all-black frame. It spans the five keypoints'
    dots and sticks, so it is tighter than the detected face box (eyes to mouth, not brow to chin).
    Pixels up to DRAWN_THRESHOLD count as black: a JPEG-compressed drawing's background is not 0."""
    drawn = (keypoint_image.detach().float().cpu().amax(dim=-1) > DRAWN_THRESHOLD).numpy()
    boxes: list[tuple[int, int, int, int] | None] = []
    for frame in drawn:
        rows, cols = np.flatnonzero(frame.any(axis=1)), np.flatnonzero(frame.any(axis=0))
        boxes.append(None if rows.size == 0 else (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1))
    return boxes


def place_like_hint(canvas: torch.Tensor, latent_size: Sequence[int]) -> torch.Tensor:
    """A canvas-sized [B, 1, H, W] region resized and centre-cropped to the latent's pixel size the
    way ComfyUI's ControlNet does it to the keypoint hint (ControlNet.get_control)."""
    import comfy.utils  # only while sampling: this module imports without ComfyUI
    height, width = (int(v) * LATENT_SCALE for v in latent_size)
    return comfy.utils.common_upscale(canvas, width, height, HINT_UPSCALE, "center")


def mask_for_batch(mask: torch.Tensor, batch: int) -> torch.Tensor:
    """One mask per latent: a single mask is shared, a shorter batch repeats its last mask, a longer
    one is cut (as ComfyUI does for other per-image inputs)."""
    if mask.shape[0] == batch or mask.shape[0] == 1:
        return mask.expand(batch, *mask.shape[1:])
    if mask.shape[0] < batch:
        return torch.cat([mask, mask[-1:].expand(batch - mask.shape[0], *mask.shape[1:])])
    return mask[:batch]


def rows_like_hint(per_image: torch.Tensor, rows: int, chunks: int) -> torch.Tensor:
    """Per-image values [B, ...] for the `rows` of one batched call of `chunks` equal chunks, the
    way ComfyUI broadcasts the hint batch (comfy.controlnet.broadcast_image_to)."""
    import comfy.controlnet  # only while sampling: this module imports without ComfyUI
    return comfy.controlnet.broadcast_image_to(per_image, rows, chunks)


class IdentityRegion:
    """Where one Apply's identity acts: an optional face box (canvas-sized, placed like the hint)
    times an optional mask (stretched to each resolution). Immutable apart from its cache, so deep
    copies share it."""

    def __init__(self, face_box: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> None:
        if face_box is None and mask is None:
            raise ValueError("an identity region needs a face box, a mask or both")
        self.face_box = None if face_box is None else face_box.detach().float().cpu()  # [B, 1, H, W]
        self.mask = None if mask is None else mask.detach().float().cpu()  # [N, H, W] in 0..1
        self._factors: dict[tuple, torch.Tensor] = {}
        self._placed: dict[tuple[int, int], torch.Tensor] = {}

    def __deepcopy__(self, memo: dict) -> "IdentityRegion":
        return self

    def factor(self, size: Sequence[int], latent_size: Sequence[int] | None, rows: int, chunks: int, face_mode: str,
               device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The region at one resolution for the rows of one batched call: [rows, 1, h, w], built once
        per resolution, latent size and batch layout. Chunk j of the rows is one copy of the latent
        batch (ComfyUI batches cond and uncond chunk-major); each chunk gets the same region. The
        latent size (h, w) places the face box; a mask alone does not need it."""
        latent = None if latent_size is None or self.face_box is None else tuple(int(v) for v in latent_size)
        key = (tuple(size), latent, rows, chunks, face_mode, device, dtype)
        factor = self._factors.get(key)
        if factor is None:
            factor = self._build(tuple(int(v) for v in size), latent, rows, chunks, face_mode)
            factor = factor.to(device=device, dtype=dtype)
            if len(self._factors) > 64:
                self._factors.clear()
            self._factors[key] = factor
        return factor

    def _build(self, size: tuple[int, int], latent_size: tuple[int, int] | None, rows: int, chunks: int,
               face_mode: str) -> torch.Tensor:
        factor = None
        if self.mask is not None:
            mask = F.interpolate(self.mask[:, None], size=size, mode="bilinear", align_corners=False)
            factor = mask_for_batch(mask, rows // chunks).repeat(chunks, 1, 1, 1)
        if self.face_box is not None:
            placed = self._placed.get(latent_size)
            if placed is None:
                placed = self._placed[latent_size] = place_like_hint(self.face_box, latent_size)
            box = F.interpolate(placed, size=size, mode=face_mode, **({"align_corners": False} if face_mode == RESIDUALS else {}))
            box = rows_like_hint(box, rows, chunks)
            factor = box if factor is None else factor * box
        return factor.expand(rows, *factor.shape[1:]) if factor.shape[0] == 1 else factor

    def confine(self, control: dict[str, list], latent_size: Sequence[int], chunks: int) -> dict[str, list]:
        """ControlNet residuals ({'input'|'middle'|'output': [tensor | None]}) times the region at each
        residual's resolution (bilinear face box), as new tensors. A residual is a UNet feature map
        [rows, C, h, w] or a FLUX token sequence [rows, h*w, C] of the latent's 2x2 patches in raster
        order; a tensor shared by several positions (FLUX repeats each block's) is scaled once."""
        confined: dict[int, torch.Tensor] = {}

        def scaled(x: torch.Tensor) -> torch.Tensor:
            if id(x) not in confined:
                if x.ndim == 3:
                    size = token_grid(latent_size)
                    factor = self.factor(size, latent_size, x.shape[0], chunks, RESIDUALS, x.device, x.dtype)
                    confined[id(x)] = x * factor.reshape(x.shape[0], size[0] * size[1], 1)
                else:
                    confined[id(x)] = x * self.factor(x.shape[-2:], latent_size, x.shape[0], chunks, RESIDUALS,
                                                      x.device, x.dtype)
            return confined[id(x)]

        return {name: [None if x is None else scaled(x) for x in residuals] for name, residuals in control.items()}


# ComfyUI cuts a conditioning mask batch to the latent batch and then tiles it, so M masks crash the
# sampler for a latent batch N > M that M does not divide. Padding with the last mask (what the face
# attention does, see regions.mask_for_batch) makes every latent batch up to this size work.
CONDITIONING_MASK_BATCH = 16


def conditioning_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The [N, H, W] mask for the positive conditioning: a single mask as is, a batch padded."""
    if mask is None or mask.shape[0] == 1 or mask.shape[0] >= CONDITIONING_MASK_BATCH:
        return mask
    return torch.cat([mask, mask[-1:].expand(CONDITIONING_MASK_BATCH - mask.shape[0], *mask.shape[1:])])


def scoped_region(face_box: torch.Tensor | None, mask: torch.Tensor | None,
                  mask_scope: str) -> tuple[IdentityRegion | None, torch.Tensor | None]:
    """(the region for the identity ControlNet's residuals, the mask for the positive conditioning).
    'prompt and identity' makes the positive prompt regional (and the ControlNet with it, through
    ComfyUI's conditioning mask); 'identity only' multiplies only the residuals by the mask; a face
    box multiplies them in both."""
    identity_only = mask_scope == IDENTITY_ONLY
    residual_mask = mask if identity_only else None
    region = None if face_box is None and residual_mask is None else IdentityRegion(face_box, residual_mask)
    return region, None if identity_only else conditioning_mask(mask)


# FLUX packs the latent into 2x2 patches (odd sides padded), one token per patch.
FLUX_PATCH = 2


def token_grid(latent_size: Sequence[int]) -> tuple[int, int]:
    """The (rows, columns) of FLUX's token grid for a latent of size (h, w)."""
    height, width = (int(v) for v in latent_size)
    return -(-height // FLUX_PATCH), -(-width // FLUX_PATCH)
