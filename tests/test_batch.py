"""`python -m instantid batch` against two real ComfyUI servers on 127.0.0.1 (the test bed's models):
jobs spread over both, images uploaded through /upload/image, /object_info read once per server, one
results line per job, a re-run does nothing, a server stopped and restarted mid-run loses no job and
gets jobs again, a job past --max-wait and every prompt of a Ctrl-C'd run leave the servers' queues,
an unseeded job keeps its first seed, and an interrupted results file stays whole."""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import antelope
from support.server import UNET_NAME, copy_models, start_server
from support.workflows import (
    load_ui_workflow,
    prepare_for_test_bed,
    score_face_against,
    write_face_photo,
)
from test_cli_run import PHOTO

from instantid.commands import batch, cli, portrait, runner

JOBS = 6
PHOTO_NAME = "batch_photo.png"


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def servers(comfy, tmp_path_factory):
    """Two ComfyUI servers over the test bed's models, started side by side."""
    from conftest import COMFYUI
    bases = [tmp_path_factory.mktemp(f"server{n}") for n in range(2)]
    for base in bases:
        copy_models(comfy.base, base)
        write_face_photo(base / "input" / PHOTO_NAME, **PHOTO)
    started: dict[int, object] = {}
    threads = [threading.Thread(target=lambda n=n: started.__setitem__(n, start_server(COMFYUI, bases[n])))
               for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    running = [started[n] for n in sorted(started)]
    try:
        assert len(running) == 2, "a ComfyUI server did not start; see the log above"
        yield running
    finally:
        for server in running:
            server.stop()


@pytest.fixture(scope="module")
def jobs_file(comfy, tmp_path_factory) -> Path:
    """Six jobs with their own faces and seeds on the shipped basic workflow, made for the test bed
    (tiny loader, 64 x 64, one step) with a similarity between the job's face and a second photo
    (the tiny UNet draws no face to score)."""
    folder = tmp_path_factory.mktemp("jobs")
    prompt = comfy.embedded.to_api(load_ui_workflow(portrait.shipped_workflow(posed=False)))
    prompt = score_face_against(prepare_for_test_bed(prompt, UNET_NAME, folder, steps=1), PHOTO_NAME)
    (folder / "bed.json").write_text(json.dumps(prompt))
    lines = []
    for n in range(JOBS):
        write_face_photo(folder / "faces" / f"face{n}.png", **face_of(n))
        lines.append(json.dumps({"id": f"job{n}", "face": f"faces/face{n}.png", "prompt": f"portrait number {n}",
                                 "seed": 100 + n, "workflow": "bed.json", "set": ["KSampler.steps=1"]}))
    path = folder / "jobs.jsonl"
    path.write_text("# six portraits\n" + "\n".join(lines) + "\n")
    return path


def face_of(n: int) -> dict:
    return {"cell": (2 + n % 4, 3), "g": 90 + 20 * n}


def read_results(out: Path) -> list[dict]:
    text = (out / batch.RESULTS_NAME).read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def check_results(records: list[dict], jobs_file: Path, out: Path, servers: list[str], count: int = JOBS) -> None:
    assert sorted(record["job"] for record in records) == [f"job{n}" for n in range(count)]  # each once
    photo = Path(jobs_file).parent / "photo_for_check.png"
    write_face_photo(photo, **PHOTO)
    for record in records:
        n = int(record["job"].removeprefix("job"))
        assert record["status"] == "done" and record["seed"] == 100 + n and record["server"] in servers
        [image] = record["outputs"]
        assert Path(image).parent == out / record["job"] and Image.open(image).size == (64, 64)
        face = jobs_file.parent / "faces" / f"face{n}.png"
        expected = antelope.expected_photo_similarity(((face, face_of(n)), (photo, PHOTO)))
        assert record["similarity"] == pytest.approx(expected, abs=1e-6)
        assert record["seconds"] > 0


def test_jobs_spread_over_two_servers_and_a_rerun_does_nothing(servers, jobs_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    urls = [server.url for server in servers]
    asked: list[tuple[str, str]] = []  # (server, path) of every request the batch sends
    real_request = runner.ComfyServer.request
    monkeypatch.setattr(runner.ComfyServer, "request",
                        lambda self, path, *args, **kwargs: asked.append((self.url, path)) or real_request(self, path, *args, **kwargs))
    code = cli.main(["batch", str(jobs_file), "--comfyui", urls[0], "--comfyui", urls[1], "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    records = read_results(out)
    check_results(records, jobs_file, out, urls)
    counts = {url: sum(record["server"] == url for record in records) for url in urls}
    assert all(count >= 1 for count in counts.values()), counts
    assert captured.out.startswith(f"6 done ({urls[0]}: {counts[urls[0]]}, {urls[1]}: {counts[urls[1]]}), "
                                   "0 already done, 0 failed, 0 not run")
    assert "jobs: 100%" in captured.err
    assert "KSampler 1/1" in captured.err  # the sampler's step, from ComfyUI's websocket, on the jobs line
    # The --set checks need /object_info: read once per server, not once per job.
    assert [asked.count((url, "/object_info")) for url in urls] == [1, 1]
    assert [asked.count((url, "/upload/image")) for url in urls] == [counts[url] for url in urls]
    asked.clear()

    before = (out / batch.RESULTS_NAME).read_bytes()
    assert cli.main(["batch", str(jobs_file), "--comfyui", urls[0], "--comfyui", urls[1], "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"0 done ({urls[0]}: 0, {urls[1]}: 0), 6 already done, 0 failed, 0 not run")
    assert (out / batch.RESULTS_NAME).read_bytes() == before
    assert asked == []


def queues(servers) -> list[tuple[list[str], list[str]]]:
    """(running, pending) prompt ids of each server."""
    return [runner.ComfyServer(server.url).queued() for server in servers]


def wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {seconds} s"
        time.sleep(0.1)


def slow_jobs_file(folder: Path, jobs_file: Path, entries: list[dict]) -> Path:
    """Jobs on the test bed's workflow; "slow" ones sample 10 000 steps (far longer than any wait here)."""
    lines = []
    for entry in entries:
        slow = entry.pop("slow", False)
        face = jobs_file.parent / "faces" / "face0.png"
        lines.append(json.dumps({"face": str(face), "workflow": str(jobs_file.parent / "bed.json"),
                                 **({"set": ["KSampler.steps=10000"]} if slow else {}), **entry}))
    path = folder / "jobs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def queue_blocker(server, jobs_file: Path) -> str:
    """A prompt of someone else that keeps the server busy (10 000 sampler steps) until cancelled."""
    prompt = json.loads((jobs_file.parent / "bed.json").read_text())
    prompt = portrait.fill_portrait(prompt, portrait.PortraitInputs(face=PHOTO_NAME, seed=1))
    for node in prompt.values():
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 10000
    return runner.ComfyServer(server.url).queue_prompt(prompt, "blocker")


def test_a_server_stopped_and_restarted_mid_run_gets_jobs_again(servers, jobs_file, tmp_path, caplog, monkeypatch):
    """The second server is stopped once it has started its first job: that job moves to the first
    server, which a prompt of someone else then keeps busy; the second server, started again on its
    port, is tried again after a pause and runs the jobs left. Every job is in the results once."""
    from conftest import COMFYUI
    out = tmp_path / "out"
    urls = tuple(server.url for server in servers)
    jobs = batch.read_jobs(jobs_file)[:4]
    started = servers[1].log().count("got prompt")
    outcome: dict[str, object] = {}
    caplog.set_level(logging.WARNING, logger="instantid")
    monkeypatch.setattr(batch, "MAX_RETRY_DELAY", 1.0)  # probe the stopped server every second
    options = batch.BatchOptions(urls, out, retry_delay=0.5, server_retries=300)
    runner_thread = threading.Thread(target=lambda: outcome.update(summary=batch.run_batch(jobs, options)))
    runner_thread.start()
    wait_until(lambda: servers[1].log().count("got prompt") > started, 300, "a job on the second server")
    blocker = queue_blocker(servers[0], jobs_file)
    port = int(urls[1].rsplit(":", 1)[1])
    servers[1].stop()
    servers[1] = start_server(COMFYUI, servers[1].base, port=port)  # the fixture stops this one
    wait_until(lambda: "got prompt" in servers[1].log(), 120, "a job on the restarted server")
    runner.ComfyServer(urls[0]).cancel(blocker)
    runner_thread.join(600)
    summary = outcome["summary"]
    assert summary.failed == [] and summary.not_run == [] and summary.done == 4
    assert summary.per_server[urls[1]] == servers[1].log().count("got prompt") >= 1
    records = read_results(out)
    check_results(records, jobs_file, out, list(urls), count=4)
    [moved] = [record.message for record in caplog.records if "trying another server" in record.message]
    assert urls[1] in moved
    assert any(f"{urls[1]} answers again" in record.message for record in caplog.records)


def test_a_job_past_max_wait_is_cancelled_on_its_server(servers, jobs_file, tmp_path):
    """The job is the running prompt when --max-wait passes: it is interrupted, and gone from the queue."""
    urls = tuple(server.url for server in servers)
    jobs = batch.read_jobs(slow_jobs_file(tmp_path, jobs_file, [{"id": "slow", "seed": 3, "slow": True}]))
    summary = batch.run_batch(jobs, batch.BatchOptions(urls, tmp_path / "out", max_wait=4))
    [failure] = summary.failed
    assert "did not finish within 4 s (--max-wait); it was cancelled on" in failure
    [record] = read_results(tmp_path / "out")
    assert record["status"] == "failed" and record["prompt_id"]
    server = runner.ComfyServer(record["server"])
    wait_until(lambda: all(record["prompt_id"] not in ids for ids in server.queued()), 60,
               "the cancelled prompt leaving the queue")  # at its node's next interrupt check
    entry = server.finished_entry(record["prompt_id"])
    assert entry["status"]["status_str"] == "error"
    assert "execution_interrupted" in [event for event, _ in entry["status"]["messages"]]
    wait_until(lambda: queues(servers) == [([], []), ([], [])], 60, "empty queues")


def test_an_unseeded_job_keeps_its_first_seed_and_a_queued_job_past_max_wait_leaves_the_queue(servers, jobs_file,
                                                                                               tmp_path):
    """Both servers busy with someone else's prompt: the unseeded job waits in a queue past --max-wait
    and is deleted from it (the other prompts run on). Its seed, drawn at that first try, is in the
    results; the re-run uses it, so its image is the one that seed draws."""
    urls = tuple(server.url for server in servers)
    blockers = [queue_blocker(server, jobs_file) for server in servers]
    wait_until(lambda: [running for running, _ in queues(servers)] == [[blockers[0]], [blockers[1]]], 60, "blockers")
    jobs_path = slow_jobs_file(tmp_path, jobs_file, [{"id": "free"}])
    out = tmp_path / "out"
    summary = batch.run_batch(batch.read_jobs(jobs_path), batch.BatchOptions(urls, out, max_wait=2))
    assert len(summary.failed) == 1 and "(--max-wait)" in summary.failed[0]
    assert queues(servers) == [([blockers[0]], []), ([blockers[1]], [])]  # ours deleted, theirs untouched
    [seeded, failed] = read_results(out)
    assert seeded["status"] == "seeded" and failed["status"] == "failed" and failed["seed"] == seeded["seed"]
    for server, blocker in zip(servers, blockers):
        runner.ComfyServer(server.url).cancel(blocker)
    wait_until(lambda: queues(servers) == [([], []), ([], [])], 60, "empty queues")

    # The re-run, with two more jobs: the same face given the seed the first try drew, and the next seed.
    jobs_path = slow_jobs_file(tmp_path, jobs_file, [{"id": "free"}, {"id": "given", "seed": seeded["seed"]},
                                                      {"id": "other", "seed": seeded["seed"] + 1}])
    assert batch.run_batch(batch.read_jobs(jobs_path), batch.BatchOptions(urls, out)).done == 3
    records = read_results(out)
    assert records[0] == {"job": "free", "status": "seeded", "seed": seeded["seed"]}
    done = {record["job"]: record for record in records[1:]}
    assert done["free"]["seed"] == seeded["seed"]
    pixels = {job: np.asarray(Image.open(record["outputs"][0])) for job, record in done.items()}
    assert np.array_equal(pixels["free"], pixels["given"]) and not np.array_equal(pixels["free"], pixels["other"])


def test_ctrl_c_cancels_every_prompt_the_run_queued(servers, jobs_file, tmp_path):
    """SIGINT while each server runs one job and holds another in its queue: both queues end empty."""
    urls = tuple(server.url for server in servers)
    jobs = batch.read_jobs(slow_jobs_file(tmp_path, jobs_file, [{"id": f"s{n}", "seed": n, "slow": True}
                                                                 for n in range(4)]))
    options = batch.BatchOptions(urls, tmp_path / "out", per_server=2, max_wait=150)

    def interrupt_when_queues_are_full() -> None:
        wait_until(lambda: all(len(running) == 1 and len(pending) == 1 for running, pending in queues(servers)), 120,
                   "one running and one queued job on each server")
        os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=interrupt_when_queues_are_full, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        batch.run_batch(jobs, options)
    # ComfyUI acts on an interrupt at the running node's next check: a job that has just started may still be
    # loading its models (seconds on a busy machine). A prompt the cancel missed would sample for many minutes.
    wait_until(lambda: queues(servers) == [([], []), ([], [])], 60, "both queues empty after Ctrl-C")
    assert not (options.out / batch.RESULTS_NAME).exists() or all(
        record["status"] != "done" for record in read_results(options.out))


def test_results_file_drops_a_torn_line_and_failed_jobs_and_appends_whole_lines(tmp_path):
    path = tmp_path / batch.RESULTS_NAME
    done = {"job": "a", "status": "done", "seed": 1}
    path.write_text(json.dumps(done) + "\n" + json.dumps({"job": "b", "status": "failed"}) + "\n" + '{"job": "c", "sta')
    results = batch.ResultsFile(path)
    assert set(results.done) == {"a"}
    assert path.read_text() == json.dumps(done) + "\n"  # rewritten whole, by rename
    results.append({"job": "b", "status": "done", "seed": 2})
    assert [json.loads(line)["job"] for line in path.read_text().splitlines()] == ["a", "b"]
    assert not path.with_name(path.name + ".tmp").exists()


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "x"}', "jobs.jsonl:1: no 'face'; every job needs a face photo"),
    ('{"face": "missing.png"}', "jobs.jsonl:1: face 'missing.png' is not a file (paths are relative to the jobs"),
    ('{"face": "f.png", "colour": 1}', "jobs.jsonl:1: unknown field(s) colour; a job has"),
    ('{"face": "f.png", "seed": -1}', "jobs.jsonl:1: seed must be a whole number, 0 or more"),
    ('{"face": "f.png", "set": ["nodot"]}', "jobs.jsonl:1: --set 'nodot': expected NODE.INPUT=VALUE"),
    ("not json", "jobs.jsonl:1: not JSON"),
])
def test_bad_jobs_are_refused_naming_the_line(tmp_path, line, message, capsys):
    write_face_photo(tmp_path / "f.png")
    (tmp_path / "jobs.jsonl").write_text(line + "\n")
    assert cli.main(["batch", str(tmp_path / "jobs.jsonl"), "--comfyui", "http://127.0.0.1:1"]) == 1
    assert message in capsys.readouterr().err


def test_ctrl_c_leaves_whole_lines_and_the_rerun_finishes_the_rest(tmp_path, monkeypatch):
    """Ctrl-C (KeyboardInterrupt in the main thread) while jobs are running: results.jsonl holds only
    whole lines of finished jobs, and a re-run runs exactly the others."""
    import _thread
    write_face_photo(tmp_path / "face.png")
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps({"face": "face.png", "seed": n}) + "\n" for n in range(12)))
    jobs = batch.read_jobs(tmp_path / "jobs.jsonl")
    ran: list[str] = []

    def slow_job(job, server, options, workflows, on_queued, progress, stopped):  # a server's work: 0.2 s
        time.sleep(0.2)
        ran.append(job.id)
        return {"job": job.id, "status": "done", "server": server.url, "seed": job.inputs.seed, "seconds": 0.1,
                "similarity": None, "outputs": [], "prompt_id": f"p{job.id}"}
    monkeypatch.setattr(batch, "run_job", slow_job)
    options = batch.BatchOptions(("http://127.0.0.1:1", "http://127.0.0.1:2"), tmp_path / "out")

    def interrupt_after_three_lines() -> None:
        path = options.out / batch.RESULTS_NAME
        while not path.is_file() or len(path.read_text().splitlines()) < 3:
            time.sleep(0.01)
        _thread.interrupt_main()
    threading.Thread(target=interrupt_after_three_lines, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        batch.run_batch(jobs, options)
    time.sleep(0.5)  # the two workers finish the job they hold, and take no other
    first = read_results(options.out)
    assert 3 <= len(first) < 12
    assert {record["job"] for record in first} == set(ran)
    ran.clear()
    summary = batch.run_batch(jobs, options)
    assert summary.skipped == len(first) and summary.done == 12 - len(first)
    assert sorted(ran) == sorted({job.id for job in jobs} - {record["job"] for record in first})
    assert sorted(int(record["job"]) for record in read_results(options.out)) == list(range(1, 13))
