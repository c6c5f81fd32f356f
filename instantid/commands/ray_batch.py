"""`batch JOBS.jsonl --ray [ADDRESS]` and `doctor --ray [ADDRESS]`: the batch past one machine, on Ray
(imported here only, and only when --ray is asked for).

Plain Ray actors (max_restarts, max_task_retries), not Ray Data's actor pools: the light `ray` install,
retries bounded by Ray itself, and a job's own failure is a row instead of an error that aborts a
dataset; ray.wait, not ActorPool, as only it tells which job a lost worker was running. Each worker
holds one GPU (or CPU) and one warm ComfyUI and runs every job through batch.run_job, the server
mode's path. A ComfyUI that stops answering ends its worker, so Ray restarts it and retries the job
(at most --retries times). Only the driver writes results.jsonl: Ctrl-C leaves it whole.
"""
from __future__ import annotations

import atexit
import ctypes
import functools
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from .batch import RESULTS_NAME, BatchOptions, BatchSummary, Job, ResultsFile, failure_record, run_job
from .comfy_home import PACK_ROOT
from .doctor import Check, Report
from .runner import ComfyServer, RunError, ServerUnreachable, load_workflow

log = logging.getLogger(__name__)

RAY_INSTALL = f"{shlex.quote(sys.executable)} -m pip install 'ray>=2.60'"
BOOT_TIMEOUT = 600.0      # ComfyUI imports every custom node pack before it answers
STOP_TIMEOUT = 10.0
NODE_DOCTOR_TIMEOUT = 300.0
PR_SET_PDEATHSIG = 1
RAY_QUIET = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RunError(f"--ray needs Ray, which this Python does not have; install it: {RAY_INSTALL}") from None
    return ray


@dataclass(frozen=True)
class RayOptions:
    comfyui: Path                      # the ComfyUI every worker starts (the same path on every node)
    address: str | None = None         # None: $RAY_ADDRESS, else a local Ray on this machine
    workers: int | None = None         # None: one per GPU, one on a machine without
    base_directory: Path | None = None
    extra_model_paths_config: Path | None = None

    def flags(self) -> list[str]:
        return _path_flags(("--base-directory", self.base_directory), ("--extra-model-paths-config",
                                                                       self.extra_model_paths_config))


def _path_flags(*pairs: tuple[str, Path | None]) -> list[str]:
    """Command-line flags with absolute paths: a worker or node runs from another folder."""
    return [part for flag, value in pairs if value for part in (flag, str(Path(value).resolve()))]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with(parent: int, prctl: Any) -> None:
    """In the child before exec: SIGKILL when the worker dies. ray.kill and a killed worker run no
    clean-up, so only the kernel's parent-death signal (Linux) can stop ComfyUI then."""
    if prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0 or os.getppid() != parent:
        os._exit(1)


class ComfyProcess:
    """One ComfyUI subprocess on 127.0.0.1 and its client; stop() ends its whole process group (also
    at the worker's normal exit, the one clean-up on systems without a parent-death signal)."""

    def __init__(self, options: RayOptions, logs: Path, cpu: bool, timeout: float) -> None:
        port = _free_port()
        logs.mkdir(parents=True, exist_ok=True)
        self.log_path = logs / f"comfyui-{socket.gethostname()}-{port}.log"
        linux = sys.platform.startswith("linux")
        before_exec = functools.partial(_die_with, os.getpid(), ctypes.CDLL(None).prctl) if linux else None
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen([sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port),
                                             "--disable-auto-launch", *(["--cpu"] if cpu else []), *options.flags()],
                                            cwd=options.comfyui, stdout=log_file, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=before_exec)  # noqa: PLW1509 (prctl only: no lock)
        atexit.register(self.stop)
        self.server = ComfyServer(f"http://127.0.0.1:{port}", timeout)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RunError(f"ComfyUI ({options.comfyui}) exited with code {self.process.returncode} while "
                               f"starting; its log: {self.log_path}")
            try:
                self.server.json("/system_stats")
                return
            except RunError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RunError(f"ComfyUI did not answer within {BOOT_TIMEOUT:.0f} s; its log: {self.log_path}") from None
                time.sleep(0.5)

    def stop(self) -> None:
        if os.name != "posix":
            self.process.kill()
            return
        for sent in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sent)
            except (ProcessLookupError, PermissionError):
                return
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                continue


class ComfyWorker:
    """A Ray actor's body: one warm ComfyUI on the actor's GPU, every job through batch.run_job."""

    def __init__(self, options: RayOptions, batch: BatchOptions, workflows: dict[Path, dict]) -> None:
        import ray
        self.batch, self.workflows, self.node = batch, workflows, socket.gethostname()
        self.comfy: ComfyProcess | None = None
        self.boot_error: str | None = None
        try:
            self.comfy = ComfyProcess(options, batch.out / "logs", not ray.get_gpu_ids(), batch.timeout)
        except (RunError, OSError) as error:
            self.boot_error = f"{self.node}: {error}"

    def ready(self) -> str | None:
        return self.boot_error

    def stop(self) -> None:
        if self.comfy is not None:
            self.comfy.stop()

    def run(self, job: Job) -> dict:
        if self.comfy is None:
            return {"job": job.id, "worker_down": self.boot_error}
        try:
            return {**run_job(job, self.comfy.server, self.batch, self.workflows), "node": self.node}
        except ServerUnreachable as error:
            log.warning("%s: %s; ending this worker so that Ray restarts it and retries the job", job.id, error)
            self.comfy.stop()
            os._exit(1)
        except RunError as error:  # the job's own failure: a row, never a retry
            return failure_record(job, self.comfy.server.url, str(error), node=self.node)


def _start_workers(ray: Any, options: RayOptions, batch: BatchOptions, workflows: dict[Path, dict]) -> list:
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    count = options.workers or max(gpus, 1)
    if count > (gpus or cpus):
        raise RunError(f"{count} workers need {count} {'GPUs' if gpus else 'CPUs'}, and the Ray cluster has "
                       f"{gpus or cpus}; ask for fewer with --workers, or add nodes (ray start --address=...)")
    actor = ray.remote(**({"num_gpus": 1} if gpus else {"num_cpus": 1}), max_restarts=-1,
                       max_task_retries=batch.retries)(ComfyWorker)
    workers = [actor.remote(options, batch, workflows) for _ in range(count)]
    try:
        errors = [error for error in ray.get([w.ready.remote() for w in workers], timeout=BOOT_TIMEOUT + 60) if error]
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as error:
        _stop(ray, workers, graceful=False)
        raise RunError(f"the Ray workers did not start ({type(error).__name__}); check the cluster (ray status) and "
                       f"ComfyUI's logs in {batch.out / 'logs'}") from None
    if errors:
        _stop(ray, workers, graceful=False)
        raise RunError(f"a Ray worker could not start ComfyUI: {errors[0]}")
    return workers


def _stop(ray: Any, workers: Sequence, graceful: bool) -> None:
    """ray.kill the workers; their ComfyUI dies with them on Linux (the parent-death signal), elsewhere
    each stops it first, at the end of a run (a worker still starting would be waited for)."""
    if graceful and not sys.platform.startswith("linux"):
        ray.wait([worker.stop.remote() for worker in workers], num_returns=len(workers), timeout=2 * STOP_TIMEOUT)
    for worker in workers:
        ray.kill(worker)


def _postfix(failed: int, alive: int) -> str:
    return f"{failed} failed, {alive} worker{'s' if alive != 1 else ''} alive"


def run_ray_batch(jobs: Sequence[Job], batch: BatchOptions, options: RayOptions, stream: TextIO | None = None) -> BatchSummary:
    """Run the jobs not finished in batch.out/results.jsonl on Ray workers."""
    ray = import_ray()
    batch = replace(batch, out=batch.out.resolve())  # the workers' current folders differ
    results = ResultsFile(batch.out / RESULTS_NAME)
    todo = deque(job for job in jobs if job.id not in results.done)
    summary = BatchSummary(skipped=len(jobs) - len(todo))
    if not todo:
        return summary
    workflows = {path: load_workflow(path) for path in {job.workflow for job in todo}}
    started_here = not ray.is_initialized()
    if started_here:
        local = not (options.address or os.environ.get("RAY_ADDRESS"))
        ray.init(address=options.address, **RAY_QUIET, **({"num_cpus": max(os.cpu_count() or 1, options.workers or 1)}
                                                            if local else {}))
    started, workers = time.monotonic(), []
    bar = tqdm(total=len(todo), desc="jobs", unit="job", file=stream or sys.stderr)
    try:
        workers = _start_workers(ray, options, batch, workflows)
        names = {worker: f"worker {n}" for n, worker in enumerate(workers, 1)}
        summary.workers, summary.per_server = len(workers), dict.fromkeys(names.values(), 0)
        free, running = list(workers), {}
        bar.set_postfix_str(_postfix(0, len(workers)))
        while todo or running:
            while todo and free:
                worker, job = free.pop(), results.seeded(todo.popleft())
                running[worker.run.remote(job)] = (job, worker)
            if not running:  # every worker is down
                break
            [ref], _ = ray.wait(list(running), num_returns=1)
            job, worker = running.pop(ref)
            try:
                record = ray.get(ref)
            except ray.exceptions.RayActorError as error:
                record = failure_record(job, None, f"its worker was lost {batch.retries + 1} times running it "
                                        f"({type(error).__name__}); ComfyUI's logs are in {batch.out / 'logs'}")
            if record.get("worker_down"):
                log.warning("%s is down: %s", names[worker], record["worker_down"])
                todo.appendleft(job)
                ray.kill(worker)
                workers.remove(worker)
                continue
            free.append(worker)
            results.append(record)
            if record["status"] == "done":
                summary.done += 1
                summary.per_server[names[worker]] += 1
            else:
                summary.failed.append(f"{job.id}: {record['error']}")
            bar.set_postfix_str(_postfix(len(summary.failed), len(workers)))
            bar.update(1)
    except BaseException:
        _stop(ray, workers, graceful=False)  # Ctrl-C: the in-flight jobs die with their workers
        workers = []
        raise
    finally:
        bar.close()
        _stop(ray, workers, graceful=True)
        if started_here:
            ray.shutdown()
    summary.not_run = [job.id for job in todo]
    summary.seconds = time.monotonic() - started
    return summary


def _node_doctor(argv: list[str]) -> tuple[int, str]:
    """`python -m instantid doctor ...` on the node this task runs on."""
    try:
        done = subprocess.run([sys.executable, "-m", "instantid", *argv], cwd=PACK_ROOT, capture_output=True,
                              text=True, timeout=NODE_DOCTOR_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return 1, f"FAIL doctor: {error}"
    return done.returncode, done.stdout + done.stderr


def ray_doctor(args: Any) -> Report:
    """doctor --ray: Ray installed, the cluster's nodes and GPUs, and on every node the doctor's own
    checks (ComfyUI, this pack loaded by it, the models of --workflow or the pack's)."""
    argv = ["doctor", *_path_flags(("--base-directory", args.base_directory), ("--workflow", args.workflow),
                                   ("--extra-model-paths-config", args.extra_model_paths_config))]
    report = Report()
    try:
        ray = import_ray()
    except RunError:
        report.checks.append(Check("fail", "ray", f"not installed in {sys.executable}", (RAY_INSTALL,)))
        return report
    report.checks.append(Check("ok", "ray", f"Ray {ray.__version__}"))
    started_here = not ray.is_initialized()
    try:
        if started_here:
            ray.init(address=args.ray or None, **RAY_QUIET)
        nodes = [node for node in ray.nodes() if node.get("Alive")]
        gpus = sum(int(node.get("Resources", {}).get("GPU", 0)) for node in nodes)
        report.checks.append(Check("ok" if gpus else "warn", "cluster", f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}, "
                                   f"{gpus} GPU{'s' if gpus != 1 else ''}" + ("" if gpus else ": workers run on the CPU")))
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        task = ray.remote(num_cpus=0)(_node_doctor)
        outcomes = ray.get([task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                            .remote(argv) for node in nodes], timeout=NODE_DOCTOR_TIMEOUT + 60)
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as error:
        report.checks.append(Check("fail", "cluster", f"no Ray cluster at {args.ray or os.environ.get('RAY_ADDRESS') or 'this machine'}: "
                                   f"{str(error).splitlines()[0]}", ("ray start --head",)))
        return report
    finally:
        if started_here and ray.is_initialized():
            ray.shutdown()
    for node, (code, text) in zip(nodes, outcomes):
        # A worker's ComfyUI loads the pack from its custom_nodes only: a misplaced pack is a failure there.
        problems = [line.split(None, 1)[1] for line in text.splitlines()
                    if line.startswith(("✘", "FAIL")) or (line.startswith(("!", "WARN")) and " pack: " in line)]
        where = node.get("NodeManagerAddress", node["NodeID"])
        report.checks.append(Check("ok", f"node {where}", "ComfyUI, this pack and the models are in place")
                             if code == 0 and not problems else
                             Check("fail", f"node {where}", "; ".join(problems) or text.strip().splitlines()[-1],
                                   (f"on {where}: cd {shlex.quote(str(PACK_ROOT))} && python -m instantid {shlex.join(argv)}",)))
    return report

