"""Tiny models with SDXL's real architecture and key layout (random weights), for CPU tests.

The UNet keeps SDXL's block structure, all 70 cross-attention layers, context 2048 and ADM 2816,
with narrow channels (32/64/128). The IdentityNet-shaped ControlNet is written in diffusers key
format, like the real InstantID ControlNet. The adapter has the real Resampler and the 140
per-layer key names, with widths matching the tiny UNet. Needs ComfyUI on sys.path (booted).
"""
from __future__ import annotations

from pathlib import Path

import torch

TINY_CHANNELS = 32
TINY_SDXL = dict(image_size=32, in_channels=4, out_channels=4, model_channels=TINY_CHANNELS,
                 num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_middle=10, transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                 context_dim=2048, adm_in_channels=2816, num_head_channels=64,
                 use_linear_in_transformer=True, use_spatial_transformer=True, legacy=False,
                 num_classes="sequential", use_checkpoint=False, use_temporal_attention=False,
                 use_temporal_resblock=False)


def register_tiny_sdxl() -> None:
    """Let ComfyUI's real loaders recognise the tiny UNet (checkpoint detection) and the tiny
    diffusers-format ControlNet (whose config detection only knows full-size layouts)."""
    import comfy.model_detection as detection
    import comfy.supported_models as supported

    if not any(getattr(m, "tiny_for_tests", False) for m in supported.models):
        class TinySDXL(supported.SDXL):
            tiny_for_tests = True
            unet_config = {"model_channels": TINY_CHANNELS, "use_linear_in_transformer": True,
                           "transformer_depth": [0, 0, 2, 2, 10, 10], "context_dim": 2048,
                           "adm_in_channels": 2816, "use_temporal_attention": False}
        supported.models.insert(0, TinySDXL)

    stock = detection.unet_config_from_diffusers_unet
    if getattr(stock, "tiny_for_tests", False):
        return

    def with_tiny(state_dict, dtype=None):
        config = stock(state_dict, dtype)
        if config is None and state_dict["conv_in.weight"].shape[0] == TINY_CHANNELS:
            config = detection.convert_config({**TINY_SDXL, "dtype": dtype})
        return config
    with_tiny.tiny_for_tests = True
    detection.unet_config_from_diffusers_unet = with_tiny


def _fill_random(module: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    with torch.no_grad():
        for p in module.parameters():
            generator = torch.Generator(device=p.device).manual_seed(seed)
            seed += 1
            p.copy_(torch.randn(p.shape, generator=generator, device=p.device, dtype=torch.float32).to(p.dtype) * std)


def sdxl_layout(channels: int = TINY_CHANNELS) -> dict:
    """SDXL's UNet/ControlNet configuration with the given base width (320 is the real SDXL)."""
    return dict(TINY_SDXL, model_channels=channels)


def build_tiny_unet(seed: int = 0, channels: int = TINY_CHANNELS, device: str = "cpu",
                    dtype: torch.dtype = torch.float32):
    """A ComfyUI ModelPatcher around a random SDXL-layout UNet (tiny by default)."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SDXL(dict(sdxl_layout(channels), dtype=dtype))
    config.set_inference_dtype(dtype, None)
    model = comfy.model_base.SDXL(config, model_type=comfy.model_base.ModelType.EPS, device=device)
    _fill_random(model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device(device),
                                            offload_device=torch.device(device))


def build_controlnet_module(seed: int = 1, channels: int = TINY_CHANNELS, device: str = "cpu",
                            dtype: torch.dtype = torch.float32):
    """A random SDXL-layout ControlNet module (IdentityNet-shaped: context 2048, ADM 2816)."""
    import comfy.cldm.cldm
    import comfy.ops

    config = {k: v for k, v in sdxl_layout(channels).items() if k != "out_channels"}
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init,
                                     device=device, dtype=dtype, **config)
    _fill_random(net, seed)
    return net


def write_tiny_unet(path: Path, seed: int = 0) -> Path:
    import safetensors.torch
    path.parent.mkdir(parents=True, exist_ok=True)
    state = build_tiny_unet(seed).model.diffusion_model.state_dict()
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _ldm_to_diffusers_controlnet_keys(state: dict) -> dict:
    """Rename an LDM-format ControlNet state dict to diffusers names (the inverse of ComfyUI's
    load path), so the file exercises the same code as the real IdentityNet."""
    import comfy.model_detection as detection
    import comfy.utils

    config = detection.convert_config(dict(TINY_SDXL))
    names = {ldm: diffusers for diffusers, ldm in comfy.utils.unet_to_diffusers(config).items()
             if not diffusers.startswith("class_embedding.")}
    names.update({"middle_block_out.0.weight": "controlnet_mid_block.weight",
                  "middle_block_out.0.bias": "controlnet_mid_block.bias"})
    for i in range(len({k.split(".")[1] for k in state if k.startswith("zero_convs.")})):
        for suffix in ("weight", "bias"):
            names[f"zero_convs.{i}.0.{suffix}"] = f"controlnet_down_blocks.{i}.{suffix}"
    hint_layers = sorted({int(k.split(".")[1]) for k in state if k.startswith("input_hint_block.")})
    for j, n in enumerate(hint_layers):
        name = "conv_in" if j == 0 else ("conv_out" if j == len(hint_layers) - 1 else f"blocks.{j - 1}")
        for suffix in ("weight", "bias"):
            names[f"input_hint_block.{n}.{suffix}"] = f"controlnet_cond_embedding.{name}.{suffix}"
    return {names[k]: v for k, v in state.items()}


def write_tiny_identitynet(path: Path, seed: int = 1) -> Path:
    """A tiny SDXL ControlNet (context 2048, ADM 2816) in diffusers key format."""
    import safetensors.torch

    path.parent.mkdir(parents=True, exist_ok=True)
    state = _ldm_to_diffusers_controlnet_keys(build_controlnet_module(seed).state_dict())
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def write_sd15_controlnet(path: Path, seed: int = 2) -> Path:
    """A small ControlNet whose cross-attention takes 768-wide (SD1.5) context, in LDM format."""
    import comfy.cldm.cldm
    import comfy.ops
    import safetensors.torch

    # transformer_depth per input block (ComfyUI's ControlNet takes a list, not an int); 64-wide heads
    # and channels because ComfyUI rebuilds an unrecognised ControlNet with 64-channel heads.
    config = dict(image_size=32, in_channels=4, model_channels=64, num_res_blocks=1, channel_mult=[1, 2],
                  transformer_depth=[1, 1], transformer_depth_middle=1, num_head_channels=64,
                  context_dim=768, use_linear_in_transformer=False, use_spatial_transformer=True,
                  legacy=False, use_checkpoint=False)
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init,
                                     device="cpu", dtype=torch.float32, **config)
    _fill_random(net, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def adapter_state(widths: list[int], seed: int = 3, dtype: torch.dtype = torch.float32) -> dict:
    """{"image_proj": Resampler state, "ip_adapter": {"1.to_k_ip.weight": [C, 2048], ...}} with the
    published layout; per-layer widths as given (the UNet's cross-attention widths)."""
    from instantid.sdxl import ADAPTER_LAYER_NUMBERS, CONTEXT_DIM, adapter_key_names
    from resampler import RESAMPLER_CONFIG, Resampler

    generator = torch.Generator().manual_seed(seed)
    resampler = Resampler(**RESAMPLER_CONFIG)
    with torch.no_grad():
        for name, p in resampler.named_parameters():
            if name.endswith("weight") and p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * (0.02 if p.ndim > 1 else 0.1))
    projections = {}
    for number, width in zip(ADAPTER_LAYER_NUMBERS, widths):
        for name in adapter_key_names(number):
            # Large values so the face attention visibly moves the tiny UNet's random-weight output.
            scale = 30.0 if "to_v_ip" in name else 1.0
            projections[name] = (torch.randn(width, CONTEXT_DIM, generator=generator) * scale / CONTEXT_DIM ** 0.5).to(dtype)
    return {"image_proj": {k: v.to(dtype) for k, v in resampler.state_dict().items()}, "ip_adapter": projections}


def write_adapter_bin(path: Path, state: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, str(path))
    return path


def write_adapter_safetensors(path: Path, state: dict) -> Path:
    import safetensors.torch
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {f"{section}.{k}": v.contiguous() for section in ("image_proj", "ip_adapter") for k, v in state[section].items()}
    safetensors.torch.save_file(flat, str(path))
    return path


# ---------------------------------------------------------------- other model families (wrong input) --
# Tiny random-weight models of the families users connect by mistake, built from ComfyUI's own
# model configs and model classes, so the checks see exactly what ComfyUI's loaders would give them.


def _patcher(model):
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def _unet_family(config_class, model_type, context_dim: int, channels: int, linear: bool, seed: int):
    import comfy.model_base

    unet_config = dict(image_size=32, in_channels=4, out_channels=4, model_channels=channels, num_res_blocks=[1, 1],
                       channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_middle=1,
                       transformer_depth_output=[1, 1, 1, 1], context_dim=context_dim, adm_in_channels=None,
                       use_linear_in_transformer=linear, use_spatial_transformer=True, legacy=False,
                       use_checkpoint=False, use_temporal_attention=False, use_temporal_resblock=False,
                       dtype=torch.float32)
    config = config_class(unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.BaseModel(config, model_type=model_type, device="cpu")
    _fill_random(model, seed)
    return _patcher(model)


def build_tiny_sd15(seed: int = 10):
    """A ComfyUI ModelPatcher around a tiny SD1.5-family UNet (768-wide text context)."""
    import comfy.model_base
    import comfy.supported_models

    return _unet_family(comfy.supported_models.SD15, comfy.model_base.ModelType.EPS, 768, 32, False, seed)


def build_tiny_sd2(seed: int = 11):
    """A ComfyUI ModelPatcher around a tiny SD2-family UNet (1024-wide text context, v-prediction)."""
    import comfy.model_base
    import comfy.supported_models

    return _unet_family(comfy.supported_models.SD20, comfy.model_base.ModelType.V_PREDICTION, 1024, 64, True, seed)


def build_tiny_sd3(seed: int = 12):
    """A ComfyUI ModelPatcher around a tiny SD3-family MMDiT (2 joint blocks, hidden 128)."""
    import comfy.model_base
    import comfy.supported_models

    unet_config = dict(in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, adm_in_channels=32,
                       context_embedder_config={"target": "torch.nn.Linear",
                                                "params": {"in_features": 64, "out_features": 128}},
                       num_patches=64, pos_embed_max_size=8, pos_embed_scaling_factor=None,
                       x_block_self_attn_layers=[], dtype=torch.float32)
    config = comfy.supported_models.SD3(unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.SD3(config, device="cpu")
    _fill_random(model, seed)
    return _patcher(model)


def build_tiny_flux(seed: int = 13, **layout):
    """A ComfyUI ModelPatcher around a tiny Flux-family DiT (1 double and 1 single block, hidden 64);
    `layout` overrides its configuration (widths, depths, guidance embedding)."""
    import comfy.model_base
    import comfy.supported_models

    unet_config = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64,
                       hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1,
                       axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=False,
                       txt_ids_dims=[], dtype=torch.float32) | layout
    config = comfy.supported_models.Flux(unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.Flux(config, device="cpu")
    _fill_random(model, seed)
    return _patcher(model)


def write_control_lora(path: Path, seed: int = 14) -> Path:
    """A minimal Control-LoRA file (the `lora_controlnet` marker plus a hint block), as SAI ships them."""
    import safetensors.torch

    generator = torch.Generator().manual_seed(seed)
    state = {"lora_controlnet": torch.tensor([]),
             "input_hint_block.0.weight": torch.randn(16, 3, 3, 3, generator=generator) * 0.02,
             "input_hint_block.0.bias": torch.zeros(16)}
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, str(path))
    return path


def write_t2i_adapter(path: Path, seed: int = 15) -> Path:
    """A small T2I-Adapter (SD1.5-style full adapter, 8 base channels) in the layout ComfyUI detects."""
    import comfy.t2i_adapter.adapter
    import safetensors.torch

    adapter = comfy.t2i_adapter.adapter.Adapter(cin=3 * 8 * 8, channels=[8, 16, 32, 32], nums_rb=2, ksize=1, sk=True,
                                                use_conv=False, xl=False)
    _fill_random(adapter, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, str(path))
    return path
