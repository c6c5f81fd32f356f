"""The nodes' per-image face loops inside ComfyUI: its progress bar moves once per image, and its
Cancel (interrupt) stops the loop before the next image."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from instantid import face_crop, face_inputs, similarity
from instantid.progress import each_image


class CountingAnalyzer:
    """A face analyser that finds the same face everywhere and counts its calls; it can press Cancel
    during one."""

    def __init__(self, cancel_at: int | None = None) -> None:
        self.calls = 0
        self.cancel_at = cancel_at

    def detect(self, bgr, face_index: int = 0):
        self.calls += 1
        if self.calls == self.cancel_at:
            import comfy.model_management
            comfy.model_management.interrupt_current_processing(True)
        return SimpleNamespace(embedding=np.ones(512, dtype=np.float32), bbox=np.array([2.0, 2.0, 12.0, 12.0]),
                               kps=np.full((5, 2), 7.0))


@pytest.fixture
def progress_hook(comfy):
    """The (value, total) ComfyUI's progress bars report, as its server would see them."""
    import comfy.utils
    seen: list[tuple[int, int]] = []
    before = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    yield seen
    comfy.utils.set_progress_bar_global_hook(before)


def images(count: int) -> torch.Tensor:
    return torch.rand(count, 16, 16, 3, generator=torch.Generator().manual_seed(count))


@pytest.mark.parametrize("loop, before", [
    (lambda analyzer, batch: face_inputs.detect_faces(analyzer, batch), 0),
    # The similarity analyses its one reference image first.
    (lambda analyzer, batch: similarity.face_similarity(analyzer, batch[:1], batch), 1),
    (lambda analyzer, batch: face_crop.crop_faces(analyzer, batch, size=64), 0),
], ids=["face analysis", "similarity", "face crop"])
def test_face_loops_move_comfyuis_progress_bar_and_stop_on_cancel(loop, before, progress_hook):
    import comfy.model_management
    loop(CountingAnalyzer(), images(3))
    assert progress_hook[-3:] == [(1, 3), (2, 3), (3, 3)]

    analyzer = CountingAnalyzer(cancel_at=before + 2)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        loop(analyzer, images(4))
    assert analyzer.calls == before + 2  # images 3 and 4 never analysed
    assert not comfy.model_management.processing_interrupted()  # the flag is consumed, as ComfyUI's own checks do


def test_without_comfyui_the_items_pass_through():
    assert list(each_image([3, 1, 2])) == [3, 1, 2]
