"""Saved identities: a FACE_EMBEDS identity as a small .safetensors file, so a person can be stored,
shared, versioned and used by a client that has no face models.

A file holds tensors `embeddings` [N, 512] float32 (the raw ArcFace embeddings), `kps` [5, 2] and
`bbox` [4] float32 (the first reference face, in pixels of the reference image) and `image_size`
[2] int64 (width, height), and string metadata: `format`, `format_version`, `combine`,
`face_index`, `label`, `pack_version`, `adapter_name`, `adapter_sha256`. An identity made with a
second recogniser (InfiniteYou's IR-SE50) also holds `recognized.<name>` [N, 512] float32 and is
format_version 2 (`recognizers`: the names); version 1 files still load. Files are read with
safetensors only (never unpickled) and only from the `instantid_faces` folders of ComfyUI's
input/ and output/ directories.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from . import __version__
from .faces import COMBINE_MODES, EMBEDDING_SIZE
from .file_digest import file_sha256
from .identity import FaceEmbeds, FaceIdentity, as_face_embeds

IDENTITY_FOLDER = "instantid_faces"
SUFFIX = ".safetensors"
FORMAT = "instantid-face-embeds"
FORMAT_VERSION = "1"
FORMAT_VERSION_RECOGNIZED = "2"  # version 1 plus recognized.<name> tensors
RECOGNIZED = "recognized."
OUTPUT_MARK = " [output]"
_SHAPES = {"embeddings": (None, EMBEDDING_SIZE), "kps": (5, 2), "bbox": (4,), "image_size": (2,)}
_PICKLE_HEADS = tuple(bytes([0x80, protocol]) for protocol in range(2, 6))


class IdentityFileError(ValueError):
    """An identity file that cannot be saved or loaded; the message says why and what to do."""


# ---------------------------------------------------------------------------------- file names --


def identity_folders(input_dir: str | Path, output_dir: str | Path) -> tuple[Path, Path]:
    """The folders identities are listed from: input/instantid_faces and output/instantid_faces."""
    return Path(input_dir) / IDENTITY_FOLDER, Path(output_dir) / IDENTITY_FOLDER


def list_identity_files(input_dir: str | Path, output_dir: str | Path) -> list[str]:
    """The choices for the Load node: 'name.safetensors' (input) and 'name.safetensors [output]'."""
    names = []
    for folder, mark in zip(identity_folders(input_dir, output_dir), ("", OUTPUT_MARK)):
        if folder.is_dir():
            names += sorted(path.relative_to(folder).as_posix() + mark for path in folder.rglob(f"*{SUFFIX}")
                            if path.is_file())
    return names


def resolve_identity_file(name: str, input_dir: str | Path, output_dir: str | Path) -> Path:
    """The file a Load choice names. Refuses names that leave the identity folders (absolute paths,
    '..'), other file types and missing files, saying what was given."""
    input_folder, output_folder = identity_folders(input_dir, output_dir)
    folder, relative = (output_folder, name[:-len(OUTPUT_MARK)]) if name.endswith(OUTPUT_MARK) else (input_folder, name)
    parts = relative.replace("\\", "/").split("/")
    where = f"{IDENTITY_FOLDER}/ in ComfyUI's {'output' if folder == output_folder else 'input'} folder"
    if not relative or os.path.isabs(relative) or relative.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise IdentityFileError(f"the identity file name {name!r} points outside {where}; choose a file listed in "
                                f"the node (files are read only from input/{IDENTITY_FOLDER}/ and "
                                f"output/{IDENTITY_FOLDER}/).")
    path = Path(os.path.abspath(folder.joinpath(*parts)))
    if os.path.commonpath([path, os.path.abspath(folder)]) != os.path.abspath(folder):
        raise IdentityFileError(f"the identity file name {name!r} points outside {where}.")
    if path.suffix.lower() != SUFFIX:
        raise IdentityFileError(f"{name!r} is not a {SUFFIX} file; identity files are saved by "
                                f"'InstantID Save Identity (Face Embeds)' as {SUFFIX}.")
    if not path.is_file():
        raise IdentityFileError(f"there is no identity file {relative!r} in {where} ({folder}); upload it there "
                                "or save one with 'InstantID Save Identity (Face Embeds)'.")
    return path


def save_path(folder_paths: ModuleType, filename_prefix: str) -> Path:
    """The next free output/instantid_faces/<prefix>_NNNNN_.safetensors, numbered as SaveImage numbers
    images (ComfyUI's get_save_image_path; %date% style fields work too)."""
    prefix = filename_prefix.strip()
    if not prefix or os.path.isabs(prefix) or ".." in prefix.replace("\\", "/").split("/"):
        raise IdentityFileError(f"filename_prefix {filename_prefix!r} must be a name inside output/{IDENTITY_FOLDER}/ "
                                "(letters, digits, optional subfolders), not empty, absolute or with '..'.")
    root = os.path.abspath(os.path.join(folder_paths.get_output_directory(), IDENTITY_FOLDER))
    os.makedirs(root, exist_ok=True)
    folder, name, counter, _, _ = folder_paths.get_save_image_path(prefix, root)
    return Path(folder) / f"{name}_{counter:05}_{SUFFIX}"


# ---------------------------------------------------------------------------- saving, loading --


def _adapter_metadata(face_embeds: FaceEmbeds) -> dict[str, str]:
    """The adapter that made the tokens, or (for a loaded identity saved again) what its file said."""
    if face_embeds.adapter_path is not None and Path(face_embeds.adapter_path).is_file():
        return {"adapter_name": Path(face_embeds.adapter_path).name,
                "adapter_sha256": file_sha256(face_embeds.adapter_path)}
    return {key: face_embeds.identity.metadata.get(key, "") for key in ("adapter_name", "adapter_sha256")}


def save_identity(face_embeds: FaceEmbeds, path: str | Path, label: str = "") -> Path:
    """Write the identity of `face_embeds` to `path` (a new file) and return the path."""
    import safetensors.torch

    identity = as_face_embeds(face_embeds).identity
    tensors = {"embeddings": identity.embeddings.detach().to("cpu", torch.float32).contiguous(),
               "kps": torch.from_numpy(np.array(identity.kps, dtype=np.float32)),
               "bbox": torch.from_numpy(np.array(identity.bbox, dtype=np.float32)),
               "image_size": torch.tensor(identity.image_size, dtype=torch.int64)}
    tensors |= {RECOGNIZED + name: rows.detach().to("cpu", torch.float32).contiguous()
                for name, rows in identity.recognized.items()}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "combine": identity.combine,
                "face_index": str(identity.face_index), "label": str(label), "pack_version": __version__,
                **_adapter_metadata(face_embeds)}
    if identity.recognized:  # a version 1 file stays byte-compatible with earlier readers
        metadata |= {"format_version": FORMAT_VERSION_RECOGNIZED, "recognizers": ",".join(identity.recognized),
                     "made_with": as_face_embeds(face_embeds).made_by}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


def _not_safetensors(path: Path, detail: str) -> IdentityFileError:
    with open(path, "rb") as file:
        head = file.read(8)
    if head.startswith(_PICKLE_HEADS) or head.startswith(b"PK\x03\x04"):
        what = "it is a pickle (a torch.save file), which could run code when loaded"
    elif not head:
        what = "it is empty"
    else:
        what = f"it could not be read as safetensors ({detail})"
    return IdentityFileError(f"{path.name} was refused and not loaded: {what}. Identity files are read as safetensors "
                             "only and never unpickled, so nothing in it ran. Save identities with 'InstantID Save "
                             "Identity (Face Embeds)'.")


def load_identity(path: str | Path) -> FaceEmbeds:
    """Read an identity file (safetensors only) into FACE_EMBEDS without face tokens."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            metadata = dict(file.metadata() or {})
            names = set(file.keys())
            recognized = {name for name in names if name.startswith(RECOGNIZED)}
            if metadata.get("format") != FORMAT or names - recognized != set(_SHAPES):
                raise IdentityFileError(
                    f"{path.name} is a safetensors file but not an InstantID identity (it holds "
                    f"{', '.join(sorted(names)[:4]) or 'no tensors'}{' ...' if len(names) > 4 else ''}; an identity "
                    f"holds {', '.join(_SHAPES)} and format={FORMAT!r} metadata). Save identities with 'InstantID "
                    "Save Identity (Face Embeds)'.")
            tensors = {name: file.get_tensor(name) for name in _SHAPES}
            extra = {name.removeprefix(RECOGNIZED): file.get_tensor(name) for name in recognized}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        if isinstance(error, IdentityFileError):
            raise
        raise _not_safetensors(path, str(error).splitlines()[0] if str(error) else type(error).__name__) from error
    return FaceEmbeds(_identity(path, tensors, metadata, extra))


def _identity(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
              recognized: dict[str, torch.Tensor]) -> FaceIdentity:
    problems = [f"{name} is {list(tensor.shape)}" for name, tensor in tensors.items()
                if len(tensor.shape) != len(_SHAPES[name])
                or any(want is not None and got != want for got, want in zip(tensor.shape, _SHAPES[name]))]
    problems += [f"{name} is not finite" for name, tensor in tensors.items()
                 if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    problems += [f"{RECOGNIZED}{name} is not finite" for name, rows in recognized.items()
                 if not bool(torch.isfinite(rows).all())]
    if metadata.get("format_version") not in (FORMAT_VERSION, FORMAT_VERSION_RECOGNIZED):
        problems.append(f"format_version is {metadata.get('format_version')!r}; this pack reads "
                        f"{FORMAT_VERSION!r} and {FORMAT_VERSION_RECOGNIZED!r}")
    if metadata.get("combine") not in COMBINE_MODES:
        problems.append(f"combine is {metadata.get('combine')!r}")
    if problems:
        raise IdentityFileError(f"{path.name} is a damaged or incompatible identity file: {'; '.join(problems)}. "
                                "Save the identity again with 'InstantID Save Identity (Face Embeds)'.")
    width, height = (int(v) for v in tensors["image_size"].tolist())
    try:
        return FaceIdentity(tensors["embeddings"].to(torch.float32), metadata["combine"],
                            tensors["kps"].to(torch.float32).numpy(), tensors["bbox"].to(torch.float32).numpy(),
                            (width, height), int(metadata.get("face_index") or 0), metadata,
                            {name: rows.to(torch.float32) for name, rows in recognized.items()})
    except ValueError as error:
        raise IdentityFileError(f"{path.name} is a damaged identity file: {error}.") from error


def describe(face_embeds: FaceEmbeds) -> str:
    """One line for the node: who, how many faces, and what made the file."""
    identity, meta = face_embeds.identity, face_embeds.identity.metadata
    count = identity.embeddings.shape[0]
    parts = [f"identity {meta.get('label') or '(no label)'}: {count} face{'s' if count > 1 else ''} "
             f"({identity.combine}), keypoints for a {identity.image_size[0]}x{identity.image_size[1]} image"]
    if identity.recognized:
        parts.append(f"also embedded by {', '.join(identity.recognized)}")
    if meta.get("adapter_name"):
        parts.append(f"saved with {meta['adapter_name']} (sha256 {meta.get('adapter_sha256', '')[:12]}…)")
    if meta.get("pack_version"):
        parts.append(f"pack {meta['pack_version']}")
    return "; ".join(parts)


def saved_file(path: Path, output_dir: str | Path) -> dict[str, str]:
    """Where a saved file is, as ComfyUI reports output files (filename, subfolder, type), plus the
    name the Load node lists it under."""
    relative = Path(os.path.abspath(path)).relative_to(os.path.abspath(Path(output_dir)))
    in_folder = relative.relative_to(IDENTITY_FOLDER).as_posix()
    return {"filename": relative.name, "subfolder": relative.parent.as_posix(), "type": "output",
            "choice": in_folder + OUTPUT_MARK}
