"""`python -m instantid run`: run a workflow without the UI, with ComfyUI embedded in this process
(instantid.commands.embedded) or on a running ComfyUI server over its HTTP API. Both read the
workflow (UI or API format), apply the `--set NODE.INPUT=VALUE` overrides, run it, and copy the
output images and read the face similarity the same way."""
from __future__ import annotations

import asyncio
import copy
import hashlib
import http.client
import json
import logging
import shutil
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .. import __version__
from .bootstrap import torch_accelerator
from .embedded import EmbeddedComfyUI, WorkflowError, is_ui_format, node_failure_text, refusal_text, ui_to_api
from .errors import CommandError

log = logging.getLogger(__name__)

SIMILARITY_NODE = "InstantIDFaceSimilarity"
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_WAIT = 1800.0
DEFAULT_POLL_INTERVAL = 0.5
PROGRESS_CONNECT_WAIT = 5.0
CANCEL_SETTLE, CANCEL_RESEND = 2.0, 0.2

class RunError(CommandError):
    """An expected failure; the message says what is wrong and what to do."""


class NodeFailure(RunError):
    """A node of the workflow raised while it ran; the message names the node and its error."""


class ServerUnreachable(RunError):
    """The server did not answer (refused, dropped, timed out): another server may run the job."""


Prepare = Callable[[dict], dict]


@dataclass(frozen=True)
class Override:
    """One `--set NODE.INPUT=VALUE`."""

    node: str
    input: str
    raw: str
    text: str


@dataclass(frozen=True)
class SimilarityResult:
    node_id: str
    per_image: tuple[float, ...]

    @property
    def value(self) -> float:
        return sum(self.per_image) / len(self.per_image)


@dataclass
class RunReport:
    prompt_id: str
    prompt: dict
    images: list[Path] = field(default_factory=list)
    similarities: list[SimilarityResult] = field(default_factory=list)

    def similarity_lines(self) -> list[str]:
        """'face similarity: 0.734' per similarity node (with the node id when there are several)."""
        several = len(self.similarities) > 1
        lines = []
        for result in self.similarities:
            line = f"face similarity: {result.value:.3f}"
            if len(result.per_image) > 1:
                line += " (images: " + ", ".join(f"{v:.3f}" for v in result.per_image) + ")"
            lines.append(line + (f" [node {result.node_id}]" if several else ""))
        return lines


# -------------------------------------------------------------------------- workflow and --set --


def load_workflow(path: Path) -> dict:
    """A workflow file as saved by ComfyUI: UI format (Save) or API format (Export (API))."""
    try:
        workflow = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise RunError(f"cannot read the workflow {path}: {error.strerror or error}") from None
    except ValueError as error:
        raise RunError(f"{path} is not JSON ({error}); pass a workflow saved or exported from ComfyUI") from None
    api_format = isinstance(workflow, dict) and bool(workflow) and all(
        isinstance(node, dict) and "class_type" in node for node in workflow.values())
    if not isinstance(workflow, dict) or not (is_ui_format(workflow) or api_format):
        raise RunError(f"{path} is not a ComfyUI workflow: expected the UI format (with 'nodes' and 'links') or the "
                       "API format ({node id: {class_type, inputs}}); in ComfyUI use Save or Export (API)")
    return workflow


def parse_override(text: str) -> Override:
    """`NODE.INPUT=VALUE`; NODE may contain dots (a title), INPUT may not."""
    key, equals, raw = text.partition("=")
    node, dot, name = key.rpartition(".")
    if not equals or not dot or not node.strip() or not name.strip():
        raise RunError(f"--set {text!r}: expected NODE.INPUT=VALUE, where NODE is a node id, title or class type, "
                       "e.g. --set KSampler.seed=7 or --set 3.steps=20")
    return Override(node.strip(), name.strip(), raw, text)


def describe_node(node_id: str, node: Mapping) -> str:
    """'12 KSampler' or '12 KSampler ('Sampler')': a node as messages name it."""
    title = (node.get("_meta") or {}).get("title")
    kind = node.get("class_type", "?")
    return f"{node_id} {kind}" + (f" ({title!r})" if title and title != kind else "")


def _sorted_ids(ids: Iterator[str] | Sequence[str]) -> list[str]:
    return sorted(ids, key=lambda i: (len(i), i))


def resolve_node(prompt: Mapping[str, Mapping], spec: str, text: str) -> str:
    """The id of the node `spec` names: a node id, else a unique title, else a unique class type."""
    if spec in prompt:
        return spec
    for label, matches in (("title", [i for i, n in prompt.items() if (n.get("_meta") or {}).get("title") == spec]),
                           ("class type", [i for i, n in prompt.items() if n.get("class_type") == spec])):
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise RunError(f"--set {text!r}: {len(matches)} nodes have the {label} {spec!r} "
                           f"({', '.join(describe_node(i, prompt[i]) for i in _sorted_ids(matches))}); use the node id")
    choices = "; ".join(describe_node(i, prompt[i]) for i in _sorted_ids(prompt))
    raise RunError(f"--set {text!r}: the workflow has no node {spec!r}. Name a node by id, title or class type; "
                   f"its nodes are: {choices}")


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def apply_overrides(prompt: Mapping[str, dict], overrides: Sequence[Override],
                    node_info: Callable[[str], Mapping] = lambda kind: {}) -> dict:
    """A copy of the API-format prompt with each override applied. An input may be one the node
    already has or any other input of its type in `node_info` (its /object_info entry). Then the
    nodes' own number checks (instantid.checks) run on the values given, so a NaN, an infinity or an
    empty InstantID schedule stops here, before ComfyUI runs anything; a FLOAT input given as text
    ('nan', 'inf') becomes the number ComfyUI would make of it."""
    from ..checks import NumberInput, SettingError, check_finite, check_schedule  # imports torch: only when used

    prompt = copy.deepcopy(dict(prompt))
    specs = []
    for override in overrides:
        node_id = resolve_node(prompt, override.node, override.text)
        node = prompt[node_id]
        inputs = node.setdefault("inputs", {})
        info = node_info(node["class_type"]) or {}
        schema = {name: entry for section in ("required", "optional")
                  for name, entry in ((info.get("input") or {}).get(section) or {}).items()}
        if override.input not in {*inputs, *schema}:
            widgets = sorted(name for name in {*inputs, *schema} if not _is_link(inputs.get(name)))
            raise RunError(f"--set {override.text!r}: node {describe_node(node_id, node)} has no input {override.input!r}; "
                           f"the inputs --set can change are: {', '.join(widgets) or 'none'}")
        current = inputs.get(override.input)
        if _is_link(current):
            raise RunError(f"--set {override.text!r}: input {override.input!r} of node {describe_node(node_id, node)} is "
                           f"connected to node {current[0]}; --set changes widget values only, so change the "
                           "connected node instead")
        # VALUE as JSON when it parses (7, 0.5, true, [1, 2]), else the text itself; an input that holds
        # text keeps the text as given, so `--set 6.text=1990` stays the string '1990'.
        try:
            value = json.loads(override.raw)
        except ValueError:
            value = override.raw
        inputs[override.input] = override.raw if isinstance(current, str) and not isinstance(value, str) else value
        log.info("set node %s input %s = %r", node_id, override.input, inputs[override.input])
        entry = schema.get(override.input)  # ("FLOAT", {"min": 0.0, ...}) or a list of choices
        options = entry[1] if isinstance(entry, (list, tuple)) and len(entry) > 1 and isinstance(entry[1], dict) else {}
        specs.append((override, node_id, info, entry[0] if isinstance(entry, (list, tuple)) and entry else None, options))
    # Checked once all are set: --set start_at and --set end_at together make one schedule.
    for override, node_id, info, kind, options in specs:
        inputs = prompt[node_id]["inputs"]
        if kind == "FLOAT" and isinstance(inputs[override.input], str):
            try:
                inputs[override.input] = float(inputs[override.input])
            except ValueError:
                raise RunError(f"--set {override.text!r}: {override.input} takes a number, not "
                               f"{inputs[override.input]!r}") from None
        try:
            check_finite([NumberInput(override.input, inputs[override.input], options.get("min"), options.get("max"))])
            start, end = inputs.get("start_at"), inputs.get("end_at")
            if (str(info.get("category", "")).startswith("InstantID") and override.input in ("start_at", "end_at")
                    and all(isinstance(v, (int, float)) for v in (start, end))):
                check_schedule(start, end)
        except SettingError as error:
            raise RunError(f"--set {override.text!r}: node {describe_node(node_id, prompt[node_id])}: {error}") from None
    return prompt


# ------------------------------------------------------------------------------------- outputs --


def _report(prompt_id: str, prompt: dict, outputs: Mapping[str, Mapping], out_dir: Path,
            save: Callable[[dict, Path], None]) -> RunReport:
    """The run's similarities, and each image its UI outputs list ({filename, subfolder, type}) saved
    into `out_dir` by `save(image, destination)` under its file name only: a server's answer never
    picks a path outside the output folder."""
    report = RunReport(prompt_id, prompt)
    for node_id in _sorted_ids([i for i, n in prompt.items() if n.get("class_type") == SIMILARITY_NODE]):
        values = (outputs.get(node_id) or {}).get("face_similarity") or []
        if values:
            report.similarities.append(SimilarityResult(node_id, tuple(float(v) for v in values)))
        else:
            log.warning("the face similarity node %s reported no value", node_id)
    for image in [image for ui in outputs.values() for image in (ui or {}).get("images") or []
                  if isinstance(image, dict) and image.get("filename")]:
        name = Path(str(image["filename"]).replace("\\", "/")).name
        if name in ("", ".", ".."):
            raise RunError(f"ComfyUI returned an unusable image file name {image['filename']!r}")
        out_dir.mkdir(parents=True, exist_ok=True)
        save(image, out_dir / name)
        report.images.append(out_dir / name)
    return report


def node_labeller(prompt: Mapping[str, Mapping]) -> Callable[[str | None], str]:
    """What the progress line calls a node by its id: its title, else its class type."""
    labels = {i: (n.get("_meta") or {}).get("title") or n.get("class_type", f"node {i}") for i, n in prompt.items()}
    return lambda node_id: labels.get(node_id, f"node {node_id}") if node_id else "progress"


Progress = Callable[[int | None, int | None, str], None]  # (step, of steps, node label); no step: the node began


class StepProgress:
    """One tqdm line on stderr that follows the run: the running node's name and its steps."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream
        self.bar: tqdm | None = None
        self.label = ""

    def __call__(self, value: int | None, total: int | None, label: str) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, desc=label, unit="step", file=self.stream or sys.stderr, leave=True)
        elif label != self.label or total != self.bar.total or (value is not None and value < self.bar.n):
            self.bar.reset(total=total)
            self.bar.set_description(label, refresh=False)
        self.label = label
        if value is not None:
            self.bar.update(value - self.bar.n)
        else:
            self.bar.refresh()

    def __enter__(self) -> StepProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ------------------------------------------------------------------------------------ embedded --


def run_embedded(workflow: dict, overrides: Sequence[Override], out_dir: Path, *, comfyui: Path,
                 base_directory: Path | None = None, extra_model_paths_configs: Sequence[Path] = (),
                 cpu: bool = False, progress_stream: Any = None, prepare: Prepare | None = None) -> RunReport:
    """Run the workflow with ComfyUI in this process (started here, or the one already running:
    ComfyUI's modules are global, so the boot options of the first start stay in force). The
    user's other custom node packs load; this pack loads from its own folder if not installed.
    `prepare` edits the API-format prompt last (after the overrides)."""
    from .comfy_home import PACK_ROOT

    if base_directory is not None and not (base_directory / "custom_nodes").is_dir():
        # ComfyUI lists <base>/custom_nodes at boot and fails when it is missing.
        log.info("creating %s (ComfyUI needs the folder, even empty)", base_directory / "custom_nodes")
        (base_directory / "custom_nodes").mkdir(parents=True, exist_ok=True)
    if not cpu and torch_accelerator() is None:
        log.warning("torch sees no GPU; running on the CPU (--cpu). An SDXL image takes many minutes this way.")
        cpu = True
    try:
        comfy = EmbeddedComfyUI.start(comfyui, cpu=cpu, base_directory=base_directory,
                                      extra_model_paths_configs=list(extra_model_paths_configs),
                                      load_custom_nodes=True, extra_node_dirs=[PACK_ROOT])
        prompt = comfy.to_api(workflow)
    except (RuntimeError, ValueError) as error:
        raise RunError(str(error)) from None
    types = comfy.nodes.NODE_CLASS_MAPPINGS
    prompt = apply_overrides(prompt, overrides, lambda kind: comfy.node_info(kind) if kind in types else {})
    prompt = prepare(prompt) if prepare else prompt
    import comfy.utils as comfy_utils  # importable once ComfyUI is booted

    label = node_labeller(prompt)
    stock_bars = comfy_utils.PROGRESS_BAR_ENABLED
    comfy_utils.PROGRESS_BAR_ENABLED = False  # ComfyUI's own tqdm would draw a second bar
    try:
        with StepProgress(progress_stream) as bar:
            # Fresh caches: a cached output node would not report its images again.
            result = comfy.run(prompt, reuse_outputs=False,
                               progress=lambda value, total, node_id: bar(value, total, label(node_id or _running_node())))
    finally:
        comfy_utils.PROGRESS_BAR_ENABLED = stock_bars
    if result.refused is not None:
        raise RunError(f"ComfyUI refused the workflow: {result.error_text()}")
    if not result.success:
        raise (NodeFailure if result.error else RunError)(f"the workflow failed at {result.error_text()}")

    def copy(image: dict, destination: Path) -> None:
        source = Path(comfy.folder_paths.get_directory_by_type(image.get("type", "output")))
        source = source / image.get("subfolder", "") / image["filename"]
        if not (destination.exists() and destination.samefile(source)):
            shutil.copyfile(source, destination)
    return _report(result.prompt_id, prompt, result.outputs, out_dir, copy)


def _running_node() -> str | None:
    """The node ComfyUI is executing (its progress bars rarely carry their node id)."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None
    context = get_executing_context()
    return context.node_id if context is not None else None


# -------------------------------------------------------------------------------------- server --


class ComfyServer:
    """The endpoints of a running ComfyUI that a headless run needs: one instance per server, safe to
    share between threads. Every request has a timeout, and none outlives its `deadline`
    (time.monotonic()) when one is given. /object_info is read once and kept."""

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise RunError(f"--comfyui {url!r} is not an http(s) URL; pass e.g. --comfyui http://127.0.0.1:8188")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._object_info: dict | None = None
        self._lock = threading.Lock()

    def request(self, path: str, body: dict | None = None, *, data: bytes | None = None,
                content_type: str = "application/json", deadline: float | None = None) -> bytes:
        """GET, or POST of `body` as JSON (or of raw `data` with its `content_type`)."""
        data = data if data is not None else None if body is None else json.dumps(body).encode()
        headers = {"User-Agent": f"instantid-nodes/{__version__}"}
        if data is not None:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(self.url + path, data=data, headers=headers)
        timeout = self.timeout if deadline is None else max(0.1, min(self.timeout, deadline - time.monotonic()))
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            raise _http_error(self.url + path, error) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            reason = getattr(error, "reason", error)
            if isinstance(reason, TimeoutError):  # socket.timeout is TimeoutError since Python 3.10
                raise ServerUnreachable(f"ComfyUI at {self.url} did not answer {path.split('?')[0]} within "
                                        f"{timeout:.1f} s; it may be busy or stuck: check its console, or raise "
                                        "--timeout") from None
            raise ServerUnreachable(f"cannot reach ComfyUI at {self.url} ({reason}); start it (python main.py --listen) "
                                    "or fix --comfyui") from None

    def json(self, path: str, body: dict | None = None, **options: Any) -> Any:
        """The JSON answer of `request` (same arguments)."""
        raw = self.request(path, body, **options)
        try:
            return json.loads(raw)
        except ValueError:
            raise RunError(f"{self.url}{path} did not answer with JSON; is --comfyui the address of ComfyUI?") from None

    def object_info(self) -> dict:
        """Every node type's schema (GET /object_info), read on the first call only."""
        with self._lock:
            if self._object_info is None:
                info = self.json("/object_info")
                if not isinstance(info, dict):
                    raise RunError(f"{self.url}/object_info did not list node types; is --comfyui the address of ComfyUI?")
                self._object_info = info
            return self._object_info

    def upload_image(self, path: Path) -> str:
        """Put a local image into the server's input folder (POST /upload/image) under a name made
        from its content, so equal files share one upload and different ones never collide. Returns
        the value a LoadImage node takes."""
        try:
            content = Path(path).read_bytes()
        except OSError as error:
            raise RunError(f"cannot read the image {path}: {error.strerror or error}") from None
        name = f"instantid-{hashlib.sha256(content).hexdigest()[:20]}{Path(path).suffix.lower() or '.png'}"
        boundary = uuid.uuid4().hex
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="overwrite"\r\n\r\ntrue\r\n'.encode(),
                 (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                  "Content-Type: application/octet-stream\r\n\r\n").encode() + content + b"\r\n",
                 f"--{boundary}--\r\n".encode()]
        answer = self.json("/upload/image", data=b"".join(parts), content_type=f"multipart/form-data; boundary={boundary}")
        if not isinstance(answer, dict) or not answer.get("name"):
            raise RunError(f"{self.url}/upload/image did not confirm the upload of {path}; is it ComfyUI?")
        return "/".join(part for part in (answer.get("subfolder"), answer["name"]) if part)

    def queue_prompt(self, prompt: dict, client_id: str) -> str:
        """POST /prompt; the prompt id. A graph ComfyUI refuses raises RunError with its reasons."""
        answer = self.json("/prompt", {"prompt": prompt, "client_id": client_id})
        prompt_id = answer.get("prompt_id") if isinstance(answer, dict) else None
        if not prompt_id:
            raise RunError(f"ComfyUI accepted the workflow but returned no prompt id ({str(answer)[:200]})")
        if answer.get("node_errors"):
            refused = refusal_text(answer.get("error", {"message": "Prompt outputs failed validation"}), answer["node_errors"])
            raise RunError(f"ComfyUI refused part of the workflow (its valid outputs still run on the server, as prompt "
                           f"{prompt_id}): {refused}")
        return prompt_id

    def finished_entry(self, prompt_id: str, deadline: float | None = None) -> dict | None:
        """The prompt's /history entry once it has finished (success or error), else None."""
        history = self.json(f"/history/{urllib.parse.quote(prompt_id)}", deadline=deadline)
        entry = history.get(prompt_id) if isinstance(history, dict) else None
        if isinstance(entry, dict):
            status = entry.get("status") or {}
            if status.get("completed") or status.get("status_str") in ("success", "error"):
                return entry
        return None

    def queued(self) -> tuple[list[str], list[str]]:
        """(running, pending) prompt ids of the server's queue (GET /queue)."""
        answer = self.json("/queue")
        answer = answer if isinstance(answer, dict) else {}
        return tuple([item[1] for item in answer.get(key) or [] if isinstance(item, list) and len(item) > 1]
                     for key in ("queue_running", "queue_pending"))

    def cancel(self, prompt_id: str) -> None:
        """Take the prompt off the server: out of the pending queue, then interrupted if it is the
        running one (ComfyUI's /interrupt with a prompt_id leaves any other prompt alone). ComfyUI
        clears its interrupt flag as a prompt starts, so an interrupt that lands just as the prompt
        leaves the pending queue is lost: it is sent again while the queue still shows the prompt
        running, for CANCEL_SETTLE seconds (after that the flag stands until its node next checks it)."""
        deadline = time.monotonic() + CANCEL_SETTLE
        self.request("/queue", {"delete": [prompt_id]})
        while True:
            self.request("/interrupt", {"prompt_id": prompt_id})
            if prompt_id not in self.queued()[0] or time.monotonic() > deadline:
                break
            time.sleep(CANCEL_RESEND)
        log.debug("cancelled prompt %s on %s", prompt_id, self.url)


def _http_error(url: str, error: urllib.error.HTTPError) -> RunError:
    try:
        body = json.loads(error.read() or b"null")
    except ValueError:
        body = None
    if isinstance(body, dict) and ("error" in body or "node_errors" in body):
        return RunError(f"ComfyUI refused the workflow: {refusal_text(body.get('error'), body.get('node_errors'))}")
    return RunError(f"{url}: HTTP {error.code} {error.reason}; check that --comfyui points at ComfyUI")


class PromptExpired(RunError):
    """The prompt did not finish within --max-wait; it was taken off the server."""

    def __init__(self, message: str, prompt_id: str) -> None:
        super().__init__(message)
        self.prompt_id = prompt_id


def run_on_server(workflow: dict, overrides: Sequence[Override], out_dir: Path, *, server: ComfyServer | str,
                  timeout: float = DEFAULT_TIMEOUT, max_wait: float = DEFAULT_MAX_WAIT,
                  poll_interval: float = DEFAULT_POLL_INTERVAL, prepare: Prepare | None = None,
                  progress: Progress | None = None, on_queued: Callable[[str], None] | None = None,
                  stopped: Callable[[], bool] | None = None) -> RunReport:
    """Submit the API-format graph to a running ComfyUI (POST /prompt), poll /history/<id> until it
    finishes, and download the output images with /view. A prompt still unfinished after `max_wait`
    seconds is cancelled on the server (PromptExpired). `prepare` edits the API-format prompt last
    (after the overrides); `progress` follows the run over ComfyUI's websocket; `on_queued` gets the
    prompt id as soon as the server has it; once `stopped()` is true the wait ends (RunError), the
    caller having cancelled the prompt. A server that stops answering raises ServerUnreachable."""
    server = server if isinstance(server, ComfyServer) else ComfyServer(server, timeout)
    # The --set checks need the inputs' types and ranges too.
    object_info = server.object_info() if is_ui_format(workflow) or overrides else {}
    try:
        prompt = ui_to_api(workflow, object_info) if is_ui_format(workflow) else workflow
    except WorkflowError as error:
        raise RunError(str(error)) from None
    prompt = apply_overrides(prompt, overrides, lambda kind: object_info.get(kind) or {})
    prompt = prepare(prompt) if prepare else prompt
    client_id = str(uuid.uuid4())
    label = node_labeller(prompt)
    report_step = (lambda value, total, node_id: progress(value, total, label(node_id))) if progress else None
    with ProgressFollower(server.url, client_id, report_step, server.timeout):
        prompt_id = server.queue_prompt(prompt, client_id)
        if on_queued is not None:
            on_queued(prompt_id)
        log.info("queued on %s as prompt %s; waiting at most %.0f s", server.url, prompt_id, max_wait)
        entry = _wait_for(server, prompt_id, max_wait, poll_interval, stopped)
    status = entry.get("status") or {}
    if status.get("status_str") == "error":
        failure = next((node_failure_text(data) for event, data in status.get("messages") or []
                        if event == "execution_error"), "ComfyUI reported an error without details; see its console")
        raise NodeFailure(f"the workflow failed at {failure}")

    def download(image: dict, destination: Path) -> None:
        query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                        "type": image.get("type", "output")})
        destination.write_bytes(server.request(f"/view?{query}"))
    return _report(prompt_id, prompt, entry.get("outputs") or {}, out_dir, download)


def _wait_for(server: ComfyServer, prompt_id: str, max_wait: float, poll_interval: float,
              stopped: Callable[[], bool] | None = None) -> dict:
    deadline = time.monotonic() + max_wait
    while (entry := server.finished_entry(prompt_id, deadline)) is None:
        if stopped is not None and stopped():
            raise RunError(f"stopped while prompt {prompt_id} was on {server.url}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            try:
                server.cancel(prompt_id)
            except RunError as error:
                raise PromptExpired(f"prompt {prompt_id} did not finish within {max_wait:.0f} s (--max-wait) and could "
                                    f"not be cancelled ({error}); check the queue of {server.url}", prompt_id) from None
            raise PromptExpired(f"prompt {prompt_id} did not finish within {max_wait:.0f} s (--max-wait); it was "
                                f"cancelled on {server.url}; wait longer with --max-wait", prompt_id)
        time.sleep(min(poll_interval, remaining))
    return entry


class ProgressFollower:
    """ComfyUI's websocket messages for one client id (executing: the node; progress: its step),
    read in a thread and handed to `report(step, steps, node_id)`. Best effort: when the socket
    cannot be opened the run goes on, polling /history alone."""

    def __init__(self, url: str, client_id: str, report: Callable[[int | None, int | None, str | None], None] | None,
                 connect_timeout: float) -> None:
        self.url = "ws" + url[len("http"):] + "/ws?" + urllib.parse.urlencode({"clientId": client_id})
        self.report = report
        self.connect_timeout = connect_timeout
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"progress {url}", daemon=True)

    def __enter__(self) -> ProgressFollower:
        if self.report is not None:
            self.thread.start()
            # Connected first, so no message of the prompt is missed; a slow socket delays the run little.
            self.ready.wait(min(self.connect_timeout, PROGRESS_CONNECT_WAIT))
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(min(self.connect_timeout, 1.0))  # a daemon thread: a socket still opening ends on its own

    def _run(self) -> None:
        try:
            asyncio.run(self._follow())
        except Exception as error:  # progress is a convenience: never fail the run over it
            log.debug("no progress from %s: %s", self.url, error)
        finally:
            self.ready.set()

    async def _follow(self) -> None:
        import aiohttp  # ComfyUI's own web server library, so every ComfyUI environment has it

        async with aiohttp.ClientSession() as session:
            socket = await asyncio.wait_for(session.ws_connect(self.url), self.connect_timeout)
            self.ready.set()
            async with socket:
                while not self.stop.is_set():
                    try:
                        message = await socket.receive(timeout=0.25)
                    except asyncio.TimeoutError:
                        continue
                    if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        return
                    event = json.loads(message.data) if message.type == aiohttp.WSMsgType.TEXT else {}
                    data = event.get("data") if isinstance(event.get("data"), dict) else {}
                    if event.get("type") == "executing" and data.get("node") is not None:
                        self.report(None, None, str(data["node"]))
                    elif event.get("type") == "progress" and isinstance(data.get("value"), int):
                        self.report(data["value"], data.get("max"), None if data.get("node") is None else str(data["node"]))
