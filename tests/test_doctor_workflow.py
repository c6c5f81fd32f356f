"""`python -m instantid doctor --workflow FILE`: the model files a workflow (UI or API format) loads,
found where ComfyUI searches or named with where they go and where to download them."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from instantid.commands import cli, doctor
from instantid.model_files import CATALOG, format_size
from instantid.commands.workflow_models import ModelReference, workflow_models
from instantid.commands.portrait import BASIC_WORKFLOW_FILE
from support.antelope import write_antelopev2
from support.workflows import REPO_ROOT
from test_doctor import fake_comfyui, run_doctor
from test_robustness import cheap_adapter_state

MARK = doctor.MARKERS
BASIC = REPO_ROOT / "workflows" / BASIC_WORKFLOW_FILE
IDENTITYNET = next(entry for entry in CATALOG if entry.id == "identitynet")


def size_of(path: Path) -> str:
    return format_size(path.stat().st_size)


def write_models_without_identitynet(base: Path) -> dict[str, Path]:
    """Every file the basic workflow loads except the IdentityNet (the checkpoint is 1000 bytes: too small)."""
    files = {"checkpoint": base / "models/checkpoints/sd_xl_base_1.0.safetensors",
             "adapter": base / "models/instantid/ip-adapter.bin",
             "faces": base / "models/insightface/models/antelopev2"}
    files["checkpoint"].parent.mkdir(parents=True)
    files["checkpoint"].write_bytes(b"\0" * 1000)
    files["adapter"].parent.mkdir(parents=True)
    torch.save(cheap_adapter_state(), files["adapter"])
    write_antelopev2(files["faces"])
    return files


def test_basic_workflow_without_the_identitynet_names_it_and_where_it_goes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COMFYUI_PATH", str(fake_comfyui(tmp_path / "ComfyUI")))
    base = tmp_path / "base"
    files = write_models_without_identitynet(base)

    code, lines = run_doctor(capsys, "--base-directory", base, "--workflow", BASIC)

    assert code == 1
    faces = files["faces"]
    start = lines.index(f"{MARK['ok']} workflow: {BASIC}: 3 model files named by 3 loader nodes and face analysis "
                        "(antelopev2)")
    assert lines[start + 1:lines.index("To fix, run:")] == [
        f"{MARK['fail']} node 1 CheckpointLoaderSimple: ckpt_name sd_xl_base_1.0.safetensors: BROKEN {files['checkpoint']} "
        "(1.0 kB): not a safetensors file (its header does not parse); the download is damaged or it is another kind of file; 1.0 kB, but stabilityai/stable-diffusion-xl-base-1.0/sd_xl_base_1.0.safetensors is 6.9 GB: a different "
        "file under its name, or a damaged download",
        f"{MARK['ok']} node 4 InstantIDModelLoader: instantid_file ip-adapter.bin: {files['adapter']} "
        f"({size_of(files['adapter'])}): InstantID adapter: face Resampler and 140 projections for SDXL's 70 layers",
        f"{MARK['fail']} node 6 ControlNetLoader: control_net_name instantid/diffusion_pytorch_model.safetensors: MISSING "
        f"(2.5 GB, {IDENTITYNET.description}); put it at "
        f"{base / 'models/controlnet/instantid/diffusion_pytorch_model.safetensors'}; download "
        "https://huggingface.co/InstantX/InstantID/resolve/main/ControlNetModel/diffusion_pytorch_model.safetensors",
        f"{MARK['ok']} antelopev2-detector: {faces / 'scrfd_10g_bnkps.onnx'} ({size_of(faces / 'scrfd_10g_bnkps.onnx')}): "
        "valid ONNX model",
        f"{MARK['ok']} antelopev2-recognizer: {faces / 'glintr100.onnx'} ({size_of(faces / 'glintr100.onnx')}): "
        "valid ONNX model",
        f"{MARK['ok']} antelopev2: insightface loads the detector (5 keypoints) and the recogniser: "
        "detection on CPUExecutionProvider, recognition on CPUExecutionProvider",
        next(line for line in lines if line.startswith("Summary: 2 problems, ")),
    ]
    assert lines[lines.index("To fix, run:") + 1] == (f"  python -m instantid fetch-models --base-directory {base} "
                                                      "--only sdxl-base-1.0 --only identitynet")
    assert not any(line.startswith(f"{MARK['ok']} adapter:") for line in lines)  # the pack's own list is not checked


def test_api_workflow_with_extra_model_paths_legacy_folders_and_unknown_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COMFYUI_PATH", str(fake_comfyui(tmp_path / "ComfyUI")))
    base = tmp_path / "base"
    base.mkdir()
    shared = tmp_path / "shared"
    lora = shared / "my-loras/style/film.safetensors"
    unet = shared / "unets/flux.safetensors"
    for path in (lora, unet):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"\0" * 10)
    config = tmp_path / "extra.yaml"
    config.write_text(f"shared:\n  base_path: {shared}\n  loras: my-loras\n  unet: unets\n")  # 'unet': ComfyUI's old key
    workflow = tmp_path / "api.json"
    workflow.write_text(json.dumps({
        "3": {"class_type": "LoraLoader", "inputs": {"lora_name": "style\\film.safetensors", "model": ["4", 0]}},
        "4": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux.safetensors", "weight_dtype": "default"}},
        "5": {"class_type": "VAELoader", "inputs": {"vae_name": "taesdxl"}},
        "12": {"class_type": "CLIPLoader", "inputs": {"clip_name": "t5xxl.safetensors", "type": "flux"}},
        "20": {"class_type": "KSampler", "inputs": {"seed": 1}},
    }))

    code, lines = run_doctor(capsys, "--base-directory", base, "--extra-model-paths-config", config, "--workflow", workflow)

    assert code == 1
    start = lines.index(f"{MARK['ok']} workflow: {workflow}: 3 model files named by 4 loader nodes")
    assert lines[start + 1:start + 5] == [
        f"{MARK['ok']} node 3 LoraLoader: lora_name style\\film.safetensors: {lora} (10 B)",
        f"{MARK['ok']} node 4 UNETLoader: unet_name flux.safetensors: {unet} (10 B)",
        f"{MARK['fail']} node 12 CLIPLoader: clip_name t5xxl.safetensors: MISSING; put it at "
        f"{base / 'models/text_encoders/t5xxl.safetensors'}",
        next(line for line in lines if line.startswith("Summary: 1 problem, ")),
    ]


def test_a_workflow_without_known_loaders_is_a_warning_listing_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COMFYUI_PATH", str(fake_comfyui(tmp_path / "ComfyUI")))
    workflow = tmp_path / "sampler.json"
    workflow.write_text(json.dumps({"1": {"class_type": "KSampler", "inputs": {"seed": 1}}}))
    code, lines = run_doctor(capsys, "--base-directory", tmp_path, "--workflow", workflow)
    assert code == 0
    summary = next(i for i, line in enumerate(lines) if line.startswith("Summary: all needed checks passed, "))
    assert lines[summary - 1] == (
        f"{MARK['warn']} workflow: {workflow}: 0 model files named by 0 loader nodes; the doctor checks the files of "
        "these loaders: CheckpointLoaderSimple, CheckpointLoader, ImageOnlyCheckpointLoader, unCLIPCheckpointLoader, "
        "UNETLoader, VAELoader, CLIPLoader, DualCLIPLoader, CLIPVisionLoader, LoraLoader, LoraLoaderModelOnly, "
        "ControlNetLoader, DiffControlNetLoader, StyleModelLoader, GLIGENLoader, UpscaleModelLoader, "
        "InstantIDModelLoader, InfiniteYouModelLoader, InstantIDFaceAnalysis")


def test_a_file_that_is_not_a_workflow_is_one_error_line(tmp_path, capsys):
    workflow = tmp_path / "notes.json"
    workflow.write_text('{"hello": "world"}')
    assert cli.main(["doctor", "--base-directory", str(tmp_path), "--workflow", str(workflow)]) == 1
    captured = capsys.readouterr()
    assert captured.err == (f"python -m instantid doctor: error: {workflow} is not a ComfyUI workflow: expected the UI "
                            "format (with 'nodes' and 'links') or the API format ({node id: {class_type, inputs}}); in "
                            "ComfyUI use Save or Export (API)\n")


def test_ui_format_reads_widgets_by_position_and_skips_muted_nodes_and_links():
    workflow = {"nodes": [
        {"id": 10, "type": "CheckpointLoader", "mode": 0, "widgets_values": ["sdxl.yaml", "base.safetensors"]},
        {"id": 2, "type": "LoraLoader", "mode": 4, "widgets_values": ["bypassed.safetensors", 1.0, 1.0]},
        {"id": 3, "type": "DualCLIPLoader", "mode": 0, "widgets_values": ["a.safetensors", "b.safetensors", "flux"]},
        {"id": 4, "type": "InstantIDFaceAnalysis", "mode": 2, "widgets_values": ["auto"]},
        {"id": 5, "type": "VAELoader", "widgets_values": {"vae_name": "sdxl_vae.safetensors"}},
    ], "links": [], "definitions": {"subgraphs": [{"nodes": [
        {"id": 7, "type": "ControlNetLoader", "widgets_values": ["canny.safetensors"]}]}]}}
    models = workflow_models(workflow)
    assert models.files == (
        ModelReference("3", "DualCLIPLoader", "clip_name1", "text_encoders", "a.safetensors"),
        ModelReference("3", "DualCLIPLoader", "clip_name2", "text_encoders", "b.safetensors"),
        ModelReference("5", "VAELoader", "vae_name", "vae", "sdxl_vae.safetensors"),
        ModelReference("7", "ControlNetLoader", "control_net_name", "controlnet", "canny.safetensors"),
        ModelReference("10", "CheckpointLoader", "config_name", "configs", "sdxl.yaml"),
        ModelReference("10", "CheckpointLoader", "ckpt_name", "checkpoints", "base.safetensors"),
    )
    assert (models.face_analysis, models.loader_nodes) == (False, 4)
