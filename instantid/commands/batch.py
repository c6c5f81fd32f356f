"""`python -m instantid batch JOBS.jsonl --comfyui URL [--comfyui URL ...]`: many portraits over
several running ComfyUI servers.

Each server gets `per_server` worker threads, so it never holds more than that many of our jobs
(queued or running). A worker uploads the job's images (/upload/image), fills the workflow as
`portrait` does and runs it with the one server client of `run --comfyui` (runner.run_on_server).
A server that stops answering is dropped and its job goes back to the queue for another server,
at most `retries` times. Finished jobs are appended to DIR/results.jsonl, one whole line each,
flushed and fsynced, so an interrupted run leaves a readable file and a re-run skips them.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from .portrait import PortraitInputs, fill_portrait, shipped_workflow, with_similarity
from .runner import (DEFAULT_MAX_WAIT, DEFAULT_TIMEOUT, ComfyServer, Override, RunError, ServerUnreachable,
                     load_workflow, parse_override, run_on_server)

log = logging.getLogger(__name__)

RESULTS_NAME = "results.jsonl"
DEFAULT_PER_SERVER = 1
DEFAULT_RETRIES = 2
JOB_FIELDS = {"id", "face", "pose", "prompt", "seed", "workflow", "checkpoint", "set"}
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_WAIT_STEP = 0.2


class JobsError(ValueError):
    """The jobs file cannot be used; the message names the line and what to change."""


@dataclass(frozen=True)
class Job:
    id: str
    inputs: PortraitInputs  # local paths for face and pose
    workflow: Path
    overrides: tuple[Override, ...] = ()


def read_jobs(path: Path) -> list[Job]:
    """One JSON object per line: face (required), prompt, pose, seed, workflow, checkpoint, set (a
    list of NODE.INPUT=VALUE), id (default: the line number). Paths are relative to the file's
    folder. Blank lines and lines starting with # are skipped. A job without a seed gets one
    here, so a retry on another server draws the same image."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise JobsError(f"cannot read the jobs file {path}: {error.strerror or error}") from None
    folder = path.parent
    jobs: list[Job] = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{number}"
        try:
            entry = json.loads(line)
        except ValueError as error:
            raise JobsError(f"{where}: not JSON ({error}); write one object per line, e.g. "
                            '{"face": "me.jpg", "prompt": "a portrait", "seed": 1}') from None
        if not isinstance(entry, dict):
            raise JobsError(f"{where}: expected an object with at least a 'face' field")
        unknown = sorted(set(entry) - JOB_FIELDS)
        if unknown:
            raise JobsError(f"{where}: unknown field(s) {', '.join(unknown)}; a job has {', '.join(sorted(JOB_FIELDS))}")
        jobs.append(_job(entry, number, folder, where))
    ids = [job.id for job in jobs]
    repeated = sorted({job_id for job_id in ids if ids.count(job_id) > 1})
    if repeated:
        raise JobsError(f"{path}: job id(s) used more than once: {', '.join(repeated)}; give each job its own id")
    return jobs


def _job(entry: dict, number: int, folder: Path, where: str) -> Job:
    def local(name: str) -> str | None:
        value = entry.get(name)
        if value is None:
            return None
        if not isinstance(value, str) or not (folder / value).expanduser().is_file():
            raise JobsError(f"{where}: {name} {value!r} is not a file (paths are relative to the jobs file's folder)")
        return str((folder / value).expanduser().resolve())

    job_id = str(entry.get("id", number))
    if not _JOB_ID.fullmatch(job_id):
        raise JobsError(f"{where}: id {job_id!r} must be letters, digits, '.', '_' or '-' (it names the job's folder)")
    face = local("face")
    if face is None:
        raise JobsError(f"{where}: no 'face'; every job needs a face photo")
    seed = entry.get("seed", random.randrange(2**32))
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise JobsError(f"{where}: seed must be a whole number, 0 or more")
    for name in ("prompt", "checkpoint"):
        if entry.get(name) is not None and not isinstance(entry[name], str):
            raise JobsError(f"{where}: {name} must be text")
    settings = entry.get("set", [])
    if not isinstance(settings, list) or not all(isinstance(item, str) for item in settings):
        raise JobsError(f"{where}: set must be a list of \"NODE.INPUT=VALUE\" strings")
    pose = local("pose")
    workflow = local("workflow")
    try:
        overrides = tuple(parse_override(item) for item in settings)
    except RunError as error:
        raise JobsError(f"{where}: {error}") from None
    inputs = PortraitInputs(face=face, prompt=entry.get("prompt"), pose=pose, seed=seed, checkpoint=entry.get("checkpoint"))
    return Job(job_id, inputs, Path(workflow) if workflow else shipped_workflow(posed=pose is not None), overrides)


class ResultsFile:
    """DIR/results.jsonl: one JSON line per finished job. Lines are appended whole (one write of
    the full line, then flush and fsync); on opening, a torn last line and the lines of failed jobs
    (which run again) are dropped by writing a new file and renaming it over the old one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.done: dict[str, dict] = {}
        kept: list[str] = []
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
        complete = text.split("\n")[:-1]  # whatever follows the last newline is torn
        for line in complete:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("status") == "done" and str(record.get("job")) not in self.done:
                self.done[str(record["job"])] = record
                kept.append(line)
        if len(kept) != len(complete) or text != "".join(line + "\n" for line in complete):
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(path.name + ".tmp")
            with open(temporary, "w", encoding="utf-8") as stream:
                stream.write("".join(line + "\n" for line in kept))
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, path)

    def append(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        with self.lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(descriptor, line)
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            if record.get("status") == "done":
                self.done[str(record["job"])] = record


@dataclass
class _Pending:
    job: Job
    tried: list[str] = field(default_factory=list)


@dataclass
class BatchSummary:
    done: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)       # "job: why"
    not_run: list[str] = field(default_factory=list)      # no server was left for them
    per_server: dict[str, int] = field(default_factory=dict)


class _Dispatcher:
    """The shared queue: a worker takes a job it has not tried on its server when there is one."""

    def __init__(self, jobs: Sequence[Job], servers: Sequence[str]) -> None:
        self.pending = deque(_Pending(job) for job in jobs)
        self.running = 0
        self.alive = set(servers)
        self.condition = threading.Condition()
        self.stopped = False

    def take(self, server: str) -> _Pending | None:
        with self.condition:
            while not self.stopped and server in self.alive:
                choice = next((item for item in self.pending if server not in item.tried), None)
                choice = choice or (self.pending[0] if self.pending else None)
                if choice is not None:
                    self.pending.remove(choice)
                    self.running += 1
                    return choice
                if self.running == 0:
                    return None
                self.condition.wait(_WAIT_STEP)
            return None

    def finished(self, requeue: _Pending | None = None, dead_server: str | None = None) -> None:
        with self.condition:
            self.running -= 1
            if dead_server is not None:
                self.alive.discard(dead_server)
            if requeue is not None:
                self.pending.appendleft(requeue)
            self.condition.notify_all()


@dataclass(frozen=True)
class BatchOptions:
    servers: tuple[str, ...]
    out: Path
    per_server: int = DEFAULT_PER_SERVER
    retries: int = DEFAULT_RETRIES
    timeout: float = DEFAULT_TIMEOUT
    max_wait: float = DEFAULT_MAX_WAIT


def run_job(job: Job, server_url: str, options: BatchOptions, workflows: dict[Path, dict]) -> dict:
    """Upload the job's images to the server, run the filled workflow there, return its record."""
    started = time.monotonic()
    server = ComfyServer(server_url, options.timeout)
    face = server.upload_image(Path(job.inputs.face))
    pose = server.upload_image(Path(job.inputs.pose)) if job.inputs.pose else None
    inputs = replace(job.inputs, face=face, pose=pose)
    report = run_on_server(workflows[job.workflow], job.overrides, options.out / job.id, url=server_url,
                           timeout=options.timeout, max_wait=options.max_wait,
                           prepare=lambda prompt: with_similarity(fill_portrait(prompt, inputs)))
    similarity = report.similarities[0].value if report.similarities else None
    return {"job": job.id, "status": "done", "server": server.url, "seed": job.inputs.seed,
            "seconds": round(time.monotonic() - started, 3), "similarity": similarity,
            "outputs": [str(path) for path in report.images], "prompt_id": report.prompt_id}


def run_batch(jobs: Sequence[Job], options: BatchOptions, stream: TextIO | None = None) -> BatchSummary:
    """Run the jobs not finished in options.out/results.jsonl over the servers."""
    for url in options.servers:
        ComfyServer(url)  # a malformed URL fails here, before any work
    results = ResultsFile(options.out / RESULTS_NAME)
    todo = [job for job in jobs if job.id not in results.done]
    servers = tuple(dict.fromkeys(url.rstrip("/") for url in options.servers))
    summary = BatchSummary(skipped=len(jobs) - len(todo), per_server=dict.fromkeys(servers, 0))
    workflows: dict[Path, dict] = {}
    for job in todo:
        if job.workflow not in workflows:
            workflows[job.workflow] = load_workflow(job.workflow)
    dispatcher = _Dispatcher(todo, servers)
    bar = tqdm(total=len(todo), desc="jobs", unit="job", file=stream or sys.stderr)
    lock = threading.Lock()

    def work(server_url: str) -> None:
        while (item := dispatcher.take(server_url)) is not None:
            item.tried.append(server_url)
            try:
                record = run_job(item.job, server_url, options, workflows)
            except ServerUnreachable as error:
                retry = len(item.tried) <= options.retries
                log.warning("%s: %s; %s", item.job.id, error,
                            "trying another server" if retry else f"giving up after {len(item.tried)} servers")
                if not retry:
                    _record_failure(results, summary, lock, item, server_url, str(error), bar)
                dispatcher.finished(requeue=item if retry else None, dead_server=server_url)
                return
            except RunError as error:
                _record_failure(results, summary, lock, item, server_url, str(error), bar)
            else:
                results.append(record)
                with lock:
                    summary.done += 1
                    summary.per_server[server_url] += 1
                    bar.update(1)
            dispatcher.finished()

    threads = [threading.Thread(target=work, args=(url,), name=f"batch {url} #{n}", daemon=True)
               for url in servers for n in range(options.per_server)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(_WAIT_STEP)
    finally:
        dispatcher.stopped = True  # on Ctrl-C the workers take no new job; written lines are whole
        bar.close()
    summary.not_run = [item.job.id for item in dispatcher.pending]
    return summary


def _record_failure(results: ResultsFile, summary: BatchSummary, lock: threading.Lock, item: _Pending,
                    server_url: str, why: str, bar: tqdm) -> None:
    results.append({"job": item.job.id, "status": "failed", "server": server_url, "seed": item.job.inputs.seed,
                    "error": why, "servers_tried": list(item.tried)})
    with lock:
        summary.failed.append(f"{item.job.id}: {why}")
        bar.update(1)
