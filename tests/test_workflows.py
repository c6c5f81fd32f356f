"""Workflows people already share for the old ComfyUI_InstantID pack load and run with this pack
(UI format, converted like `python -m instantid run` does). The pack's own workflows/ are tested in
test_shipped_workflows.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import UNET_NAME
from support.workflows import OLD_PACK_WORKFLOWS, load_ui_workflow, prepare_for_test_bed


def run_ui_workflow(comfy, path: Path):
    prompt = comfy.embedded.to_api(load_ui_workflow(path))
    result = comfy.run(prepare_for_test_bed(prompt, UNET_NAME, comfy.base / "input"))
    assert result.success, result.error_text()
    return prompt, result


def assert_instantid_reached_sampler(seen: list, identities: int = 1) -> None:
    from instantid.sdxl import ATTN2_KEYS
    assert len(seen) == 1
    patches = seen[0]["model"].model_options["transformer_options"]["patches_replace"]["attn2"]
    assert set(patches) == set(ATTN2_KEYS)
    assert all(len(patch.branches) == identities for patch in patches.values())
    for entry in seen[0]["positive"] + seen[0]["negative"]:
        assert type(entry[1]["control"]).__name__ == "IdentityNet"
        assert [tokens.shape for tokens in entry[1]["control"].face_tokens] == [(1, 16, 2048)] * 2
        assert "cross_attn_controlnet" not in entry[1]  # other ControlNets of the chain keep the text context


@pytest.mark.parametrize("name", ["InstantID_basic.json", "InstantID_posed.json"])
def test_old_pack_workflow_runs_with_this_pack(comfy, sampler_spy, name):
    path = OLD_PACK_WORKFLOWS / name
    if not path.is_file():
        pytest.skip(f"the shared old-pack workflows are not at {OLD_PACK_WORKFLOWS} (they come with the team's shared/ folder)")
    prompt, result = run_ui_workflow(comfy, path)
    apply = next(node for node in prompt.values() if node["class_type"] == "ApplyInstantID")
    assert (apply["inputs"]["weight"], apply["inputs"]["start_at"], apply["inputs"]["end_at"]) == (0.8, 0, 1)
    assert ("image_kps" in apply["inputs"]) == (name == "InstantID_posed.json")
    assert_instantid_reached_sampler(sampler_spy)
    images = [image for output in result.outputs.values() for image in output.get("images", [])]
    assert len(images) == 1 and images[0]["type"] == "temp"


def test_multi_id_workflow_stacks_two_identities(comfy, sampler_spy, monkeypatch):
    path = OLD_PACK_WORKFLOWS / "InstantID_multi_id.json"
    if not path.is_file():
        pytest.skip(f"the shared old-pack workflows are not at {OLD_PACK_WORKFLOWS}")
    workflow = load_ui_workflow(path)
    if any(n["type"] in ("ImageFlip+", "MaskFlip+") for n in workflow["nodes"]):
        # ComfyUI_essentials is not installed here: bypass its two flip nodes (mode 4), as a user
        # without that pack would; the graph stays connected through the bypass.
        for node in workflow["nodes"]:
            if node["type"] in ("ImageFlip+", "MaskFlip+"):
                node["mode"] = 4
    prompt = comfy.embedded.to_api(workflow)
    result = comfy.run(prepare_for_test_bed(prompt, UNET_NAME, comfy.base / "input"))
    assert result.success, result.error_text()
    patches = sampler_spy[0]["model"].model_options["transformer_options"]["patches_replace"]["attn2"]
    assert all(len(patch.branches) == 2 for patch in patches.values())
    masks = [entry[1].get("mask") for entry in sampler_spy[0]["positive"]]
    assert len(masks) == 2 and all(mask is not None for mask in masks)
    # Today's result: the latent of the route before the IdentityNet carried its own tokens.
    from support.old_route import attach_identitynet_through_conditioning
    monkeypatch.setattr(comfy.pack_module("instantid.apply"), "attach_identitynet", attach_identitynet_through_conditioning)
    old = comfy.run(prepare_for_test_bed(prompt, UNET_NAME, comfy.base / "input"))
    assert old.success, old.error_text()
    assert "cross_attn_controlnet" in sampler_spy[1]["positive"][0][1]
    assert torch.equal(sampler_spy[0]["latent"], sampler_spy[1]["latent"])

