"""The pack's shape: domain modules import without ComfyUI (and without touching the network), and
ComfyUI is found where the README says."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from instantid.commands import cli, comfy_home

REPO_ROOT = Path(__file__).resolve().parents[1]
DOMAIN_MODULES = ["resampler", "instantid.sdxl", "instantid.adapter", "instantid.faces", "instantid.keypoints",
                  "instantid.regions", "instantid.drawn_keypoints", "instantid.attention", "instantid.control", "instantid.checks", "instantid.face_inputs", "instantid.apply",
                  "instantid.similarity", "instantid.progress", "instantid.identity", "instantid.identity_files", "instantid.face_crop", "instantid.paths",
                  "instantid.sdxl_checks", "instantid.resampling", "instantid.weights_files", "instantid.irse50",
                  "instantid.infiniteyou", "instantid.flux_apply",
                  "instantid.model_files", "instantid.file_layouts", "instantid.commands.fetch",
                  "instantid.commands.doctor", "instantid.commands.runner", "instantid.commands.embedded",
                  "instantid.commands.cli", "instantid.commands.bootstrap", "instantid.commands.portrait",
                  "instantid.commands.batch", "instantid.commands.ray_batch", "workflow_tools.builder",
                  "workflow_tools.specs"]


def test_domain_modules_import_without_comfyui():
    script = ("import sys\n"
              f"for name in {DOMAIN_MODULES!r}:\n"
              "    __import__(name)\n"
              "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('comfy', 'folder_paths', 'nodes', 'execution', 'insightface', 'onnxruntime'))\n"
              "print(','.join(loaded))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # Importing never loads ComfyUI, and insightface/onnxruntime only load when face analysis is used.
    assert result.stdout.strip() == ""


def test_nothing_imports_ray_unless_ray_is_asked_for():
    """Ray is an optional extra: importing every module and `batch --help` leave it unloaded."""
    script = ("import runpy, sys\n"
              f"for name in {DOMAIN_MODULES!r}:\n"
              "    __import__(name)\n"
              "sys.argv = ['instantid', 'batch', '--help']\n"
              "try:\n"
              "    runpy.run_module('instantid', run_name='__main__')\n"
              "except SystemExit:\n"
              "    pass\n"
              "sys.stderr.write(','.join(sorted(m for m in sys.modules if m.split('.')[0] == 'ray')))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--ray [ADDRESS]" in result.stdout, result.stderr
    assert result.stderr == ""


def test_without_ray_doctor_ray_and_batch_ray_say_how_to_install_it(tmp_path):
    (tmp_path / "face.png").write_bytes(b"a photo")
    (tmp_path / "jobs.jsonl").write_text('{"face": "face.png"}\n')
    script = ("import sys\n"
              "sys.modules['ray'] = None  # as in a Python without the extra\n"
              "from instantid.commands import cli\n"
              "print(cli.main(['doctor', '--ray']), cli.main(['batch', sys.argv[1], '--ray']),\n"
              "      cli.main(['batch', sys.argv[1], '--ray', '--comfyui', 'http://127.0.0.1:1']))\n")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "jobs.jsonl")], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.splitlines()[-1] == "1 1 1", result.stderr
    assert f"ray: not installed in {sys.executable}" in result.stdout
    assert "-m pip install 'ray>=2.60'" in result.stdout and "NOT READY" in result.stdout
    assert f"batch: error: --ray needs Ray, which this Python does not have; install it: {sys.executable} -m pip install " \
           "'ray>=2.60'\n" in result.stderr
    assert "batch: error: give --comfyui URL (servers you run) or --ray [ADDRESS] (workers on Ray), one of the two" \
           in result.stderr


@pytest.mark.parametrize("mode, option, message", [
    (["--ray"], ["--per-server", "2"], "--per-server is for --comfyui, not --ray: a Ray worker runs one job at a time "
                                       "on its own ComfyUI; leave it out"),
    (["--ray"], ["--retry-delay", "1"], "--retry-delay is for --comfyui, not --ray: Ray restarts a lost worker itself"),
    (["--comfyui", "http://127.0.0.1:1"], ["--workers", "2"], "--workers is for --ray, not --comfyui"),
    (["--comfyui", "http://127.0.0.1:1"], ["--base-directory", "."], "--base-directory is for --ray, not --comfyui")])
def test_a_batch_option_of_the_other_mode_is_refused_not_ignored(tmp_path, capsys, mode, option, message):
    (tmp_path / "jobs.jsonl").write_text('{"face": "face.png"}\n')
    assert cli.main(["batch", str(tmp_path / "jobs.jsonl"), *mode, *option]) == 1
    assert message in capsys.readouterr().err


FRONT_END = ["faces", "keypoints", "drawn_keypoints", "face_inputs", "identity", "identity_files", "regions",
             "face_crop", "similarity", "checks"]
BACK_ENDS = {"sdxl", "sdxl_checks", "adapter", "attention", "control", "apply", "irse50", "infiniteyou", "flux_apply"}


def imported_modules(path: Path) -> set[str]:
    """The instantid modules a file imports, deferred imports included."""
    import ast
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names |= {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("instantid."):
            names.add(node.module.split(".")[1])
    return names


def test_the_face_front_end_imports_no_back_end():
    """Back ends (SDXL InstantID, FLUX InfiniteYou) import the face front end, never the reverse."""
    for module in FRONT_END:
        reached = imported_modules(REPO_ROOT / "instantid" / f"{module}.py") & BACK_ENDS
        assert not reached, f"instantid/{module}.py imports the back end module(s) {sorted(reached)}"


def import_graph() -> dict[str, set[str]]:
    """Each module of the runtime package -> the package's modules it imports, deferred imports
    included (`from . import x` names the module x when there is one, else the package)."""
    import ast
    files = {}
    for path in (REPO_ROOT / "instantid").rglob("*.py"):
        parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def module(dotted: str) -> str | None:
        while dotted and dotted not in files:
            dotted = dotted.rpartition(".")[0]
        return dotted or None
    graph = {}
    for name, path in files.items():
        package = (name if path.name == "__init__.py" else name.rpartition(".")[0]).split(".")
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] if node.level else [])
                source = ".".join(part for part in (base, node.module) if part)
                targets |= {module(f"{source}.{alias.name}") if f"{source}.{alias.name}" in files else module(source)
                            for alias in node.names}
            elif isinstance(node, ast.Import):
                targets |= {module(alias.name) for alias in node.names}
        graph[name] = targets - {None, name}
    return graph


def test_no_import_cycle_deferred_imports_included():
    graph = import_graph()
    assert graph["instantid.commands.doctor"] >= {"instantid.file_layouts", "instantid.commands.model_folders"}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        for target in sorted(graph[name]):
            assert target not in path, "import cycle: " + " -> ".join(path[path.index(target):] + [target])
            if target not in done:
                visit(target, path + [target])
        done.add(name)
    for name in sorted(graph):
        visit(name, [name])


def test_comfyui_is_found_through_comfyui_path(tmp_path, monkeypatch):
    fake = tmp_path / "ComfyUI"
    (fake / "comfy").mkdir(parents=True)
    (fake / "nodes.py").write_text("")
    (fake / "execution.py").write_text("")
    (fake / "comfyui_version.py").write_text('__version__ = "9.9.9"\n')
    monkeypatch.setenv("COMFYUI_PATH", str(fake))
    assert comfy_home.find_comfyui() == fake.resolve()
    assert comfy_home.comfyui_version(fake) == "9.9.9"


def test_a_comfyui_path_that_is_not_comfyui_is_reported_not_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "nowhere"))
    assert comfy_home.find_comfyui() is None
    message = comfy_home.why_not_found()
    assert f"{tmp_path / 'nowhere'} (COMFYUI_PATH)" in message and "~/comfy/ComfyUI" in message


def test_the_folder_above_custom_nodes_is_searched(tmp_path, monkeypatch):
    comfyui = tmp_path / "ComfyUI"
    pack = comfyui / "custom_nodes" / "instantid-nodes"
    pack.mkdir(parents=True)
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setattr(comfy_home, "PACK_ROOT", pack)
    sources = [source for source, _ in comfy_home.comfyui_candidates()]
    assert sources == ["the folder above custom_nodes/", "comfy-cli's default workspace"]
    assert comfy_home.comfyui_candidates()[0][1] == comfyui


def test_shipped_workflows_are_ui_format_and_their_api_twins_api_format():
    import json

    from workflow_tools.specs import WORKFLOWS
    files = sorted((REPO_ROOT / "workflows").glob("*.json"))
    assert [p.name for p in files] == sorted(f"{spec.name}.json" for spec in WORKFLOWS)
    for path in files:
        workflow = json.loads(path.read_text())
        assert isinstance(workflow["nodes"], list) and isinstance(workflow["links"], list), path.name
        twin = json.loads((path.parent / "api" / path.name).read_text())
        assert all(set(node) >= {"class_type", "inputs"} for node in twin.values()), path.name


def test_the_domain_and_the_nodes_never_import_the_commands():
    import ast
    sources = [REPO_ROOT / "nodes.py", REPO_ROOT / "resampler.py", *sorted((REPO_ROOT / "instantid").glob("*.py"))]
    offenders = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            if any(name == "commands" or ".commands" in f".{name}" for name in names):
                offenders.append(f"{path.name}:{node.lineno}")
    # __main__ is the entry point of the command line, so it is the one place allowed to start it.
    assert offenders == ["__main__.py:2"]


def test_fixture_node_ids_do_not_look_like_the_packs_own():
    """Manager's node scanner reads the whole repository: a test fixture id starting with 'InstantID'
    (or naming a product node) would be listed as a node of this pack."""
    import re
    source = (REPO_ROOT / "tests" / "fixture_pack" / "__init__.py").read_text()
    fixture_ids = re.findall(r'node_id="([^"]+)"', source)
    product_ids = set(re.findall(r'node_id="([^"]+)"', (REPO_ROOT / "nodes.py").read_text()))
    assert len(fixture_ids) >= 3
    for node_id in fixture_ids:
        assert not node_id.lower().startswith(("instantid", "applyinstantid")) and node_id not in product_ids, node_id
        assert "instantid" not in node_id.lower() and "face" not in node_id.lower(), node_id
