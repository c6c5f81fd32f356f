"""`python -m instantid doctor` on model trees with known faults and on a complete one, the model
checks one by one, and the packaging the Comfy Registry and ComfyUI-Manager read."""
from __future__ import annotations

import ast
import json
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import torch

from conftest import COMFYUI, REPO_ROOT
from instantid import __version__, file_layouts
from instantid.commands import cli, doctor
from instantid.model_files import CATALOG, format_size
from instantid.commands.comfy_home import PACK_ROOT, comfyui_version
from support.antelope import write_antelopev2

MARK = doctor.MARKERS
IDENTITYNET = next(entry for entry in CATALOG if entry.id == "identitynet")


def fake_comfyui(folder: Path, version: str = "0.8.0") -> Path:
    """A folder comfy_home accepts as a ComfyUI checkout; the doctor only reads its version."""
    (folder / "comfy").mkdir(parents=True)
    (folder / "nodes.py").write_text("")
    (folder / "execution.py").write_text("")
    (folder / "comfyui_version.py").write_text(f'__version__ = "{version}"\n')
    return folder


def run_doctor(capsys, *args: object) -> tuple[int, list[str]]:
    code = cli.main(["doctor", *map(str, args)])
    return code, capsys.readouterr().out.splitlines()


def size_of(path: Path) -> str:
    return format_size(path.stat().st_size)


def test_missing_nested_and_corrupt_files_are_reported_with_the_fixes(tmp_path, monkeypatch, capsys):
    comfyui = fake_comfyui(tmp_path / "ComfyUI")
    monkeypatch.setenv("COMFYUI_PATH", str(comfyui))
    base = tmp_path / "base"
    adapter = base / "models/instantid/ip-adapter.bin"
    adapter.parent.mkdir(parents=True)
    adapter.write_bytes(b"<!DOCTYPE html><html><body>Error 502</body></html>")  # a saved error page
    faces = base / "models/insightface/models/antelopev2"
    write_antelopev2(faces / "antelopev2")  # the archive unzipped one level too deep
    # no IdentityNet at all

    code, lines = run_doctor(capsys, "--base-directory", base)

    assert code == 1
    assert lines[0] == f"{MARK['ok']} ComfyUI: {comfyui} (version 0.8.0)"
    assert lines[1] == f"{MARK['ok']} model folders: base directory {base}"
    assert lines[2].startswith(f"{MARK['ok']} Python: ")
    assert any(line.startswith(f"{MARK['ok']} onnxruntime: ") and "(a session on scrfd_10g_bnkps.onnx)" in line
               for line in lines)
    nested = faces / "antelopev2"
    assert lines[lines.index(f"{MARK['warn']} pack: {PACK_ROOT} is not in {base / 'custom_nodes'}, so ComfyUI's UI "
                             "will not load these nodes (`python -m instantid run` loads them anyway)") + 1:] == [
        f"{MARK['fail']} adapter: BROKEN {adapter} ({size_of(adapter)}): not a PyTorch zip archive (the format of the "
        "published ip-adapter.bin): the download is truncated or damaged, or it is not a model file (an HTML error page?)",
        f"{MARK['fail']} identitynet: MISSING (2.5 GB, {IDENTITYNET.description}); put it at "
        f"{base / 'models/controlnet/instantid/diffusion_pytorch_model.safetensors'}",
        f"{MARK['warn']} antelopev2-detector: {nested / 'scrfd_10g_bnkps.onnx'} ({size_of(nested / 'scrfd_10g_bnkps.onnx')}) "
        f"is in a nested folder: this pack finds it there, other insightface tools do not; it belongs in {faces}",
        f"{MARK['warn']} antelopev2-recognizer: {nested / 'glintr100.onnx'} ({size_of(nested / 'glintr100.onnx')}) "
        f"is in a nested folder: this pack finds it there, other insightface tools do not; it belongs in {faces}",
        f"{MARK['ok']} antelopev2: insightface loads the detector (5 keypoints) and the recogniser: "
        "detection on CPUExecutionProvider, recognition on CPUExecutionProvider",
        f"{MARK['warn']} sdxl-base-1.0: not found (6.9 GB); `portrait` fetches it to "
        f"{base / 'models/checkpoints/sd_xl_base_1.0.safetensors'} (workflows of your own load the checkpoint they name)",
        *[line for line in lines if "(optional, for FLUX/InfiniteYou: " in line],
        *[line for line in lines if line.startswith("Summary: ")],
        "To fix, run:",
        *lines[lines.index("To fix, run:") + 1:],
    ]
    assert re.fullmatch(r"Summary: 2 problems, \d+ warnings: NOT READY\.", lines[lines.index("To fix, run:") - 1])
    fixes = lines[lines.index("To fix, run:") + 1:]
    assert fixes[0] == f"  python -m instantid fetch-models --base-directory {base} --only adapter --only identitynet"
    assert f"  ln -s {PACK_ROOT} {base / 'custom_nodes' / PACK_ROOT.name}" in fixes
    assert f"  mkdir -p {faces} && mv {nested}/* {faces}/ && rmdir {nested}" in fixes


def test_complete_model_tree_passes(comfy, capsys):
    """The test bed's base directory holds every file with the real layout (tiny weights)."""
    code, lines = run_doctor(capsys, "--base-directory", comfy.base)
    assert code == 0, "\n".join(lines)
    models = comfy.base / "models"
    adapter = models / "instantid/ip-adapter.bin"
    identitynet = models / "controlnet/instantid/diffusion_pytorch_model.safetensors"
    faces = models / "insightface/models/antelopev2"
    assert f"{MARK['ok']} ComfyUI: {COMFYUI} (version {comfyui_version(COMFYUI)})" in lines
    assert f"{MARK['ok']} adapter: {adapter} ({size_of(adapter)}): InstantID adapter: face Resampler and 140 " \
           "projections for SDXL's 70 layers" in lines
    assert f"{MARK['ok']} identitynet: {identitynet} ({size_of(identitynet)}): diffusers SDXL ControlNet, 34 " \
           "cross-attention layers with 2048-wide context" in lines
    assert f"{MARK['ok']} antelopev2-detector: {faces / 'scrfd_10g_bnkps.onnx'} ({size_of(faces / 'scrfd_10g_bnkps.onnx')}): " \
           "valid ONNX model" in lines
    assert f"{MARK['ok']} antelopev2-recognizer: {faces / 'glintr100.onnx'} ({size_of(faces / 'glintr100.onnx')}): " \
           "valid ONNX model" in lines
    assert not [line for line in lines if line.startswith(MARK["fail"])]
    [summary] = [line for line in lines if line.startswith("Summary")]
    assert re.fullmatch(r"Summary: all needed checks passed, \d+ warnings?: ready\.", summary)
    from torch.utils.serialization import config
    assert config.load.mmap is False  # the memory-mapped adapter check put torch's setting back


def test_no_comfyui_and_no_base_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "nowhere"))
    code, lines = run_doctor(capsys)
    assert code == 1
    assert lines[0].startswith(f"{MARK['fail']} ComfyUI: ComfyUI not found (searched {tmp_path / 'nowhere'} (COMFYUI_PATH)")
    assert lines[1] == f"{MARK['fail']} model folders: no base directory"
    assert f"{MARK['fail']} adapter: MISSING (1.7 GB, {CATALOG[0].description}); no model folder to put it in " \
           "(pass --base-directory)" in lines


def test_too_deeply_nested_face_model_is_missing_with_a_move_command(tmp_path):
    root = tmp_path / "insightface"
    write_antelopev2(root / "models/antelopev2/antelopev2/antelopev2")
    (root / "models/antelopev2/antelopev2/antelopev2/glintr100.onnx").unlink()
    entries = [entry for entry in CATALOG if entry.folder == "insightface"]
    detector, recognizer = doctor.check_antelopev2(entries, [root], root)
    deep = root / "models/antelopev2/antelopev2/antelopev2"
    target = root / "models/antelopev2"
    assert detector == doctor.Check("fail", "antelopev2-detector", f"MISSING at {target / 'scrfd_10g_bnkps.onnx'}; a copy at "
                                    f"{deep / 'scrfd_10g_bnkps.onnx'} is too deeply nested for the pack to find",
                                    (f"mkdir -p {target} && mv {deep}/* {target}/ && rmdir {deep}",))
    assert recognizer.status == "fail" and recognizer.detail.startswith("MISSING (261.0 MB")
    assert recognizer.refetch == ("antelopev2-recognizer",)


def test_corrupt_onnx_file_is_broken(tmp_path):
    root = tmp_path / "insightface"
    write_antelopev2(root / "models/antelopev2")
    detector = root / "models/antelopev2/scrfd_10g_bnkps.onnx"
    detector.write_bytes(detector.read_bytes()[:1000])  # a truncated download
    checks = doctor.check_antelopev2([e for e in CATALOG if e.folder == "insightface"], [root], root)
    assert [c.status for c in checks] == ["fail", "ok"]  # no insightface load check while a file is broken
    assert checks[0].detail == (f"BROKEN {detector} (1.0 kB): onnxruntime cannot load it (INVALID_PROTOBUF): the download "
                                "is truncated or damaged, or it is not an ONNX model")


def _save_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    import safetensors.torch
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({key: torch.zeros(shape) for key, shape in shapes.items()}, str(path))
    return path


DIFFUSERS_SDXL = {"controlnet_cond_embedding.conv_in.weight": (16, 3, 3, 3), "controlnet_mid_block.weight": (128, 128, 1, 1),
                  "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": (64, 2048),
                  "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight": (128, 2048),
                  "add_embedding.linear_1.weight": (128, 2816)}


@pytest.mark.parametrize("name, shapes, problem", [
    ("sdxl", DIFFUSERS_SDXL, None),
    ("sd15", {"input_hint_block.0.weight": (16, 3, 3, 3),
              "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (32, 768)},
     "it is a ControlNet for 768-wide text context (SD1.5 is 768, SD2 1024), not SDXL's 2048; InstantID needs its "
     "IdentityNet from InstantX/InstantID"),
    ("no-adm", {k: v for k, v in DIFFUSERS_SDXL.items() if not k.startswith("add_embedding")},
     "it lacks SDXL's size conditioning (2816-wide); it is not the SDXL IdentityNet"),
    ("unet", {"model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3)}, "it is a UNet or checkpoint, not a ControlNet"),
])
def test_identitynet_layout_from_the_safetensors_header(tmp_path, name, shapes, problem):
    path = _save_safetensors(tmp_path / f"{name}.safetensors", shapes)
    reason, what = file_layouts.identitynet_problem(path)
    assert reason == problem
    assert what == ("diffusers SDXL ControlNet, 2 cross-attention layers with 2048-wide context" if problem is None else "")


def test_truncated_or_foreign_identitynet(tmp_path):
    good = _save_safetensors(tmp_path / "good.safetensors", DIFFUSERS_SDXL)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    full = good.stat().st_size
    assert file_layouts.identitynet_problem(truncated)[0] == (f"truncated or padded: its {full - 100} bytes are not what its "
                                                        "header describes; the download is incomplete")
    html = tmp_path / "page.safetensors"
    html.write_bytes(b"<html><body>rate limited</body></html>")
    assert file_layouts.identitynet_problem(html)[0] == ("not a safetensors file (its header does not parse); the download is "
                                                   "damaged or it is another kind of file")


def test_adapter_with_the_wrong_layout_gets_the_loaders_message(tmp_path):
    from instantid.adapter import EXPECTED_LAYOUT
    path = tmp_path / "ip-adapter.bin"
    torch.save({"image_proj": {"proj.weight": torch.zeros(4, 4)}, "ip_adapter": {}}, str(path))
    problem, _ = file_layouts.adapter_problem(path)
    assert problem is not None and str(path) in problem and EXPECTED_LAYOUT in problem


# ------------------------------------------------------------------------ ComfyUI Desktop layout --


def desktop_install(tmp_path: Path, monkeypatch, platform: str) -> tuple[Path, Path, Path]:
    """ComfyUI Desktop as it lays itself out on `platform` (github.com/Comfy-Org/desktop, README):
    ComfyUI inside the app, the user's base directory chosen at install (with Desktop's
    comfy.settings.json), config.json naming it and extra_models_config.yaml in the app-data folder.
    Returns (bundled ComfyUI, base directory, extra_models_config.yaml)."""
    from types import SimpleNamespace
    from instantid.commands import comfy_home
    monkeypatch.setattr(comfy_home, "sys", SimpleNamespace(platform=platform))  # this module only
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    if platform == "win32":
        monkeypatch.setenv("APPDATA", str(home / "AppData/Roaming"))
        monkeypatch.setenv("LOCALAPPDATA", str(home / "AppData/Local"))
        bundled, app_data = home / "AppData/Local/Programs/ComfyUI/resources/ComfyUI", home / "AppData/Roaming/ComfyUI"
    else:
        bundled = home / "Applications/ComfyUI.app/Contents/Resources/ComfyUI"
        app_data = home / "Library/Application Support/ComfyUI"
    fake_comfyui(bundled)
    base = home / "Documents/ComfyUI"
    (base / "user/default").mkdir(parents=True)
    (base / "user/default/comfy.settings.json").write_text("{}")
    app_data.mkdir(parents=True)
    (app_data / "config.json").write_text(json.dumps({"basePath": str(base), "installState": "installed"}))
    shared = tmp_path / "shared-models"
    models_config = app_data / "extra_models_config.yaml"
    models_config.write_text(f"comfyui_desktop:\n  base_path: {shared}\n  instantid: instantid/\n")
    return bundled, base, models_config


@pytest.mark.parametrize("platform", ["win32", "darwin"])
def test_doctor_finds_desktops_comfyui_from_the_base_directory(tmp_path, monkeypatch, capsys, platform):
    bundled, base, models_config = desktop_install(tmp_path, monkeypatch, platform)
    adapter = tmp_path / "shared-models/instantid/ip-adapter.bin"  # found only through Desktop's yaml
    adapter.parent.mkdir(parents=True)
    adapter.write_bytes(b"<html>502</html>")
    _, lines = run_doctor(capsys, "--base-directory", base)
    assert lines[0] == f"{MARK['ok']} ComfyUI: {bundled.resolve()} (version 0.8.0)"
    assert lines[1] == f"{MARK['ok']} model folders: base directory {base}; extra model paths {models_config}"
    assert any(line.startswith(f"{MARK['fail']} adapter: BROKEN {adapter} ") for line in lines), "\n".join(lines)


def test_pack_in_a_desktop_base_finds_comfyui_and_the_base_without_flags(tmp_path, monkeypatch, capsys):
    from instantid.commands import comfy_home
    bundled, base, models_config = desktop_install(tmp_path, monkeypatch, "darwin")
    (base / "config.json").write_text("")  # Desktop's config.json is not what says where the base is here
    (models_config.parent / "config.json").unlink()
    pack = base / "custom_nodes" / "instantid-nodes"
    pack.mkdir(parents=True)
    monkeypatch.setattr(comfy_home, "PACK_ROOT", pack)
    assert comfy_home.find_comfyui() == bundled.resolve()
    assert comfy_home.default_base_directory() == base
    _, lines = run_doctor(capsys)
    assert lines[0] == f"{MARK['ok']} ComfyUI: {bundled.resolve()} (version 0.8.0)"
    assert lines[1] == f"{MARK['ok']} model folders: base directory {base}"  # no config.json: no Desktop yaml


def test_comfyui_path_still_comes_first_with_desktop(tmp_path, monkeypatch, capsys):
    _, base, _ = desktop_install(tmp_path, monkeypatch, "win32")
    own = fake_comfyui(tmp_path / "MyComfyUI", version="0.9.1")
    monkeypatch.setenv("COMFYUI_PATH", str(own))
    _, lines = run_doctor(capsys, "--base-directory", base)
    assert lines[0] == f"{MARK['ok']} ComfyUI: {own.resolve()} (version 0.9.1)"


def test_desktop_not_installed_is_listed_where_searched(tmp_path, monkeypatch):
    from types import SimpleNamespace
    from instantid.commands import comfy_home
    monkeypatch.setattr(comfy_home, "sys", SimpleNamespace(platform="win32"))
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setenv("APPDATA", str(tmp_path / "Roaming"))
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "Local"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    base = tmp_path / "base"
    assert comfy_home.find_comfyui(base) is None
    assert comfy_home.why_not_found(base).startswith(
        f"ComfyUI not found (searched {base} (--base-directory), ")
    assert f"{tmp_path / 'Local/Programs/ComfyUI/resources/ComfyUI'} (ComfyUI Desktop's bundled ComfyUI)" in \
        comfy_home.why_not_found(base)


# ------------------------------------------------------------------ distributions side by side --


def fake_distributions(monkeypatch, group, installed: dict[str, str]) -> None:
    """importlib.metadata answers as if exactly `installed` of the group's distributions were
    there; every other distribution is looked up for real."""
    real = metadata.version

    def version(name: str) -> str:
        if name in group.names:
            if name not in installed:
                raise metadata.PackageNotFoundError(name)
            return installed[name]
        return real(name)

    monkeypatch.setattr(metadata, "version", version)


@pytest.mark.parametrize("installed, keep, note", [
    ({"opencv-python": "5.0.0.93", "opencv-python-headless": "4.11.0.86"}, "opencv-python", False),
    ({"opencv-python-headless": "4.11.0.86", "opencv-contrib-python-headless": "4.10.0.84"},
     "opencv-contrib-python-headless", True),
    ({"opencv-python": "5.0.0.93", "opencv-contrib-python": "4.10.0.84", "opencv-contrib-python-headless": "4.10.0.84"},
     "opencv-contrib-python", True),
])
def test_two_opencv_distributions_are_reported_with_the_pip_commands_that_leave_one(monkeypatch, installed, keep, note):
    from instantid.faces import OPENCV
    fake_distributions(monkeypatch, OPENCV, installed)
    check = doctor.check_installs(OPENCV)
    names = " ".join(name for name in OPENCV.names if name in installed)
    fix = f"pip uninstall -y {names} && pip install {keep}"
    listed = ", ".join(f"{name} {installed[name]}" for name in OPENCV.names if name in installed)
    assert check == doctor.Check(
        "warn", "OpenCV installs",
        f"Several OpenCV distributions are installed ({listed}). They all write the same cv2 folder, so their files are "
        f"mixed and uninstalling either one breaks `import cv2`. Keep one: {fix}."
        + (" Repeat this after every insightface install or upgrade: it brings opencv-python back." if note else ""),
        (fix,))


def test_one_opencv_distribution_is_fine(monkeypatch):
    from instantid.faces import OPENCV
    fake_distributions(monkeypatch, OPENCV, {"opencv-python-headless": "4.11.0.86"})
    assert doctor.check_installs(OPENCV) == doctor.Check("ok", "OpenCV installs",
                                                         "one distribution (opencv-python-headless 4.11.0.86)")


def test_onnxruntime_and_opencv_share_one_mechanism_in_the_report(tmp_path, monkeypatch, capsys):
    from instantid.faces import ONNXRUNTIME, OPENCV
    monkeypatch.setenv("COMFYUI_PATH", str(fake_comfyui(tmp_path / "ComfyUI")))
    real = metadata.version
    fake = {"opencv-python": "5.0.0.93", "opencv-python-headless": "4.11.0.86", "onnxruntime": "1.32.0",
            "onnxruntime-gpu": "1.31.1"}

    def version(name: str) -> str:
        if name in OPENCV.names or name in ONNXRUNTIME.names:
            if name not in fake:
                raise metadata.PackageNotFoundError(name)
            return fake[name]
        return real(name)

    monkeypatch.setattr(metadata, "version", version)
    _, lines = run_doctor(capsys, "--base-directory", tmp_path)
    assert any(line.startswith(f"{MARK['warn']} OpenCV installs: Several OpenCV distributions are installed "
                               "(opencv-python 5.0.0.93, opencv-python-headless 4.11.0.86).") for line in lines)
    assert any(line.startswith(f"{MARK['warn']} onnxruntime installs: Several onnxruntime distributions are installed "
                               "(onnxruntime 1.32.0, onnxruntime-gpu 1.31.1).") for line in lines)
    fixes = lines[lines.index("To fix, run:") + 1:]
    assert "  pip uninstall -y opencv-python opencv-python-headless && pip install opencv-python" in fixes
    assert "  pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in fixes


# --------------------------------------------------------------------------------- packaging --

COMFYUI_MODULES = {"comfy", "comfy_api", "comfy_execution", "folder_paths", "nodes", "execution", "utils", "server"}
DISTRIBUTION_OF = {"cv2": "opencv-python", "yaml": "pyyaml", "typing_extensions": "typing-extensions"}
NOT_DECLARED = {
    "torch": "comes from ComfyUI",
    "onnxruntime": "insightface>=2.1 brings it; onnxruntime-gpu users swap it",
    "comfy_cli": "optional: the 'cli' extra, imported only to convert UI-format workflows",
    "packaging": "optional: checks installed versions before pip runs (without it pip decides)",
    "ray": "optional: the 'ray' extra, imported only by batch --ray and doctor --ray",
}


def _requirement_names(lines: list[str]) -> set[str]:
    names = set()
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0].lower())
    return names


def _third_party_imports() -> set[str]:
    files = [*sorted((REPO_ROOT / "instantid").rglob("*.py")), REPO_ROOT / "nodes.py", REPO_ROOT / "resampler.py",
             REPO_ROOT / "__init__.py"]
    names = set()
    for file in files:
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    own = {"instantid", "resampler", "__future__"}
    return {n for n in names if n not in sys.stdlib_module_names and n not in COMFYUI_MODULES and n not in own}


def test_requirements_declare_exactly_what_the_pack_imports():
    requirements = _requirement_names((REPO_ROOT / "requirements.txt").read_text().splitlines())
    imported = _third_party_imports()
    assert {DISTRIBUTION_OF.get(n, n) for n in imported if n not in NOT_DECLARED} == requirements
    assert set(NOT_DECLARED) <= imported  # each exemption is still needed
    assert not {"onnxruntime", "onnxruntime-gpu"} & requirements
    assert "insightface>=2.1" in (REPO_ROOT / "requirements.txt").read_text().splitlines()
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert _requirement_names(extras["cli"]) == {"comfy-cli"} and _requirement_names(extras["ray"]) == {"ray"}


def test_pyproject_is_what_the_comfy_registry_reads():
    from comfy_cli.registry.config_parser import extract_node_configuration
    config = extract_node_configuration(str(REPO_ROOT / "pyproject.toml"))
    assert config is not None
    project, comfy = config.project, config.tool_comfy
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]{0,99}", project.name) and "comfyui" not in project.name.lower()
    assert project.version == __version__
    assert project.license.file == "LICENSE" and (REPO_ROOT / "LICENSE").is_file()
    assert project.urls.repository.startswith("https://github.com/")
    assert comfy.publisher_id and comfy.display_name
    assert project.supported_comfyui_version == ">=0.8.0"
    requirements = (REPO_ROOT / "requirements.txt").read_text().splitlines()
    assert _requirement_names(project.dependencies) == _requirement_names(requirements)
    assert not any("onnxruntime" in dependency for dependency in project.dependencies)


@pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")  # comfy-cli's pathspec call
def test_registry_zip_holds_what_comfyui_loads_and_no_tests(tmp_path, monkeypatch):
    """`comfy node pack` (comfy-cli's zip_files: git-tracked files minus .comfyignore) ships the pack
    and its command line, and leaves the tests, their fixture node pack, CI and scripts out."""
    import subprocess
    import zipfile
    from comfy_cli.file_utils import zip_files
    tracked = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files", "-z"], capture_output=True, text=True, timeout=60)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout: comfy node pack would zip the folder as it is")
    monkeypatch.chdir(REPO_ROOT)
    zip_files(str(tmp_path / "node.zip"))
    names = set(zipfile.ZipFile(tmp_path / "node.zip").namelist())
    files = set(tracked.stdout.split("\0")) - {""}  # NUL-separated: workflow file names hold spaces
    runtime = {f for f in files if f.startswith(("instantid/", "workflows/"))}
    assert runtime | {"__init__.py", "nodes.py", "resampler.py", "requirements.txt", "pyproject.toml", "LICENSE",
                      "README.md"} <= names
    assert not [n for n in names if n.startswith(("tests/", "scripts/", ".ci/", ".github/"))]
    assert not {"requirements-test.txt", "run-tests"} & names
    assert names <= files  # nothing untracked


def test_flux_files_are_optional_warnings_and_checked_by_layout(tmp_path, monkeypatch):
    """The FLUX (InfiniteYou) default set: missing → a warning naming its --only id (SDXL users stay
    ready); the InfuseNet's released layout and InfiniteYou's archives pass; a wrong file fails. The
    bed's InfuseNet is smaller than the published one: where the catalog pins a file's content, its
    size alone fails it; with the pins lifted, the layout checks decide."""
    import dataclasses

    from instantid.commands import doctor
    from instantid.model_files import FLUX_CATALOG, FLUX_DEFAULT
    check_flux_files = doctor.check_flux_files
    from support.flux_bed import cached_flux_files
    from support.infiniteyou_models import write_infiniteyou_files
    missing = check_flux_files({}, {})
    assert [(c.status, c.name) for c in missing] == [("warn", i) for i in FLUX_DEFAULT]
    assert all(f"--only {c.name}" in c.detail and not c.refetch for c in missing)
    entries = {e.id: e for e in FLUX_CATALOG}
    flux, infusenet = cached_flux_files()
    for entry_id, source in (("infusenet-aes-fp8", infusenet), ("flux1-dev-fp8", infusenet)):
        target = tmp_path / entries[entry_id].folder / entries[entry_id].path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source)
    write_infiniteyou_files(tmp_path / "scratch")
    (tmp_path / "infiniteyou" / "aes_stage2").mkdir(parents=True)
    (tmp_path / "scratch" / "image_proj_model.bin").rename(tmp_path / "infiniteyou" / "aes_stage2" / "image_proj_model.bin")
    (tmp_path / "infiniteyou" / "recognition_arcface_ir_se50.pth").write_bytes(b"not a torch archive")
    folders = {k: [tmp_path / k] for k in ("controlnet", "checkpoints", "infiniteyou")}
    pinned = {c.name: c for c in check_flux_files(folders, {})}
    released = entries["infusenet-aes-fp8"]  # the bed's InfuseNet has 1+1 blocks, the released one 4+10
    assert released.sha256 and pinned[released.id].status == "fail"
    assert f"but {released.repo}/{released.file} is {released.approx_size}" in pinned[released.id].detail
    monkeypatch.setattr(doctor, "FLUX_CATALOG", tuple(dataclasses.replace(e, sha256=None) for e in FLUX_CATALOG))
    checks = {c.name: c for c in check_flux_files(folders, {})}
    assert checks["infusenet-aes-fp8"].status == "ok" and checks["infiniteyou-projection-aes"].status == "ok"
    assert checks["irse50"].status == "fail" and "not a PyTorch archive" in checks["irse50"].detail
    # The InfuseNet under the checkpoint's name: no FLUX checkpoint key.
    assert checks["flux1-dev-fp8"].status == "fail" and checks["flux1-dev-fp8"].refetch == ("flux1-dev-fp8",)
