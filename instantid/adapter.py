"""The InstantID adapter file: safe loading, layout validation, face tokens, per-layer face K/V.

`ip-adapter.bin` holds {"image_proj": Resampler weights, "ip_adapter": {"1.to_k_ip.weight": ...,
"139.to_v_ip.weight"}}; the .safetensors form flattens it with `image_proj.` / `ip_adapter.` key
prefixes. The 140 projection matrices (341M parameters) are only ever applied to the constant face
tokens, so they are folded into per-layer K/V once per face (a few MB) and never sent to the GPU.
"""
from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .model_files import model_file
from .paths import FETCH_COMMAND
from .sdxl import ADAPTER_LAYER_NUMBERS, ATTN2_KEYS, CONTEXT_DIM, adapter_key_names

from .resampling import RESAMPLER_CONFIG, Resampler

EMBEDDING_DIM = RESAMPLER_CONFIG["embedding_dim"]
TOKENS_PER_FACE = RESAMPLER_CONFIG["num_queries"]
ADAPTER_FILE = model_file("adapter")
EXPECTED_LAYOUT = (
    "an InstantID adapter: 'image_proj' (the face Resampler: latents [1, 16, 1280], proj_in [1280, 512], "
    "proj_out [2048, 1280]) and 'ip_adapter' with 140 tensors 1.to_k_ip.weight ... 139.to_v_ip.weight of "
    f"shape [640 or 1280, 2048]. Get {ADAPTER_FILE.source} (or run `{FETCH_COMMAND}`) and put it in "
    f"ComfyUI/models/{ADAPTER_FILE.folder}/")
# Layer positions (in ATTN2_KEYS order) that run at the narrower width: input 4,5 and output 3,4,5.
NARROW_LAYERS = frozenset(i for i, (block, block_id, _) in enumerate(ATTN2_KEYS)
                          if (block == "input" and block_id in (4, 5)) or (block == "output" and block_id in (3, 4, 5)))


class AdapterFileError(ValueError):
    """The file is not a usable InstantID adapter; the message says why and what was expected."""


class AdapterMismatchError(ValueError):
    """The adapter does not fit the model it is applied to."""


@dataclass(eq=False)
class FaceTokens:
    """Face tokens for one identity: positive and negative (uncond) rows, [1, T, 2048] fp32 on CPU,
    T = 16 per face. This is the FACE_EMBEDS value passed between nodes."""
    cond: torch.Tensor
    uncond: torch.Tensor
    layer_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)


SECTIONS = ("image_proj", "ip_adapter")
_PICKLE_PROTOCOL_HEADERS = tuple(bytes([0x80, protocol]) for protocol in range(2, 6))


def _file_facts(path: Path) -> tuple[int, bytes]:
    size = path.stat().st_size
    with open(path, "rb") as file:
        return size, file.read(64)


def _damaged(path: Path, size: int, head: bytes, detail: str) -> AdapterFileError:
    """The error for a file that is not readable weights: say what it looks like and what to do."""
    if size == 0:
        what = "is empty (0 bytes)"
    elif path.suffix.lower() not in (".safetensors", ".sft") and head[8:10] == b'{"':
        # safetensors starts with an 8-byte header length and a JSON header.
        return AdapterFileError(f"{path} is a safetensors file with a '{path.suffix}' name; rename it to "
                                f"{path.stem}.safetensors. Expected {EXPECTED_LAYOUT}")
    elif head.lstrip()[:1] == b"<":
        what = f"({size} bytes) is a web page, not weights (a failed download saved an error page)"
    else:
        what = f"({size} bytes) could not be read ({detail}); it is damaged or incomplete"
    return AdapterFileError(f"{path} {what}. Download it again (or run `python -m instantid fetch-models`). "
                            f"Expected {EXPECTED_LAYOUT}")


def _read_state(path: Path, mmap: bool = False) -> dict:
    """The file's tensors, never executing pickled code (memory-mapped, not read, with mmap)."""
    size, head = _file_facts(path)
    if path.suffix.lower() in (".safetensors", ".sft"):
        import safetensors.torch
        from safetensors import SafetensorError
        try:
            flat = safetensors.torch.load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise _damaged(path, size, head, f"not valid safetensors: {e}") from e
        # Keys outside the two sections stay flat, so a wrong file (a checkpoint, a LoRA) keeps the
        # key names that identify it in the error message.
        state: dict = {}
        for key, tensor in flat.items():
            section, _, rest = key.partition(".")
            if section in SECTIONS and rest:
                state.setdefault(section, {})[rest] = tensor
            else:
                state[key] = tensor
        return state
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        # torch's weights-only unpickler raises this both for a pickle that names Python callables
        # (which a plain torch.load would run) and for bytes that are no pickle at all.
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if unsafe or zipfile.is_zipfile(path) or head.startswith(_PICKLE_PROTOCOL_HEADERS):
            what = f"it would import and call {unsafe.group(1)}" if unsafe else "it holds more than plain tensors"
            raise AdapterFileError(
                f"{path} was refused and not loaded: it is a pickle that could run code when loaded ({what}). "
                f"InstantID adapters are plain weights; delete this file and use the official {ADAPTER_FILE.source} "
                f"or a .safetensors file. Expected {EXPECTED_LAYOUT}") from e
        raise _damaged(path, size, head, "not a PyTorch weights file") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise _damaged(path, size, head, str(e).splitlines()[0] if str(e) else type(e).__name__) from e


_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "conditioner.", "cond_stage_model.",
                        "input_blocks.", "middle_block.", "down_blocks.", "mid_block.", "controlnet_", "zero_convs.")


def _what_it_looks_like(state: dict) -> str:
    """A guess at what a wrong file is, so the message can name it."""
    if isinstance(state.get("state_dict"), dict):  # a training checkpoint wraps its weights
        return _what_it_looks_like(state["state_dict"])
    keys = [str(k) for k in state]
    if any(k.startswith(_CHECKPOINT_PREFIXES) for k in keys):
        return "a model checkpoint (UNet/ControlNet weights), not an adapter"
    if any(k.startswith(("lora_unet_", "lora_te", "diffusion_model.")) or ".lora_" in k for k in keys):
        return "a LoRA, not an adapter"
    if not isinstance(state.get("image_proj"), dict) or not isinstance(state.get("ip_adapter"), dict):
        sample = ", ".join(sorted(keys)[:3]) or "nothing"
        return (f"not an IP-Adapter-style file (no 'image_proj' and 'ip_adapter' sections; it holds {len(keys)} "
                f"entries such as {sample})")
    image_proj, ip_adapter = state["image_proj"], state["ip_adapter"]
    first = ip_adapter.get("1.to_k_ip.weight")
    if isinstance(first, torch.Tensor) and first.shape[-1] != CONTEXT_DIM:
        family = {768: " (SD1.5)", 1024: " (SD2.x)"}.get(first.shape[-1], "")
        return f"an adapter for a {first.shape[-1]}-wide text context{family}, not SDXL's {CONTEXT_DIM}"
    if "proj.weight" in image_proj or "proj.0.weight" in image_proj:
        return "an IP-Adapter / IP-Adapter FaceID (its image projection is not InstantID's face Resampler)"
    proj_in = image_proj.get("proj_in.weight")
    if isinstance(proj_in, torch.Tensor) and proj_in.shape[-1] != EMBEDDING_DIM:
        return (f"an IP-Adapter Plus (its Resampler takes {proj_in.shape[-1]}-wide image features; InstantID takes "
                f"{EMBEDDING_DIM}-wide face embeddings)")
    return "an adapter whose layout differs from InstantID's"


def _check_resampler(image_proj: dict, path: Path) -> dict:
    expected = _expected_resampler_shapes()
    problems = [f"{k} missing" for k in expected if k not in image_proj]
    problems += [f"{k} is {list(image_proj[k].shape)}, expected {list(shape)}"
                 for k, shape in expected.items() if k in image_proj and tuple(image_proj[k].shape) != shape]
    problems += [f"unexpected {k}" for k in image_proj if k not in expected]
    if problems:
        raise AdapterFileError(f"{path} is {_what_it_looks_like({'image_proj': image_proj, 'ip_adapter': {}})}: "
                               f"{'; '.join(problems[:4])}{' ...' if len(problems) > 4 else ''}. Expected {EXPECTED_LAYOUT}")
    return image_proj


def _expected_resampler_shapes() -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Resampler(**RESAMPLER_CONFIG).state_dict().items()}


def _check_projections(ip_adapter: dict, path: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    expected_names = {name for n in ADAPTER_LAYER_NUMBERS for name in adapter_key_names(n)}
    missing = sorted(expected_names - set(ip_adapter), key=lambda k: int(k.split(".")[0]))
    extra = sorted(set(ip_adapter) - expected_names)
    if missing or extra:
        raise AdapterFileError(
            f"{path} has {len(ip_adapter)} per-layer tensors where SDXL InstantID has 140 (70 cross-attention layers)"
            f"{'; missing ' + ', '.join(missing[:3]) if missing else ''}{'; unexpected ' + ', '.join(extra[:3]) if extra else ''}. "
            f"Expected {EXPECTED_LAYOUT}")
    pairs = [tuple(ip_adapter[name] for name in adapter_key_names(n)) for n in ADAPTER_LAYER_NUMBERS]
    narrow = pairs[0][0].shape[0]
    for position, (n, (k, v)) in enumerate(zip(ADAPTER_LAYER_NUMBERS, pairs)):
        want = narrow if position in NARROW_LAYERS else 2 * narrow
        for name, tensor in zip(adapter_key_names(n), (k, v)):
            if tuple(tensor.shape) != (want, CONTEXT_DIM):
                raise AdapterFileError(f"{path}: {name} is {list(tensor.shape)}, expected [{want}, {CONTEXT_DIM}] "
                                       f"(the widths must follow SDXL's layers). Expected {EXPECTED_LAYOUT}")
    return pairs


class InstantIDAdapter:
    """A loaded adapter (the INSTANTID value). The Resampler stays on the CPU in fp32: it runs once
    per face, so it never occupies GPU memory."""

    def __init__(self, path: Path, image_proj: dict, projections: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.path = path
        with torch.device("meta"):
            self.resampler = Resampler(**RESAMPLER_CONFIG)
        self.resampler.load_state_dict({k: v.float() for k, v in image_proj.items()}, assign=True)
        self.resampler.eval().requires_grad_(False)
        self.projections = projections
        self._tokens: OrderedDict[tuple, FaceTokens] = OrderedDict()

    @property
    def widths(self) -> list[int]:
        return [k.shape[0] for k, _ in self.projections]

    def check_fits(self, model_widths: list[int]) -> None:
        """Raise AdapterMismatchError unless every layer's width equals the model's."""
        if model_widths != self.widths:
            bad = next(i for i, (a, m) in enumerate(zip(self.widths, model_widths)) if a != m)
            raise AdapterMismatchError(
                f"the adapter {self.path.name} does not fit this model: at cross-attention layer {ATTN2_KEYS[bad]} the "
                f"adapter is {self.widths[bad]} wide and the model {model_widths[bad]}. InstantID needs a full-size SDXL "
                "model and the InstantID ip-adapter.bin made for it; load an SDXL checkpoint, or the official adapter.")

    def face_tokens(self, embedding: torch.Tensor, noise: float = 0.0) -> FaceTokens:
        """Face tokens for [N, 512] raw embeddings (N > 1 only for 'concat': their tokens are joined).
        Uncond tokens are Resampler(0) as in the official pipeline, or Resampler(noise * U[0,1)) with
        a seed taken from the embedding, so the result is reproducible without touching torch's RNG."""
        embedding = embedding.detach().float().cpu().reshape(-1, EMBEDDING_DIM)
        digest = hashlib.sha256(embedding.numpy().tobytes()).digest()
        key = (digest, float(noise))
        cached = self._tokens.get(key)
        if cached is not None:
            self._tokens.move_to_end(key)
            return cached
        if noise > 0:
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            uncond_input = noise * torch.rand(embedding.shape, generator=generator)
        else:
            uncond_input = torch.zeros_like(embedding)
        with torch.no_grad():
            both = self.resampler(torch.cat([embedding, uncond_input])[:, None, :])
        count = embedding.shape[0]
        tokens = FaceTokens(cond=both[:count].reshape(1, -1, CONTEXT_DIM).clone(),
                            uncond=both[count:].reshape(1, -1, CONTEXT_DIM).clone())
        self._tokens[key] = tokens
        if len(self._tokens) > 8:
            self._tokens.popitem(last=False)
        return tokens

    def layer_kv(self, tokens: FaceTokens) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (K, V) of the face tokens, each [2, T, C] holding (positive, negative) rows;
        computed once per FaceTokens in fp32 and kept with them."""
        if tokens.layer_kv is None:
            both = torch.cat([tokens.cond, tokens.uncond]).float()
            with torch.no_grad():
                tokens.layer_kv = [(both @ k.float().T, both @ v.float().T) for k, v in self.projections]
        return tokens.layer_kv


def load_adapter(path: Path, mmap: bool = False) -> InstantIDAdapter:
    """Load and validate an adapter file (.bin/.pt/.pth with torch's weights-only loader, or
    .safetensors/.sft with prefixed keys). mmap=True maps a .bin instead of reading it (the
    doctor's check of a 1.7 GB file reads little more than its headers)."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path} does not exist. Expected {EXPECTED_LAYOUT}")
    state = _read_state(path, mmap)
    if not isinstance(state, dict):
        raise AdapterFileError(f"{path} holds a {type(state).__name__}, not a dictionary of weights. Expected {EXPECTED_LAYOUT}")
    if not isinstance(state.get("image_proj"), dict) or not isinstance(state.get("ip_adapter"), dict):
        raise AdapterFileError(f"{path} is {_what_it_looks_like(state)}. Expected {EXPECTED_LAYOUT}")
    not_tensors = [f"{section}.{key}" for section in SECTIONS for key, value in state[section].items()
                   if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise AdapterFileError(f"{path} has entries that are not tensors ({', '.join(not_tensors[:3])}). "
                               f"Expected {EXPECTED_LAYOUT}")
    first = state["ip_adapter"].get("1.to_k_ip.weight")
    if first is not None and first.shape[-1] != CONTEXT_DIM:
        raise AdapterFileError(f"{path} is {_what_it_looks_like(state)}. Expected {EXPECTED_LAYOUT}")
    image_proj = _check_resampler(state["image_proj"], path)
    projections = _check_projections(state["ip_adapter"], path)
    return InstantIDAdapter(path, image_proj, projections)
