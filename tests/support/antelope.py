"""A tiny synthetic antelopev2 pack, so the tests run the REAL insightface + onnxruntime code offline.

`write_antelopev2(folder)` writes two ONNX files of a few KB that insightface's model router treats
exactly like the real ones:

* ``scrfd_10g_bnkps.onnx`` routes to SCRFD: input ``[1, 3, '?', '?']`` and nine rank-2 outputs
  (score, bbox, kps for strides 8, 16, 32, two anchors each). Rank 2, not rank 3, because
  insightface 0.7.3 cannot decode batched outputs.
* ``glintr100.onnx`` routes to ArcFaceONNX: input ``['None', 3, 112, 112]``, output ``[None, 512]``.

What the fake detector sees as a face
    Only stride 32, anchor 0 can fire. Every 32x32 cell of the detector input is averaged and
    ``red = mean(R - B)`` is taken on insightface's normalised blob ``(p - 127.5) / 128``, which is
    RGB because SCRFD converts its BGR input with ``swapRB=True``. The score is
    ``sigmoid(20 * (red - 1.5) - 20 * mean(red of the 8 neighbour cells))``, so a cell fires
    (score 0.99995) only when at least ~76 % of it is a saturated red marker RGB ``(255, g, 0)``
    and its neighbours are not red:

    * an RGB array passed where BGR is expected makes the marker blue, and no face is found;
    * a marker spanning 2x2 cells or more (a face too big for this detection size) is missed, like
      real SCRFD misses huge faces, so the detection-size fallback can be tested.

    The green value sets the size: ``d = 1 + 3 g / 255`` stride units. In detector pixels the bbox
    is ``cell centre +- 32 d`` and the keypoints are ``cell centre + (arcface_dst - 56) / 56 * 32 d``,
    so insightface's ``norm_crop`` maps the bbox square exactly onto the 112x112 aligned crop.
    insightface divides both by its letterbox ``det_scale`` (see `expected_face`).

What the fake recogniser returns
    ``embedding[:256]`` is the 7x7-pooled R channel of the aligned crop and ``embedding[256:]`` the
    pooled B channel (16x16 grids of ``(p - 127.5) / 127.5``), so `expected_embedding` catches both
    alignment and colour-order mistakes.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DETECTOR_FILE = "scrfd_10g_bnkps.onnx"
RECOGNIZER_FILE = "glintr100.onnx"

OPSET = 13  # old enough for any onnxruntime insightface 0.7.3 or 2.x runs on
IR_VERSION = 8

STRIDES = (8, 16, 32)
FIRE_STRIDE = 32
ANCHORS = 2

# SCRFD normalises with (p - 127.5) / 128, so a 255 pixel becomes 127.5 / 128.
DET_MEAN, DET_STD = 127.5, 128.0
_FULL = 127.5 / DET_STD

# Score logit = 20 * (red - 1.5) - 20 * mean(red of the 8 neighbours). The graph computes the
# neighbour mean from a 3x3 average that includes the centre:
#   GAIN * red - GAIN * avg3x3 + BIAS  with GAIN = 20 * 9 / 8, BIAS = -20 * 1.5.
_SCORE_GAIN = 20.0
_SCORE_THRESHOLD = 1.5
_RING_GAIN = _SCORE_GAIN * 9.0 / 8.0
_SCORE_BIAS = -_SCORE_GAIN * _SCORE_THRESHOLD
_NEVER = -30.0  # logit of outputs that must never fire: sigmoid(-30) ~ 1e-13

# Face half-size in stride units, d = 1 + 3 g / 255, written as d = 2.5 + _SIZE_GAIN * Gn where
# Gn = (g - 127.5) / 128 is the normalised green the detector sees.
_SIZE_CENTRE = 2.5
_SIZE_GAIN = 1.5 / _FULL

ARCFACE_DST = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
# Keypoints relative to the box centre, in units of the half box size.
FACE_TEMPLATE = (ARCFACE_DST - 56.0) / 56.0


def face_half_size(g: float) -> float:
    """Half the box side, in stride units, of a marker with green value `g`."""
    return 1.0 + 3.0 * float(g) / 255.0


# ------------------------------------------------------------------------------------ geometry --


def det_scale_for(h: int, w: int, det_size: int | Sequence[int]) -> float:
    """insightface's letterbox scale for an `h` x `w` image at `det_size` (an int for a square size,
    or a (width, height) pair), replicating SCRFD.detect's arithmetic including its int() cut."""
    det_w, det_h = (det_size, det_size) if isinstance(det_size, int) else det_size
    if float(h) / w > float(det_h) / det_w:
        new_h = det_h
    else:
        new_h = int(det_w * (float(h) / w))
    return float(new_h) / h


def expected_face(cell: tuple[int, int], g: int, det_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The (bbox (4,), kps (5, 2)) insightface should report, in original image pixels, for a marker
    drawn at `cell` = (column, row) of the 32-px detector grid with green value `g`."""
    gx, gy = cell
    centre = np.array([FIRE_STRIDE * gx + FIRE_STRIDE / 2.0, FIRE_STRIDE * gy + FIRE_STRIDE / 2.0])
    half = FIRE_STRIDE * face_half_size(g)
    bbox = np.concatenate([centre - half, centre + half])
    kps = centre + FACE_TEMPLATE * half
    return bbox / det_scale, kps / det_scale


def draw_face(
    image_rgb: np.ndarray, cell: tuple[int, int], g: int, det_scale: float = 1.0, *, red: int = 255
) -> np.ndarray:
    """Paint the marker for `cell` into an RGB HxWx3 uint8 array in place and return the array.

    With `det_scale` != 1 the marker is laid out for that detector scale and padded by 2 detector
    pixels, so the cell stays fully covered after insightface's cv2.resize while its neighbours stay
    almost clear. A `red` below 255 lowers the score a little (240 gives 0.9995 instead of 0.99995).
    """
    margin = 0 if det_scale == 1.0 else 2
    gx, gy = cell
    x0 = int(np.floor((FIRE_STRIDE * gx - margin) / det_scale))
    y0 = int(np.floor((FIRE_STRIDE * gy - margin) / det_scale))
    x1 = int(np.ceil((FIRE_STRIDE * (gx + 1) + margin) / det_scale))
    y1 = int(np.ceil((FIRE_STRIDE * (gy + 1) + margin) / det_scale))
    image_rgb[max(y0, 0):y1, max(x0, 0):x1] = (red, g, 0)
    return image_rgb


def expected_embedding(image_bgr: np.ndarray, kps: np.ndarray) -> np.ndarray:
    """The 512 values the fake recogniser returns for the face with keypoints `kps` in `image_bgr`."""
    from insightface.utils import face_align

    crop = face_align.norm_crop(image_bgr, landmark=np.asarray(kps, np.float32), image_size=112)
    rgb = (crop[:, :, ::-1].astype(np.float64) - 127.5) / 127.5
    pooled = rgb.reshape(16, 7, 16, 7, 3).mean(axis=(1, 3))
    return np.concatenate([pooled[:, :, 0].ravel(), pooled[:, :, 2].ravel()])


# --------------------------------------------------------------------------------- ONNX graphs --


def _tensor(name: str, values: np.ndarray | Sequence[float], dtype: type = np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="instantid-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _geometry_head(stride: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """1x1 conv weights (out, 3, 1, 1) and biases reading the pooled RGB cell: bbox distances and
    keypoint offsets as affine functions of the green channel, for anchor 0 of the firing stride."""
    bbox_w, bbox_b = np.zeros((4 * ANCHORS, 3, 1, 1)), np.zeros(4 * ANCHORS)
    kps_w, kps_b = np.zeros((10 * ANCHORS, 3, 1, 1)), np.zeros(10 * ANCHORS)
    if stride == FIRE_STRIDE:
        # Anchor centres sit at the cell's top-left corner, half a stride before the cell centre:
        # left/top distances are d - 0.5, right/bottom d + 0.5.
        bbox_w[0:4, 1, 0, 0] = _SIZE_GAIN
        bbox_b[0:4] = _SIZE_CENTRE + np.array([-0.5, -0.5, 0.5, 0.5])
        for point, (tx, ty) in enumerate(FACE_TEMPLATE):
            for axis, t in enumerate((tx, ty)):
                channel = 2 * point + axis
                kps_w[channel, 1, 0, 0] = t * _SIZE_GAIN
                kps_b[channel] = 0.5 + t * _SIZE_CENTRE
    return {"bbox": (bbox_w, bbox_b), "kps": (kps_w, kps_b)}


def _flatten_head(nodes: list, source: str, name: str, width: int) -> None:
    """NCHW conv output -> [H*W*anchors, width], SCRFD's rank-2 layout."""
    nodes.append(helper.make_node("Transpose", [source], [f"{name}_nhwc"], name=f"{name}_nhwc", perm=[0, 2, 3, 1]))
    nodes.append(helper.make_node("Reshape", [f"{name}_nhwc", f"rows_of_{width}"], [name], name=f"{name}_rows"))


def _detector_graph() -> onnx.GraphProto:
    nodes: list = []
    inits = [_tensor(f"rows_of_{k}", [-1, k], np.int64) for k in (1, 4, 10)]
    outputs: dict[str, onnx.ValueInfoProto] = {}
    for stride in STRIDES:
        pooled = f"pool{stride}"
        nodes.append(helper.make_node("AveragePool", ["input.1"], [pooled], name=pooled,
                                      kernel_shape=[stride, stride], strides=[stride, stride]))
        score_w, score_b = np.zeros((ANCHORS, 3, 1, 1)), np.full(ANCHORS, _NEVER)
        score_in = pooled
        if stride == FIRE_STRIDE:
            # red per cell, then its 3x3 average (zero padding counts: image borders are not red).
            inits.append(_tensor("red_w", np.array([1.0, 0.0, -1.0]).reshape(1, 3, 1, 1)))
            nodes.append(helper.make_node("Conv", [pooled, "red_w"], ["red"], name="red"))
            nodes.append(helper.make_node("AveragePool", ["red"], ["red3x3"], name="red3x3", kernel_shape=[3, 3],
                                          strides=[1, 1], pads=[1, 1, 1, 1], count_include_pad=1))
            nodes.append(helper.make_node("Concat", ["red", "red3x3"], ["red_pair"], name="red_pair", axis=1))
            score_in = "red_pair"
            score_w = np.zeros((ANCHORS, 2, 1, 1))
            score_w[0, :, 0, 0] = [_RING_GAIN, -_RING_GAIN]
            score_b = np.array([_SCORE_BIAS, _NEVER])
        heads = {"score": (score_in, score_w, score_b, 1)}
        for kind, (w, b) in _geometry_head(stride).items():
            heads[kind] = (pooled, w, b, w.shape[0] // ANCHORS)
        for kind, (source, w, b, width) in heads.items():
            name = f"{kind}_{stride}"
            inits += [_tensor(f"{name}_w", w), _tensor(f"{name}_b", b)]
            nodes.append(helper.make_node("Conv", [source, f"{name}_w", f"{name}_b"], [f"{name}_conv"],
                                          name=f"{name}_conv"))
            head = f"{name}_conv"
            if kind == "score":
                nodes.append(helper.make_node("Sigmoid", [head], [f"{name}_sigmoid"], name=f"{name}_sigmoid"))
                head = f"{name}_sigmoid"
            _flatten_head(nodes, head, name, width)
            outputs[name] = helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"n{stride}", width])
    # SCRFD reads its outputs as [scores x3, bboxes x3, kps x3], each in ascending stride order.
    order = [outputs[f"{kind}_{stride}"] for kind in ("score", "bbox", "kps") for stride in STRIDES]
    image = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])
    return helper.make_graph(nodes, "tiny_scrfd_10g_bnkps", [image], order, inits)


def _recognizer_graph() -> onnx.GraphProto:
    # Node names must not start with Sub/_minus and Mul/_mul: ArcFaceONNX would then assume an
    # mxnet export with mean 0 / std 1 instead of 127.5 / 127.5.
    select = np.zeros((2, 3, 1, 1))
    select[0, 0] = 1.0  # R of the RGB blob
    select[1, 2] = 1.0  # B
    nodes = [
        helper.make_node("AveragePool", ["input.1"], ["pooled"], name="pool7", kernel_shape=[7, 7], strides=[7, 7]),
        helper.make_node("Conv", ["pooled", "select_w"], ["red_blue"], name="select_red_blue"),
        helper.make_node("Flatten", ["red_blue"], ["embedding"], name="flatten", axis=1),
    ]
    crop = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])
    embedding = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["None", 512])
    return helper.make_graph(nodes, "tiny_glintr100", [crop], [embedding], [_tensor("select_w", select)])


def write_antelopev2(folder: Path) -> Path:
    """Write the two synthetic antelopev2 files into `folder` (created if needed) and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _save(_detector_graph(), folder / DETECTOR_FILE)
    _save(_recognizer_graph(), folder / RECOGNIZER_FILE)
    return folder


def expected_photo_similarity(photos: Sequence[tuple[Path, Mapping[str, object]]]) -> float:
    """The face similarity of two photo files drawn with `draw_face(cell, g)` (as written by
    support.workflows.write_face_photo), from the synthetic recogniser's known output rather than
    the pack's code path. `photos` is ((path, {"cell": ..., "g": ...}), (path, {...}))."""
    from PIL import Image

    from instantid.similarity import cosine_similarity
    embeddings = []
    for path, face in photos:
        bgr = np.asarray(Image.open(path).convert("RGB"))[..., ::-1]
        _, kps = expected_face(face["cell"], face["g"], det_scale_for(bgr.shape[0], bgr.shape[1], 640))
        embeddings.append(expected_embedding(bgr, kps))
    return cosine_similarity(*embeddings)
