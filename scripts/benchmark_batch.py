"""The batch's cost per job: the server mode on one ComfyUI server against Ray with one worker, and
Ray with two workers against one, measured side by side in one run.

    python scripts/benchmark_batch.py              # the test bed (tiny SDXL layout, 64x64) on the CPU

Every run gets the same jobs (the basic workflow on the test bed, each with its own seed so that
ComfyUI's cache never answers). The cost per job is taken on the driver's clock between results
lines: (t(last line) - t(second line)) / (n - 2), so a worker starting its ComfyUI and the first job
on each worker loading the models do not count, and Ray's own dispatch does. Each ComfyUI runs torch
on one thread (OMP_NUM_THREADS=1), so two workers on a 2-core machine get a core each. Printed:
seconds per job in each mode, Ray (one worker) over the server mode (target: at most 1.05), and the
throughput of two workers over one.
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


def per_job(run, count: int, folder: Path, seeds: itertools.count) -> float:
    """Driver seconds per job between the second and the last results line of `count` fresh jobs."""
    from instantid.commands import batch
    jobs = folder / f"jobs-{next(seeds)}.jsonl"
    jobs.write_text("".join(json.dumps({"id": f"j{n}", "face": "face.png", "seed": next(seeds), "workflow": "bed.json"})
                            + "\n" for n in range(count)))
    written: list[float] = []
    append = batch.ResultsFile.append

    def timed_append(results: batch.ResultsFile, record: dict) -> None:
        append(results, record)
        if record.get("status") == "done":
            written.append(time.perf_counter())
    batch.ResultsFile.append = timed_append
    try:
        summary = run(batch.read_jobs(jobs), folder / f"out-{jobs.stem}")
    finally:
        batch.ResultsFile.append = append
    if summary.done != count:
        raise SystemExit(f"a benchmark batch did not finish: {summary.lines(folder)}")
    return (written[-1] - written[1]) / (count - 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, default=None, help="ComfyUI folder (default: found like the tests do)")
    parser.add_argument("--jobs", type=int, default=8, help="jobs in each timed batch (default %(default)s)")
    parser.add_argument("--steps", type=int, default=1, help="sampler steps of each job (default %(default)s)")
    args = parser.parse_args()
    comfyui = args.comfyui or find_comfyui()
    if comfyui is None:
        raise SystemExit(f"benchmark_batch: {why_not_found()}")
    logging.basicConfig(level=logging.WARNING)
    import ray

    from instantid.commands.batch import BatchOptions, run_batch
    from instantid.commands.ray_batch import RAY_QUIET, RayOptions, run_ray_batch
    from support.server import SERVER_PYTHONPATH, start_server
    quiet = open(os.devnull, "w")
    with tempfile.TemporaryDirectory(prefix="benchmark-batch-") as temporary:
        folder = Path(temporary)
        base = test_bed(comfyui, folder, args.steps)
        # Every ComfyUI started below: the fixture nodes' imports, and torch on one thread.
        os.environ.update(PYTHONPATH=SERVER_PYTHONPATH, OMP_NUM_THREADS="1")
        seeds = itertools.count(1000)
        server = start_server(comfyui, base)
        try:
            def on_server(jobs, out):
                return run_batch(jobs, BatchOptions((server.url,), out), stream=quiet)
            seconds = {"server mode, 1 server": per_job(on_server, args.jobs, folder, seeds)}
        finally:
            server.stop()
        ray.init(num_cpus=2, **RAY_QUIET)
        try:
            for workers in (1, 2):
                def on_ray(jobs, out, workers=workers):
                    return run_ray_batch(jobs, BatchOptions((), out), RayOptions(comfyui, workers=workers,
                                                                                  base_directory=base), stream=quiet)
                seconds[f"Ray, {workers} worker{'s' if workers > 1 else ''}"] = per_job(on_ray, args.jobs, folder, seeds)
        finally:
            ray.shutdown()
    say(f"batch cost per job on the driver's clock, {args.jobs} jobs a run, test bed {args.steps} step(s), "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    for name, value in seconds.items():
        say(f"  {name:<22} {value:6.2f} s/job")
    say(f"  Ray 1 worker / server mode:     {seconds['Ray, 1 worker'] / seconds['server mode, 1 server']:.3f}  (target <= 1.05)")
    say(f"  throughput, Ray 2 workers / 1:  {seconds['Ray, 1 worker'] / seconds['Ray, 2 workers']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
