"""The InfiniteYou model (the INFINITEYOU value): its projection and its face recogniser.

The projection is the pack's Resampler at InfiniteYou's sizes: one 512-d IR-SE50 embedding in,
8 identity tokens of FLUX's 4096-wide text context out; `image_proj_model.bin` is a dict whose
`image_proj` entry is its state dict (a .safetensors may keep the `image_proj.` prefix or not).
The recogniser is IR-SE50 (irse50.py). Both stay on the CPU in fp32 and run once per face.
Also here: the check that a CONTROL_NET is the InfuseNet as ComfyUI loads it.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from .checks import UnsupportedModelError
from .irse50 import IRSE50Recognizer, load_irse50
from .model_files import FLUX_CATALOG, model_file
from .resampling import Resampler
from .weights_files import WeightsUnreadable, read_weights

INFINITEYOU = "infiniteyou"  # the back end name on FACE_EMBEDS
PROJECTION_CONFIG = dict(dim=1280, depth=4, dim_head=64, heads=20, num_queries=8, embedding_dim=512,
                         output_dim=4096, ff_mult=4)
SECTION = "image_proj"
PROJECTION_FILE, SIM_PROJECTION_FILE = model_file("infiniteyou-projection-aes"), model_file("infiniteyou-projection-sim")
PROJECTION_SOURCE = (f"{PROJECTION_FILE.source} (or {SIM_PROJECTION_FILE.file}), in "
                     f"ComfyUI/models/{PROJECTION_FILE.folder}/")
EXPECTED_PROJECTION = ("InfiniteYou's image projection: a dict whose 'image_proj' entry holds latents [1, 8, 1280], "
                       "proj_in [1280, 512], proj_out [4096, 1280], 4 layers, or a .safetensors of the same tensors: "
                       f"{PROJECTION_SOURCE}")
HOW_TO_MAKE = ("Make an identity for FLUX by connecting the photo to 'FLUX Apply InfiniteYou (InstantID)' (image input, with "
               "'InstantID InsightFace (antelopev2)' on insightface) and saving its FACE_EMBEDS output with 'InstantID "
               "Save Identity (Face Embeds)': that file holds the IR-SE50 embedding as well and serves both SDXL and FLUX.")


class ProjectionFileError(ValueError):
    """The file is not InfiniteYou's projection; the message says why and what was expected."""


def _projection_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = read_weights(path)
    except WeightsUnreadable as error:
        raise ProjectionFileError(f"{path} could not be read as weights ({error}). Expected {EXPECTED_PROJECTION}.") from error
    if not isinstance(state, dict):
        raise ProjectionFileError(f"{path} holds a {type(state).__name__}, not weights. Expected {EXPECTED_PROJECTION}.")
    sdxl_adapter = any(isinstance(k, str) and k.partition(".")[0] == "ip_adapter" for k in state)
    if isinstance(state.get(SECTION), dict):
        state = state[SECTION]
    elif any(isinstance(k, str) and k.startswith(SECTION + ".") for k in state):
        state = {k.removeprefix(SECTION + "."): v for k, v in state.items() if k.startswith(SECTION + ".")}
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Resampler(**PROJECTION_CONFIG).state_dict().items()}
    problems = [f"{k} missing" for k in expected if not isinstance(state.get(k), torch.Tensor)]
    problems += [f"{k} is {list(state[k].shape)}, expected {list(shape)}" for k, shape in expected.items()
                 if isinstance(state.get(k), torch.Tensor) and tuple(state[k].shape) != shape]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    if problems:
        what = ("the InstantID (SDXL) adapter, whose projection makes 16 tokens 2048 wide" if sdxl_adapter
                else f"{len(state)} entries such as {', '.join(sorted(map(str, state))[:3]) or 'nothing'}")
        raise ProjectionFileError(f"{path} is not InfiniteYou's projection (it holds {what}: {'; '.join(problems[:3])}"
                                  f"{' ...' if len(problems) > 3 else ''}). Expected {EXPECTED_PROJECTION}.")
    return state


def load_projection(path: str | Path) -> Resampler:
    """The projection from its file, validated by its key layout."""
    state = _projection_state(Path(path))
    with torch.device("meta"):
        projection = Resampler(**PROJECTION_CONFIG)
    projection.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    return projection.eval().requires_grad_(False)


class InfiniteYouModel:
    """Projection and recogniser, as loaded; identity tokens are cached per embedding."""

    def __init__(self, projection: Resampler, recognizer: IRSE50Recognizer, projection_path: Path | None = None) -> None:
        self.projection = projection
        self.recognizer = recognizer
        self.path = projection_path
        self._tokens: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    def identity_tokens(self, embedding: torch.Tensor) -> torch.Tensor:
        """[1, 8 N, 4096] fp32 for [N, 512] IR-SE50 embeddings (N > 1 only for 'concat': their tokens
        are joined, as the SDXL adapter joins its face tokens)."""
        embedding = embedding.detach().float().cpu().reshape(-1, PROJECTION_CONFIG["embedding_dim"])
        key = hashlib.sha256(embedding.numpy().tobytes()).digest()
        tokens = self._tokens.get(key)
        if tokens is None:
            with torch.no_grad():
                tokens = self.projection(embedding[:, None, :]).reshape(1, -1, PROJECTION_CONFIG["output_dim"]).clone()
            self._tokens[key] = tokens
            if len(self._tokens) > 8:
                self._tokens.popitem(last=False)
        return tokens


def load_infiniteyou(projection_path: str | Path, recognizer_path: str | Path) -> InfiniteYouModel:
    """Both files, each validated by its key layout (ProjectionFileError / irse50.RecognizerFileError)."""
    projection = load_projection(projection_path)
    recognizer = IRSE50Recognizer(load_irse50(recognizer_path), Path(recognizer_path))
    return InfiniteYouModel(projection, recognizer, Path(projection_path))


INFUSENET, *OTHER_INFUSENETS = (entry for entry in FLUX_CATALOG if entry.id.startswith("infusenet-"))
INFUSENET_FIX = (f"load the InfuseNet with 'Load ControlNet Model': {INFUSENET.source} (or "
                 f"{', '.join(entry.file for entry in OTHER_INFUSENETS)}), in ComfyUI/models/{INFUSENET.folder}/")


def check_infusenet(control_net: Any) -> None:
    """UnsupportedModelError unless control_net is a FLUX ControlNet as ComfyUI loads the InfuseNet:
    ControlNetFlux with a latent (VAE-encoded) hint and text context as wide as the identity tokens."""
    if control_net is None:
        raise UnsupportedModelError(f"The control_net input is empty: the ControlNet file could not be loaded; {INFUSENET_FIX}.")
    model = getattr(control_net, "control_model", None)
    name = type(model).__name__ if model is not None else type(control_net).__name__
    txt_in = getattr(model, "txt_in", None)
    if name != "ControlNetFlux" or not hasattr(control_net, "set_cond_hint"):
        what = ("an SDXL ControlNet (the InstantID IdentityNet goes to 'Apply InstantID')"
                if hasattr(model, "input_blocks") else f"a {name}, not a FLUX ControlNet")
    elif not getattr(model, "latent_input", False):
        what = "a FLUX ControlNet that takes a pixel hint (XLabs layout), not the InfuseNet (InstantX layout)"
    elif getattr(txt_in, "in_features", None) != PROJECTION_CONFIG["output_dim"]:
        what = f"a FLUX ControlNet whose context is {getattr(txt_in, 'in_features', '?')} wide, not 4096"
    else:
        return
    raise UnsupportedModelError(f"The control_net input is {what}, not the InfiniteYou InfuseNet; {INFUSENET_FIX}.")

