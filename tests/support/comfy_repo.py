"""A local git repository holding the test bed's ComfyUI, tagged like the release, for installing
"ComfyUI" through comfy-cli without the network (INSTANTID_COMFYUI_REPO points at it).

The repository is built from the checkout's files without copying them (git reads the folder as
its work tree); extra files (a symlink to the fixture node pack, an extra_model_paths.yaml) are
added as index entries only."""
from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

GIT = ("git", "-c", "user.name=test bed", "-c", "user.email=bed@localhost", "-c", "commit.gpgsign=false")


def _git(repository: Path, *args: str, work_tree: Path | None = None, data: bytes | None = None) -> str:
    tree = ("--work-tree", str(work_tree)) if work_tree else ()
    done = subprocess.run([*GIT, "--git-dir", str(repository), *tree, *args], input=data, capture_output=True,
                          timeout=120, check=True)
    return done.stdout.decode().strip()


def make_comfyui_repository(comfyui: Path, repository: Path, version: str, *, files: Mapping[str, str] = {},
                            links: Mapping[str, Path] = {}) -> Path:
    """A bare repository at `repository` with one commit of `comfyui` (as its .gitignore filters it)
    plus `files` (path -> text) and `links` (path -> symlink target), tagged v<version>."""
    subprocess.run(["git", "init", "-q", "--bare", str(repository)], check=True, timeout=60)
    _git(repository, "add", "-A", ".", work_tree=comfyui)
    for path, text in files.items():
        blob = _git(repository, "hash-object", "-w", "--stdin", data=text.encode())
        _git(repository, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}")
    for path, target in links.items():
        blob = _git(repository, "hash-object", "-w", "--stdin", data=str(target).encode())
        _git(repository, "update-index", "--add", "--cacheinfo", f"120000,{blob},{path}")
    _git(repository, "commit", "-q", "-m", f"ComfyUI {version} (test bed copy)", work_tree=comfyui)
    _git(repository, "tag", f"v{version}")
    return repository
