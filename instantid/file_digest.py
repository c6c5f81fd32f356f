"""The sha256 of a file, read in blocks and remembered per path, size and modification time (an
adapter is 1.7 GB; a checkpoint 6.9 GB): saved identities name their adapter by it, and the
downloads are verified with it. Standard library only, so the command line can use it anywhere."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

_HASHES: dict[tuple[str, int, int], str] = {}
BLOCK_BYTES = 1 << 22


def file_sha256(path: str | Path) -> str:
    """The file's sha256 as 64 hex digits."""
    stat = os.stat(path)
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(BLOCK_BYTES), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]
