"""ComfyUI's progress bar and Cancel button for the nodes' per-image loops.

Inside ComfyUI, `each_image` advances the node's progress bar (comfy.utils.ProgressBar) once per
image and stops before the next image when the user pressed Cancel
(comfy.model_management.throw_exception_if_processing_interrupted). Outside ComfyUI (tests, scripts)
it simply hands out the images: ComfyUI is imported only when a loop runs, never at import.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

Item = TypeVar("Item")


def each_image(items: Sequence[Item]) -> Iterator[Item]:
    """The items in order, reporting progress to ComfyUI and honouring its Cancel between them."""
    try:
        from comfy.model_management import throw_exception_if_processing_interrupted
        from comfy.utils import ProgressBar
    except ImportError:  # the domain used without ComfyUI
        yield from items
        return
    bar = ProgressBar(len(items))
    for item in items:
        throw_exception_if_processing_interrupted()
        yield item
        bar.update(1)
