"""Face crop and paste: repair a small face at full resolution.

A face a tenth of the frame loses the identity, because the IdentityNet and the face attention act
on a few latent pixels. The usual fix: crop the face with some context, upscale the crop so the
face is large, run InstantID img2img on it, and paste the result back into the original.

Geometry. The crop box is the detected face box grown by `padding` (a fraction of the box) on each
side, centred on the face. It is never shifted to stay inside the image: the part outside is filled
by repeating the edge pixels, so the face stays centred in the crop. The crop is resampled so its
long side is `size`, both sides multiples of 8 (what the VAE needs). In a batch every crop has the
size of the first face's crop; the other boxes grow along one side to that aspect (never shrink).

Paste. The original image cannot be recovered exactly from a resampled crop (down(up(x)) != x), so
the paste does not put resized pixels back. It recomputes the unprocessed crop from the original
exactly as the crop did, and adds the CHANGE, resized back to the box, weighted by the feathered
mask: out = original + mask * resize(processed - unprocessed). An unmodified crop is a change of
exactly zero, which gives back the original bit for bit; pixels outside the crop box are never
written. Inside, a real change blends in along the mask (the original's detail that resampling
would lose is kept under the new face, instead of a slightly softened copy of it).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .checks import NumberInput, check_finite
from .faces import FaceAnalyzer, FaceIndexOutOfRange, image_batch_to_bgr
from .progress import each_image

DEFAULT_PADDING = 0.6
DEFAULT_SIZE = 1024
DEFAULT_FEATHER = 32
SIZE_MULTIPLE = 8  # the VAE's downscale: latent sides are whole numbers
ASPECT_TOLERANCE = 0.01  # a processed crop resized by more than this along one axis would be distorted


@dataclass(frozen=True)
class FaceCrop:
    """Where one image's crop came from. `box` is (x0, y0, x1, y1) in source pixels, end exclusive;
    it may reach outside the image. `face_found` False: no face (or no face at face_index) was
    found, the crop shows the whole image and the paste leaves that image as it is."""

    source_size: tuple[int, int]  # (height, width) of the original image
    box: tuple[int, int, int, int]
    crop_size: tuple[int, int]  # (height, width) of the crop image
    face_found: bool

    @property
    def box_size(self) -> tuple[int, int]:
        """(height, width) of the box in source pixels."""
        x0, y0, x1, y1 = self.box
        return y1 - y0, x1 - x0

    @property
    def scale(self) -> tuple[float, float]:
        """(x, y) crop pixels per source pixel; the two differ only by the rounding to multiples of 8."""
        box_h, box_w = self.box_size
        return self.crop_size[1] / box_w, self.crop_size[0] / box_h


@dataclass(frozen=True)
class CropResult:
    image: torch.Tensor  # [B, h, w, C] the crops, upscaled
    crops: tuple[FaceCrop, ...]  # one per image, batch positions kept (the CROP value)
    mask: torch.Tensor  # [B, h, w] the paste's blend mask at DEFAULT_FEATHER, in crop pixels
    notes: list[str]


def _as_pixels(images: torch.Tensor, name: str) -> torch.Tensor:
    """A ComfyUI IMAGE as a float32 CPU [B, H, W, C] tensor (the precision both nodes compute in)."""
    if not torch.is_tensor(images) or images.ndim != 4 or not images.is_floating_point() or min(images.shape) == 0:
        shape = list(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"The {name} input must be a ComfyUI IMAGE (a float [batch, height, width, channels] tensor), "
                         f"got {shape}; connect an IMAGE output such as Load Image or VAE Decode.")
    return images.detach().to("cpu", torch.float32)


def check_crop_settings(padding: float, size: int) -> None:
    if not padding >= 0:
        raise ValueError(f"padding is {padding}; use 0 or more (a fraction of the face box added on each side, "
                         f"{DEFAULT_PADDING} by default).")
    if size < SIZE_MULTIPLE or size % SIZE_MULTIPLE:
        raise ValueError(f"size is {size}; use a multiple of {SIZE_MULTIPLE} (the crop's long side, "
                         f"{DEFAULT_SIZE} by default), as the VAE needs.")


def crop_dimensions(width: float, height: float, size: int) -> tuple[int, int]:
    """(height, width) of a crop whose long side is `size` and whose short side keeps the aspect,
    rounded to a multiple of 8 (at least 8)."""
    short = max(SIZE_MULTIPLE, round(size * min(width, height) / max(width, height) / SIZE_MULTIPLE) * SIZE_MULTIPLE)
    return (size, short) if height >= width else (short, size)


def _round(value: float) -> int:
    return math.floor(value + 0.5)


def fit_box(centre: tuple[float, float], width: float, height: float,
            crop_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The integer box centred on `centre` that holds width x height, grown along one side to the
    crop's aspect."""
    aspect = crop_size[1] / crop_size[0]
    if width / height < aspect:
        width = height * aspect
    else:
        height = width / aspect
    box_w, box_h = max(1, _round(width)), max(1, _round(height))
    x0, y0 = _round(centre[0] - box_w / 2), _round(centre[1] - box_h / 2)
    return x0, y0, x0 + box_w, y0 + box_h


def padded_face(bbox: np.ndarray, padding: float) -> tuple[tuple[float, float], float, float]:
    """(centre, width, height) of a detected face box grown by `padding` of its size on each side."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    grow = 1.0 + 2.0 * padding
    return ((x1 + x2) / 2, (y1 + y2) / 2), max(x2 - x1, 1.0) * grow, max(y2 - y1, 1.0) * grow


def source_region(image: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """The box's pixels of one [H, W, C] image; outside the image the edge pixels repeat."""
    x0, y0, x1, y1 = box
    height, width = image.shape[:2]
    rows = torch.arange(y0, y1).clamp_(0, height - 1)
    columns = torch.arange(x0, x1).clamp_(0, width - 1)
    return image.index_select(0, rows).index_select(1, columns)


def resample(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[H, W, C] resized to (height, width): bicubic, antialiased when shrinking. Linear in the
    pixels, so a zero change stays exactly zero."""
    if tuple(pixels.shape[:2]) == tuple(size):
        return pixels
    channels_first = pixels.movedim(-1, 0)[None]
    resized = F.interpolate(channels_first, size=size, mode="bicubic", align_corners=False, antialias=True)
    return resized[0].movedim(0, -1)


def unprocessed_crop(image: torch.Tensor, crop: FaceCrop) -> torch.Tensor:
    """The crop of one [H, W, C] float32 image, as the crop node outputs it and the paste recomputes it."""
    return resample(source_region(image, crop.box), crop.crop_size).clamp(0.0, 1.0)


def edge_distances(length: int, source_per_pixel: float) -> torch.Tensor:
    """For each of `length` pixels across a box, the distance of its centre to the nearer box edge,
    in source pixels."""
    centres = torch.arange(length, dtype=torch.float64) + 0.5
    return torch.minimum(centres, length - centres) * source_per_pixel


def feather_mask(crop: FaceCrop, feather: float, in_crop_pixels: bool) -> torch.Tensor:
    """The blend weight over the box: 0 at its edge rising linearly to 1 at `feather` source pixels
    inside (at most half the box's short side, so a large feather still leaves a full-weight
    centre). In crop pixels (the crop node's mask, 0 where the crop lies outside the image) or in
    source pixels (the paste)."""
    box_h, box_w = crop.box_size
    scale_x, scale_y = crop.scale if in_crop_pixels else (1.0, 1.0)
    height, width = (crop.crop_size if in_crop_pixels else crop.box_size)
    distance = torch.minimum(edge_distances(height, 1 / scale_y)[:, None], edge_distances(width, 1 / scale_x)[None, :])
    ramp = min(float(feather), min(box_h, box_w) / 2)
    mask = torch.ones_like(distance) if ramp <= 0 else (distance / ramp).clamp_(0.0, 1.0)
    if in_crop_pixels:
        x0, y0 = crop.box[:2]
        source_h, source_w = crop.source_size
        xs = x0 + (torch.arange(width, dtype=torch.float64) + 0.5) / scale_x
        ys = y0 + (torch.arange(height, dtype=torch.float64) + 0.5) / scale_y
        mask = mask * ((ys >= 0) & (ys < source_h))[:, None] * ((xs >= 0) & (xs < source_w))[None, :]
    return mask.to(torch.float32)


def _which(index: int, total: int) -> str:
    return f"image {index + 1} of {total}"


def crop_faces(analyzer: FaceAnalyzer, images: torch.Tensor, face_index: int = 0, padding: float = DEFAULT_PADDING,
               size: int = DEFAULT_SIZE, numbers: Sequence[NumberInput] = ()) -> CropResult:
    """Crop the face of each image (face_index 0: the largest, k: the k-th from the left), upscaled
    so the crop's long side is `size`. An image without that face gets the whole image as its crop,
    an empty mask and a note; the paste returns it unchanged. `numbers`: the node's FLOAT inputs
    (checks.float_inputs), checked for NaN/infinity like every Apply's."""
    check_finite(numbers or [NumberInput("padding", padding)])
    check_crop_settings(padding, size)
    pixels = _as_pixels(images, "image")
    total, height, width = pixels.shape[:3]
    notes: list[str] = []
    faces = []
    for index, bgr in enumerate(each_image(image_batch_to_bgr(pixels))):
        try:
            face = analyzer.detect(bgr, face_index)
            problem = None if face is not None else "no face found"
        except FaceIndexOutOfRange as error:
            face, problem = None, str(error)
        if problem:
            notes.append(f"{_which(index, total)}: {problem}; its crop is the whole image with an empty mask, and "
                         "InstantID Face Paste returns it unchanged")
        faces.append(face)
    whole_image = ((width / 2, height / 2), float(width), float(height))
    # (centre, width, height) to cover: the padded face, or the whole image when there is none
    wanted = [whole_image if face is None else padded_face(face.bbox, padding) for face in faces]
    first = next((w for w, face in zip(wanted, faces) if face is not None), wanted[0])
    crop_size = crop_dimensions(first[1], first[2], size)
    crops = tuple(FaceCrop((height, width), fit_box(centre, w, h, crop_size), crop_size, face is not None)
                  for (centre, w, h), face in zip(wanted, faces))
    out = torch.stack([unprocessed_crop(image, crop) for image, crop in zip(pixels, crops)])
    masks = torch.stack([feather_mask(crop, DEFAULT_FEATHER, in_crop_pixels=True) if crop.face_found
                         else torch.zeros(crop_size) for crop in crops])
    return CropResult(out, crops, masks, notes)


def _processed_at_crop_size(processed: torch.Tensor, crop_size: tuple[int, int]) -> torch.Tensor:
    """The processed crop at the crop's size: as is, or resized when only its scale changed (an upscaler)."""
    height, width = processed.shape[:2]
    if (height, width) == crop_size:
        return processed
    if abs((width / height) / (crop_size[1] / crop_size[0]) - 1) > ASPECT_TOLERANCE:
        raise ValueError(f"The processed crop is {width}x{height} but the crop was {crop_size[1]}x{crop_size[0]}, a "
                         "different shape; connect the crop (after img2img, which keeps its size) to 'processed'.")
    return resample(processed, crop_size)


def _check_paste_inputs(pixels: torch.Tensor, processed: torch.Tensor, crops: Sequence[FaceCrop]) -> None:
    if not isinstance(crops, Sequence) or not crops or not all(isinstance(crop, FaceCrop) for crop in crops):
        raise ValueError("The crop input must be the CROP output of InstantID Face Crop.")
    if len(crops) != pixels.shape[0] or processed.shape[0] != pixels.shape[0]:
        raise ValueError(f"Batch sizes differ: {pixels.shape[0]} original image(s), {processed.shape[0]} processed "
                         f"crop(s), {len(crops)} crop description(s); paste each crop back into the batch it came from.")
    source = crops[0].source_size
    if tuple(pixels.shape[1:3]) != source:
        raise ValueError(f"The image is {pixels.shape[2]}x{pixels.shape[1]} but the crop was taken from a "
                         f"{source[1]}x{source[0]} image; connect the image that went into InstantID Face Crop.")
    if processed.shape[3] != pixels.shape[3]:
        raise ValueError(f"The processed crop has {processed.shape[3]} channels and the image {pixels.shape[3]}; "
                         "both must be the same kind of image (RGB).")


def paste_faces(images: torch.Tensor, processed: torch.Tensor, crops: Sequence[FaceCrop],
                feather: float = DEFAULT_FEATHER) -> tuple[torch.Tensor, list[str]]:
    """The original images with each processed crop's change blended into its box (see the module
    docstring). Pixels outside the boxes, and whole images whose crop found no face, are unchanged."""
    if not feather >= 0:
        raise ValueError(f"feather is {feather}; use 0 (a hard edge) or more pixels.")
    pixels = _as_pixels(images, "image")
    processed = _as_pixels(processed, "processed")
    _check_paste_inputs(pixels, processed, crops)
    out = pixels.clone()
    notes = []
    for index, (image, crop) in enumerate(zip(pixels, crops)):
        if not crop.face_found:
            notes.append(f"{_which(index, len(crops))} had no face at the crop and is returned unchanged")
            continue
        change = _processed_at_crop_size(processed[index], crop.crop_size) - unprocessed_crop(image, crop)
        back = resample(change, crop.box_size)
        mask = feather_mask(crop, feather, in_crop_pixels=False)
        x0, y0, x1, y1 = crop.box
        height, width = image.shape[:2]
        left, top, right, bottom = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
        inside = (slice(top - y0, bottom - y0), slice(left - x0, right - x0))
        original = image[top:bottom, left:right]
        blended = original + mask[inside][..., None] * back[inside]
        # Clamp to 0..1, but never past what the original already held, so zero change is exact.
        out[index, top:bottom, left:right] = torch.clamp(blended, min=original.clamp(max=0.0),
                                                         max=original.clamp(min=1.0))
    return out, notes
