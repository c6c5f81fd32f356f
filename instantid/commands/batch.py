"""`python -m instantid batch JOBS.jsonl --comfyui URL [--comfyui URL ...]`: many portraits over
several running ComfyUI servers.

Each server gets `per_server` worker threads, so it never holds more than that many of our jobs
(queued or running). A worker uploads the job's images (/upload/image), fills the workflow as
`portrait` does and runs it with the one server client of `run --comfyui` (runner.ComfyServer, one
per server, so /object_info is read once per server). A job past --max-wait is cancelled on its
server before the worker takes another. A server that stops answering hands its job back to the
queue for another server (at most `retries` times) and is tried again after a doubling pause; it is
left out after `server_retries` failures in a row. Ctrl-C cancels every prompt of the run still on
a server. Finished jobs are appended to DIR/results.jsonl, one whole line each, flushed and fsynced,
so an interrupted run leaves a readable file and a re-run skips them; a job without a seed gets one
at its first try, written there first, so every try and re-run draws the same image.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from .portrait import PortraitInputs, fill_portrait, shipped_workflow, with_similarity
from .runner import (
    DEFAULT_MAX_WAIT,
    DEFAULT_TIMEOUT,
    ComfyServer,
    Override,
    Progress,
    PromptExpired,
    RunError,
    ServerUnreachable,
    load_workflow,
    parse_override,
    run_on_server,
)

log = logging.getLogger(__name__)

RESULTS_NAME = "results.jsonl"
DEFAULT_PER_SERVER = 1
DEFAULT_RETRIES = 2
DEFAULT_RETRY_DELAY = 5.0
DEFAULT_SERVER_RETRIES = 8
MAX_RETRY_DELAY = 60.0
CANCEL_TIMEOUT = 5.0
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
    folder. Blank lines and lines starting with # are skipped. A job without a seed keeps None
    here; it gets one at its first try (ResultsFile.seed_for)."""
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
    seed = entry.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
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
    """DIR/results.jsonl: one JSON line per finished job, and a "seeded" line for each job that got
    its seed here. Lines are appended whole (one write of the full line, then flush and fsync); on
    opening, a torn last line and the lines of failed jobs (which run again) are dropped by writing
    a new file and renaming it over the old one; the seed of an unfinished job stays, on one line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.done: dict[str, dict] = {}
        self.seeds: dict[str, int] = {}
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
        complete = text.split("\n")[:-1]  # whatever follows the last newline is torn
        done_lines: list[str] = []
        for line in complete:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict) or "job" not in record:
                continue
            job = str(record["job"])
            if isinstance(record.get("seed"), int) and job not in self.done:
                self.seeds[job] = record["seed"]
            if record.get("status") == "done" and job not in self.done:
                self.done[job] = record
                done_lines.append(line)
        kept = done_lines + [_line({"job": job, "status": "seeded", "seed": seed}).rstrip("\n")
                             for job, seed in self.seeds.items() if job not in self.done]
        if kept != complete or text != "".join(line + "\n" for line in complete):
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(path.name + ".tmp")
            with open(temporary, "w", encoding="utf-8") as stream:
                stream.write("".join(line + "\n" for line in kept))
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, path)

    def append(self, record: dict) -> None:
        line = _line(record).encode()
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

    def seeded(self, job: Job) -> Job:
        """The job with the seed every try of it uses (seed_for)."""
        return replace(job, inputs=replace(job.inputs, seed=self.seed_for(job)))

    def seed_for(self, job: Job) -> int:
        """The job's own seed; else the one an earlier try drew; else a new one, written down first."""
        if job.inputs.seed is not None:
            return job.inputs.seed
        with self.lock:
            seed = self.seeds.get(job.id)
        if seed is None:
            seed = random.randrange(2**32)
            self.append({"job": job.id, "status": "seeded", "seed": seed})
            with self.lock:
                self.seeds[job.id] = seed
        return seed


def _line(record: dict) -> str:
    return json.dumps(record, sort_keys=True) + "\n"


@dataclass
class _Pending:
    job: Job
    tried: list[str] = field(default_factory=list)


@dataclass
class BatchSummary:
    done: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)       # "job: why"
    not_run: list[str] = field(default_factory=list)      # no server (or Ray worker) was left for them
    per_server: dict[str, int] = field(default_factory=dict)
    workers: int = 0                                      # jobs run at once: servers x per_server, or Ray workers
    seconds: float = 0.0                                  # wall time of the run

    def lines(self, results: Path) -> list[str]:
        """The end of a run, for both modes: counts, wall time, images per minute per worker, then
        one line per failed job and what to do about jobs not run."""
        spread = ", ".join(f"{name}: {count}" for name, count in self.per_server.items())
        rate = self.done / max(self.seconds, 1e-9) * 60 / max(self.workers, 1)
        jobs = self.done + self.skipped + len(self.failed) + len(self.not_run)
        lines = [f"{self.done} done{f' ({spread})' if spread else ''}, {self.skipped} already done, {len(self.failed)} failed, "
                 f"{len(self.not_run)} not run; {jobs} jobs in {self.seconds:.1f} s, {rate:.2f} images/min per "
                 f"worker; results in {results}"]
        lines += [f"failed: {text}" for text in self.failed]
        if self.not_run:
            lines.append(f"not run, no worker left: {', '.join(self.not_run)}; start a server (or worker) and run "
                         "the command again")
        return lines


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

    def finished(self, requeue: _Pending | None = None) -> None:
        with self.condition:
            self.running -= 1
            if requeue is not None:
                self.pending.appendleft(requeue)
            self.condition.notify_all()

    def pause(self, seconds: float) -> bool:
        """Wait up to `seconds`; False at once when the run stops or no work is left for anyone."""
        until = time.monotonic() + seconds
        with self.condition:
            while not self.stopped and (self.pending or self.running):
                remaining = until - time.monotonic()
                if remaining <= 0:
                    return True
                self.condition.wait(min(remaining, _WAIT_STEP))
            return False

    def leave_out(self, server: str) -> None:
        with self.condition:
            self.alive.discard(server)
            self.condition.notify_all()


class _Queued:
    """The prompts of this run on the servers now, so Ctrl-C can cancel each of them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.prompts: dict[str, ComfyServer] = {}
        self.stopped = False

    def add(self, server: ComfyServer, prompt_id: str) -> None:
        with self.lock:
            self.prompts[prompt_id] = server
            late = self.stopped
        if late:  # queued while the run was stopping: the sweep has passed already
            _cancel_quietly(server, prompt_id)

    def remove(self, prompt_id: str | None) -> None:
        with self.lock:
            self.prompts.pop(prompt_id, None)

    def cancel_all(self) -> None:
        with self.lock:
            self.stopped = True
            prompts = list(self.prompts.items())
        for prompt_id, server in prompts:
            _cancel_quietly(server, prompt_id)


def _cancel_quietly(server: ComfyServer, prompt_id: str) -> None:
    try:
        ComfyServer(server.url, min(server.timeout, CANCEL_TIMEOUT)).cancel(prompt_id)
    except RunError as error:
        log.warning("could not cancel prompt %s on %s: %s", prompt_id, server.url, error)


@dataclass(frozen=True)
class BatchOptions:
    servers: tuple[str, ...]
    out: Path
    per_server: int = DEFAULT_PER_SERVER
    retries: int = DEFAULT_RETRIES
    timeout: float = DEFAULT_TIMEOUT
    max_wait: float = DEFAULT_MAX_WAIT
    retry_delay: float = DEFAULT_RETRY_DELAY
    server_retries: int = DEFAULT_SERVER_RETRIES


def run_job(job: Job, server: ComfyServer, options: BatchOptions, workflows: dict[Path, dict],
            on_queued: Callable[[str], None] | None = None, progress: Progress | None = None,
            stopped: Callable[[], bool] | None = None) -> dict:
    """Upload the job's images to the server, run the filled workflow there, return its record."""
    started = time.monotonic()
    face = server.upload_image(Path(job.inputs.face))
    pose = server.upload_image(Path(job.inputs.pose)) if job.inputs.pose else None
    inputs = replace(job.inputs, face=face, pose=pose)
    report = run_on_server(workflows[job.workflow], job.overrides, options.out / job.id, server=server,
                           timeout=options.timeout, max_wait=options.max_wait, on_queued=on_queued, progress=progress,
                           stopped=stopped, prepare=lambda prompt: with_similarity(fill_portrait(prompt, inputs)))
    similarity = report.similarities[0].value if report.similarities else None
    return {"job": job.id, "status": "done", "server": server.url, "seed": job.inputs.seed,
            "seconds": round(time.monotonic() - started, 3), "similarity": similarity,
            "outputs": [str(path) for path in report.images], "prompt_id": report.prompt_id}


def run_batch(jobs: Sequence[Job], options: BatchOptions, stream: TextIO | None = None) -> BatchSummary:
    """Run the jobs not finished in options.out/results.jsonl over the servers."""
    servers = {url.rstrip("/"): ComfyServer(url, options.timeout) for url in options.servers}  # bad URLs fail here
    results = ResultsFile(options.out / RESULTS_NAME)
    todo = [job for job in jobs if job.id not in results.done]
    summary = BatchSummary(skipped=len(jobs) - len(todo), per_server=dict.fromkeys(servers, 0),
                           workers=len(servers) * options.per_server)
    started = time.monotonic()
    workflows: dict[Path, dict] = {}
    for job in todo:
        if job.workflow not in workflows:
            workflows[job.workflow] = load_workflow(job.workflow)
    dispatcher = _Dispatcher(todo, tuple(servers))
    queued = _Queued()
    bar = tqdm(total=len(todo), desc="jobs", unit="job", file=stream or sys.stderr)
    lock = threading.Lock()

    def show(job: Job) -> Progress:
        def step(value: int | None, total: int | None, label: str) -> None:
            bar.set_postfix_str(f"{job.id}: {label}" + (f" {value}/{total}" if value is not None else ""))
        return step

    def attempt(item: _Pending, server: ComfyServer) -> bool:
        """One try of the job on the server; False when the server stopped answering."""
        item.tried.append(server.url)
        job = results.seeded(item.job)
        prompt_ids: list[str] = []

        def on_queued(prompt_id: str) -> None:
            prompt_ids.append(prompt_id)
            queued.add(server, prompt_id)
        try:
            record = run_job(job, server, options, workflows, on_queued, show(job), lambda: dispatcher.stopped)
        except ServerUnreachable as error:
            for prompt_id in prompt_ids:  # should the server come back, it must not run the job a second time
                _cancel_quietly(server, prompt_id)
            retry = len(item.tried) <= options.retries and not dispatcher.stopped
            log.warning("%s: %s; %s", job.id, error,
                        "trying another server" if retry else f"giving up after {len(item.tried)} tries")
            if not retry and not dispatcher.stopped:
                _record_failure(results, summary, lock, item, job, server.url, str(error), bar)
            dispatcher.finished(requeue=item if retry else None)
            return False
        except RunError as error:
            if not dispatcher.stopped:
                _record_failure(results, summary, lock, item, job, server.url, str(error), bar,
                                prompt_id=error.prompt_id if isinstance(error, PromptExpired) else None)
        else:
            results.append(record)
            with lock:
                summary.done += 1
                summary.per_server[server.url] += 1
                bar.update(1)
        finally:
            for prompt_id in prompt_ids:
                queued.remove(prompt_id)
        dispatcher.finished()
        return True

    def work(server: ComfyServer) -> None:
        failures = 0
        while (item := dispatcher.take(server.url)) is not None:
            if attempt(item, server):
                continue
            while True:  # the server stopped answering: pause, doubling, until it answers again
                failures += 1
                delay = min(options.retry_delay * 2 ** (failures - 1), MAX_RETRY_DELAY)
                if failures > options.server_retries:
                    log.warning("%s: no answer after %d tries; leaving it out of this run", server.url, failures)
                    dispatcher.leave_out(server.url)
                    return
                if not dispatcher.pause(delay):
                    return
                try:
                    server.queued()
                except RunError:
                    continue
                log.warning("%s answers again; giving it jobs", server.url)
                failures = 0
                break

    threads = [threading.Thread(target=work, args=(server,), name=f"batch {url} #{n}", daemon=True)
               for url, server in servers.items() for n in range(options.per_server)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(_WAIT_STEP)
    except BaseException:
        dispatcher.stopped = True  # on Ctrl-C the workers take no new job; written lines are whole
        queued.cancel_all()
        raise
    finally:
        dispatcher.stopped = True
        bar.close()
    summary.not_run = [item.job.id for item in dispatcher.pending]
    summary.seconds = time.monotonic() - started
    return summary


def failure_record(job: Job, server_url: str | None, why: str, **more: object) -> dict:
    """The results line of a job that failed (a re-run tries it again)."""
    return {"job": job.id, "status": "failed", "server": server_url, "seed": job.inputs.seed, "error": why, **more}


def _record_failure(results: ResultsFile, summary: BatchSummary, lock: threading.Lock, item: _Pending, job: Job,
                    server_url: str, why: str, bar: tqdm, prompt_id: str | None = None) -> None:
    results.append(failure_record(job, server_url, why, servers_tried=list(item.tried), prompt_id=prompt_id))
    with lock:
        summary.failed.append(f"{job.id}: {why}")
        bar.update(1)
