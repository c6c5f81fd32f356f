"""Command line: `python -m instantid <command>`.

Each command is a pair of functions: `_add_<command>(commands)` declares its arguments and sets
`handler`; the handler takes the parsed arguments and returns an exit code, raising CommandError
for expected failures (printed as one line, no traceback). `build_parser` registers them all.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from . import __version__
from .catalog import CATALOG, ModelFile
from .comfy_home import find_comfyui, why_not_found
from .fetch import DEFAULT_RETRIES, DEFAULT_TIMEOUT, FetchError, fetch_models, resolve_endpoint


class CommandError(Exception):
    """An expected failure; the message is one actionable line."""


def read_extra_model_paths(config: Path) -> dict[str, list[Path]]:
    """The folders an extra_model_paths.yaml registers, per folder key, in the order ComfyUI's
    folder_paths would hold them (utils/extra_config.py): `base_path` (relative to the file) joins
    each newline-separated entry, paths without a base are relative to the file, and sections with
    `is_default: true` go to the front."""
    try:
        import yaml  # ComfyUI requires PyYAML; only this option needs it
    except ImportError:
        raise CommandError("reading --extra-model-paths-config needs PyYAML: pip install pyyaml") from None
    try:
        document = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise CommandError(f"cannot read {config}: {error}".replace("\n", " ")) from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise CommandError(f"{config}: expected sections of folder keys, got {type(document).__name__}")
    config_dir = Path(os.path.abspath(config)).parent  # abspath, not resolve: symlinks as ComfyUI sees them
    folders: dict[str, list[Path]] = {}
    for section, entries in document.items():
        if entries is None:
            continue
        if not isinstance(entries, dict):
            raise CommandError(f"{config}: section {section!r} must map folder keys to paths")
        entries = dict(entries)
        base = entries.pop("base_path", None)
        if base is not None:
            base = Path(os.path.expandvars(os.path.expanduser(str(base))))
            base = base if base.is_absolute() else config_dir / base
        is_default = bool(entries.pop("is_default", False))
        for key, value in entries.items():
            if not isinstance(value, str):
                raise CommandError(f"{config}: {section}.{key} must be a path or newline-separated paths")
            for line in value.split("\n"):
                if not line:
                    continue
                path = Path(os.path.normpath((base or config_dir) / line))
                paths = folders.setdefault(str(key), [])
                if path in paths and is_default:
                    paths.remove(path)
                if is_default:
                    paths.insert(0, path)
                elif path not in paths:
                    paths.append(path)
    return folders


def model_folders(keys: Iterable[str], base_directory: Path | None, extra_config: Path | None) -> dict[str, Path]:
    """Where each folder key's files go: the first folder extra_model_paths registers for it,
    else <ComfyUI base>/models/<key>. ComfyUI is looked up only when a key needs it."""
    registered = read_extra_model_paths(extra_config) if extra_config else {}
    folders = {key: registered[key][0] for key in keys if registered.get(key)}
    missing = [key for key in keys if key not in folders]
    if missing:
        if base_directory is None:
            base_directory = find_comfyui()
            if base_directory is None:
                raise CommandError(f"{why_not_found()}; or pass --base-directory DIR")
        elif not base_directory.is_dir():
            raise CommandError(f"--base-directory {base_directory} is not a directory")
        folders.update({key: base_directory / "models" / key for key in missing})
    return folders


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number, 0 or more: {text!r}")
    return int(text)


def _add_fetch_models(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "fetch-models",
        help="download the model files the pack needs, verified against the published sha256",
        description="Download the InstantID adapter, the IdentityNet and the antelopev2 face models into "
                    "ComfyUI's model folders. Interrupted downloads resume; files already present and "
                    "verified are skipped.",
    )
    parser.add_argument("--base-directory", type=Path, metavar="DIR",
                        help="ComfyUI base directory; files go to DIR/models/<folder>/ (default: the ComfyUI "
                             "found through COMFYUI_PATH, the folder above custom_nodes/, or ~/comfy/ComfyUI)")
    parser.add_argument("--extra-model-paths-config", type=Path, metavar="FILE",
                        help="an extra_model_paths.yaml; the first folder it registers for instantid, controlnet "
                             "or insightface is used instead of the base directory's")
    parser.add_argument("--endpoint", metavar="URL",
                        help="Hugging Face endpoint or mirror (default: $HF_ENDPOINT, else https://huggingface.co)")
    parser.add_argument("--only", action="append", choices=[entry.id for entry in CATALOG], metavar="ID",
                        help="fetch only this file; repeatable (ids: %(choices)s; default: every required file)")
    parser.add_argument("--timeout", type=_positive_float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help="connect and read timeout for each request (default: %(default)s)")
    parser.add_argument("--retries", type=_non_negative_int, default=DEFAULT_RETRIES, metavar="N",
                        help="tries after a failure that made no progress (default: %(default)s)")
    parser.set_defaults(handler=_fetch_models)


def _fetch_models(args: argparse.Namespace) -> int:
    chosen = set(args.only or [])
    entries: list[ModelFile] = [entry for entry in CATALOG if (entry.id in chosen if chosen else entry.required)]
    folders = model_folders({entry.folder for entry in entries}, args.base_directory, args.extra_model_paths_config)
    try:
        endpoint = resolve_endpoint(args.endpoint)
        out = sys.stdout
        out.write(f"Fetching {len(entries)} model file(s) from {endpoint}:\n")
        for entry in entries:
            out.write(f"  {entry.id} ({entry.approx_size}) -> {folders[entry.folder] / entry.path}\n"
                      f"    licence: {entry.license} ({entry.license_url})\n")
        out.flush()
        results = fetch_models(entries, folders, endpoint=endpoint, timeout=args.timeout, retries=args.retries)
    except FetchError as error:
        raise CommandError(str(error)) from None
    downloaded = sum(result.downloaded for result in results)
    size_only = [result.entry.id for result in results if not result.sha256_checked]
    note = f"; size only (no published sha256): {', '.join(size_only)}" if size_only else ""
    sys.stdout.write(f"Done: {downloaded} downloaded, {len(results) - downloaded} already present, "
                     f"all verified{note}.\n")
    return 0


COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (_add_fetch_models,)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m instantid", description="InstantID for ComfyUI, from the command line.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a usage error argparse has already explained
        return stop.code if isinstance(stop.code, int) else 2
    # The library logs progress and retries; show them on stderr for the duration of the command.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("instantid")
    previous_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        return args.handler(args)
    except CommandError as error:
        sys.stderr.write(f"{parser.prog} {args.command}: error: {error}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{parser.prog} {args.command}: interrupted; run it again to resume\n")
        return 130
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
