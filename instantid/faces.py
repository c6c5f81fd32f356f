"""InsightFace for InstantID: find the antelopev2 models, pick onnxruntime providers, detect the face.

InstantID needs two things from a reference photo: the five keypoints (drawn into the IdentityNet
image) and the raw 512-d ArcFace embedding (fed to the adapter's resampler). Only antelopev2's
detector (`scrfd_10g_bnkps.onnx`) and recogniser (`glintr100.onnx`) produce them, so only those two
files are loaded.

Importing this module is cheap and offline: insightface, onnxruntime and torch are imported inside
the functions that need them. insightface's own model download is never used: its URL is dead and
its request has no timeout, so it can hang a ComfyUI run forever.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .model_files import ANTELOPEV2
from .paths import FETCH_COMMAND

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

FACE_MODEL_NAME = "antelopev2"
FACE_MODEL_FILES = tuple(entry.file for entry in ANTELOPEV2)
DETECTOR_FILE, RECOGNIZER_FILE = FACE_MODEL_FILES

# Largest first: 640 is what InstantID was trained with; smaller sizes only rescue faces that fill
# so much of the photo that SCRFD misses them at 640. The ladder holds InfiniteYou's own retries
# (640, 320, 160), so a face its reference pipeline finds is found here too.
DETECTION_SIZES = (640, 576, 512, 448, 384, 320, 256, 192, 160)
EMBEDDING_SIZE = 512


class Recognizer(Protocol):
    """A second face recogniser a back end brings (InfiniteYou's IR-SE50): it embeds the face that
    antelopev2 found, at that face's five points. `name` keys its embeddings in an identity."""

    name: str
    label: str

    def embed(self, image_bgr: np.ndarray, kps: Any) -> np.ndarray: ...


class FaceModelsMissing(FileNotFoundError):
    """The antelopev2 detector or recogniser file is not where the pack looks for it."""


class FaceModelInvalid(RuntimeError):
    """A face model file exists but onnxruntime or insightface cannot use it."""


# ------------------------------------------------------------------------- finding the models --


def _candidate_folders(root: Path) -> list[Path]:
    """Where a root may hold antelopev2: the documented layout, the layout unzipping the official
    archive into models/antelopev2/ leaves (insightface#1525, #2702), and the folder itself."""
    documented = root / "models" / FACE_MODEL_NAME
    return [documented, documented / FACE_MODEL_NAME, root / FACE_MODEL_NAME]


def _present(folder: Path) -> list[str]:
    return [name for name in FACE_MODEL_FILES if (folder / name).is_file()]


def stray_copies(roots: Sequence[Path]) -> list[Path]:
    """Model files a few levels deeper than the accepted layouts (e.g. unzipped twice), so the error
    (and the doctor) can say where they are. Bounded depth keeps this cheap on big model folders."""
    searched = {folder for root in roots for folder in _candidate_folders(root)}
    found = []
    for root in roots:
        for top in (root / "models" / FACE_MODEL_NAME, root / FACE_MODEL_NAME):
            for name in FACE_MODEL_FILES:
                for depth in ("*/", "*/*/", "*/*/*/"):
                    found += [p for p in top.glob(depth + name) if p.parent not in searched]
    return sorted(set(found))


def _missing_message(roots: Sequence[Path]) -> str:
    target = _candidate_folders(roots[0])[0]
    searched = [folder for root in roots for folder in _candidate_folders(root)]
    lines = [f"InsightFace {FACE_MODEL_NAME} face models not found. Put {DETECTOR_FILE} and {RECOGNIZER_FILE} in:",
             f"  {target}"]
    partial = [folder for folder in searched if folder.is_dir()]
    if partial:
        lines.append("What was found:")
        for folder in partial:
            present = _present(folder)
            missing = [name for name in FACE_MODEL_FILES if name not in present]
            has = f"has {', '.join(present)}" if present else "has neither file"
            lines.append(f"  {folder}: {has}; missing {', '.join(missing)}")
    for stray in stray_copies(roots):
        lines.append(f"  {stray}: too deeply nested, move it to {target / stray.name}")
    lines.append("Searched: " + ", ".join(str(folder) for folder in searched))
    lines.append("Download them: " + ", ".join(entry.url() for entry in ANTELOPEV2))
    lines.append(f"or get them with `{FETCH_COMMAND}`. This pack does not use insightface's auto-download: "
                 "its URL is dead and the request has no timeout, so it can hang.")
    return "\n".join(lines)


def find_antelopev2(roots: Sequence[Path]) -> Path:
    """The first folder holding both antelopev2 files, checking for each root (in order)
    root/models/antelopev2/, root/models/antelopev2/antelopev2/ and root/antelopev2/.

    Raises FaceModelsMissing naming the folder the files belong in and what was found instead.
    """
    roots = [Path(root).expanduser() for root in roots]
    if not roots:
        raise FaceModelsMissing(f"No insightface model folder is configured, so {FACE_MODEL_NAME} cannot be found. "
                                f"Run `{FETCH_COMMAND}`.")
    for root in roots:
        for folder in _candidate_folders(root):
            if len(_present(folder)) == len(FACE_MODEL_FILES):
                return folder
    raise FaceModelsMissing(_missing_message(roots))


# -------------------------------------------------------------------------- onnxruntime setup --

PROVIDER_CHOICES = ["auto", "CPU", "CUDA", "ROCM", "CoreML", "DirectML", "OpenVINO", "MIGraphX"]

CPU_PROVIDER = "CPUExecutionProvider"
# ROCMExecutionProvider is gone from current onnxruntime; AMD builds ship MIGraphX. An old
# onnxruntime-rocm still offering ROCM is used when MIGraphX is absent.
_WANTED = {
    "CPU": (),
    "CUDA": ("CUDAExecutionProvider",),
    "ROCM": ("MIGraphXExecutionProvider", "ROCMExecutionProvider"),
    "CoreML": ("CoreMLExecutionProvider",),
    "DirectML": ("DmlExecutionProvider",),
    "OpenVINO": ("OpenVINOExecutionProvider",),
    "MIGraphX": ("MIGraphXExecutionProvider",),
}
_AUTO_ORDER = ("CUDAExecutionProvider", "MIGraphXExecutionProvider", "ROCMExecutionProvider",
               "DmlExecutionProvider", "CoreMLExecutionProvider")
# EPs that address one GPU among several; the others take no device_id option.
_DEVICE_EPS = {"CUDAExecutionProvider", "MIGraphXExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider"}


def _swap_command(distribution: str) -> str:
    return f"pip uninstall -y onnxruntime {distribution} && pip install {distribution}"


_HOW_TO_GET = {
    "CUDA": f"For NVIDIA GPUs run: {_swap_command('onnxruntime-gpu')}",
    "ROCM": f"For AMD GPUs run: {_swap_command('onnxruntime-migraphx')}",
    "MIGraphX": f"For AMD GPUs run: {_swap_command('onnxruntime-migraphx')}",
    "DirectML": f"On Windows run: {_swap_command('onnxruntime-directml')}",
    "OpenVINO": f"For Intel devices run: {_swap_command('onnxruntime-openvino')}",
    "CoreML": "CoreML exists only on macOS, where the standard onnxruntime wheel includes it.",
}
_REINSTALL_NOTE = " Repeat this after every insightface install or upgrade: it brings the CPU onnxruntime back."

ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                     "onnxruntime-rocm", "onnxruntime-migraphx", "onnxruntime-silicon", "onnxruntime-qnn")


def _choice_key(choice: str) -> str:
    for key in PROVIDER_CHOICES:
        if key.lower() == str(choice).strip().lower():
            return key
    raise ValueError(f"Unknown face analysis provider {choice!r}; choose one of {', '.join(PROVIDER_CHOICES)}.")


def select_providers(choice: str, available: list[str] | None = None, *,
                     device_id: int = 0) -> tuple[list, list[str]]:
    """The onnxruntime providers for `choice` (one of PROVIDER_CHOICES, case-insensitive) and the
    warnings a user should see.

    Only providers in `available` (default: onnxruntime.get_available_providers()) are kept, because
    onnxruntime silently drops unknown ones. GPU providers come as (name, {'device_id': ...}); the
    list always ends with CPUExecutionProvider so an EP that fails to start falls back instead of
    failing. "auto" takes the first GPU provider this onnxruntime offers, else CPU, without warning.
    """
    key = _choice_key(choice)
    if available is None:
        import onnxruntime

        available = onnxruntime.get_available_providers()
    wanted = _AUTO_ORDER if key == "auto" else _WANTED[key]
    chosen = [name for name in wanted if name in available][:1]
    providers: list = [(name, {"device_id": str(device_id)}) if name in _DEVICE_EPS else name for name in chosen]
    providers.append(CPU_PROVIDER)
    warnings = []
    if wanted and not chosen and key != "auto":
        warnings.append(f"Face analysis: {key} was requested but this onnxruntime offers only "
                        f"{', '.join(available) or 'nothing'}; face analysis runs on the CPU instead. "
                        f"{_HOW_TO_GET[key]}" + (_REINSTALL_NOTE if key != "CoreML" else ""))
    return providers, warnings


@dataclass(frozen=True)
class SharedModuleDistributions:
    """pip distributions that all install the same module folder. With two installed, each one's
    files overwrite the other's, and uninstalling either breaks the module; pip allows it anyway."""
    what: str
    names: tuple[str, ...]
    harm: str
    keep_first: tuple[str, ...]  # which one to keep when several are installed, best first
    dragged_in: str  # the one `pip install insightface` installs again
    reinstall_note: str

    def installed(self) -> dict[str, str]:
        """The installed ones and their versions."""
        found = {}
        for name in self.names:
            try:
                found[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
        return found

    def keep(self, found: Mapping[str, str]) -> str:
        return next((name for name in self.keep_first if name in found), self.dragged_in)

    def fix(self, found: Mapping[str, str]) -> str:
        """The pip commands that leave one: all out (their shared files are mixed), the kept one back in."""
        return f"pip uninstall -y {' '.join(found)} && pip install {self.keep(found)}"

    def warning(self) -> str | None:
        """An actionable warning when more than one is installed, else None."""
        found = self.installed()
        if len(found) < 2:
            return None
        listed = ", ".join(f"{name} {version}" for name, version in found.items())
        note = self.reinstall_note if self.keep(found) != self.dragged_in else ""
        return f"Several {self.what} distributions are installed ({listed}). {self.harm} Keep one: {self.fix(found)}.{note}"


# Keep the accelerated build: the CPU one is what `pip install insightface` drags back in.
ONNXRUNTIME = SharedModuleDistributions(
    "onnxruntime", ORT_DISTRIBUTIONS, "They overwrite each other's files, which usually leaves only the CPU provider.",
    ORT_DISTRIBUTIONS[1:], "onnxruntime", _REINSTALL_NOTE)
# Keep a contrib build (a superset that another node pack asked for), else the one insightface and
# this pack declare, so the next `pip install` does not bring a second one back.
OPENCV = SharedModuleDistributions(
    "OpenCV", ("opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless"),
    "They all write the same cv2 folder, so their files are mixed and uninstalling either one breaks `import cv2`.",
    ("opencv-contrib-python", "opencv-contrib-python-headless", "opencv-python", "opencv-python-headless"),
    "opencv-python", " Repeat this after every insightface install or upgrade: it brings opencv-python back.")


def onnxruntime_distributions() -> dict[str, str]:
    """Installed onnxruntime distributions and their versions. They all install the same
    `onnxruntime` module, so with two of them the last one installed silently wins."""
    return ONNXRUNTIME.installed()


def double_install_warning() -> str | None:
    """An actionable warning when more than one onnxruntime distribution is installed, else None."""
    return ONNXRUNTIME.warning()


def _split_providers(providers: list) -> tuple[list[str], list[dict[str, str]]]:
    """(names, options) in the parallel-list form both insightface 0.7.3 and 2.x pass to onnxruntime."""
    names = [p[0] if isinstance(p, tuple) else p for p in providers]
    options = [dict(p[1]) if isinstance(p, tuple) else {} for p in providers]
    return names, options


# ------------------------------------------------------------------------------ loading models --

# onnxruntime's errors for a file that is not a usable model (truncated download, HTML error page).
_BAD_MODEL_ERRORS = ("InvalidProtobuf", "InvalidArgument", "InvalidGraph", "NoModel", "NoSuchFile")


def _bad_model_errors() -> tuple[type[BaseException], ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(getattr(state, name) for name in _BAD_MODEL_ERRORS if hasattr(state, name))


def _invalid(path: Path, reason: str) -> FaceModelInvalid:
    size = path.stat().st_size if path.is_file() else 0
    return FaceModelInvalid(f"{path} ({size} bytes) is not a usable {FACE_MODEL_NAME} model: {reason}. "
                            f"It is probably truncated or not an ONNX file; delete it and run `{FETCH_COMMAND}`.")


def _import_insightface_model_zoo() -> Any:
    # insightface 0.7.3 imports albumentations, which checks for updates over the network at import.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from insightface import model_zoo

    return model_zoo


def _load_model(path: Path, task: str, names: list[str], options: list[dict[str, str]]) -> Any:
    """One insightface model from one file, checked to be the `task` it is meant for."""
    model_zoo = _import_insightface_model_zoo()
    try:
        # static_shape_sessions=False: insightface 2.x would otherwise build one more ONNX session per
        # detection size the fallback tries. 0.7.3 ignores the keyword.
        model = model_zoo.get_model(str(path), providers=names, provider_options=options, static_shape_sessions=False)
    except _bad_model_errors() as error:
        raise _invalid(path, str(error).strip()) from error
    if model is None or getattr(model, "taskname", None) != task:
        routed = "nothing" if model is None else f"{type(model).__name__} ({getattr(model, 'taskname', '?')})"
        raise _invalid(path, f"insightface recognises it as {routed}, not as the {task} model")
    return model


# ----------------------------------------------------------------------------------- detection --


@dataclass(frozen=True, eq=False)
class DetectedFace:
    """The face InstantID uses from one image. Arrays are read-only because results are cached and
    shared between runs. `embedding` is insightface's raw `embedding` (not `normed_embedding`): the
    InstantID adapter was trained on the raw vector."""

    bbox: np.ndarray  # (4,) float32: x1, y1, x2, y2 in image pixels, not clipped to the image
    kps: np.ndarray  # (5, 2) float32: eyes (image left, right), nose, mouth corners (left, right)
    embedding: np.ndarray  # (512,) float32
    det_score: float
    det_size: int  # the square detection size that found the face


def _frozen(values: Any, shape: tuple[int, ...]) -> np.ndarray:
    array = np.array(values, dtype=np.float32).reshape(shape)
    array.setflags(write=False)
    return array


def _image_key(image: np.ndarray) -> str:
    digest = hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=16)
    digest.update(f"{image.shape}{image.dtype}".encode())
    return digest.hexdigest()


def _check_bgr(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        described = f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}"
        # A float 0..1 image makes insightface silently find no face, so refuse it loudly.
        raise ValueError(f"FaceAnalyzer.detect needs a BGR uint8 HxWx3 array, got {described}; "
                         "convert ComfyUI images with image_batch_to_bgr().")


def _largest(bboxes: np.ndarray) -> int:
    # The real area. InstantID's README and older packs sort by (x2-x1)*x3-y1, a precedence bug.
    areas = (bboxes[:, 2] - bboxes[:, 0]) * (bboxes[:, 3] - bboxes[:, 1])
    return int(np.argmax(areas))


class FaceIndexOutOfRange(ValueError):
    """face_index asks for a face beyond those found; `found` says how many there are."""

    def __init__(self, face_index: int, found: int) -> None:
        super().__init__(f"face_index {face_index} asks for face {face_index} from the left, but "
                         f"{found} face{'' if found == 1 else 's'} {'was' if found == 1 else 'were'} found")
        self.face_index = face_index
        self.found = found


def choose_face(bboxes: np.ndarray, face_index: int) -> int:
    """Which detected face to use: 0 = the largest (the official rule), k >= 1 = the k-th from the
    left (by the box's left edge). Raises FaceIndexOutOfRange beyond the faces found."""
    if face_index < 0:
        raise ValueError(f"face_index is {face_index}; use 0 for the largest face or k >= 1 for the k-th from the left.")
    if face_index == 0:
        return _largest(bboxes)
    if face_index > bboxes.shape[0]:
        raise FaceIndexOutOfRange(face_index, int(bboxes.shape[0]))
    return int(np.argsort(bboxes[:, 0], kind="stable")[face_index - 1])


_NOT_CACHED = object()


class FaceAnalyzer:
    """antelopev2 detection + recognition, tuned for InstantID: one face per image (the largest),
    detection-size fallback, and a small cache keyed by image content."""

    cache_size = 16

    def __init__(self, det_model: Any, rec_model: Any, warnings: Sequence[str] = ()) -> None:
        """Use `load` or `wrap`. `det_model`/`rec_model` are insightface SCRFD/ArcFaceONNX models."""
        if not getattr(det_model, "use_kps", True):
            raise FaceModelInvalid("The face detector gives no keypoints; InstantID needs antelopev2's "
                                   f"{DETECTOR_FILE}.")
        self.det_model = det_model
        self.rec_model = rec_model
        self.warnings = tuple(warnings)
        self._cache: OrderedDict[str, DetectedFace | None] = OrderedDict()

    @classmethod
    def load(cls, model_dir: Path, provider: str = "auto") -> FaceAnalyzer:
        """Load the detector and recogniser from `model_dir` (see find_antelopev2) on `provider`
        (one of PROVIDER_CHOICES). The three other antelopev2 models never get a session."""
        model_dir = Path(model_dir)
        missing = [name for name in FACE_MODEL_FILES if not (model_dir / name).is_file()]
        if missing:
            raise FaceModelsMissing(f"{', '.join(missing)} missing in {model_dir}. Run `{FETCH_COMMAND}`.")
        providers, warnings = select_providers(provider)
        doubled = double_install_warning()
        if doubled:
            warnings.append(doubled)
        names, options = _split_providers(providers)
        analyzer = cls(_load_model(model_dir / DETECTOR_FILE, "detection", names, options),
                       _load_model(model_dir / RECOGNIZER_FILE, "recognition", names, options))
        warnings += analyzer._fallback_warnings(names[0])
        if warnings:  # after a warning, say what really runs, from the sessions themselves
            in_use = "; ".join(f"{task} on {', '.join(used)}" for task, used in analyzer.providers_in_use.items())
            warnings.append(f"Face analysis is using: {in_use}.")
        analyzer.warnings = tuple(warnings)
        for warning in warnings:
            logger.warning(warning)
        logger.info("Face analysis providers in use: %s", analyzer.providers_in_use)
        return analyzer

    @classmethod
    def wrap(cls, app: Any) -> FaceAnalyzer:
        """Use an insightface FaceAnalysis loaded elsewhere (another pack's FACEANALYSIS output)."""
        recognizer = getattr(app, "models", {}).get("recognition")
        if getattr(app, "det_model", None) is None or recognizer is None:
            raise ValueError("This face analysis object has no detection or no recognition model; "
                             f"InstantID needs both ({FACE_MODEL_NAME}).")
        return cls(app.det_model, recognizer)

    def _fallback_warnings(self, wanted: str) -> list[str]:
        # onnxruntime falls back to CPU when an offered EP fails to start (missing CUDA/cuDNN
        # libraries); the session's own provider list is the only reliable sign.
        if wanted == CPU_PROVIDER:
            return []
        lost = [task for task, used in self.providers_in_use.items() if wanted not in used]
        if not lost:
            return []
        return [f"Face analysis: {wanted} is installed but failed to start for {', '.join(lost)}; running on "
                "the CPU. Check the onnxruntime error above (usually CUDA/cuDNN libraries that do not match "
                "this onnxruntime build)."]

    @property
    def providers_in_use(self) -> dict[str, list[str]]:
        """What each session really runs on, after onnxruntime's own fallback."""
        return {"detection": list(self.det_model.session.get_providers()),
                "recognition": list(self.rec_model.session.get_providers())}

    @property
    def session_count(self) -> int:
        """ONNX sessions this analyzer's models hold, including any per-size detector sessions."""
        sessions = [self.det_model.session, self.rec_model.session]
        sessions += list(getattr(self.det_model, "resolution_sessions", {}).values())
        return len({id(session) for session in sessions})

    def _detection_sizes(self) -> tuple[int, ...]:
        # A detector exported with a fixed input size ignores the requested size (insightface 2.x).
        static = getattr(self.det_model, "static_input_size", None)
        return (int(static[0]),) if static else DETECTION_SIZES

    def detect(self, image_bgr: np.ndarray, face_index: int = 0) -> DetectedFace | None:
        """The largest face (face_index 0) or the face_index-th from the left in a BGR uint8 HxWx3
        image, or None when there is no face. Detection runs at 640 and, only when that finds nothing,
        at the smaller DETECTION_SIZES. Results are cached by image content and index: ComfyUI re-runs
        the Apply node when only a weight changes. Raises FaceIndexOutOfRange (see choose_face)."""
        _check_bgr(image_bgr)
        key = f"{_image_key(image_bgr)}/{face_index}"
        cached = self._cache.get(key, _NOT_CACHED)
        if cached is not _NOT_CACHED:
            self._cache.move_to_end(key)
            return cached
        face = self._detect_uncached(image_bgr, face_index)
        self._cache[key] = face
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return face

    def _detect_uncached(self, image: np.ndarray, face_index: int) -> DetectedFace | None:
        for size in self._detection_sizes():
            bboxes, kpss = self.det_model.detect(image, input_size=(size, size), max_num=0, metric="default")
            if bboxes.shape[0]:
                break
        else:
            logger.info("No face found in a %dx%d image at any detection size", image.shape[1], image.shape[0])
            return None
        chosen = choose_face(bboxes, face_index)
        return self._describe(image, bboxes[chosen], kpss[chosen], size)

    def _describe(self, image: np.ndarray, bbox_score: np.ndarray, kps: np.ndarray, size: int) -> DetectedFace:
        from insightface.app.common import Face

        # The recogniser runs only for the chosen face: it aligns the crop with these keypoints.
        face = Face(bbox=bbox_score[:4], kps=kps, det_score=bbox_score[4])
        embedding = self.rec_model.get(image, face)
        return DetectedFace(bbox=_frozen(bbox_score[:4], (4,)), kps=_frozen(kps, (5, 2)),
                            embedding=_frozen(embedding, (EMBEDDING_SIZE,)),
                            det_score=float(bbox_score[4]), det_size=size)


# ------------------------------------------------------------------------ ComfyUI image tensors --


def _channels_to_rgb(pixels: torch.Tensor) -> torch.Tensor:
    channels = pixels.shape[-1]
    if channels == 3:
        return pixels
    if channels == 4:  # RGBA: the alpha mask is not part of the face
        return pixels[..., :3]
    if channels in (1, 2):  # grayscale, or grayscale + alpha
        return pixels[..., :1].expand(*pixels.shape[:-1], 3)
    raise ValueError(f"Expected 1 (gray), 2 (gray+alpha), 3 (RGB) or 4 (RGBA) channels, got {channels}.")


def image_batch_to_bgr(images: torch.Tensor) -> list[np.ndarray]:
    """A ComfyUI IMAGE ([B,H,W,C] or [H,W,C] float, RGB in 0..1) as contiguous BGR uint8 HxWx3 arrays,
    the input insightface expects. Values are clamped to 0..1 (NaN becomes 0) and rounded."""
    import torch

    images = torch.as_tensor(images)
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[-1] > 4 or min(images.shape[1:3]) == 0 or not images.is_floating_point():
        raise ValueError(f"Expected a ComfyUI IMAGE: a float tensor [batch, height, width, channels] in 0..1 with "
                         f"1-4 channels, got {images.dtype} {list(images.shape)}. Connect an IMAGE output (e.g. "
                         "Load Image), not a MASK or LATENT.")
    pixels = _channels_to_rgb(images.detach().to("cpu", torch.float32))
    # One float copy (nan_to_num), then in place: a 4096x4096 image is 200 MB per float copy.
    pixels = torch.nan_to_num(pixels, nan=0.0).clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
    return [np.ascontiguousarray(image[..., ::-1]) for image in pixels.numpy()]


# ------------------------------------------------------------------------- several face images --

COMBINE_MODES = ("average", "norm average", "concat")


def combine_embeddings(embeddings: np.ndarray | torch.Tensor, mode: str) -> torch.Tensor:
    """Combine the [N, 512] embeddings of several reference photos into float32 tokens.

    average: the mean, [1, 512]. norm average: the mean direction of the L2-normalised vectors,
    scaled to the mean input norm, [1, 512], so one photo with an unusually large norm does not
    dominate while the magnitude the adapter was trained on is kept. concat: all N rows, [N, 512].
    """
    import torch

    if mode not in COMBINE_MODES:
        raise ValueError(f"Unknown embedding combine mode {mode!r}; choose one of {', '.join(COMBINE_MODES)}.")
    vectors = torch.as_tensor(embeddings).detach().to("cpu", torch.float64)
    if vectors.ndim == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.ndim != 2 or vectors.shape[0] == 0 or vectors.shape[1] != EMBEDDING_SIZE:
        raise ValueError(f"Expected face embeddings of shape [N, {EMBEDDING_SIZE}], got {list(vectors.shape)}.")
    if mode == "concat":
        combined = vectors
    elif mode == "average":
        combined = vectors.mean(dim=0, keepdim=True)
    else:
        combined = _norm_average(vectors)
    return combined.to(torch.float32)


def _norm_average(vectors: torch.Tensor) -> torch.Tensor:
    norms = vectors.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("A face embedding is all zeros and has no direction; 'norm average' cannot use it.")
    direction = (vectors / norms).mean(dim=0, keepdim=True)
    length = direction.norm()
    if float(length) < 1e-6:
        raise ValueError("The face embeddings cancel out under 'norm average'; use 'average' or 'concat'.")
    return direction / length * norms.mean()
