"""Numbers that make no sense stop before anything is patched: NaN or an infinity in any FLOAT input
of the pack's nodes (found in the node schemas, so a FLOAT input added later is covered too), and
a start_at after end_at. The message names the input, the value and what to set; the model and
conditioning given are left exactly as they were. `python -m instantid run --set` runs the same
checks before ComfyUI runs anything."""
from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch

from conftest import UNET_NAME
from instantid.commands import cli
from instantid.commands.portrait import BASIC_WORKFLOW_FILE
from support.headless import FakeComfyUI, finishes_within, serve
from support.workflows import REPO_ROOT, load_ui_workflow, prepare_for_test_bed
from test_apply import Kit, load_kit, seeded_conditioning

BAD_NUMBERS = {"nan": (math.nan, "NaN (not a number)"), "+inf": (math.inf, "inf (infinite)"),
               "-inf": (-math.inf, "-inf (infinite)")}
# The nodes with FLOAT inputs (a test below keeps this list complete); the first five have a start_at..end_at window.
NODES_WITH_SCHEDULE = ("ApplyInstantID", "ApplyInstantIDAdvanced", "InstantIDAttentionPatch", "ApplyInstantIDControlNet",
                       "ApplyInfiniteYou")
NODES_WITH_NUMBERS = (*NODES_WITH_SCHEDULE, "InstantIDFaceCrop")


@pytest.fixture(scope="module")
def kit(comfy) -> Kit:
    return load_kit(comfy)


@pytest.fixture(scope="module")
def setting_error(comfy) -> type[Exception]:
    return comfy.pack_module("instantid.checks").SettingError


def good_inputs(kit: Kit, node_id: str) -> dict[str, Any]:
    """Inputs with which the node works (each test changes one of them); fresh conditioning each time."""
    conditioning = dict(positive=seeded_conditioning(1), negative=seeded_conditioning(2))
    if node_id == "InstantIDFaceCrop":
        return dict(image=kit.image, faceanalysis=kit.analyzer, face_index=0, padding=0.6, size=64)
    if node_id == "ApplyInfiniteYou":
        # The number checks run first, before any model is used: SDXL stand-ins for the FLUX models
        # show that nothing else stopped the node (test_infiniteyou_apply runs it on FLUX models).
        return dict(infiniteyou=None, control_net=kit.control_net, vae=None, insightface=kit.analyzer, image=kit.image,
                    strength=1.0, start_at=0.0, end_at=1.0, infusenet_guidance=1.0, **conditioning)
    if node_id == "ApplyInstantIDControlNet":
        (_, face_embeds) = kit.apply("InstantIDAttentionPatch")
        return dict(face_embeds=face_embeds, control_net=kit.control_net, image_kps=torch.zeros(1, 64, 64, 3),
                    strength=1.0, start_at=0.0, end_at=1.0, **conditioning)
    common = dict(instantid=kit.adapter, insightface=kit.analyzer, image=kit.image, model=kit.model,
                  start_at=0.0, end_at=1.0)
    if node_id == "InstantIDAttentionPatch":
        return dict(common, weight=0.8, noise=0.0)
    if node_id == "ApplyInstantID":
        return dict(common, control_net=kit.control_net, weight=0.8, **conditioning)
    return dict(common, control_net=kit.control_net, ip_weight=0.8, cn_strength=0.8, noise=0.0,
                combine_embeds="average", **conditioning)


def float_inputs(comfy, node_id: str) -> list:
    """The FLOAT inputs the node's schema declares, as ComfyUI loaded the pack."""
    node = getattr(comfy.pack_module("nodes"), node_id)
    return [item for item in node.define_schema().inputs if item.get_io_type() == "FLOAT"]


def state_of(model: Any, inputs: dict[str, Any]) -> tuple:
    """What must not change: the model's options and weights' identity, the conditioning's tensors and keys."""
    conditioning = [(tensor.clone(), sorted(extra), {k: v.clone() for k, v in extra.items() if torch.is_tensor(v)})
                    for name in ("positive", "negative") if name in inputs for tensor, extra in inputs[name]]
    return repr(model.model_options), dict(model.patches), conditioning


def assert_same_state(before: tuple, after: tuple) -> None:
    assert before[0] == after[0] and before[1] == after[1]
    assert len(before[2]) == len(after[2])
    for (tensor, keys, extras), (tensor_now, keys_now, extras_now) in zip(before[2], after[2]):
        assert torch.equal(tensor, tensor_now) and keys == keys_now
        assert extras.keys() == extras_now.keys() and all(torch.equal(extras[k], extras_now[k]) for k in extras)


def test_every_node_with_a_float_input_is_tested_here(comfy):
    """A node that gains its first FLOAT input must get good inputs in this file, so the
    parametrised test below covers it."""
    with_floats = {node.define_schema().node_id for node in comfy.pack_module("nodes").NODES
                   if any(item.get_io_type() == "FLOAT" for item in node.define_schema().inputs)}
    assert with_floats == set(NODES_WITH_NUMBERS)


@pytest.mark.parametrize("bad", list(BAD_NUMBERS))
@pytest.mark.parametrize("node_id", NODES_WITH_NUMBERS)
def test_nan_and_infinity_in_every_float_input_stop_with_the_input_named(comfy, kit, setting_error, node_id, bad):
    value, shown = BAD_NUMBERS[bad]
    inputs = float_inputs(comfy, node_id)
    assert node_id not in NODES_WITH_SCHEDULE or {"start_at", "end_at"} <= {item.id for item in inputs}
    for item in inputs:
        given = good_inputs(kit, node_id)
        given[item.id] = value
        before = state_of(kit.model, given)
        with pytest.raises(setting_error) as error:
            kit.run_node(node_id, **given)
        assert str(error.value) == (
            f"The {item.id} input is {shown}; it must be a number from {item.min:g} to {item.max:g}. Set {item.id} "
            f"to a value in that range (if {item.id} is connected, the node feeding it made this value).")
        assert_same_state(before, state_of(kit.model, given))


def test_good_inputs_do_work(kit):
    """The inputs the tests above start from are accepted: the error comes from the one bad number."""
    (model, positive, _) = kit.run_node("ApplyInstantIDAdvanced", **good_inputs(kit, "ApplyInstantIDAdvanced"))
    assert model is not kit.model and "control" in positive[0][1]
    (positive, _) = kit.run_node("ApplyInstantIDControlNet", **good_inputs(kit, "ApplyInstantIDControlNet"))
    assert "control" in positive[0][1]


@pytest.mark.parametrize("node_id", NODES_WITH_SCHEDULE)
def test_start_after_end_is_an_error_naming_both_values_even_with_skip(kit, setting_error, node_id):
    given = good_inputs(kit, node_id)
    given.update(start_at=0.8, end_at=0.2)
    if node_id != "ApplyInstantIDControlNet":
        given.update(on_no_face="skip", image=torch.zeros(1, 320, 320, 3))  # no face: still an error, not a skip
    before = state_of(kit.model, given)
    with pytest.raises(setting_error) as error:
        kit.run_node(node_id, **given)
    assert str(error.value) == (
        "start_at (0.8) is after end_at (0.2), so this window of the schedule is empty and InstantID would never act "
        "(the identity would silently vanish). Lower start_at to 0.2 or less, or raise end_at to 0.8 or more "
        "(0 = first step, 1 = last step).")
    assert_same_state(before, state_of(kit.model, given))


def test_equal_start_and_end_is_accepted(kit):
    (model, positive, _) = kit.run_node("ApplyInstantID", **dict(good_inputs(kit, "ApplyInstantID"), start_at=0.5,
                                                                 end_at=0.5))
    assert "control" in positive[0][1]


def test_domain_call_without_a_node_names_its_own_arguments(comfy, kit, setting_error):
    apply_instantid = comfy.pack_module("instantid.apply").apply_instantid
    given = good_inputs(kit, "ApplyInstantIDAdvanced")
    arguments = dict(adapter=kit.adapter, face_analysis=kit.analyzer, control_net=kit.control_net, image=kit.image,
                     model=kit.model, positive=given["positive"], negative=given["negative"], ip_weight=0.8,
                     cn_strength=math.inf, start_at=0.0, end_at=1.0)
    with pytest.raises(setting_error, match=r"^The cn_strength input is inf \(infinite\); it must be a finite number"):
        apply_instantid(**arguments)
    with pytest.raises(setting_error, match=r"^start_at \(1\) is after end_at \(0\)"):
        apply_instantid(**dict(arguments, cn_strength=0.8, start_at=1.0, end_at=0.0))


# --------------------------------------------------------------------------------- run --set --


@pytest.fixture
def apply_workflow(comfy, tmp_path) -> Any:
    """The shipped basic workflow in API format on the test bed (tiny models, 64 px, 1 step)."""
    prompt = comfy.embedded.to_api(load_ui_workflow(REPO_ROOT / "workflows" / BASIC_WORKFLOW_FILE))
    prompt = prepare_for_test_bed(prompt, UNET_NAME, comfy.base / "input", steps=1)
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(prompt))
    return path


@pytest.mark.parametrize(("setting", "message"), [
    ("Apply InstantID.weight=nan", "The weight input is NaN (not a number); it must be a number from 0 to 5."),
    ("ApplyInstantID.weight=-inf", "The weight input is -inf (infinite); it must be a number from 0 to 5."),
    ("8.start_at=0.9", "start_at (0.9) is after end_at (0.3), so this window of the schedule is empty"),
])
def test_run_set_refuses_bad_numbers_before_comfyui_samples(comfy, apply_workflow, tmp_path, capsys, setting, message):
    out = tmp_path / "out"
    args = ["run", str(apply_workflow), "--base-directory", str(comfy.base), "--out", str(out), "--set", setting]
    if setting.startswith("8."):
        args += ["--set", "8.end_at=0.3"]
    assert cli.main(args) == 1
    captured = capsys.readouterr()
    line = captured.err.splitlines()[-1]
    assert line.startswith(f"python -m instantid run: error: --set {setting!r}: node 8 ApplyInstantID"), line
    assert message in line
    assert "KSampler" not in captured.err and not out.exists()  # no progress bar: sampling never started


def test_run_set_nan_on_a_server_is_refused_before_anything_is_queued(comfy, tmp_path, capsys, monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    workflow = load_ui_workflow(REPO_ROOT / "workflows" / BASIC_WORKFLOW_FILE)
    kinds = {n["type"] for n in workflow["nodes"]} & set(comfy.embedded.nodes.NODE_CLASS_MAPPINGS)  # no Note
    fake = FakeComfyUI(object_info={kind: comfy.embedded.node_info(kind) for kind in kinds})
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(workflow))
    with serve(fake) as url:
        code = finishes_within(20, cli.main, ["run", str(path), "--comfyui", url, "--set", "ApplyInstantID.weight=inf",
                                              "--out", str(tmp_path / "out")])
    assert code == 1
    assert "The weight input is inf (infinite); it must be a number from 0 to 5" in capsys.readouterr().err
    assert fake.posted == []


@pytest.mark.parametrize(("window", "message"), [
    (dict(cn_start_at=0.9, cn_end_at=0.1), "cn_start_at (0.9) is after cn_end_at (0.1)"),
    (dict(cn_start_at=0.9, end_at=0.95, cn_end_at=-1.0, start_at=0.0), None),
    (dict(cn_start_at=0.9, cn_end_at=-1.0, end_at=0.5), "cn_start_at (0.9) is after end_at (0.5)"),
])
def test_the_identitynet_window_is_checked_too(kit, setting_error, window, message):
    """Advanced's separate IdentityNet window (-1 follows start_at/end_at) must not be empty either."""
    given = dict(good_inputs(kit, "ApplyInstantIDAdvanced"), **window)
    before = state_of(kit.model, given)
    if message is None:
        (_, positive, _) = kit.run_node("ApplyInstantIDAdvanced", **given)
        assert "control" in positive[0][1]
        return
    with pytest.raises(setting_error) as error:
        kit.run_node("ApplyInstantIDAdvanced", **given)
    assert str(error.value).startswith(message + ", so this window of the schedule is empty")
    assert_same_state(before, state_of(kit.model, given))
