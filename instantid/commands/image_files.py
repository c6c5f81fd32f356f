"""The photo files a command is given, checked with the standard library alone: `portrait` runs this
before anything is installed, so a mistyped path costs no install."""
from __future__ import annotations

from pathlib import Path

from .bootstrap import StepFailed

IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")


def check_image(label: str, value: str) -> None:
    """A photo that exists and starts like an image file (PNG, JPEG, GIF, BMP, WebP, TIFF); its
    pixels are ComfyUI's Load Image's to read (PIL may not be installed yet)."""
    path = Path(value)
    if not path.is_file():
        raise StepFailed("check the inputs", f"the {label} {value} does not exist", "pass the path of a photo")
    try:
        with open(path, "rb") as stream:
            head = stream.read(12)
    except OSError as error:
        raise StepFailed("check the inputs", f"the {label} {value} cannot be read ({error.strerror or error})",
                         "check its permissions") from None
    if not head.startswith(IMAGE_SIGNATURES) or (head.startswith(b"RIFF") and head[8:12] != b"WEBP"):
        raise StepFailed("check the inputs", f"the {label} {value} is not an image file", "pass a PNG, JPEG or WebP photo")


def check_photos(face: str, pose: str | None) -> None:
    check_image("face image", face)
    if pose is not None:
        check_image("pose image", pose)
