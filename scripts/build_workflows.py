"""Write workflows/*.json (UI format), workflows/api/*.json (their API twins) and workflows/*.jpg (their
Templates thumbnails, drawings of the graphs) from the specs in
workflow_tools/specs.py. Boots ComfyUI embedded with this pack to read the node
definitions; run with ComfyUI's Python from the pack's folder:

    python scripts/build_workflows.py            # rewrite the files
    python scripts/build_workflows.py --check    # exit 1 if a file differs from what would be written
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO_ROOT))

from instantid import __version__  # noqa: E402
from instantid.commands.comfy_home import comfyui_version, find_comfyui, why_not_found  # noqa: E402
from instantid.commands.embedded import EmbeddedComfyUI  # noqa: E402
from workflow_tools.builder import dumps, render  # noqa: E402
from workflow_tools.specs import WORKFLOWS  # noqa: E402

log = logging.getLogger("build_workflows")
WORKFLOWS_DIR = REPO_ROOT / "workflows"
THUMBNAIL_SUFFIX = ".jpg"  # what the Templates browser asks for beside each workflow


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    comfyui = find_comfyui()
    if comfyui is None:
        log.error(why_not_found())
        return 2
    with tempfile.TemporaryDirectory() as base:
        # An empty base directory: the definitions must not depend on the models installed here.
        comfy = EmbeddedComfyUI.start(comfyui, cpu=True, base_directory=Path(base), load_custom_nodes=False,
                                      extra_node_dirs=[REPO_ROOT])
        files = render(WORKFLOWS, comfy, __version__, comfyui_version(comfyui))
    wanted: dict[Path, bytes] = {}
    for name, (workflow, api, picture) in files.items():
        wanted[WORKFLOWS_DIR / name] = dumps(workflow).encode()
        wanted[WORKFLOWS_DIR / "api" / name] = dumps(api).encode()
        wanted[WORKFLOWS_DIR / name.replace(".json", THUMBNAIL_SUFFIX)] = picture
    stale = [p for folder in (WORKFLOWS_DIR, WORKFLOWS_DIR / "api") for pattern in ("*.json", f"*{THUMBNAIL_SUFFIX}")
             for p in folder.glob(pattern) if p not in wanted]
    differing = [p for p, data in wanted.items() if not p.is_file() or p.read_bytes() != data]
    if args.check:
        for path in [*differing, *stale]:
            log.error("out of date: %s", path.relative_to(REPO_ROOT))
        return 1 if differing or stale else 0
    for path in stale:
        path.unlink()
        log.info("removed %s", path.relative_to(REPO_ROOT))
    for path in differing:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(wanted[path])
        log.info("wrote %s", path.relative_to(REPO_ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
