"""`python -m instantid batch --ray` on a real local Ray (CPU, two workers, each starting a real
ComfyUI over the test bed's models): every job once, also when a worker's ComfyUI is killed mid-run
and when a worker itself is killed; a job that always crashes its ComfyUI ends failed after the
retry limit; a no-face job is one error row, never retried; Ctrl-C leaves whole lines, no process
behind, and the re-run finishes the rest without a duplicate. One Ray for the module, few runs."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed: the Ray batch tests are SKIPPED "
                                        "(pip install 'ray>=2.60'; CI installs it from requirements-test.txt)")

from PIL import Image
from support.server import SERVER_PYTHONPATH, copy_models, link_custom_nodes
from support.workflows import write_face_photo
from test_batch import PHOTO, PHOTO_NAME, check_results, jobs_file, read_results  # noqa: F401 (jobs_file: a fixture)

from instantid.commands import batch, cli, ray_batch

NO_FACE_ERROR = "FaceNotFound: no face found"
CRASH_LINE = "test bed: crashing ComfyUI on purpose"  # what fixture_pack's TestBedCrash prints (that module needs ComfyUI)


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module: two CPUs, so two workers. Ray's processes inherit this
    environment: the workers' ComfyUI find the fixture pack's imports through PYTHONPATH, and run
    torch on one thread each (conftest's OMP_NUM_THREADS)."""
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = SERVER_PYTHONPATH
    ray.init(num_cpus=2, **ray_batch.RAY_QUIET)
    try:
        yield
    finally:
        ray.shutdown()
        if previous is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = previous


@pytest.fixture(scope="module")
def base(comfy, tmp_path_factory) -> Path:
    """The ComfyUI base directory every worker's ComfyUI uses: the test bed's models, this pack and
    the fixture pack in custom_nodes, the photo the bed's similarity node scores against."""
    folder = tmp_path_factory.mktemp("ray-base")
    copy_models(comfy.base, folder)
    link_custom_nodes(folder)
    write_face_photo(folder / "input" / PHOTO_NAME, **PHOTO)
    return folder


def comfyui_processes(base: Path) -> dict[int, int]:
    """pid -> parent pid of every ComfyUI running over `base`."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"main.py" in command and str(base).encode() in command:
            found[int(entry.name)] = parent
    return found


def wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def done_lines(out: Path) -> int:
    path = out / batch.RESULTS_NAME
    return sum('"status": "done"' in line for line in path.read_text().splitlines()) if path.is_file() else 0


def test_doctor_ray_runs_the_doctor_on_every_node(local_ray, base, jobs_file, capsys):  # noqa: F811
    code = cli.main(["doctor", "--ray", "--base-directory", str(base), "--workflow", str(jobs_file.parent / "bed.json")])
    out = capsys.readouterr().out
    assert f"ray: Ray {ray.__version__}" in out and "cluster: 1 node, 0 GPUs: workers run on the CPU" in out, out
    [node] = [line for line in out.splitlines() if " node " in line]
    assert node.endswith(": ComfyUI, this pack and the models are in place") and code == 0, out


def write_jobs(jobs_file: Path) -> Path:  # noqa: F811
    """jobs_file's six jobs, then a job whose photo shows no face and a job whose workflow kills its
    ComfyUI (right after the face photo loads: no sampling, so each retry costs a boot only). The
    crash job comes last: after its last try no job waits for its worker's next boot."""
    folder = jobs_file.parent
    crash = json.loads((folder / "bed.json").read_text())
    [(save_id, _)] = [(node_id, node) for node_id, node in crash.items() if node["class_type"] == "SaveImage"]
    del crash[save_id]
    [apply] = [node for node in crash.values() if node["class_type"] == "ApplyInstantID"]
    crash["99"] = {"class_type": "TestBedCrash", "inputs": {"images": apply["inputs"]["image"]}}
    (folder / "crash.json").write_text(json.dumps(crash))
    Image.new("RGB", (320, 320), (90, 90, 90)).save(folder / "blank.png")
    jobs = folder / "ray_jobs.jsonl"  # beside jobs_file, whose paths are relative to its folder
    jobs.write_text(jobs_file.read_text() + "".join(json.dumps(line) + "\n" for line in (
        {"id": "noface", "face": "blank.png", "seed": 8, "workflow": "bed.json"},
        {"id": "crash", "face": "faces/face0.png", "seed": 7, "workflow": "crash.json"})))
    return jobs


def test_ctrl_c_then_a_rerun_through_killed_comfyui_killed_worker_crash_and_no_face(
        local_ray, base, jobs_file, tmp_path, capsys):  # noqa: F811
    """Run 1 (on the API, one worker) is interrupted after its first image: the workers and their ComfyUI are
    gone, results.jsonl holds whole lines. Run 2 (the command) continues; after its first image one
    worker's ComfyUI and the other worker's process are SIGKILLed at once. Every job ends once."""
    from conftest import COMFYUI
    jobs, out = write_jobs(jobs_file), tmp_path / "out"

    def interrupt_after_the_first_image() -> None:
        wait_until(lambda: done_lines(out) >= 1, 120, "a first image")
        os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=interrupt_after_the_first_image, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        ray_batch.run_ray_batch(batch.read_jobs(jobs), batch.BatchOptions((), out, retries=1),
                                ray_batch.RayOptions(COMFYUI, workers=1, base_directory=base))
    wait_until(lambda: not comfyui_processes(base), 20, "no ComfyUI left after Ctrl-C (ray.kill)")
    first = read_results(out)
    assert 1 <= len(first) < 8 and all(record["status"] == "done" for record in first)
    logs_of_run_1 = set((out / "logs").glob("*.log"))
    killed: list[str] = []

    def kill_a_comfyui_and_a_worker() -> None:
        wait_until(lambda: done_lines(out) > len(first), 120, "a first image of the re-run")
        running = sorted(comfyui_processes(base).items())
        assert len(running) == 2, running
        (comfyui, _), (orphan, worker) = running
        os.kill(comfyui, signal.SIGKILL)
        os.kill(worker, signal.SIGKILL)
        killed.extend([comfyui, worker])
        # The killed worker ran no clean-up: its ComfyUI goes by the parent-death signal, at once.
        wait_until(lambda: orphan not in comfyui_processes(base), 5, "the killed worker's ComfyUI to end")
        killed.append(orphan)
    killer = threading.Thread(target=kill_a_comfyui_and_a_worker, daemon=True)
    killer.start()
    code = cli.main(["batch", str(jobs), "--ray", "--workers", "2", "--retries", "1", "--base-directory", str(base),
                     "--out", str(out)])
    captured = capsys.readouterr()
    killer.join(1)
    assert len(killed) == 3, f"the kills did not happen as planned ({killed}); stderr: {captured.err[-2000:]}"
    assert code == 1, captured.err
    records = read_results(out)
    assert records[:len(first)] == first
    assert sorted(record["job"] for record in records) == sorted([f"job{n}" for n in range(6)] + ["crash", "noface"])
    by_job = {record["job"]: record for record in records}
    check_results([r for r in records if r["job"].startswith("job")], jobs_file, out.resolve(),
                  sorted({r["server"] for r in records if r["status"] == "done"}))
    logs_of_run_2 = set((out / "logs").glob("*.log")) - logs_of_run_1

    def count(text: str) -> int:
        return sum(path.read_text(errors="replace").count(text) for path in logs_of_run_2)
    assert by_job["noface"]["status"] == "failed" and NO_FACE_ERROR in by_job["noface"]["error"]
    assert count("Exception during processing") == 1  # the no-face job ran once: no retry
    assert by_job["crash"]["status"] == "failed" and "lost 2 times" in by_job["crash"]["error"]
    assert count(CRASH_LINE) == 2  # the first try and the one retry, then no more
    [summary] = [line for line in captured.out.splitlines() if "already done" in line]
    assert summary.startswith(f"{6 - len(first)} done (worker 1: ")
    assert f", {len(first)} already done, 2 failed, 0 not run; 8 jobs in " in summary
    assert "images/min per worker" in summary
    assert "jobs: 100%" in captured.err and "workers alive" in captured.err
    wait_until(lambda: not comfyui_processes(base), 20, "no ComfyUI left after the run")
