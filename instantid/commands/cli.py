"""Command line: `python -m instantid <command>`.

Each command is a pair of functions: `_add_<command>(commands)` declares its arguments and sets
`handler`; the handler takes the parsed arguments and returns an exit code, raising CommandError
for expected failures (printed as one line, no traceback). `build_parser` registers them all.

This module and what it imports at the top need only the standard library, so `--help` works on a
bare Python; a handler imports what its command needs. A command that finds this Python without
the pack's packages is handed to bootstrap.install_command_packages.
"""
from __future__ import annotations

import argparse
import logging
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

from .. import __version__
from .bootstrap import COMFYUI_VERSION, HARDWARE, REPOSITORY_VARIABLE
from ..model_files import CATALOG, CHECKPOINTS, DEFAULT_CHECKPOINT
from .comfy_home import find_comfyui, why_not_found
from .errors import CommandError
from .model_folders import comfyui_base, comfyui_layout, model_folders, read_extra_model_paths

__all__ = ["CommandError", "build_parser", "main", "read_extra_model_paths"]


# instantid.face_inputs.ON_NO_FACE, which needs torch to import (test_cli_help checks they agree).
ON_NO_FACE_CHOICES = ("error", "skip")


class LazyDefault:
    """A default that lives in a module needing more than the standard library: shown in --help
    when that module imports, filled in by `main` before the handler runs."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def value(self) -> object:
        return getattr(importlib.import_module(f"{__package__}.{self.module}"), self.name)

    def __str__(self) -> str:
        try:
            return str(self.value())
        except ImportError:
            return f"{self.module}.{self.name}"


def _number(kind: type, zero_allowed: bool = False) -> Callable[[str], float]:
    """An argparse type: a whole number (`kind` int) or a number, more than 0 (or 0 or more)."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not (value >= 0 if zero_allowed else value > 0):  # NaN fails both
            what = f"a whole number, {'0' if zero_allowed else '1'} or more" if kind is int else "more than 0"
            raise argparse.ArgumentTypeError(f"must be {what}: {text!r}")
        return value
    return parse


_FOLDERS_HELP = "(default: the ComfyUI found through COMFYUI_PATH, the folder above custom_nodes/, or ~/comfy/ComfyUI)"
# The options several commands share: add_argument's keywords by flag.
OPTIONS: dict[str, dict] = {
    "--base-directory": dict(type=Path, metavar="DIR", help=f"ComfyUI's --base-directory: models are in "
                             f"DIR/models/<folder>/ {_FOLDERS_HELP}"),
    "--extra-model-paths-config": dict(type=Path, metavar="FILE", help="ComfyUI's --extra-model-paths-config: an "
                                       "extra_model_paths.yaml whose folders are searched too (ComfyUI's own is always "
                                       "read); files are fetched into its first folder of their kind"),
    "--endpoint": dict(metavar="URL", help="Hugging Face endpoint or mirror for the models (default: $HF_ENDPOINT, "
                       "else https://huggingface.co)"),
    "--cpu": dict(action="store_true", help="run ComfyUI on the CPU (automatic without a GPU)"),
    "--verbose": dict(action="store_true", help="show ComfyUI's traceback when a node fails, and the pack's debug messages"),
    "--timeout": dict(type=_number(float), default=LazyDefault("runner", "DEFAULT_TIMEOUT"), metavar="SECONDS",
                      help="timeout of each HTTP request to a ComfyUI server (default: %(default)s)"),
    "--max-wait": dict(type=_number(float), default=LazyDefault("runner", "DEFAULT_MAX_WAIT"), metavar="SECONDS",
                       help="longest wait for a workflow on a ComfyUI server; past it, it is cancelled there "
                            "(default: %(default)s)"),
    "--workspace": dict(type=Path, metavar="DIR", help="where to install ComfyUI when none is found (default: comfy-cli's "
                        f"default workspace, ~/comfy/ComfyUI); the repository is ${REPOSITORY_VARIABLE} or GitHub's"),
    "--hardware": dict(choices=HARDWARE, help="the torch build to install with ComfyUI (default: what this machine has)"),
}


def _add(parser: argparse.ArgumentParser, *flags: str) -> None:
    for flag in flags:
        parser.add_argument(flag, **OPTIONS[flag])


def _add_fetch_models(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "fetch-models",
        help="download the model files the pack needs, verified against the published sha256",
        description="Download the InstantID adapter, the IdentityNet and the antelopev2 face models into "
                    "ComfyUI's model folders. Interrupted downloads resume; files already present and "
                    "verified are skipped.",
    )
    _add(parser, "--base-directory", "--extra-model-paths-config", "--endpoint")
    parser.add_argument("--timeout", type=_number(float), default=LazyDefault("fetch", "DEFAULT_TIMEOUT"), metavar="SECONDS",
                        help="connect and read timeout for each request (default: %(default)s)")
    parser.add_argument("--only", action="append", choices=[entry.id for entry in CATALOG], metavar="ID",
                        help="fetch only this file; repeatable (ids: %(choices)s; default: every required file)")
    parser.add_argument("--retries", type=_number(int, zero_allowed=True), default=LazyDefault("fetch", "DEFAULT_RETRIES"),
                        metavar="N", help="tries after a failure that made no progress (default: %(default)s)")
    parser.set_defaults(handler=_fetch_models)


def _fetch_models(args: argparse.Namespace) -> int:
    from .fetch import fetch_models, resolve_endpoint

    chosen = set(args.only or [])
    entries = [entry for entry in CATALOG if (entry.id in chosen if chosen else entry.required)]
    folders = model_folders({entry.folder for entry in entries}, args.base_directory, args.extra_model_paths_config)
    endpoint = resolve_endpoint(args.endpoint)
    lines = [f"Fetching {len(entries)} model file(s) from {endpoint}:"]
    lines += [f"  {entry.id} ({entry.approx_size}) -> {folders[entry.folder] / entry.path}\n"
              f"    licence: {entry.license} ({entry.license_url})" for entry in entries]
    _print(lines)
    results = fetch_models(entries, folders, endpoint=endpoint, timeout=args.timeout, retries=args.retries)
    downloaded = sum(result.downloaded for result in results)
    size_only = [result.entry.id for result in results if not result.sha256_checked]
    note = f"; size only (no published sha256): {', '.join(size_only)}" if size_only else ""
    _print([f"Done: {downloaded} downloaded, {len(results) - downloaded} already present, all verified{note}."])
    return 0


def _print(lines: list[str]) -> None:
    sys.stdout.write("".join(line + "\n" for line in lines))
    sys.stdout.flush()


class _Tracebacks(logging.Filter):
    """Drops the tracebacks ComfyUI logs: the executor's for a failing node (the command prints the
    node, its error and the fix on one line instead) and those of imports that failed at boot (their
    one-line 'Cannot import' stays). --verbose keeps them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.module == "execution":
            return False
        return not str(record.msg).startswith("Traceback (most recent call last)")


def _add_doctor(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "doctor", help="check that ComfyUI, the Python packages and the model files are in place",
        description="Check ComfyUI, Python, torch, insightface, onnxruntime (the providers that really load) and "
                    "each model file (found, size, layout, the folder it belongs in). Prints one line per check and "
                    "the commands that fix what is wrong. Exit code 0 only when everything needed is in place. "
                    "Downloads nothing and needs no GPU.")
    _add(parser, "--base-directory", "--extra-model-paths-config")
    parser.add_argument("--workflow", type=Path, metavar="FILE",
                        help="check the model files this workflow (UI or API format) loads instead of the pack's own: "
                             "each missing one is named with where it goes and, when known, where to download it")
    parser.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                        help="check the Ray cluster at ADDRESS (default: $RAY_ADDRESS, else a local Ray) instead: Ray "
                             "installed, its GPUs, and these checks on every node")
    parser.set_defaults(handler=_doctor)


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import doctor_report, markers_for

    if args.ray is not None:
        from .ray_batch import ray_doctor
        report = ray_doctor(args)
    else:
        report = doctor_report(args.base_directory, args.extra_model_paths_config, args.workflow)
    _print(report.lines(markers_for(sys.stdout)))
    return 0 if report.ok else 1


def _add_run(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "run", help="run a workflow without the UI (ComfyUI in this process, or on a running server)",
        description="Run a ComfyUI workflow (UI or API format) headless. By default ComfyUI runs inside this "
                    "process with your custom node packs; with --comfyui URL the workflow is sent to a running "
                    "ComfyUI. Output images are written to --out; 'face similarity: ...' is printed for every "
                    "InstantID Face Similarity node.")
    parser.add_argument("workflow", type=Path, metavar="WORKFLOW.json", help="a workflow saved or exported from ComfyUI")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="change a widget value; NODE is a node id, title or class type (when unique), VALUE is "
                             "JSON when it parses, else text; repeatable (e.g. --set KSampler.seed=7)")
    parser.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                        help="folder for the output images (default: the current folder)")
    parser.add_argument("--comfyui", metavar="URL",
                        help="send the workflow to this running ComfyUI (e.g. http://127.0.0.1:8188) instead")
    _add(parser, "--base-directory", "--extra-model-paths-config", "--cpu", "--timeout", "--max-wait", "--verbose")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from . import runner

    workflow = runner.load_workflow(args.workflow)
    overrides = [runner.parse_override(text) for text in args.set]
    if args.comfyui:
        with runner.StepProgress() as progress:
            report = runner.run_on_server(workflow, overrides, args.out, server=args.comfyui, timeout=args.timeout,
                                          max_wait=args.max_wait, progress=progress)
    else:
        comfyui = find_comfyui(args.base_directory)
        if comfyui is None:
            raise CommandError(f"{why_not_found(args.base_directory)}; or send the workflow to a running ComfyUI "
                               "with --comfyui URL")
        comfyui_base(args.base_directory, required=False)  # a wrong --base-directory fails here, not in ComfyUI
        base, configs = comfyui_layout(args.base_directory, args.extra_model_paths_config)
        report = runner.run_embedded(workflow, overrides, args.out, comfyui=comfyui, base_directory=base,
                                     extra_model_paths_configs=configs, cpu=args.cpu)
    lines = [f"wrote {path}" for path in report.images] + report.similarity_lines()
    if not report.images:
        lines.append("the workflow produced no images (it has no Save Image or Preview Image output)")
    _print(lines)
    return 0


def _add_install_comfyui(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "install-comfyui", help=f"find ComfyUI, or install ComfyUI {COMFYUI_VERSION} with comfy-cli, ready for this pack",
        description=f"Find ComfyUI (COMFYUI_PATH, the folder above custom_nodes/, ~/comfy/ComfyUI); when there is none, "
                    f"install ComfyUI {COMFYUI_VERSION} (the tested version) with comfy-cli for this machine's hardware. "
                    "Then link this checkout into its custom_nodes and install the Python packages ComfyUI and the pack "
                    "need into this Python. Steps already done are skipped. Prints the ComfyUI folder last.")
    _add(parser, "--workspace", "--hardware")
    parser.add_argument("--no-link", action="store_true", help="do not link this checkout into custom_nodes")
    parser.set_defaults(handler=_install_comfyui)


def _install_comfyui(args: argparse.Namespace) -> int:
    from .bootstrap import Steps, prepare_comfyui

    steps = Steps(3 if args.no_link else 4)
    _print([str(prepare_comfyui(workspace=args.workspace, hardware=args.hardware, link=not args.no_link, steps=steps))])
    return 0


def _add_portrait(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "portrait", help="one face photo and a prompt to an image: installs what is missing, then draws",
        description="Draw a portrait of the person in FACE: finds or installs ComfyUI (with comfy-cli), links this pack "
                    "into it, fetches the missing models (the pack's and an SDXL checkpoint), runs the basic workflow "
                    "(the posed one with --pose) with ComfyUI in this process, and prints the image path and the face "
                    "similarity. Running it again skips every step already done.")
    parser.add_argument("face", metavar="FACE", help="a photo with the face to draw")
    parser.add_argument("prompt", metavar="PROMPT", help="what to draw, e.g. \"analog film photo of a man, city street\"")
    parser.add_argument("--pose", metavar="POSE", help="a photo whose face position and angle the portrait takes")
    parser.add_argument("--seed", type=_number(int, zero_allowed=True), metavar="N",
                        help="the sampler's seed (default: the workflow's)")
    parser.add_argument("--checkpoint", metavar="FILE_OR_NAME",
                        help="the SDXL checkpoint: a file, a name in models/checkpoints, or a catalog name "
                             f"({', '.join(entry.id for entry in CHECKPOINTS)}; default {DEFAULT_CHECKPOINT}, fetched "
                             "when missing)")
    parser.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                        help="folder for the image (default: the current folder)")
    parser.add_argument("--workflow", type=Path, metavar="WORKFLOW.json",
                        help="run this workflow instead of the shipped one; it needs one Apply InstantID node with a "
                             "Load Image on its face input")
    parser.add_argument("--on-no-face", choices=ON_NO_FACE_CHOICES, default="error",
                        help="when the face photo shows no face: stop with an error, or skip InstantID and draw from the "
                             "prompt alone (default: %(default)s)")
    _add(parser, "--workspace", "--hardware", "--endpoint", "--cpu", "--base-directory", "--extra-model-paths-config",
         "--verbose")
    parser.set_defaults(handler=_portrait)


def _portrait(args: argparse.Namespace) -> int:
    from .image_files import check_photos

    check_photos(args.face, args.pose)  # before importing portrait, which may install packages: a wrong path costs nothing
    from .portrait import PortraitInputs, PortraitOptions, make_portrait

    inputs = PortraitInputs(face=args.face, prompt=args.prompt, pose=args.pose, seed=args.seed, checkpoint=args.checkpoint,
                            on_no_face=args.on_no_face)
    report = make_portrait(PortraitOptions(inputs, args.out, workflow=args.workflow, workspace=args.workspace,
                                           hardware=args.hardware, endpoint=args.endpoint, cpu=args.cpu,
                                           base_directory=args.base_directory,
                                           extra_model_paths_config=args.extra_model_paths_config))
    _print([f"wrote {path}" for path in report.images] + report.similarity_lines())
    return 0


def _add_batch(commands: argparse._SubParsersAction) -> None:
    results_name = LazyDefault("batch", "RESULTS_NAME")
    parser = commands.add_parser(
        "batch", help="many portraits over running ComfyUI servers, or on Ray workers",
        description="Run the jobs of JOBS.jsonl (one JSON object a line: face, and optionally prompt, pose, seed, "
                    "workflow, checkpoint, set, id) on running ComfyUI servers. Images are uploaded to the server "
                    "that runs the job; a job whose server stops answering is retried on another, and that server "
                    f"again after a pause. Finished jobs go to DIR/{results_name}, one line each, and a re-run skips "
                    "them; a job without a seed gets one at its first try, kept there for re-runs. Ctrl-C cancels "
                    "every prompt the run queued. With --ray, Ray workers (one per GPU) each start their own ComfyUI "
                    "and run the jobs; Ray places and restarts them.")
    parser.add_argument("jobs", type=Path, metavar="JOBS.jsonl", help="the jobs, one JSON object per line")
    parser.add_argument("--comfyui", action="append", metavar="URL",
                        help="a running ComfyUI (e.g. http://127.0.0.1:8188); repeat for several servers")
    parser.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                        help="run on Ray instead: workers that each start a ComfyUI on one GPU, on the cluster at "
                             "ADDRESS (default: $RAY_ADDRESS, else a local Ray on this machine); needs the ray extra")
    parser.add_argument("--workers", type=_number(int), metavar="N",
                        help="with --ray: the number of workers (default: one per GPU, one without a GPU)")
    _add(parser, "--base-directory", "--extra-model-paths-config")
    parser.add_argument("--out", type=Path, default=Path("batch-out"), metavar="DIR",
                        help=f"folder for {results_name} and one subfolder of images per job (default: %(default)s)")
    parser.add_argument("--per-server", type=_number(int), default=LazyDefault("batch", "DEFAULT_PER_SERVER"), metavar="N",
                        help="jobs each server holds at once, queued or running (default: %(default)s)")
    parser.add_argument("--retries", type=_number(int, zero_allowed=True), default=LazyDefault("batch", "DEFAULT_RETRIES"),
                        metavar="N", help="tries again of a job whose server (or Ray worker) is lost (default: %(default)s)")
    parser.add_argument("--retry-delay", type=_number(float), default=LazyDefault("batch", "DEFAULT_RETRY_DELAY"),
                        metavar="SECONDS",
                        help="first pause before a server that stopped answering is tried again; the pause doubles "
                             f"at each failure, and a server is left out after {LazyDefault('batch', 'DEFAULT_SERVER_RETRIES')} failures in a "
                             "row (default: %(default)s)")
    _add(parser, "--timeout", "--max-wait")
    parser.set_defaults(handler=_batch)


# The batch options of one mode, and why the other has no use for them: given there, they are refused.
BATCH_SERVER_OPTIONS = {"--per-server": "a Ray worker runs one job at a time on its own ComfyUI",
                        "--retry-delay": "Ray restarts a lost worker itself"}
BATCH_RAY_OPTIONS = {"--workers": "the servers are the ones --comfyui names",
                     "--base-directory": "each server has its own folders",
                     "--extra-model-paths-config": "each server reads its own"}


def _batch(args: argparse.Namespace) -> int:
    from .batch import BatchOptions, JobsError, read_jobs, run_batch

    if (args.ray is None) == (not args.comfyui):
        raise CommandError("give --comfyui URL (servers you run) or --ray [ADDRESS] (workers on Ray), one of the two")
    mode, other, unused = (("--ray", "--comfyui", BATCH_SERVER_OPTIONS) if args.ray is not None else
                           ("--comfyui", "--ray", BATCH_RAY_OPTIONS))
    for flag, why in unused.items():
        name = flag.removeprefix("--").replace("-", "_")
        if getattr(args, name) is not None and name not in args.defaulted:
            raise CommandError(f"{flag} is for {other}, not {mode}: {why}; leave it out")
    try:
        jobs = read_jobs(args.jobs)
        options = BatchOptions(tuple(args.comfyui or ()), args.out, per_server=args.per_server, retries=args.retries,
                               timeout=args.timeout, max_wait=args.max_wait, retry_delay=args.retry_delay)
        if args.ray is not None:
            from .ray_batch import RayOptions, run_ray_batch
            comfyui = find_comfyui(args.base_directory)
            if comfyui is None:
                raise CommandError(f"{why_not_found(args.base_directory)}; every Ray worker starts this ComfyUI")
            summary = run_ray_batch(jobs, options, RayOptions(comfyui, args.ray or None, args.workers,
                                                              args.base_directory, args.extra_model_paths_config))
        else:
            summary = run_batch(jobs, options)
    except JobsError as error:
        raise CommandError(str(error)) from None
    _print(summary.lines(args.out / "results.jsonl"))
    return 0 if not summary.failed and not summary.not_run else 1


COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_portrait, _add_batch, _add_install_comfyui, _add_doctor, _add_fetch_models, _add_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m instantid", description="InstantID for ComfyUI, from the command line.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a usage error argparse has already explained
        return stop.code if isinstance(stop.code, int) else 2
    verbose = getattr(args, "verbose", False)
    # The library logs progress and retries; show them on stderr for the duration of the command.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("instantid")
    previous_level, previous_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False  # ComfyUI's root handler would print every line a second time
    tracebacks = _Tracebacks()
    if not verbose:
        logging.getLogger().addFilter(tracebacks)
    try:
        args.defaulted = {name for name, value in vars(args).items() if isinstance(value, LazyDefault)}
        for name, value in vars(args).items():
            if isinstance(value, LazyDefault):
                setattr(args, name, value.value())
        return args.handler(args)
    except CommandError as error:
        sys.stderr.write(f"{parser.prog} {args.command}: error: {error}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{parser.prog} {args.command}: interrupted; run it again to resume\n")
        return 130
    except ModuleNotFoundError as missing:
        if (missing.name or "instantid").split(".")[0] == "instantid":
            raise
        from .bootstrap import install_command_packages

        return install_command_packages(missing, argv)
    finally:
        logging.getLogger().removeFilter(tracebacks)
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
        logger.propagate = previous_propagate
