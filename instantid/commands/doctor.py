"""`python -m instantid doctor`: is this machine ready to run InstantID, and if not, what to do.

Each check is one line (status, name, detail); the report ends with a summary and the commands
that fix what failed. Nothing is downloaded, no GPU is needed and no weights are read: the model
files are checked by their headers (instantid.file_layouts), the antelopev2 files
opened with onnxruntime and insightface as the Face Analysis node does."""
from __future__ import annotations

import logging
import os
import platform
import re
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

from .bootstrap import installed_version, torch_accelerator
from .comfy_home import PACK_ROOT, comfyui_version, find_comfyui, why_not_found
from .model_folders import (FolderError, comfyui_base, config_files, first_existing, folder_flags, model_folders,
                            model_search_paths, registered_folders)
from .workflow_models import (CHECKPOINT_LOADER, FACE_ANALYSIS_NODES, MODEL_LOADERS, ModelReference, WorkflowModels,
                              workflow_models)
from ..faces import (CPU_PROVIDER, DETECTOR_FILE, FACE_MODEL_NAME, FETCH_COMMAND, ONNXRUNTIME, OPENCV, FaceModelsMissing,
                    SharedModuleDistributions, find_antelopev2, select_providers, stray_copies)
from ..file_layouts import adapter_problem, checkpoint_problem, flux_file_problem, identitynet_problem, onnx_problem
from ..model_files import (ANTELOPEV2, CATALOG, DEFAULT_CHECKPOINT, FLUX_CATALOG, FLUX_DEFAULT, REQUIRED, WORKFLOW_MODELS,
                           ModelFile, format_size, model_file)
from ..paths import ADAPTER_FOLDER

log = logging.getLogger(__name__)

Status = Literal["ok", "warn", "fail"]
MARKERS = {"ok": "✔", "warn": "!", "fail": "✘"}
ASCII_MARKERS = {"ok": "OK", "warn": "WARN", "fail": "FAIL"}
GPU_ONNXRUNTIME = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
SIZE_TOLERANCE = 0.1  # catalog sizes are rounded; a wrong file is off by far more


@dataclass(frozen=True)
class Check:
    """One line of the report. `fixes` are shell commands; `refetch` names a catalog entry that
    `fetch-models` should (re)download."""

    status: Status
    name: str
    detail: str
    fixes: tuple[str, ...] = ()
    refetch: tuple[str, ...] = ()


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    fetch_command: str = FETCH_COMMAND

    @property
    def ok(self) -> bool:
        """True when nothing needed is missing or broken (warnings allowed)."""
        return all(check.status != "fail" for check in self.checks)

    def fixes(self) -> list[str]:
        """The commands to run, in order, without repeats; one fetch-models for every file to (re)get."""
        refetch = [entry_id for check in self.checks for entry_id in check.refetch]
        commands = []
        if refetch:
            chosen = "" if sorted(set(refetch)) == sorted(entry.id for entry in REQUIRED) else "".join(f" --only {i}" for i in dict.fromkeys(refetch))
            commands.append(self.fetch_command + chosen)
        for check in self.checks:
            commands += [fix for fix in check.fixes if fix not in commands]
        return commands

    def lines(self, markers: Mapping[str, str] = MARKERS) -> list[str]:
        width = max(len(marker) for marker in markers.values())
        out = [f"{markers[check.status]:<{width}} {check.name}: {check.detail}" for check in self.checks]
        failed = sum(check.status == "fail" for check in self.checks)
        warned = sum(check.status == "warn" for check in self.checks)
        warnings = f"{warned} warning{'s' if warned != 1 else ''}"
        if failed:
            out.append(f"Summary: {failed} problem{'s' if failed != 1 else ''}, {warnings}: NOT READY.")
        else:
            out.append(f"Summary: all needed checks passed, {warnings}: ready.")
        fixes = self.fixes()
        if fixes:
            out.append("To fix, run:")
            out += [f"  {command}" for command in fixes]
        return out


# ----------------------------------------------------------------------------------- environment --


def check_comfyui(comfyui: Path | None, base_directory: Path | None = None) -> Check:
    if comfyui is None:
        return Check("fail", "ComfyUI", why_not_found(base_directory))
    return Check("ok", "ComfyUI", f"{comfyui} (version {comfyui_version(comfyui)})")


def check_model_folders(base_directory: Path | None, extra_configs: Sequence[Path]) -> Check:
    where = [f"base directory {base_directory}" if base_directory else "no base directory"]
    where += [f"extra model paths {config}" for config in extra_configs]
    status: Status = "ok" if base_directory or extra_configs else "fail"
    fixes = () if status == "ok" else ("python -m instantid doctor --base-directory /path/to/ComfyUI",)
    return Check(status, "model folders", "; ".join(where), fixes)


def check_python() -> Check:
    version = platform.python_version()
    if sys.version_info < (3, 10):  # noqa: UP036 (the doctor must say so on an old Python)
        return Check("fail", "Python", f"{version} at {sys.executable}; the pack needs Python 3.10 or newer")
    return Check("ok", "Python", f"{version} at {sys.executable}")


def check_torch() -> tuple[Check, bool]:
    """The torch check and whether torch sees a CUDA GPU."""
    try:
        import torch
    except ImportError as error:
        return Check("fail", "torch", f"cannot import torch ({error}); install ComfyUI's requirements into this Python",
                     ("pip install -r /path/to/ComfyUI/requirements.txt",)), False
    accelerator = torch_accelerator()
    if accelerator is not None:
        return Check("ok", "torch", f"{torch.__version__}, {accelerator}"), torch.cuda.is_available()
    build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
    return Check("warn", "torch", f"{torch.__version__} ({build}) sees no GPU: ComfyUI runs on the CPU (--cpu), where "
                                  "an SDXL image takes many minutes; install the torch build for your GPU (see ComfyUI's "
                                  "README)"), False


def check_packages() -> Check:
    """insightface and OpenCV, which the pack imports (torch and numpy come with ComfyUI)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # as faces does: no network at import
    found, missing = [], []
    for label, module, distributions in (("insightface", "insightface", ("insightface",)),
                                         ("opencv", "cv2", OPENCV.names)):
        version = next((v for v in map(installed_version, distributions) if v), None)
        try:
            __import__(module)
        except ImportError as error:
            missing.append(f"{label} ({error})")
            continue
        found.append(f"{label} {version or 'unknown version'}")
    if missing:
        return Check("fail", "packages", f"cannot import {', '.join(missing)}",
                     ("pip install -r requirements.txt  # in this pack's folder, with ComfyUI's Python",))
    insightface_version = installed_version("insightface") or "0"
    if tuple(int(p) for p in re.findall(r"\d+", insightface_version)[:2]) < (2, 1):
        return Check("fail", "packages", f"insightface {insightface_version} is older than 2.1, which the pack needs",
                     ("pip install -U 'insightface>=2.1'",))
    return Check("ok", "packages", ", ".join(found))


def check_onnxruntime(detector: Path | None, torch_cuda: bool) -> list[Check]:
    """onnxruntime's version, the providers a session on the detector really gets (else those the
    build offers), GPU advice, and the double-install clobber."""
    try:
        import onnxruntime
    except ImportError as error:
        return [Check("fail", "onnxruntime", f"cannot import onnxruntime ({error})",
                      ("pip install 'insightface>=2.1'  # brings onnxruntime",))]
    available = list(onnxruntime.get_available_providers())
    providers, _ = select_providers("auto", available)
    names = [p[0] if isinstance(p, tuple) else p for p in providers]
    options = [dict(p[1]) if isinstance(p, tuple) else {} for p in providers]
    loaded = None
    if detector is not None:
        try:
            loaded = onnxruntime.InferenceSession(str(detector), providers=names, provider_options=options).get_providers()
        except Exception as error:  # a broken file is reported by its own check
            log.debug("no provider check on %s: %s", detector, error)
    version = onnxruntime.__version__
    checks = []
    if loaded is not None:
        checks.append(Check("ok", "onnxruntime", f"{version}, face analysis runs on {', '.join(loaded)} "
                                                 f"(a session on {detector.name})"))
        if names[0] != CPU_PROVIDER and names[0] not in loaded:
            checks.append(Check("warn", "onnxruntime GPU", f"{names[0]} is installed but failed to start, so face "
                                "analysis runs on the CPU; usually CUDA/cuDNN libraries that do not match this "
                                "onnxruntime build (see onnxruntime's error above)"))
    else:
        checks.append(Check("ok", "onnxruntime", f"{version}, providers available: {', '.join(available)} "
                                                 f"(not tried on a model: no usable {DETECTOR_FILE})"))
    if torch_cuda and "CUDAExecutionProvider" not in available:
        checks.append(Check("warn", "onnxruntime GPU", "torch uses CUDA but this onnxruntime has no CUDA provider, so "
                            "face analysis runs on the CPU (slower, still correct); swap in onnxruntime-gpu, and again "
                            "after every insightface upgrade", (GPU_ONNXRUNTIME,)))
    checks.append(check_installs(ONNXRUNTIME))
    return checks


def check_installs(group: SharedModuleDistributions) -> Check:
    """Whether exactly one of the distributions that share a module folder is installed; with
    several, the pip commands that leave one."""
    found = group.installed()
    doubled = group.warning()
    if doubled:
        return Check("warn", f"{group.what} installs", doubled, (group.fix(found),))
    installed = ", ".join(f"{name} {v}" for name, v in found.items()) or "none installed with pip"
    return Check("ok", f"{group.what} installs", f"one distribution ({installed})" if found else installed)


def check_pack_location(custom_node_folders: Sequence[Path]) -> Check:
    """Whether ComfyUI loads this copy of the pack (it must sit in, or be linked from, custom_nodes)."""
    for folder in custom_node_folders:
        entries = list(folder.iterdir()) if folder.is_dir() else []
        if PACK_ROOT.parent.resolve() == folder.resolve() or any(e.resolve() == PACK_ROOT for e in entries if e.is_dir()):
            return Check("ok", "pack", f"{PACK_ROOT} is loaded by ComfyUI from {folder}")
    if not custom_node_folders:
        return Check("warn", "pack", f"{PACK_ROOT}: no ComfyUI custom_nodes folder to check")
    target = custom_node_folders[0] / PACK_ROOT.name
    return Check("warn", "pack", f"{PACK_ROOT} is not in {custom_node_folders[0]}, so ComfyUI's UI will not load these "
                                 "nodes (`python -m instantid run` loads them anyway)",
                 (f"ln -s {shlex.quote(str(PACK_ROOT))} {shlex.quote(str(target))}",))


# ----------------------------------------------------------------------------------- model files --


def _found(path: Path) -> str:
    return f"{path} ({format_size(path.stat().st_size)})"


def _where(target: Path | None) -> str:
    return f"put it at {target}" if target else "no model folder to put it in (pass --base-directory)"


def _missing_detail(entry: ModelFile, target: Path | None) -> str:
    return f"MISSING ({entry.approx_size}, {entry.description}); {_where(target)}"


def _bad(entry: ModelFile, path: Path, reason: str) -> Check:
    return Check("fail", entry.id, f"BROKEN {_found(path)}: {reason}", refetch=(entry.id,))


def size_problem(entry: ModelFile, path: Path, *, layout_checked: bool) -> str | None:
    """Why a file named as a catalog entry is not that file by its size (more than 10% off the
    published size), or None. A file whose layout is checked is sized only when the catalog pins
    its content (sha256, exact size): a layout check already tells a wrong file."""
    if layout_checked and entry.sha256 is None:
        return None
    size = path.stat().st_size
    if abs(size - entry.approx_bytes) <= SIZE_TOLERANCE * entry.approx_bytes:
        return None
    return (f"{format_size(size)}, but {entry.repo}/{entry.file} is {entry.approx_size}: a different file under its name, "
            "or a damaged download")


def _joined(*reasons: str | None) -> str | None:
    return "; ".join(reason for reason in reasons if reason) or None


def check_file_entry(entry: ModelFile, roots: Sequence[Path], target: Path | None,
                     problem: Callable[[Path], tuple[str | None, str]], optional: str | None = None) -> Check:
    """Found (first root holding entry.path, as ComfyUI searches) and valid, else what is wrong; a
    missing `optional` file is a warning with that detail."""
    path = first_existing(roots, entry.path)
    if path is None:
        if optional is not None:
            return Check("warn", entry.id, optional)
        return Check("fail", entry.id, _missing_detail(entry, target), refetch=(entry.id,))
    reason, what = problem(path)
    reason = _joined(reason, size_problem(entry, path, layout_checked=True))
    if reason:
        return _bad(entry, path, reason)
    return Check("ok", entry.id, f"{_found(path)}: {what}")


def check_flux_files(search_paths: Mapping[str, Sequence[Path]], targets: Mapping[str, Path],
                     fetch_command: str = FETCH_COMMAND) -> list[Check]:
    """The FLUX (InfiniteYou) files the FLUX workflows load: optional, so a missing one is a warning
    naming its fetch command; a broken one fails."""
    return [check_file_entry(entry, search_paths.get(entry.folder, []), None, partial(flux_file_problem, entry),
                             optional=f"not found (optional, for FLUX/InfiniteYou: {entry.approx_size}, {entry.license}); "
                                      f"{_where(_target(targets, entry))}, or run {fetch_command} --only {entry.id}")
            for entry in FLUX_CATALOG if entry.id in FLUX_DEFAULT]


def _move_command(source: Path, target: Path) -> str:
    src, dst = shlex.quote(str(source)), shlex.quote(str(target))
    return f"mkdir -p {dst} && mv {src}/* {dst}/ && rmdir {src}"


def check_antelopev2(entries: Sequence[ModelFile], roots: Sequence[Path], target_root: Path | None) -> list[Check]:
    """The two antelopev2 files. Where the pack finds both (faces.find_antelopev2) wins; a pair in
    a nested folder works for this pack but is reported with the command that moves it."""
    def documented_folder(path: Path, entry: ModelFile) -> Path | None:
        """The documented folder of the root that holds `path`; None when `path` is in it."""
        root = next((r for r in roots if r in path.parents), None)
        if root is None or path == root / entry.path:
            return None
        return (root / entry.path).parent

    folder = _antelopev2_folder(roots)
    checks = []
    for entry in entries:
        name = Path(entry.path).name
        target = target_root / entry.path if target_root else None
        path = folder / name if folder else first_existing(roots, entry.path)
        if path is None:
            stray = next((copy for copy in stray_copies(roots) if copy.name == name), None)
            if stray is not None and target is not None:
                checks.append(Check("fail", entry.id, f"MISSING at {target}; a copy at {stray} is too deeply nested "
                                                      "for the pack to find", (_move_command(stray.parent, target.parent),)))
            else:
                checks.append(Check("fail", entry.id, _missing_detail(entry, target), refetch=(entry.id,)))
            continue
        reason = onnx_problem(path)
        if reason:
            checks.append(_bad(entry, path, reason))
        elif (documented := documented_folder(path, entry)) is not None:
            checks.append(Check("warn", entry.id, f"{_found(path)} is in a nested folder: this pack finds it there, "
                                                  f"other insightface tools do not; it belongs in {documented}",
                                (_move_command(path.parent, documented),)))
        else:
            checks.append(Check("ok", entry.id, f"{_found(path)}: valid ONNX model"))
    if folder is not None and all(check.status != "fail" for check in checks):
        checks.append(_insightface_load(folder))
    return checks


def _insightface_load(folder: Path) -> Check:
    from ..faces import FaceAnalyzer

    try:
        analyzer = FaceAnalyzer.load(folder, "auto")
    except Exception as error:
        return Check("fail", FACE_MODEL_NAME, f"insightface cannot use the files in {folder}: {error}",
                     refetch=("antelopev2-detector", "antelopev2-recognizer"))
    used = ", ".join(f"{task} on {providers[0]}" for task, providers in analyzer.providers_in_use.items())
    return Check("ok", FACE_MODEL_NAME, f"insightface loads the detector (5 keypoints) and the recogniser: {used}")


# ------------------------------------------------------------------------------ a workflow's models --

_VALIDATORS: dict[str, Callable[[Path], tuple[str | None, str]]] = {DEFAULT_CHECKPOINT: checkpoint_problem,
                                                                    "adapter": adapter_problem,
                                                                    "identitynet": identitynet_problem}


def check_workflow_file(reference: ModelReference, roots: Sequence[Path], target_folder: Path | None) -> Check:
    """One file a workflow's node loads: found where ComfyUI searches (and, for the pack's own
    files, valid), else where it goes and, when the catalog knows it, where to download it."""
    entry = next((entry for entry in (*CATALOG, *WORKFLOW_MODELS)
                  if (entry.folder, entry.path) == (reference.folder, reference.relative_path)), None)
    name = f"node {reference.node} {reference.class_type}"
    subject = f"{reference.input} {reference.file}"
    refetch = (entry.id,) if entry else ()
    path = first_existing(roots, reference.relative_path)
    if path is None:
        target = target_folder / reference.relative_path if target_folder else None
        if entry is None:
            return Check("fail", name, f"{subject}: MISSING; {_where(target)}")
        return Check("fail", name, f"{subject}: {_missing_detail(entry, target)}; "
                                   f"download {entry.url()}", refetch=refetch)
    # The adapter is checked whatever its name: InstantIDModelLoader loads nothing else.
    validator = _VALIDATORS.get(entry.id) if entry else None
    if validator is None and reference.folder == ADAPTER_FOLDER:
        validator = adapter_problem
    elif validator is None and reference.class_type == CHECKPOINT_LOADER:
        validator = checkpoint_problem
    reason, what = validator(path) if validator else (None, "")
    reason = _joined(reason, size_problem(entry, path, layout_checked=validator is not None) if entry else None)
    if reason:
        return Check("fail", name, f"{subject}: BROKEN {_found(path)}: {reason}", refetch=refetch)
    return Check("ok", name, f"{subject}: {_found(path)}" + (f": {what}" if what else ""))


def check_workflow(workflow: Path, models: WorkflowModels, search_paths: Mapping[str, Sequence[Path]],
                   targets: Mapping[str, Path]) -> list[Check]:
    """A line naming the workflow and what it loads, then one per model file it names (the
    antelopev2 checks when it analyses faces)."""
    loaded = [f"{len(models.files)} model file{'s' if len(models.files) != 1 else ''} named by {models.loader_nodes} "
              f"loader node{'s' if models.loader_nodes != 1 else ''}"]
    if models.face_analysis:
        loaded.append(f"face analysis ({FACE_MODEL_NAME})")
    if models.files or models.face_analysis:
        checks = [Check("ok", "workflow", f"{workflow}: {' and '.join(loaded)}")]
    else:
        checks = [Check("warn", "workflow", f"{workflow}: {loaded[0]}; the doctor checks the files of these loaders: "
                                            f"{', '.join([*MODEL_LOADERS, *FACE_ANALYSIS_NODES])}")]
    checks += [check_workflow_file(reference, search_paths.get(reference.folder, []), targets.get(reference.folder))
               for reference in models.files]
    if models.face_analysis:
        checks += check_antelopev2(ANTELOPEV2, list(search_paths.get("insightface", [])), targets.get("insightface"))
    return checks


# ------------------------------------------------------------------------------------------ all --


def doctor_report(base_directory: Path | None, extra_config: Path | None, workflow_path: Path | None) -> Report:
    """Every check, in report order, on the folders ComfyUI would use with these options. With
    `workflow_path`, the model files checked are those that workflow loads instead of the pack's own."""
    comfyui = find_comfyui(base_directory)
    base = comfyui_base(base_directory, required=False)
    configs = config_files(comfyui, base, extra_config)
    workflow = None
    if workflow_path is not None:
        from .runner import load_workflow

        workflow = (workflow_path, workflow_models(load_workflow(workflow_path)))
    keys = sorted({entry.folder for entry in CATALOG} | {ref.folder for ref in (workflow[1].files if workflow else ())})
    try:
        targets = model_folders(keys, base_directory, extra_config)
    except FolderError:
        targets = {}  # the report says that no folder is known
    search_paths = model_search_paths(keys, base_directory, configs)
    custom_nodes = ([base / "custom_nodes"] if base else []) + registered_folders(configs).get("custom_nodes", [])
    report = Report(fetch_command=FETCH_COMMAND + folder_flags(base_directory, extra_config))
    report.checks += [check_comfyui(comfyui, base), check_model_folders(base, configs), check_python()]
    torch_check, torch_cuda = check_torch()
    report.checks += [torch_check, check_packages(), check_installs(OPENCV)]
    face_roots = search_paths["insightface"]
    folder = _antelopev2_folder(face_roots)
    detector = first_existing(face_roots, model_file("antelopev2-detector").path) or (folder / DETECTOR_FILE if folder else None)
    faces_log = logging.getLogger("instantid.faces")  # its 'providers in use' note repeats a report line
    previous_level = faces_log.level
    faces_log.setLevel(logging.WARNING)
    try:
        report.checks += check_onnxruntime(detector, torch_cuda)
        report.checks.append(check_pack_location(custom_nodes))
        if workflow is not None:
            report.checks += check_workflow(*workflow, search_paths, targets)
            return report
        for entry_id, validator in (("adapter", adapter_problem), ("identitynet", identitynet_problem)):
            entry = model_file(entry_id)
            report.checks.append(check_file_entry(entry, search_paths[entry.folder], _target(targets, entry), validator))
        report.checks += check_antelopev2(ANTELOPEV2, face_roots, targets.get("insightface"))
    finally:
        faces_log.setLevel(previous_level)
    checkpoint = model_file(DEFAULT_CHECKPOINT)
    target = _target(targets, checkpoint)
    # Missing is a warning: portrait fetches it, and the nodes do not need it.
    report.checks.append(check_file_entry(checkpoint, search_paths["checkpoints"], target, checkpoint_problem,
                                          optional=f"not found ({checkpoint.approx_size}); `portrait` fetches it to "
                                                   f"{target or 'models/checkpoints'} (workflows of your own load the "
                                                   "checkpoint they name)"))
    report.checks += check_flux_files(search_paths, targets, report.fetch_command)
    return report


def _antelopev2_folder(roots: Sequence[Path]) -> Path | None:
    try:
        return find_antelopev2(roots) if roots else None
    except FaceModelsMissing:
        return None


def _target(targets: Mapping[str, Path], entry: ModelFile) -> Path | None:
    return targets[entry.folder] / entry.path if entry.folder in targets else None


def markers_for(stream: object) -> Mapping[str, str]:
    """✔/✘ where the stream can print them, else OK/FAIL/WARN."""
    encoding = getattr(stream, "encoding", None) or "ascii"
    try:
        "".join(MARKERS.values()).encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return ASCII_MARKERS
    return MARKERS
