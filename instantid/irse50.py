"""ArcFace IR-SE50, the face recogniser InfiniteYou's projection was trained on (not antelopev2's).

The network is facexlib's `Backbone(num_layers=50, mode='ir_se')` (TreB1eN's InsightFace_Pytorch),
written here so that facexlib's `recognition_arcface_ir_se50.pth` loads as is, key for key: facexlib
itself pulls numba and downloads weights at run time. An embedding is insightface's `norm_crop`
112x112 of the BGR image at the five detected points, scaled to [-1, 1] (channels stay BGR, as the
reference pipeline feeds them), through the network: 512 values of unit length.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .weights_files import WeightsUnreadable, read_weights

RECOGNIZER_NAME = "arcface_ir_se50"
CROP_SIZE = 112
EMBEDDING_SIZE = 512
# (input width, output width, units) of the four stages; the first unit of each stage strides by 2.
STAGES = ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3))
SE_REDUCTION = 16
EXPECTED_LAYOUT = ("facexlib's ArcFace IR-SE50 state dict (recognition_arcface_ir_se50.pth from "
                   "github.com/xinntao/facexlib/releases/tag/v0.1.0): input_layer.0.weight [64, 3, 3, 3], 24 body "
                   "units body.0 ... body.23, output_layer.3.weight [512, 25088]")


class RecognizerFileError(ValueError):
    """The file is not a usable IR-SE50 recogniser; the message says why and what was expected."""


class SqueezeExcite(nn.Module):
    """Channel gate: global average, bottleneck, sigmoid (keys fc1, fc2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // SE_REDUCTION, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // SE_REDUCTION, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class Unit(nn.Module):
    """One IR-SE bottleneck: BN, 3x3 conv, PReLU, 3x3 conv (strided), BN, SE, plus the shortcut
    (subsampling when the width is kept, else a strided 1x1 conv and BN). Keys res_layer.0..5 and
    shortcut_layer.0..1 follow facexlib's Sequential indices."""

    def __init__(self, width_in: int, width_out: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.res_layer = nn.Sequential(nn.BatchNorm2d(width_in), nn.Conv2d(width_in, width_out, 3, 1, 1, bias=False),
                                       nn.PReLU(width_out), nn.Conv2d(width_out, width_out, 3, stride, 1, bias=False),
                                       nn.BatchNorm2d(width_out), SqueezeExcite(width_out))
        self.shortcut_layer = (None if width_in == width_out else
                               nn.Sequential(nn.Conv2d(width_in, width_out, 1, stride, bias=False),
                                             nn.BatchNorm2d(width_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x[:, :, ::self.stride, ::self.stride] if self.shortcut_layer is None else self.shortcut_layer(x)
        return self.res_layer(x) + shortcut


class IRSE50(nn.Module):
    """[B, 3, 112, 112] in [-1, 1] -> [B, 512] unit vectors (eval mode: dropout is off)."""

    def __init__(self) -> None:
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        self.body = nn.Sequential(*(Unit(width_in if unit == 0 else width_out, width_out, 2 if unit == 0 else 1)
                                    for width_in, width_out, units in STAGES for unit in range(units)))
        # Indices 1 and 2 (dropout, flatten) hold no weights; the keys skip them as facexlib's do.
        self.output_layer = nn.Sequential(nn.BatchNorm2d(512), nn.Dropout(), nn.Flatten(),
                                          nn.Linear(512 * 7 * 7, EMBEDDING_SIZE), nn.BatchNorm1d(EMBEDDING_SIZE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.output_layer(self.body(self.input_layer(x))), dim=1)


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of facexlib's state dict and its shape (num_batches_tracked counters optional)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in IRSE50().state_dict().items() if not k.endswith("num_batches_tracked")}


def load_irse50(path: str | Path) -> IRSE50:
    """The recogniser from facexlib's .pth (plain state dict, read with weights_only) or a
    .safetensors with the same keys; RecognizerFileError naming the file and what it holds when the
    layout is not IR-SE50's. The network stays on the CPU in fp32: it runs once per face."""
    path = Path(path)
    try:
        state = read_weights(path)
    except WeightsUnreadable as error:
        raise RecognizerFileError(f"{path} could not be read as weights ({error}). Expected {EXPECTED_LAYOUT}.") from error
    if isinstance(state, dict) and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        held = ", ".join(sorted(map(str, state))[:3]) if isinstance(state, dict) else type(state).__name__
        raise RecognizerFileError(f"{path} is not the IR-SE50 face recogniser (it holds {held or 'nothing'}, not a plain "
                                  f"state dict of tensors). Expected {EXPECTED_LAYOUT}.")
    expected = expected_shapes()
    weights = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    problems = [f"{k} missing" for k in expected if k not in weights]
    problems += [f"{k} is {list(weights[k].shape)}, expected {list(shape)}" for k, shape in expected.items()
                 if k in weights and tuple(weights[k].shape) != shape]
    problems += [f"unexpected {k}" for k in weights if k not in expected]
    if problems:
        sample = ", ".join(sorted(state)[:3]) or "nothing"
        raise RecognizerFileError(f"{path} is not the IR-SE50 face recogniser ({len(state)} tensors such as {sample}: "
                                  f"{'; '.join(problems[:3])}{' ...' if len(problems) > 3 else ''}). "
                                  f"Expected {EXPECTED_LAYOUT}.")
    network = IRSE50()
    network.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    return network.eval().requires_grad_(False)


def aligned_face(image_bgr: np.ndarray, kps: np.ndarray) -> torch.Tensor:
    """[1, 3, 112, 112] float32 in [-1, 1]: insightface's norm_crop of the BGR image at the points."""
    from insightface.utils import face_align

    crop = face_align.norm_crop(image_bgr, landmark=np.asarray(kps, dtype=np.float32), image_size=CROP_SIZE)
    return torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255.0 * 2 - 1


class IRSE50Recognizer:
    """A face recogniser in the front end's terms (faces.Recognizer): a name and embed(). Embeddings
    are remembered by aligned crop (ComfyUI re-runs an Apply when only a strength changes, and the
    similarity node sees the same reference again)."""

    name = RECOGNIZER_NAME
    label = "ArcFace IR-SE50 (InfiniteYou)"
    cache_size = 32

    def __init__(self, network: IRSE50, path: Path | None = None) -> None:
        self.network = network
        self.path = path
        self._embeddings: OrderedDict[bytes, np.ndarray] = OrderedDict()

    def embed(self, image_bgr: np.ndarray, kps: Any) -> np.ndarray:
        """The 512-d unit embedding of the face at `kps` (5 x 2 pixels) in a BGR uint8 image."""
        face = aligned_face(image_bgr, kps)
        key = hashlib.sha256(face.numpy().tobytes()).digest()
        embedding = self._embeddings.get(key)
        if embedding is None:
            with torch.no_grad():
                embedding = self.network(face)[0].numpy().astype(np.float32)
            embedding.setflags(write=False)
            self._embeddings[key] = embedding
            if len(self._embeddings) > self.cache_size:
                self._embeddings.popitem(last=False)
        return embedding
