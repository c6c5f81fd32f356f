"""The commands as a new user meets them (issue 19): help on a bare Python installs nothing, the
README's first code block is complete, a wrong --checkpoint stops before any install, a face-less
photo is one line naming the node, `portrait --base-directory` fetches into that base, ComfyUI is
found through comfy-cli's settings, and doctor names a wrong checkpoint by its header and its size."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from PIL import Image

from instantid import file_layouts
from instantid.commands import cli, comfy_home, doctor, image_files
from instantid.model_files import CATALOG, DEFAULT_CHECKPOINT, format_size
from instantid.commands.comfy_home import PACK_ROOT
from support.server import FIXTURE_PACK, free_port
from support.workflows import REPO_ROOT, write_face_photo
from test_doctor import fake_comfyui, run_doctor
from test_portrait import bed_repository, bed_workflow_file, hub, last_line, run_portrait  # noqa: F401 (fixtures)

COMMANDS = ("portrait", "batch", "install-comfyui", "doctor", "fetch-models", "run")
CHECKPOINT = next(entry for entry in CATALOG if entry.id == DEFAULT_CHECKPOINT)


# ------------------------------------------------------------------------------------------ help --


def _installed(venv: Path) -> list[str]:
    return sorted(str(path.relative_to(venv)) for path in venv.glob("lib/python*/site-packages/*"))


def test_help_on_a_bare_python_prints_and_installs_nothing(tmp_path):
    """A fresh venv (no pip, no numpy, no tqdm): the top help and every command's help print, and
    nothing is installed or attempted (a pip call would fail loudly here: the venv has no pip)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    before = _installed(venv)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["HOME"] = str(tmp_path / "home")
    for command in ((), *((name,) for name in COMMANDS)):
        result = subprocess.run([python, "-m", "instantid", *command, "--help"], cwd=PACK_ROOT, env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (command, result.stderr)
        assert result.stderr == ""
        assert result.stdout.startswith(f"usage: python -m instantid {' '.join(command)}".rstrip())
    assert _installed(venv) == before
    assert not (tmp_path / "home").exists()
    # A mistyped face path is found before the pack's packages are needed: one line, nothing installed.
    result = subprocess.run([python, "-m", "instantid", "portrait", str(tmp_path / "no-such-face.jpg"), "a prompt"],
                            cwd=PACK_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"python -m instantid portrait: error: step 'check the inputs' failed: the face image "
        f"{tmp_path / 'no-such-face.jpg'} does not exist. To fix: pass the path of a photo"]
    assert _installed(venv) == before


def test_help_shows_the_defaults_of_the_modules_that_own_them(capsys):
    from instantid.commands import runner

    assert cli.main(["run", "--help"]) == 0
    assert f"(default: {runner.DEFAULT_MAX_WAIT})" in " ".join(capsys.readouterr().out.split())


def test_the_on_no_face_choices_are_the_nodes():
    from instantid.face_inputs import ON_NO_FACE

    assert cli.ON_NO_FACE_CHOICES == ON_NO_FACE


def test_readme_first_code_block_starts_with_a_venv():
    block = re.search(r"```bash\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.S)[1].splitlines()
    assert block[0] == "python3 -m venv .venv && . .venv/bin/activate"
    assert all(line.startswith("python -m instantid portrait face.jpg ") for line in block[1:]) and len(block) == 3


def test_no_import_cycle_between_the_command_modules():
    """No module of instantid/commands imports, at any depth, one that imports it back (deferred
    imports count)."""
    folder = PACK_ROOT / "instantid" / "commands"
    imports = {}
    for path in folder.glob("*.py"):
        text = path.read_text()
        imports[path.stem] = set(re.findall(r"^\s*from \.(\w+) import", text, re.M))
        imports[path.stem] |= {name for group in re.findall(r"^\s*from \. import ([\w, ]+)", text, re.M)
                               for name in re.split(r",\s*", group)}

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for name in imports.get(todo.pop(), ()):
                if name not in seen:
                    seen.add(name)
                    todo.append(name)
        return seen

    assert [name for name in imports if name in reach(name)] == []


# ------------------------------------------------------------------------------- portrait step 1 --


def test_a_wrong_checkpoint_fails_in_step_one_with_nothing_installed(hub, tmp_path):  # noqa: F811
    face = write_face_photo(tmp_path / "me.png")
    result = run_portrait(tmp_path / "home", f"http://127.0.0.1:{free_port()}/ComfyUI.git", hub.endpoint, str(face),
                          "a portrait", "--checkpoint", "sdxl_bsae.safetensors")
    assert result.returncode == 1
    assert last_line(result.stderr).startswith("python -m instantid portrait: error: step 'check the inputs' failed: "
                                               "--checkpoint 'sdxl_bsae.safetensors' is not a file")
    assert "[2/7]" not in result.stderr
    assert not (tmp_path / "home" / "comfy").exists() and hub.requests == []


def test_a_file_that_is_no_image_fails_in_step_one(tmp_path):
    notes = tmp_path / "face.jpg"
    notes.write_text("not a photo")
    with pytest.raises(Exception, match="step 'check the inputs' failed: the face image .* is not an image file"):
        image_files.check_image("face image", str(notes))
    image_files.check_image("face image", str(write_face_photo(tmp_path / "me.png")))


@pytest.mark.parametrize("key", ["default_workspace", "recent_workspace"])
def test_comfyui_is_found_in_comfy_clis_workspace_settings(tmp_path, monkeypatch, key):
    """`comfy set-default DIR` writes default_workspace, every comfy-cli command recent_workspace, in
    comfy-cli's config.ini; portrait finds that ComfyUI instead of installing a second one."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    assert comfy_home.find_comfyui() is None
    workspace = fake_comfyui(tmp_path / "elsewhere" / "ComfyUI")
    config = tmp_path / "home" / ".config" / "comfy-cli" / "config.ini"
    config.parent.mkdir(parents=True)
    config.write_text(f"[DEFAULT]\n{key} = {workspace}\nenable_tracking = False\n")
    assert comfy_home.find_comfyui() == workspace
    expected = workspace if key == "default_workspace" else tmp_path / "home" / "comfy" / "ComfyUI"
    assert comfy_home.default_workspace() == expected


# ------------------------------------------------------------------------------------ doctor --


def _save(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({key: torch.zeros(shape) for key, shape in shapes.items()}, str(path))
    return path


UNET = {"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (8, 2048)}
ENCODERS = {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (4,),
            "conditioner.embedders.1.model.ln_final.weight": (4,)}
VAE = {"first_stage_model.decoder.conv_out.weight": (3, 4, 3, 3)}


def test_checkpoint_header_names_a_unet_only_file_and_one_without_text_encoders(tmp_path):
    assert file_layouts.checkpoint_problem(_save(tmp_path / "full.safetensors", {**UNET, **ENCODERS, **VAE})) == (
        None, "SDXL checkpoint: UNet, both text encoders, VAE")
    assert file_layouts.checkpoint_problem(_save(tmp_path / "unet.safetensors", UNET))[0] == (
        "it is a UNet-only file (no text encoders, no VAE): Load Checkpoint cannot use it; load it with Load Diffusion "
        "Model, or pass a full SDXL checkpoint")
    assert file_layouts.checkpoint_problem(_save(tmp_path / "no-te.safetensors", {**UNET, **VAE}))[0] == (
        "it has no CLIP-L text encoder and no OpenCLIP-G text encoder: an SDXL checkpoint without its text encoders")
    sd15 = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 768),
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": (4,)}
    assert file_layouts.checkpoint_problem(_save(tmp_path / "sd15.safetensors", sd15))[0] == (
        "its UNet takes 768-wide text context (SD1.5 is 768, SD2 1024), not SDXL's 2048: it is not an SDXL checkpoint")
    assert file_layouts.checkpoint_problem(_save(tmp_path / "vae.safetensors", VAE))[0] == (
        "it has no UNet (no model.diffusion_model.* tensors): it is not a checkpoint")


def test_doctor_flags_the_unet_only_checkpoint_portrait_would_use(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COMFYUI_PATH", str(fake_comfyui(tmp_path / "ComfyUI")))
    base = tmp_path / "base"
    path = _save(base / "models" / "checkpoints" / CHECKPOINT.path, UNET)
    code, lines = run_doctor(capsys, "--base-directory", base)
    assert code == 1
    [line] = [line for line in lines if line.startswith(f"{doctor.MARKERS['fail']} {DEFAULT_CHECKPOINT}: ")]
    assert line == (f"{doctor.MARKERS['fail']} {DEFAULT_CHECKPOINT}: BROKEN {path} ({format_size(path.stat().st_size)}): "
                    "it is a UNet-only file (no text encoders, no VAE): Load Checkpoint cannot use it; load it with Load "
                    f"Diffusion Model, or pass a full SDXL checkpoint; {format_size(path.stat().st_size)}, but "
                    "stabilityai/stable-diffusion-xl-base-1.0/sd_xl_base_1.0.safetensors is 6.9 GB: a different file under "
                    "its name, or a damaged download")


def test_doctor_workflow_flags_a_catalog_file_of_the_wrong_size(tmp_path, monkeypatch, capsys):
    """A 227 MB file named sd_xl_base_1.0.safetensors (a sparse file: no disk used) is not the 6.9 GB checkpoint."""
    monkeypatch.setenv("COMFYUI_PATH", str(fake_comfyui(tmp_path / "ComfyUI")))
    base = tmp_path / "base"
    path = base / "models" / "checkpoints" / CHECKPOINT.path
    path.parent.mkdir(parents=True)
    with open(path, "wb") as stream:
        stream.truncate(227_000_000)
    workflow = tmp_path / "api.json"
    workflow.write_text(json.dumps({"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT.path}}}))
    code, lines = run_doctor(capsys, "--base-directory", base, "--workflow", workflow)
    assert code == 1
    assert (f"{doctor.MARKERS['fail']} node 1 CheckpointLoaderSimple: ckpt_name {CHECKPOINT.path}: BROKEN {path} (227.0 MB): "
            "not a safetensors file (its header does not parse); the download is damaged or it is another kind of file; 227.0 MB, but stabilityai/stable-diffusion-xl-base-1.0/sd_xl_base_1.0.safetensors is 6.9 GB: a different "
            "file under its name, or a damaged download") in lines


# ------------------------------------------------------------------- portrait end to end (slow) --


def test_portrait_with_a_base_directory_fetches_there_and_a_gray_photo_is_one_line(
        bed_repository, bed_workflow_file, hub, tmp_path):  # noqa: F811 (fixtures of test_portrait)
    """ComfyUI installed from an empty HOME, the models fetched into --base-directory (the test bed's
    UNet-as-checkpoint is found through --extra-model-paths-config), then a photo without a face:
    one error line naming the node and the pack's no-face message, no traceback."""
    home, base = tmp_path / "home", tmp_path / "base"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "test-bed-nodes").symlink_to(FIXTURE_PACK)  # ComfyUI loads the base's custom nodes
    config = tmp_path / "models.yaml"
    config.write_text(f"test_bed:\n  base_path: {base}\n  diffusion_models: models/checkpoints\n")
    gray = tmp_path / "gray.png"
    Image.new("RGB", (96, 96), (128, 128, 128)).save(gray)
    result = run_portrait(home, str(bed_repository), hub.endpoint, str(gray), "a portrait", "--out", str(tmp_path / "out"),
                          "--workflow", str(bed_workflow_file), "--base-directory", str(base),
                          "--extra-model-paths-config", str(config))
    assert result.returncode == 1, result.stderr[-3000:]
    for entry in [e for e in CATALOG if e.required] + [CHECKPOINT]:
        assert (base / "models" / entry.folder / entry.path).read_bytes() == hub.files[(entry.repo, entry.file)]
    assert not (home / "comfy" / "ComfyUI" / "models" / "instantid" / "ip-adapter.bin").exists()
    error = last_line(result.stderr)
    assert re.fullmatch(r"python -m instantid portrait: error: step 'draw the portrait' failed: the workflow failed at "
                        r"node \d+ \((ApplyInstantID|InstantIDFaceSimilarity)\): (NoFaceError|FaceNotFound): [Nn]o face found in the "
                        r"reference .*", error), error
    assert "Traceback" not in result.stderr and "!!! Exception" not in result.stderr
    assert "custom_nodes" not in error and "doctor" not in error
    assert sum(line.startswith("python -m instantid") for line in result.stderr.splitlines()) == 1
    assert [line for line in result.stderr.splitlines() if line.startswith(". To fix")] == []

    # Again: the face models are in place now, so the photo is checked before ComfyUI boots.
    again = run_portrait(home, str(bed_repository), hub.endpoint, str(gray), "a portrait", "--out", str(tmp_path / "out"),
                         "--workflow", str(bed_workflow_file), "--base-directory", str(base),
                         "--extra-model-paths-config", str(config))
    assert again.returncode == 1
    assert last_line(again.stderr) == (
        f"python -m instantid portrait: error: step 'check the inputs' failed: no face found in the face image {gray} "
        f"(antelopev2 from {base / 'models/insightface/models/antelopev2'}). To fix: pass a photo with one clearly "
        "visible, front-facing face, or --on-no-face skip to draw from the prompt alone")
    assert "[2/7]" not in again.stderr
