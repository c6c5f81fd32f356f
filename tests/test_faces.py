"""instantid.faces against the REAL insightface + onnxruntime code, offline, on the tiny synthetic
antelopev2 pack from tests/support/antelope.py (its docstring explains what counts as a face)."""
from __future__ import annotations

import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from instantid import faces
from instantid.faces import (
    COMBINE_MODES,
    FACE_MODEL_FILES,
    DetectedFace,
    FaceAnalyzer,
    FaceModelInvalid,
    FaceModelsMissing,
    combine_embeddings,
    double_install_warning,
    find_antelopev2,
    image_batch_to_bgr,
    onnxruntime_distributions,
    select_providers,
)
from support import antelope

insightface = pytest.importorskip("insightface")

CPU_ONLY = ["AzureExecutionProvider", "CPUExecutionProvider"]
CELL, GREEN = (9, 7), 128


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Any insightface download attempt fails at once and is recorded."""
    import insightface.utils.storage as storage

    attempts: list[str] = []

    def refuse(url: str, *args: object, **kwargs: object) -> None:
        attempts.append(url)
        raise AssertionError(f"insightface tried to download {url}")

    monkeypatch.setattr(storage, "download_file", refuse)
    return attempts


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An insightface root holding the synthetic pack in models/antelopev2/."""
    root = tmp_path_factory.mktemp("insightface")
    antelope.write_antelopev2(root / "models" / "antelopev2")
    return root


@pytest.fixture(scope="module")
def analyzer(pack: Path) -> FaceAnalyzer:
    return FaceAnalyzer.load(pack / "models" / "antelopev2", "CPU")


def rgb_canvas(h: int = 640, w: int = 640) -> np.ndarray:
    return np.zeros((h, w, 3), np.uint8)


def comfy_image(*rgb_images: np.ndarray) -> torch.Tensor:
    """RGB uint8 arrays as a ComfyUI IMAGE batch (float 0..1, [B,H,W,C])."""
    return torch.from_numpy(np.stack(rgb_images).astype(np.float32) / 255.0)


def one_face_bgr() -> np.ndarray:
    return image_batch_to_bgr(comfy_image(antelope.draw_face(rgb_canvas(), CELL, GREEN)))[0]


# ------------------------------------------------------------------------- the synthetic pack --


def test_pack_runs_in_the_real_face_analysis(pack: Path) -> None:
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name=str(pack / "models" / "antelopev2"), root=str(pack),
                       providers=["CPUExecutionProvider"], allowed_modules=["detection", "recognition"])
    app.prepare(ctx_id=-1, det_size=(640, 640))
    bgr = one_face_bgr()
    found = app.get(bgr)
    assert len(found) == 1
    bbox, kps = antelope.expected_face(CELL, GREEN)
    np.testing.assert_allclose(found[0].bbox, bbox, rtol=0, atol=1e-3)
    np.testing.assert_allclose(found[0].kps, kps, rtol=0, atol=1e-3)
    np.testing.assert_allclose(found[0].embedding, antelope.expected_embedding(bgr, found[0].kps), rtol=0, atol=1e-5)
    assert found[0].det_score == pytest.approx(1 / (1 + np.exp(-20 * (2 * 127.5 / 128 - 1.5))), abs=1e-5)


# ----------------------------------------------------------------------------------- detection --


def test_detect_returns_expected_kps_and_raw_embedding(analyzer: FaceAnalyzer) -> None:
    bgr = one_face_bgr()
    face = analyzer.detect(bgr)
    assert isinstance(face, DetectedFace) and face.det_size == 640
    bbox, kps = antelope.expected_face(CELL, GREEN)
    assert face.bbox.dtype == face.kps.dtype == face.embedding.dtype == np.float32
    assert (face.bbox.shape, face.kps.shape, face.embedding.shape) == ((4,), (5, 2), (512,))
    np.testing.assert_allclose(face.bbox, bbox, rtol=0, atol=1e-3)
    np.testing.assert_allclose(face.kps, kps, rtol=0, atol=1e-3)
    expected = antelope.expected_embedding(bgr, face.kps)
    np.testing.assert_allclose(face.embedding, expected, rtol=0, atol=1e-5)
    # Raw, not normed: this crop's embedding is far from unit length.
    assert np.linalg.norm(face.embedding) == pytest.approx(np.linalg.norm(expected), rel=1e-5)
    assert abs(np.linalg.norm(expected) - 1.0) > 1.0
    assert not face.embedding.flags.writeable  # cached results must not be mutated by callers


def test_rgb_passed_as_bgr_finds_no_face(analyzer: FaceAnalyzer) -> None:
    rgb = antelope.draw_face(rgb_canvas(), CELL, GREEN)
    assert analyzer.detect(rgb) is None
    assert analyzer.detect(image_batch_to_bgr(comfy_image(rgb))[0]) is not None


def test_float_image_is_refused_instead_of_finding_nothing(analyzer: FaceAnalyzer) -> None:
    with pytest.raises(ValueError, match="image_batch_to_bgr"):
        analyzer.detect(one_face_bgr().astype(np.float32) / 255.0)


def test_largest_face_wins_over_score_and_buggy_area(analyzer: FaceAnalyzer) -> None:
    # Small face: full red (higher score), bottom right. Big face: red 240 (lower score), top left.
    # The old (x2-x1)*y2-y1 formula would pick the small one: 64*656-592 > 256*144+112.
    rgb = rgb_canvas()
    antelope.draw_face(rgb, (15, 19), 0)
    antelope.draw_face(rgb, (1, 0), 255, red=240)
    bgr = image_batch_to_bgr(comfy_image(rgb))[0]
    bboxes, _ = analyzer.det_model.detect(bgr, input_size=(640, 640), max_num=0, metric="default")
    assert len(bboxes) == 2 and bboxes[0, 4] > bboxes[1, 4]  # insightface lists the small face first
    face = analyzer.detect(bgr)
    np.testing.assert_allclose(face.bbox, antelope.expected_face((1, 0), 255)[0], rtol=0, atol=1e-3)
    np.testing.assert_allclose(face.embedding, antelope.expected_embedding(bgr, face.kps), rtol=0, atol=1e-5)


def test_face_too_big_at_640_is_found_at_a_smaller_size(pack: Path) -> None:
    analyzer = FaceAnalyzer.load(pack / "models" / "antelopev2", "CPU")
    scale = antelope.det_scale_for(640, 640, 320)
    bgr = image_batch_to_bgr(comfy_image(antelope.draw_face(rgb_canvas(), (3, 3), 0, scale)))[0]
    sizes = []
    real_detect = analyzer.det_model.detect

    def recording_detect(image: np.ndarray, input_size: tuple[int, int], **kwargs: object) -> tuple:
        sizes.append(input_size)
        return real_detect(image, input_size=input_size, **kwargs)

    analyzer.det_model.detect = recording_detect
    face = analyzer.detect(bgr)
    assert sizes == [(s, s) for s in (640, 576, 512, 448, 384, 320)]
    assert face.det_size == 320
    bbox, kps = antelope.expected_face((3, 3), 0, scale)
    np.testing.assert_allclose(face.bbox, bbox, rtol=0, atol=1e-2)
    np.testing.assert_allclose(face.kps, kps, rtol=0, atol=1e-2)
    # insightface 2.x would build one extra session per size tried; the analyzer must not.
    assert analyzer.session_count == 2


def test_same_image_is_detected_once(pack: Path) -> None:
    analyzer = FaceAnalyzer.load(pack / "models" / "antelopev2", "CPU")
    calls = []
    real_detect = analyzer.det_model.detect
    analyzer.det_model.detect = lambda *a, **k: calls.append(1) or real_detect(*a, **k)
    first = analyzer.detect(one_face_bgr())
    again = analyzer.detect(one_face_bgr())  # equal content, different array
    assert len(calls) == 1 and again is first
    blank = rgb_canvas()
    assert analyzer.detect(blank) is None and analyzer.detect(blank.copy()) is None
    assert len(calls) == 1 + len(faces.DETECTION_SIZES)  # "no face" is cached too
    shifted = one_face_bgr()
    shifted[0, 0, 0] = 1  # one byte differs: a new image
    analyzer.detect(shifted)
    assert len(calls) == 2 + len(faces.DETECTION_SIZES)


def test_wrap_uses_another_packs_face_analysis(pack: Path) -> None:
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name=str(pack / "models" / "antelopev2"), root=str(pack),
                       providers=["CPUExecutionProvider"], allowed_modules=["detection", "recognition"])
    app.prepare(ctx_id=-1, det_size=(640, 640))
    wrapped = FaceAnalyzer.wrap(app)
    face = wrapped.detect(one_face_bgr())
    np.testing.assert_allclose(face.kps, antelope.expected_face(CELL, GREEN)[1], rtol=0, atol=1e-3)
    assert wrapped.det_model is app.det_model and wrapped.rec_model is app.models["recognition"]


def test_only_two_sessions_on_cpu(analyzer: FaceAnalyzer) -> None:
    assert analyzer.session_count == 2
    assert analyzer.providers_in_use == {"detection": ["CPUExecutionProvider"],
                                         "recognition": ["CPUExecutionProvider"]}


# -------------------------------------------------------------------------- finding the models --


def test_find_documented_layout(pack: Path) -> None:
    assert find_antelopev2([pack]) == pack / "models" / "antelopev2"


def test_find_nested_unzip_layout_and_later_roots(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    (first / "models" / "antelopev2").mkdir(parents=True)
    nested = antelope.write_antelopev2(second / "models" / "antelopev2" / "antelopev2")
    assert find_antelopev2([first, second]) == nested
    direct = antelope.write_antelopev2(tmp_path / "c" / "antelopev2")
    assert find_antelopev2([tmp_path / "c"]) == direct


def test_missing_folder_names_where_files_belong(tmp_path: Path) -> None:
    with pytest.raises(FaceModelsMissing) as error:
        find_antelopev2([tmp_path / "one", tmp_path / "two"])
    message = str(error.value)
    assert f"\n  {tmp_path / 'one' / 'models' / 'antelopev2'}\n" in message
    assert "scrfd_10g_bnkps.onnx" in message and "glintr100.onnx" in message
    assert "python -m instantid fetch-models" in message and "auto-download" in message
    assert str(tmp_path / "two" / "antelopev2") in message  # the search list
    assert isinstance(error.value, FileNotFoundError)


def test_folder_with_one_file_names_the_missing_one(tmp_path: Path, pack: Path) -> None:
    nested = tmp_path / "models" / "antelopev2" / "antelopev2"
    nested.mkdir(parents=True)
    (nested / "glintr100.onnx").write_bytes((pack / "models" / "antelopev2" / "glintr100.onnx").read_bytes())
    with pytest.raises(FaceModelsMissing) as error:
        find_antelopev2([tmp_path])
    message = str(error.value)
    assert f"{nested}: has glintr100.onnx; missing scrfd_10g_bnkps.onnx" in message
    assert f"{tmp_path / 'models' / 'antelopev2'}: has neither file" in message
    assert f"\n  {tmp_path / 'models' / 'antelopev2'}\n" in message


def test_too_deeply_nested_files_are_pointed_at(tmp_path: Path) -> None:
    deep = antelope.write_antelopev2(tmp_path / "models" / "antelopev2" / "antelopev2" / "antelopev2")
    with pytest.raises(FaceModelsMissing, match="too deeply nested") as error:
        find_antelopev2([tmp_path])
    assert f"{deep / 'scrfd_10g_bnkps.onnx'}: too deeply nested, move it to " \
           f"{tmp_path / 'models' / 'antelopev2' / 'scrfd_10g_bnkps.onnx'}" in str(error.value)


@pytest.mark.parametrize("broken", ["scrfd_10g_bnkps.onnx", "glintr100.onnx"])
@pytest.mark.parametrize("content", ["truncated", "html", "empty"])
def test_corrupt_onnx_names_the_file(tmp_path: Path, pack: Path, broken: str, content: str) -> None:
    folder = antelope.write_antelopev2(tmp_path / "antelopev2")
    good = (folder / broken).read_bytes()
    data = {"truncated": good[: len(good) // 2], "html": b"<html>404 Not Found</html>", "empty": b""}[content]
    (folder / broken).write_bytes(data)
    with pytest.raises(FaceModelInvalid) as error:
        FaceAnalyzer.load(folder, "CPU")
    assert str(folder / broken) in str(error.value) and f"({len(data)} bytes)" in str(error.value)
    assert "python -m instantid fetch-models" in str(error.value)


def test_swapped_files_are_rejected(tmp_path: Path, pack: Path) -> None:
    folder = tmp_path / "antelopev2"
    folder.mkdir()
    source = pack / "models" / "antelopev2"
    (folder / "scrfd_10g_bnkps.onnx").write_bytes((source / "glintr100.onnx").read_bytes())
    (folder / "glintr100.onnx").write_bytes((source / "scrfd_10g_bnkps.onnx").read_bytes())
    with pytest.raises(FaceModelInvalid, match="scrfd_10g_bnkps.onnx.*ArcFaceONNX.*not as the detection"):
        FaceAnalyzer.load(folder, "CPU")


def test_load_with_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FaceModelsMissing, match=f"scrfd_10g_bnkps.onnx, glintr100.onnx missing in {tmp_path}"):
        FaceAnalyzer.load(tmp_path, "CPU")


# --------------------------------------------------------------------------------- no network --


def test_nothing_downloads_or_connects(pack: Path, no_downloads: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from insightface.app import FaceAnalysis

    def no_socket(*args: object) -> None:
        raise AssertionError("network connection attempted")

    monkeypatch.setattr(socket.socket, "connect", no_socket)
    analyzer = FaceAnalyzer.load(find_antelopev2([pack]), "auto")
    assert analyzer.detect(one_face_bgr()) is not None
    FaceAnalysis(name=str(pack / "models" / "antelopev2"), root=str(pack), providers=["CPUExecutionProvider"],
                 allowed_modules=["detection", "recognition"])
    assert no_downloads == []
    # The guard itself works: a missing pack makes insightface try, and the attempt is caught.
    with pytest.raises(AssertionError, match="tried to download"):
        FaceAnalysis(name="antelopev2", root=str(pack / "elsewhere"), providers=["CPUExecutionProvider"])
    assert len(no_downloads) == 1


def test_import_is_cheap_and_offline() -> None:
    code = ("import sys, instantid.faces; "
            "print(sorted(m for m in ('insightface', 'onnxruntime', 'torch', 'cv2') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------- providers --


def test_auto_on_cpu_only_is_cpu_without_warning() -> None:
    assert select_providers("auto", CPU_ONLY) == (["CPUExecutionProvider"], [])


def test_auto_prefers_cuda_with_device_option() -> None:
    providers, warnings = select_providers("auto", ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                    "CPUExecutionProvider"])
    assert providers == [("CUDAExecutionProvider", {"device_id": "0"}), "CPUExecutionProvider"] and warnings == []


def test_cuda_on_cpu_only_falls_back_and_says_how_to_fix() -> None:
    providers, warnings = select_providers("CUDA", CPU_ONLY)
    assert providers == ["CPUExecutionProvider"]
    assert len(warnings) == 1
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in warnings[0]
    assert "runs on the CPU" in warnings[0]


def test_rocm_maps_to_migraphx() -> None:
    providers, warnings = select_providers("ROCM", ["MIGraphXExecutionProvider", "CPUExecutionProvider"])
    assert providers == [("MIGraphXExecutionProvider", {"device_id": "0"}), "CPUExecutionProvider"] and warnings == []
    old_rocm_build = ["ROCMExecutionProvider", "CPUExecutionProvider"]
    assert select_providers("ROCM", old_rocm_build)[0][0] == ("ROCMExecutionProvider", {"device_id": "0"})


@pytest.mark.parametrize(("choice", "provider"), [("DirectML", ("DmlExecutionProvider", {"device_id": "0"})),
                                                  ("CoreML", "CoreMLExecutionProvider"),
                                                  ("OpenVINO", "OpenVINOExecutionProvider"),
                                                  ("cuda", ("CUDAExecutionProvider", {"device_id": "0"}))])
def test_other_providers(choice: str, provider: object) -> None:
    available = ["DmlExecutionProvider", "CoreMLExecutionProvider", "OpenVINOExecutionProvider",
                 "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers(choice, available) == ([provider, "CPUExecutionProvider"], [])


def test_cpu_choice_and_unknown_choice() -> None:
    assert select_providers("CPU", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == (["CPUExecutionProvider"], [])
    with pytest.raises(ValueError, match="auto, CPU, CUDA, ROCM, CoreML, DirectML, OpenVINO, MIGraphX"):
        select_providers("TPU", CPU_ONLY)


def test_load_reports_cuda_fallback_warning(pack: Path) -> None:
    analyzer = FaceAnalyzer.load(pack / "models" / "antelopev2", "CUDA")
    if "CUDAExecutionProvider" in analyzer.providers_in_use["detection"]:
        pytest.skip("this onnxruntime runs CUDA")
    assert any("onnxruntime-gpu" in warning for warning in analyzer.warnings)
    assert analyzer.providers_in_use["recognition"] == ["CPUExecutionProvider"]


def fake_installed(monkeypatch: pytest.MonkeyPatch, installed: dict[str, str]) -> None:
    def version(name: str) -> str:
        if name not in installed:
            raise metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(metadata, "version", version)


def test_double_install_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_installed(monkeypatch, {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"})
    assert onnxruntime_distributions() == {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"}
    warning = double_install_warning()
    assert "onnxruntime 1.32.0, onnxruntime-gpu 1.31.1" in warning
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in warning


def test_single_install_has_no_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_installed(monkeypatch, {"onnxruntime-directml": "1.24.4"})
    assert onnxruntime_distributions() == {"onnxruntime-directml": "1.24.4"}
    assert double_install_warning() is None


# ---------------------------------------------------------------------- ComfyUI image tensors --


def test_exact_pixel_values_and_channel_order() -> None:
    image = torch.tensor([[[1.0, 0.5, 0.0], [0.2, 1 / 255, 0.998]],
                          [[2.0, -1.0, float("nan")], [0.5 / 255, 1.5 / 255, 254.5 / 255]]])
    (bgr,) = image_batch_to_bgr(image)  # [H,W,C] is accepted as a batch of one
    # 0.5*255 = 127.5 rounds half to even (128); 0.998*255 = 254.49 -> 254; NaN -> 0.
    expected_rgb = np.array([[[255, 128, 0], [51, 1, 254]], [[255, 0, 0], [0, 2, 254]]], np.uint8)
    np.testing.assert_array_equal(bgr, expected_rgb[..., ::-1])
    assert bgr.dtype == np.uint8 and bgr.flags.c_contiguous


def test_batch_rgba_gray_and_gray_alpha() -> None:
    rng = np.random.default_rng(0)
    rgba = rng.random((2, 3, 5, 4), dtype=np.float32)
    out = image_batch_to_bgr(torch.from_numpy(rgba))
    assert len(out) == 2
    for i in range(2):
        np.testing.assert_array_equal(out[i], (rgba[i, ..., 2::-1] * 255).round().astype(np.uint8))
    gray = rng.random((1, 3, 5, 1), dtype=np.float32)
    expected_gray = np.repeat((gray[0] * 255).round().astype(np.uint8), 3, axis=2)
    np.testing.assert_array_equal(image_batch_to_bgr(torch.from_numpy(gray))[0], expected_gray)
    gray_alpha = np.concatenate([gray, np.zeros_like(gray)], axis=3)
    np.testing.assert_array_equal(image_batch_to_bgr(torch.from_numpy(gray_alpha))[0], expected_gray)


@pytest.mark.parametrize("bad", [torch.zeros(2, 64, 64, 5), torch.zeros(64, 64), torch.zeros(1, 0, 4, 3),
                                 torch.zeros(1, 4, 4, 3, dtype=torch.uint8), torch.zeros(1, 1, 4, 4, 3)])
def test_bad_image_shapes_are_explained(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="ComfyUI IMAGE|channels"):
        image_batch_to_bgr(bad)


# ---------------------------------------------------------------------- combining embeddings --


def test_combine_average_and_concat() -> None:
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(3, 512)) * np.array([[1.0], [5.0], [20.0]])
    average = combine_embeddings(vectors, "average")
    assert average.dtype == torch.float32 and average.shape == (1, 512)
    np.testing.assert_allclose(average.numpy()[0], vectors.sum(axis=0) / 3, rtol=1e-6, atol=1e-6)
    concat = combine_embeddings(torch.tensor(vectors, dtype=torch.float32), "concat")
    assert concat.dtype == torch.float32 and concat.shape == (3, 512)
    np.testing.assert_array_equal(concat.numpy(), vectors.astype(np.float32))


def test_combine_norm_average() -> None:
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(4, 512)) * np.array([[1.0], [2.0], [10.0], [30.0]])
    units = [v / np.sqrt(np.dot(v, v)) for v in vectors]
    direction = np.sum(units, axis=0) / len(units)
    mean_norm = np.mean([np.sqrt(np.dot(v, v)) for v in vectors])
    expected = direction / np.sqrt(np.dot(direction, direction)) * mean_norm
    result = combine_embeddings(vectors, "norm average")
    assert result.shape == (1, 512) and result.dtype == torch.float32
    np.testing.assert_allclose(result.numpy()[0], expected, rtol=1e-5, atol=1e-5)
    one = vectors[2:3]
    np.testing.assert_allclose(combine_embeddings(np.repeat(one, 5, axis=0), "norm average").numpy(),
                               one, rtol=1e-6, atol=1e-5)


def test_combine_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="average, norm average, concat"):
        combine_embeddings(np.ones((2, 512)), "sum")
    with pytest.raises(ValueError, match=r"\[N, 512\]"):
        combine_embeddings(np.ones((2, 256)), "average")
    v = np.ones((1, 512))
    with pytest.raises(ValueError, match="cancel out"):
        combine_embeddings(np.concatenate([v, -v]), "norm average")
    assert COMBINE_MODES == ("average", "norm average", "concat")
    assert FACE_MODEL_FILES == ("scrfd_10g_bnkps.onnx", "glintr100.onnx")
