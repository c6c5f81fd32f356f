"""`python -m instantid portrait FACE "PROMPT"`: from a clone to an image in one command.

ComfyUI is found or installed (bootstrap), the missing models are fetched (the pack's files and
an SDXL checkpoint from the catalog, or the user's own checkpoint), and the shipped basic workflow
(the posed one with --pose) runs with ComfyUI embedded. The face, pose, prompt and seed go into
the workflow through its graph (what feeds the Apply InstantID node), so any workflow built around
one Apply InstantID node works; `batch` fills its jobs the same way.
"""
from __future__ import annotations

import importlib.util
import logging
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

from ..paths import FETCH_COMMAND
from .bootstrap import Steps, StepFailed, prepare_comfyui
from .image_files import check_photos
from ..model_files import CATALOG, CHECKPOINTS, DEFAULT_CHECKPOINT, REQUIRED, ModelFile
from .comfy_home import PACK_ROOT, find_comfyui
from .fetch import DEFAULT_TIMEOUT, FetchError, fetch_models
from .model_folders import (FolderError, comfyui_layout, config_files, first_existing, folder_flags, model_folders,
                            model_search_paths)
from .workflow_models import CHECKPOINT_LOADER
from .runner import SIMILARITY_NODE, NodeFailure, RunError, RunReport, describe_node, load_workflow, run_embedded

log = logging.getLogger(__name__)

APPLY_TYPES = ("ApplyInstantID", "ApplyInstantIDAdvanced")
SEED_INPUTS = ("seed", "noise_seed")
# The shipped workflows portrait and batch run (workflow_tools/specs.py names its files after these).
BASIC_WORKFLOW_FILE = "01 Basic portrait.json"
POSED_WORKFLOW_FILE = "02 Pose from a second photo.json"


def shipped_workflow(posed: bool) -> Path:
    """The workflow portrait and batch run when none is given: the one place that names them."""
    return PACK_ROOT / "workflows" / (POSED_WORKFLOW_FILE if posed else BASIC_WORKFLOW_FILE)


@dataclass(frozen=True)
class PortraitInputs:
    """What a portrait (or a batch job) puts into a workflow; None leaves the workflow's value."""
    face: str
    prompt: str | None = None
    pose: str | None = None
    seed: int | None = None
    checkpoint: str | None = None
    on_no_face: str | None = None


# --------------------------------------------------------------------------- the workflow graph --


def _node(node_id: str, node: Mapping) -> str:
    return f"node {describe_node(node_id, node)}"


def _source(prompt: Mapping[str, dict], node: Mapping, name: str) -> tuple[str, dict] | None:
    """The node whose output feeds input `name` of `node`, if that input is a link."""
    value = (node.get("inputs") or {}).get(name)
    if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt:
        return str(value[0]), prompt[str(value[0])]
    return None


def apply_node(prompt: Mapping[str, dict]) -> tuple[str, dict]:
    found = [(i, n) for i, n in prompt.items() if n.get("class_type") in APPLY_TYPES]
    if len(found) != 1:
        raise RunError(f"the workflow has {len(found)} Apply InstantID nodes ({', '.join(APPLY_TYPES)}); a portrait "
                       "needs exactly one to know where the face goes. Use a workflow from workflows/, or run yours "
                       "with `python -m instantid run WORKFLOW --set ...`")
    return found[0]


def _load_image_feeding(prompt: Mapping[str, dict], apply: tuple[str, dict], name: str, what: str) -> dict | None:
    source = _source(prompt, apply[1], name)
    if source is None:
        return None
    if source[1].get("class_type") != "LoadImage":
        raise RunError(f"the {what} of {_node(*apply)} comes from {_node(*source)}, not a Load Image node, so "
                       f"there is no file to replace; connect a Load Image node to its '{name}' input")
    return source[1]


def fill_portrait(prompt: Mapping[str, dict], inputs: PortraitInputs) -> dict:
    """A copy of the API-format prompt with the face and pose images (Load Image values), the prompt
    text (the encoder feeding Apply InstantID's 'positive'), the seed and the checkpoint set."""
    prompt = {node_id: {**node, "inputs": dict(node.get("inputs") or {})} for node_id, node in prompt.items()}
    apply = apply_node(prompt)
    face = _load_image_feeding(prompt, apply, "image", "face image")
    if face is None:
        raise RunError(f"the face image input of {_node(*apply)} is not connected; connect a Load Image node")
    face["inputs"]["image"] = inputs.face
    if inputs.pose is not None:
        pose = _load_image_feeding(prompt, apply, "image_kps", "pose image")
        if pose is None:
            raise RunError(f"a pose was given but {_node(*apply)} has no keypoint image (image_kps) connected; use "
                           f"the posed workflow ({shipped_workflow(True).name}) or connect a Load Image node to it")
        pose["inputs"]["image"] = inputs.pose
    if inputs.prompt is not None:
        encoder = _source(prompt, apply[1], "positive")
        if encoder is None or not isinstance(encoder[1]["inputs"].get("text"), str):
            raise RunError(f"the 'positive' input of {_node(*apply)} does not come from a text encoder with a "
                           "text widget, so the prompt has nowhere to go")
        encoder[1]["inputs"]["text"] = inputs.prompt
    if inputs.seed is not None:
        seeds = [(node, name) for node in prompt.values() for name in SEED_INPUTS if isinstance(node["inputs"].get(name), int)]
        if not seeds:
            raise RunError("the workflow has no seed widget (seed or noise_seed) for --seed to set")
        for node, name in seeds:
            node["inputs"][name] = inputs.seed
    if inputs.checkpoint is not None:
        loaders = [node for node in prompt.values() if node.get("class_type") == CHECKPOINT_LOADER]
        for node in loaders:
            node["inputs"]["ckpt_name"] = inputs.checkpoint
        if not loaders:
            log.info("the workflow has no Load Checkpoint node; it draws with the models it loads itself")
    if inputs.on_no_face is not None:
        apply[1]["inputs"]["on_no_face"] = inputs.on_no_face
    return prompt


def portrait_prompt(prompt: Mapping[str, dict], inputs: PortraitInputs) -> dict:
    """The prompt portrait runs: filled, with a face similarity unless a face-less photo is to be
    skipped (the similarity node would fail on that photo)."""
    filled = fill_portrait(prompt, inputs)
    return filled if inputs.on_no_face == "skip" else with_similarity(filled)


def with_similarity(prompt: Mapping[str, dict]) -> dict:
    """The prompt with an InstantID Face Similarity node comparing the face image with the saved
    image, unless it has one already (then that one reports)."""
    prompt = dict(prompt)
    if any(node.get("class_type") == SIMILARITY_NODE for node in prompt.values()):
        return prompt
    apply = apply_node(prompt)
    analysis = (apply[1].get("inputs") or {}).get("insightface")
    face = (apply[1].get("inputs") or {}).get("image")
    saved = next(((node.get("inputs") or {}).get("images") for node in prompt.values()
                  if node.get("class_type") == "SaveImage"), None)
    if not (isinstance(analysis, list) and isinstance(face, list) and isinstance(saved, list)):
        log.info("no face similarity: the workflow has no Save Image node or no face analysis connected")
        return prompt
    new_id = str(max((int(i) for i in prompt if i.isdigit()), default=0) + 1)
    prompt[new_id] = {"class_type": SIMILARITY_NODE, "inputs": {"faceanalysis": analysis, "reference": face, "image": saved},
                      "_meta": {"title": "Face similarity (added by portrait)"}}
    return prompt


# ------------------------------------------------------------------------------------- models --


@dataclass(frozen=True)
class CheckpointChoice:
    """What --checkpoint names: the ckpt_name the workflow gets, the catalog entry to fetch, or the
    user's own file to link into models/checkpoints (both None: a file already in ComfyUI's folders)."""
    name: str
    entry: ModelFile | None = None
    file: Path | None = None


def choose_checkpoint(choice: str | None, checkpoint_folders: Sequence[Path]) -> CheckpointChoice:
    """`choice` checked before anything is installed: a catalog id, a file, or a name in the
    checkpoints folders of the ComfyUI already there (none before an install)."""
    entry = next((entry for entry in CHECKPOINTS if entry.id == (choice or DEFAULT_CHECKPOINT)), None)
    if entry is not None:
        return CheckpointChoice(entry.path, entry=entry)
    assert choice is not None
    if not Path(choice).is_absolute() and first_existing(checkpoint_folders, choice) is not None:
        return CheckpointChoice(choice)
    path = Path(choice).expanduser()
    if not path.is_file():
        ids = ", ".join(entry.id for entry in CHECKPOINTS)
        where = f"not in {', '.join(map(str, checkpoint_folders))}" if checkpoint_folders else "(no ComfyUI yet to look in)"
        raise StepFailed("check the inputs", f"--checkpoint {choice!r} is not a file, {where} and not a catalog name "
                                             f"({ids})", f"pass a .safetensors file, a file name from ComfyUI's "
                                                         f"models/checkpoints, or one of: {ids}")
    return CheckpointChoice(path.name, file=path.resolve())


def link_checkpoint(path: Path, checkpoints: Path, steps: Steps) -> None:
    """Link the user's own checkpoint file into models/checkpoints, so ComfyUI lists it."""
    link = checkpoints / path.name
    if link.exists() and not link.samefile(path):
        raise StepFailed("fetch the models", f"{link} exists and is another file",
                         f"rename {path} or pass --checkpoint {path.name} to use the one in {checkpoints}")
    if not link.exists():
        checkpoints.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
        steps.say(f"    linked {link} -> {path}")


def check_face(face: str, face_model_roots: Sequence[Path]) -> None:
    """A face photo without a face stops here, before ComfyUI boots, when insightface is installed
    and antelopev2 is in place already (a re-run); otherwise the Apply node reports it."""
    if importlib.util.find_spec("insightface") is None or importlib.util.find_spec("cv2") is None:
        return
    from ..faces import FaceAnalyzer, FaceModelsMissing, find_antelopev2

    try:
        folder = find_antelopev2(face_model_roots)
    except FaceModelsMissing:
        return
    import cv2

    image = cv2.imread(face, cv2.IMREAD_COLOR)  # BGR, as the analyzer takes it
    if image is None:
        raise StepFailed("check the inputs", f"the face image {face} cannot be decoded", "pass a PNG, JPEG or WebP photo")
    try:
        analyzer = FaceAnalyzer.load(folder, "auto")
    except Exception as error:  # a damaged model file: the node reports it with its own message
        log.debug("no face check before the run: %s", error)
        return
    if analyzer.detect(image) is None:
        raise StepFailed("check the inputs", f"no face found in the face image {face} ({folder.name} from {folder})",
                         "pass a photo with one clearly visible, front-facing face, or --on-no-face skip to draw "
                         "from the prompt alone")


def fetch_missing(entries: list[ModelFile], targets: Mapping[str, Path], search_paths: Mapping[str, Sequence[Path]],
                  steps: Steps, *, endpoint: str | None, timeout: float, fix_options: str) -> None:
    """Fetch the entries found in none of the folders ComfyUI searches; present files are left
    alone (doctor checks them)."""
    missing = [entry for entry in entries if first_existing(search_paths.get(entry.folder, ()), entry.path) is None]
    if not missing:
        steps.say("    all present")
        return
    for entry in missing:
        steps.say(f"    {entry.id} ({entry.approx_size}) -> {targets[entry.folder] / entry.path}; licence: {entry.license}")
    try:
        fetch_models(missing, targets, endpoint=endpoint, timeout=timeout)
    except FetchError as error:
        only = "".join(f" --only {entry.id}" for entry in missing)
        raise StepFailed("fetch the models", str(error),
                         f"run again to resume, or fetch them alone: {FETCH_COMMAND}{fix_options}{only}") from None


# ------------------------------------------------------------------------------------ command --


@dataclass(frozen=True)
class PortraitOptions:
    inputs: PortraitInputs
    out: Path
    workflow: Path | None = None
    workspace: Path | None = None
    hardware: str | None = None
    endpoint: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    cpu: bool = False
    base_directory: Path | None = None
    extra_model_paths_config: Path | None = None


def make_portrait(options: PortraitOptions, stream: TextIO | None = None) -> RunReport:
    """Every step of the portrait command; StepFailed on a failure."""
    inputs = options.inputs
    steps = Steps(7, stream)
    steps.start("check the inputs")
    check_photos(inputs.face, inputs.pose)
    if options.base_directory is not None and not options.base_directory.is_dir():
        raise StepFailed("check the inputs", f"--base-directory {options.base_directory} is not a directory",
                         "create it or pass ComfyUI's base directory")
    workflow_path = options.workflow or shipped_workflow(posed=inputs.pose is not None)
    try:
        workflow = load_workflow(workflow_path)
    except RunError as error:
        raise StepFailed("check the inputs", str(error), "pass a workflow saved from ComfyUI with --workflow") from None
    _, search_paths = _search_paths(options, find_comfyui())
    checkpoint = choose_checkpoint(inputs.checkpoint, search_paths.get("checkpoints", []))
    if inputs.on_no_face != "skip":
        check_face(inputs.face, search_paths.get("insightface", []))
    comfyui = prepare_comfyui(workspace=options.workspace, hardware=options.hardware, steps=steps)
    steps.start("fetch the models")
    base, search_paths = _search_paths(options, comfyui)
    try:
        targets = model_folders({entry.folder for entry in CATALOG}, base, options.extra_model_paths_config)
    except FolderError as error:
        raise StepFailed("fetch the models", str(error), "pass --base-directory DIR") from None
    if checkpoint.file is not None:
        link_checkpoint(checkpoint.file, targets["checkpoints"], steps)
    wanted = [*REQUIRED] + ([checkpoint.entry] if checkpoint.entry else [])
    fetch_missing(wanted, targets, search_paths, steps, endpoint=options.endpoint, timeout=options.timeout,
                  fix_options=folder_flags(base, options.extra_model_paths_config))
    steps.start(f"draw the portrait with {workflow_path.name} (ComfyUI embedded)")
    absolute = replace(inputs, face=str(Path(inputs.face).resolve()), checkpoint=checkpoint.name,
                       pose=str(Path(inputs.pose).resolve()) if inputs.pose else None)
    run_base, configs = comfyui_layout(options.base_directory, options.extra_model_paths_config)
    try:
        return run_embedded(workflow, [], options.out, comfyui=comfyui, cpu=options.cpu, base_directory=run_base,
                            extra_model_paths_configs=configs,
                            prepare=lambda prompt: portrait_prompt(prompt, absolute))
    except NodeFailure as failure:
        # The node's own message says what to do; a face-less photo also has the command's way out.
        fix = "with portrait, pass --on-no-face skip" if ": NoFaceError: " in str(failure) else ""
        raise StepFailed("draw the portrait", str(failure), fix) from None
    except RunError as error:
        raise StepFailed("draw the portrait", str(error),
                         f"act on the cause; {shlex.quote(sys.executable)} -m instantid doctor checks ComfyUI, the "
                         "packages and the models") from None


def _search_paths(options: PortraitOptions, comfyui: Path | None) -> tuple[Path | None, dict[str, list[Path]]]:
    """The base directory and the folders ComfyUI searches for the catalog's keys (only the registered
    ones without a ComfyUI)."""
    base = options.base_directory or comfyui_layout(None, None)[0] or comfyui
    try:
        configs = config_files(comfyui, options.base_directory, options.extra_model_paths_config)
        return base, model_search_paths({entry.folder for entry in CATALOG}, base, configs)
    except FolderError as error:
        raise StepFailed("check the inputs", str(error), "pass --base-directory DIR") from None
