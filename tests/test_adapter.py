"""The adapter file: loading both formats, the Resampler against a from-scratch reference, uncond
tokens, noise, and the per-layer face K/V. Pure tests: no ComfyUI needed."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from instantid.adapter import NARROW_LAYERS, load_adapter
from instantid.sdxl import ATTN2_KEYS
from support.reference import reference_resampler
from support.tiny_models import adapter_state, write_adapter_bin, write_adapter_safetensors

TINY_WIDTHS = [64 if i in NARROW_LAYERS else 128 for i in range(len(ATTN2_KEYS))]


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path]:
    folder = tmp_path_factory.mktemp("adapter")
    state = adapter_state(TINY_WIDTHS)
    half = {section: {k: v.half() for k, v in part.items()} for section, part in state.items()}
    return state, write_adapter_bin(folder / "ip-adapter.bin", state), write_adapter_safetensors(folder / "ip-adapter.safetensors", half)


def test_resampler_equals_reference_for_loaded_weights(adapter_files):
    state, bin_path, _ = adapter_files
    adapter = load_adapter(bin_path)
    embedding = torch.randn(1, 512, generator=torch.Generator().manual_seed(5)) * 1.5
    tokens = adapter.face_tokens(embedding)
    expected = reference_resampler(state["image_proj"], embedding)
    assert tokens.cond.shape == (1, 16, 2048)
    torch.testing.assert_close(tokens.cond, expected, rtol=1e-5, atol=1e-5)


def test_uncond_tokens_are_resampler_of_zeros_at_noise_zero(adapter_files):
    state, bin_path, _ = adapter_files
    adapter = load_adapter(bin_path)
    tokens = adapter.face_tokens(torch.randn(1, 512))
    torch.testing.assert_close(tokens.uncond, reference_resampler(state["image_proj"], torch.zeros(1, 512)), rtol=1e-5, atol=1e-5)


def test_noise_uncond_is_seeded_by_the_embedding_and_leaves_torch_rng_alone(adapter_files):
    state, bin_path, _ = adapter_files
    adapter = load_adapter(bin_path)
    embedding = torch.randn(1, 512, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    noisy = adapter.face_tokens(embedding, noise=0.35)
    assert torch.equal(torch.get_rng_state(), rng_before)
    clean = adapter.face_tokens(embedding, noise=0.0)
    assert not torch.allclose(noisy.uncond, clean.uncond, atol=1e-3)
    torch.testing.assert_close(noisy.cond, clean.cond)
    # Same embedding -> same noise, in a fresh adapter object too (no cache involved).
    again = load_adapter(bin_path).face_tokens(embedding, noise=0.35)
    torch.testing.assert_close(again.uncond, noisy.uncond, rtol=0, atol=0)
    # The noise input is noise * U[0, 1): Resampler of a vector in [0, 0.35).
    other = load_adapter(bin_path).face_tokens(embedding + 1, noise=0.35)
    assert not torch.allclose(other.uncond, noisy.uncond, atol=1e-4)


def test_concat_gives_sixteen_tokens_per_face(adapter_files):
    state, bin_path, _ = adapter_files
    adapter = load_adapter(bin_path)
    embeddings = torch.randn(3, 512, generator=torch.Generator().manual_seed(2))
    tokens = adapter.face_tokens(embeddings)
    assert tokens.cond.shape == (1, 48, 2048) and tokens.uncond.shape == (1, 48, 2048)
    for i in range(3):
        torch.testing.assert_close(tokens.cond[:, 16 * i:16 * (i + 1)],
                                   reference_resampler(state["image_proj"], embeddings[i:i + 1]), rtol=1e-5, atol=1e-5)


def test_layer_kv_projects_both_token_sets_with_each_layers_weights(adapter_files):
    state, bin_path, _ = adapter_files
    adapter = load_adapter(bin_path)
    tokens = adapter.face_tokens(torch.randn(1, 512))
    layer_kv = adapter.layer_kv(tokens)
    assert len(layer_kv) == 70
    for position, (k, v) in enumerate(layer_kv):
        number = 2 * position + 1
        wk, wv = state["ip_adapter"][f"{number}.to_k_ip.weight"], state["ip_adapter"][f"{number}.to_v_ip.weight"]
        assert k.shape == (2, 16, TINY_WIDTHS[position])
        torch.testing.assert_close(k[0], tokens.cond[0] @ wk.T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v[1], tokens.uncond[0] @ wv.T, rtol=1e-5, atol=1e-5)
    assert adapter.layer_kv(tokens) is layer_kv  # computed once per face


def test_safetensors_with_prefixes_loads_the_same_layout(adapter_files):
    state, bin_path, st_path = adapter_files
    from_bin, from_st = load_adapter(bin_path), load_adapter(st_path)
    assert from_st.widths == from_bin.widths == TINY_WIDTHS
    embedding = torch.randn(1, 512)
    torch.testing.assert_close(from_st.face_tokens(embedding).cond, from_bin.face_tokens(embedding).cond, rtol=0.05, atol=0.05)


def test_adapter_widths_are_checked_against_the_model(adapter_files):
    _, bin_path, _ = adapter_files
    adapter = load_adapter(bin_path)
    adapter.check_fits(TINY_WIDTHS)
    wrong = list(TINY_WIDTHS)
    wrong[60] = 64
    with pytest.raises(ValueError, match=r"\('middle', 0, 0\).*128 wide and the model 64"):
        adapter.check_fits(wrong)
