"""The batch's cost per job: the server mode on one ComfyUI server against Ray with one worker, and
Ray with two workers against one, measured side by side in one run.

    python scripts/benchmark_batch.py              # the test bed (tiny SDXL layout, 64x64) on the CPU

Every run gets the same kind of job (the basic workflow on the test bed, its own seed so ComfyUI's
cache never answers) and is timed from the command's start to its end. The cost per job is
(T(n2 jobs) - T(n1 jobs)) / (n2 - n1), so what each run pays once (a Ray worker starting its
ComfyUI, the first job loading the models) cancels. Printed: seconds per job in each mode, Ray (one
worker) over the server mode (the target is at most 1.05), and the throughput of two workers over
one (on a 2-core machine the two ComfyUI share the cores; on a 2-GPU machine each has its own).
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO_ROOT))
sys.path.append(str(REPO_ROOT / "tests"))

from instantid.commands.comfy_home import find_comfyui, why_not_found  # noqa: E402

PHOTO_NAME = "benchmark_photo.png"


def say(text: str = "") -> None:
    """One line of the report on stdout (this script's output is its result)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def test_bed(comfyui: Path, folder: Path, steps: int) -> Path:
    """The test bed's models in folder/base (with this pack and the fixture nodes) and its basic
    workflow in API format, as the batch tests build them; returns the base directory."""
    from instantid.commands.embedded import EmbeddedComfyUI
    from instantid.commands.portrait import shipped_workflow
    from support.server import FIXTURE_PACK, UNET_NAME, link_custom_nodes, write_fixture_models
    from support.workflows import load_ui_workflow, prepare_for_test_bed, score_face_against, write_face_photo
    base = folder / "base"
    embedded = EmbeddedComfyUI.start(comfyui, cpu=True, base_directory=base, load_custom_nodes=False,
                                     extra_node_dirs=[REPO_ROOT, FIXTURE_PACK])
    write_fixture_models(base)
    link_custom_nodes(base)
    write_face_photo(base / "input" / PHOTO_NAME)
    write_face_photo(folder / "face.png", cell=(3, 3), g=110)
    prompt = embedded.to_api(load_ui_workflow(shipped_workflow(posed=False)))
    prompt = score_face_against(prepare_for_test_bed(prompt, UNET_NAME, folder, steps=steps), PHOTO_NAME)
    (folder / "bed.json").write_text(json.dumps(prompt))
    return base


def timed(run, count: int, folder: Path, seeds: itertools.count) -> float:
    """Seconds for one batch of `count` fresh jobs (new seeds, a new results folder)."""
    from instantid.commands.batch import read_jobs
    jobs = folder / f"jobs-{next(seeds)}.jsonl"
    jobs.write_text("".join(json.dumps({"id": f"j{n}", "face": "face.png", "seed": next(seeds), "workflow": "bed.json"})
                            + "\n" for n in range(count)))
    start = time.perf_counter()
    summary = run(read_jobs(jobs), folder / f"out-{jobs.stem}")
    seconds = time.perf_counter() - start
    if summary.done != count:
        raise SystemExit(f"a benchmark batch did not finish: {summary.lines(folder)}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, default=None, help="ComfyUI folder (default: found like the tests do)")
    parser.add_argument("--jobs", default="2,8", help="n1,n2 batch sizes (default %(default)s)")
    parser.add_argument("--steps", type=int, default=6, help="sampler steps of each job (default %(default)s)")
    args = parser.parse_args()
    comfyui = args.comfyui or find_comfyui()
    if comfyui is None:
        raise SystemExit(f"benchmark_batch: {why_not_found()}")
    n1, n2 = (int(part) for part in args.jobs.split(","))
    logging.basicConfig(level=logging.WARNING)
    import ray

    from instantid.commands.batch import BatchOptions, run_batch
    from instantid.commands.ray_batch import RAY_QUIET, RayOptions, run_ray_batch
    from support.server import SERVER_PYTHONPATH, start_server
    with tempfile.TemporaryDirectory(prefix="benchmark-batch-") as temporary:
        folder = Path(temporary)
        base = test_bed(comfyui, folder, args.steps)
        os.environ["PYTHONPATH"] = SERVER_PYTHONPATH  # the fixture nodes' imports, in every ComfyUI started below
        seeds = itertools.count(1000)
        server = start_server(comfyui, base)
        try:
            def on_server(jobs, out):
                return run_batch(jobs, BatchOptions((server.url,), out), stream=open(os.devnull, "w"))
            timed(on_server, 1, folder, seeds)  # warm: the server's first job loads the models
            server_seconds = [timed(on_server, n, folder, seeds) for n in (n1, n2)]
        finally:
            server.stop()
        ray.init(num_cpus=2, **RAY_QUIET)
        try:
            def on_ray(workers: int):
                def run(jobs, out):
                    return run_ray_batch(jobs, BatchOptions((), out), RayOptions(comfyui, workers=workers, base_directory=base),
                                         stream=open(os.devnull, "w"))
                return run
            ray_seconds = {workers: [timed(on_ray(workers), n, folder, seeds) for n in (n1, n2)] for workers in (1, 2)}
        finally:
            ray.shutdown()
    per_job = {"server mode, 1 server": (server_seconds[1] - server_seconds[0]) / (n2 - n1)}
    per_job |= {f"Ray, {w} worker{'s' if w > 1 else ''}": (ray_seconds[w][1] - ray_seconds[w][0]) / (n2 - n1) for w in (1, 2)}
    say(f"batch cost per job, ({n2} jobs - {n1} jobs) / {n2 - n1}, test bed {args.steps} steps, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}")
    for name, seconds in per_job.items():
        say(f"  {name:<22} {seconds:6.2f} s/job")
    say(f"  Ray 1 worker / server mode:        {per_job['Ray, 1 worker'] / per_job['server mode, 1 server']:.3f}  (target <= 1.05)")
    say(f"  throughput, Ray 2 workers / 1:     {per_job['Ray, 1 worker'] / per_job['Ray, 2 workers']:.3f}")
    say(f"  fixed cost of a Ray run ({n1} jobs): 1 worker {ray_seconds[1][0]:.1f} s, 2 workers {ray_seconds[2][0]:.1f} s; "
        f"server mode {server_seconds[0]:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
