"""Speed and memory of InstantID against its floor, measured side by side in one process.

    python scripts/benchmark.py --device cpu     # tiny SDXL layout, 64x64 (what CI machines can run)
    python scripts/benchmark.py --device cuda    # the real SDXL configuration, fp16, 1024^2, 768^2, 1344x768

Models have SDXL's architecture (the tiny layout on CPU) with random weights, an IdentityNet-shaped
ControlNet and an adapter with the real layout; face analysis runs the real insightface code on the
synthetic antelopev2 of the test suite. Per-step time is (T(n2 steps) - T(n1 steps)) / (n2 - n1), so
fixed per-sample costs cancel, taken as the median over repeats with the variants interleaved.
Printed: per-step times and ratios (plain UNet; + IdentityNet; + ApplyInstantID; attention patch
only), the cost of model.clone() on a patched model, GPU memory added by the adapter, host syncs
per UNet call, and face-analysis time and ONNX session count.

    python scripts/benchmark.py --case flux      # the FLUX case alone (InfiniteYou)

The FLUX case samples the FLUX test bed (FLUX.1-dev's real widths and layout, 1 double + 1 single
block, random bf16 weights, loaded by ComfyUI's own loaders; built once per machine) at cfg 1 with
FluxGuidance, as FLUX-dev graphs run, with (a) ApplyInfiniteYou and (b) the same InfuseNet file
loaded by ComfyUI's ControlNet loader and applied by ComfyUI's ControlNetApplyAdvanced on the same
keypoint hint. (b) is given the same 8 identity tokens through ComfyUI's own `cross_attn_controlnet`
conditioning key, so both run the same arithmetic and the ratio is what the Apply's control object
adds. Printed: the paired ratio with its per-repeat range, whether the Apply copied any weight, the
Apply's own time beyond face analysis, and how often IR-SE50 and the projection run in a sampling run.
"""
from __future__ import annotations

import argparse
import copy
import gc
import logging
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
import warnings
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO_ROOT))
sys.path.append(str(REPO_ROOT / "tests"))

from instantid.commands.comfy_home import find_comfyui, why_not_found  # noqa: E402


def say(text: str = "") -> None:
    """One line of the report on stdout (this script's output is its result)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--case", choices=["all", "sdxl", "flux"], default="all",
                        help="sdxl: InstantID on the SDXL layout; flux: InfiniteYou on the FLUX bed (default: both)")
    parser.add_argument("--comfyui", type=Path, default=None, help="ComfyUI folder (default: found like the tests do)")
    parser.add_argument("--sizes", default=None, help="comma-separated WxH list (default: 64x64 on cpu; 1024x1024,768x768,1344x768 on cuda)")
    parser.add_argument("--steps", default=None, help="n1,n2 step counts (default 2,6 on cpu; 4,12 on cuda)")
    parser.add_argument("--flux-size", default=None, help="WxH of the FLUX case (default: 64x64 on cpu; 1024x1024 on cuda)")
    parser.add_argument("--flux-steps", default=None, help="n1,n2 step counts of the FLUX case (default 1,3 on cpu; 4,12 on cuda)")
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args()


def boot_comfy(comfyui: Path, device: str) -> None:
    sys.path.insert(0, str(comfyui))
    from comfy.cli_args import args
    args.cpu = device == "cpu"
    logging.getLogger().setLevel(logging.WARNING)


def conditioning(seed: int) -> list:
    import torch
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 2048, generator=generator), {"pooled_output": torch.randn(1, 1280, generator=generator)}]]


def random_adapter(widths: list[int]):
    """An InstantIDAdapter with the published layout and random weights, built in memory."""
    import torch
    from support.tiny_models import adapter_state

    from instantid.adapter import InstantIDAdapter
    state = adapter_state(widths, dtype=torch.float16)
    projections = [(state["ip_adapter"][f"{n}.to_k_ip.weight"], state["ip_adapter"][f"{n}.to_v_ip.weight"])
                   for n in range(1, 140, 2)]
    return InstantIDAdapter(Path("random-ip-adapter.bin"), state["image_proj"], projections)


def synthetic_face(width: int, height: int, green: int = 128):
    """A synthetic face the test detector finds; its embedding depends on `green` (a new value: a new
    identity, no cache hit anywhere)."""
    import numpy as np
    import torch
    from support import antelope
    pixels = np.zeros((height, width, 3), np.uint8)
    antelope.draw_face(pixels, (4, 3), green, antelope.det_scale_for(height, width, 640))
    return torch.from_numpy(pixels).float()[None] / 255.0


def timed_sample(model, positive, negative, latent, steps: int, device: str, cfg: float = 5.0) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for one sampling run of ComfyUI's sampler."""
    import comfy.sample
    import torch
    noise = comfy.sample.prepare_noise(latent, 0)
    if device == "cuda":
        torch.cuda.synchronize()
    gc.collect()
    gc.disable()  # as timeit does: a garbage collection inside one sample is noise, not cost
    try:
        start, cpu_start = time.perf_counter(), time.process_time()
        comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent, denoise=1.0,
                            seed=0, disable_pbar=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        gc.enable()


def empty_latent(width: int, height: int, channels: int = 4):
    import torch
    return torch.zeros(1, channels, height // 8, width // 8)


RATIOS = (("identitynet", "unet"), ("instantid", "identitynet"), ("attention", "unet"))


@dataclass
class StepTimes:
    """Seconds per step of each variant, one value per repeat: wall clock and this process's CPU time."""
    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]

    def median(self, name: str, clock: str = "wall") -> float:
        return statistics.median(getattr(self, clock)[name])

    def ratios(self, a: str, b: str, clock: str = "wall") -> list[float]:
        """a / b within each repeat (the variants of a repeat ran back to back)."""
        times = getattr(self, clock)
        return [x / y for x, y in zip(times[a], times[b])]

    def ratio(self, a: str, b: str, clock: str = "wall") -> float:
        return statistics.median(self.ratios(a, b, clock))


def per_step_times(variants: dict, latent, n1: int, n2: int, repeats: int, device: str, cfg: float = 5.0) -> StepTimes:
    """Seconds per step of each variant, per repeat. Ratios are best taken within one repeat
    (StepTimes.ratio): the variants of a repeat run back to back (in alternating order), so a slow
    drift of the machine cancels in the ratio instead of in the medians."""
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for name, (model, positive, negative) in variants.items():  # warm-up: loads models, compiles kernels
        timed_sample(model, positive, negative, latent, n1, device, cfg)
    for repeat in range(repeats):
        order = list(variants.items()) if repeat % 2 == 0 else list(variants.items())[::-1]
        for name, (model, positive, negative) in order:
            short = timed_sample(model, positive, negative, latent, n1, device, cfg)
            long = timed_sample(model, positive, negative, latent, n2, device, cfg)
            wall[name].append((long[0] - short[0]) / (n2 - n1))
            cpu[name].append((long[1] - short[1]) / (n2 - n1))
    spread = {name: (max(v) - min(v)) / statistics.median(v) for name, v in wall.items()}
    say(f"  ({latent.shape[-1] * 8}x{latent.shape[-2] * 8} run-to-run spread of the per-step time, (max-min)/median: "
        + ", ".join(f"{name} {value:.0%}" for name, value in spread.items()) + ")")
    return StepTimes(wall, cpu)


def clone_cost(patched) -> tuple[float, int, bool]:
    """Mean ms per clone(), bytes allocated by one clone, and whether the clone shares the face K/V."""
    clones = 100
    start = time.perf_counter()
    for _ in range(clones):
        patched.clone()
    per_clone_ms = (time.perf_counter() - start) * 1000 / clones
    tracemalloc.start()
    clone = patched.clone()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    key = next(iter(patched.model_options["transformer_options"]["patches_replace"]["attn2"]))
    original = patched.model_options["transformer_options"]["patches_replace"]["attn2"][key].branches[0]
    copied = clone.model_options["transformer_options"]["patches_replace"]["attn2"][key].branches[0]
    return per_clone_ms, peak, copied.k_face.data_ptr() == original.k_face.data_ptr()


def host_syncs(model, device: str, width: int, height: int) -> int:
    """Synchronising CUDA calls during one UNet call, counted with torch's sync debug mode."""
    import torch
    if device != "cuda":
        return -1
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, height // 8, width // 8, generator=generator).cuda()
    sigmas = torch.full((2,), 5.0, device="cuda")
    options = dict(copy.copy(model.model_options["transformer_options"]), cond_or_uncond=[1, 0], sigmas=sigmas)
    context = torch.randn(2, 77, 2048, generator=generator).cuda()
    y = torch.randn(2, 2816, generator=generator).cuda()
    import comfy.model_management
    comfy.model_management.load_models_gpu([model])
    with torch.no_grad():
        model.model.apply_model(x, sigmas, c_crossattn=context, y=y, transformer_options=options)  # warm-up
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                model.model.apply_model(x, sigmas, c_crossattn=context, y=y, transformer_options=options)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def sdxl_case(options: argparse.Namespace, analyzer) -> None:
    """InstantID on the SDXL layout: per-step ratios, clone cost, adapter memory, host syncs."""
    import comfy.controlnet
    import torch
    from support.tiny_models import (
        TINY_CHANNELS,
        build_controlnet_module,
        build_tiny_unet,
    )

    from instantid.apply import apply_attention_only, apply_instantid
    from instantid.control import attach_identitynet
    from instantid.face_inputs import detect_faces
    from instantid.keypoints import keypoint_image_batch
    from instantid.sdxl import attn2_widths

    cuda = options.device == "cuda"
    device, dtype, channels = ("cuda", torch.float16, 320) if cuda else ("cpu", torch.float32, TINY_CHANNELS)
    sizes = [tuple(int(v) for v in s.split("x")) for s in (options.sizes or ("1024x1024,768x768,1344x768" if cuda else "64x64")).split(",")]
    n1, n2 = (int(v) for v in (options.steps or ("4,16" if cuda else "2,6")).split(","))

    started = time.perf_counter()
    model = build_tiny_unet(seed=0, channels=channels, device=device, dtype=dtype)
    control_net = comfy.controlnet.ControlNet(build_controlnet_module(seed=1, channels=channels, device=device, dtype=dtype),
                                              load_device=torch.device(device), manual_cast_dtype=None)
    adapter = random_adapter(attn2_widths(model.model.diffusion_model))
    built = time.perf_counter() - started
    positive, negative = conditioning(1), conditioning(2)

    say(f"# InstantID benchmark: {machine_name(cuda)}; torch {torch.__version__}; UNet base width {channels} "
          f"({'real SDXL config' if cuda else 'tiny SDXL layout'}), {dtype}; per-step = (T({n2}) - T({n1}))/{n2 - n1}, "
          f"median of {options.repeats} (ratios: median of the per-repeat ratios); batch 1 with CFG; models built in {built:.1f} s")
    say("| size | UNet ms/step | +IdentityNet | +ApplyInstantID | attention only | IdentityNet/UNet | "
        "ApplyInstantID/(UNet+IdentityNet) | attention/UNet |")
    say("|---|---|---|---|---|---|---|---|")
    instantid_model = None
    cpu_notes: list[str] = []
    for width, height in sizes:
        face = synthetic_face(width, height)
        outcome = apply_instantid(adapter=adapter, face_analysis=analyzer, control_net=control_net, image=face, model=model,
                                  positive=positive, negative=negative, ip_weight=0.8, cn_strength=0.8, start_at=0.0, end_at=1.0)
        attention = apply_attention_only(adapter=adapter, face_analysis=analyzer, image=face, model=model, weight=0.8,
                                         start_at=0.0, end_at=1.0)
        keypoints = keypoint_image_batch([detect_faces(analyzer, face)[0].kps], width, height)
        floor = attach_identitynet(positive, negative, control_net, keypoints, 0.8, 0.0, 1.0,
                                   outcome.face_tokens.cond, outcome.face_tokens.uncond)
        variants = {"unet": (model, positive, negative), "identitynet": (model, *floor),
                    "instantid": (outcome.model, outcome.positive, outcome.negative),
                    "attention": (attention.model, positive, negative)}
        times = per_step_times(variants, empty_latent(width, height), n1, n2, options.repeats, options.device)
        say(f"| {width}x{height} | {times.median('unet') * 1000:.1f} | {times.median('identitynet') * 1000:.1f} | "
            f"{times.median('instantid') * 1000:.1f} | {times.median('attention') * 1000:.1f} | "
            + " | ".join(f"{times.ratio(*pair):.3f}" for pair in RATIOS) + " |")
        cpu_notes.append(f"{width}x{height}: " + ", ".join(f"{name} {times.median(name, 'cpu') * 1000:.1f}" for name in variants))
        instantid_model = outcome.model

    say()
    say("host CPU ms per step (process time; close to the wall time means the run is launch-bound): " + "; ".join(cpu_notes))
    per_clone_ms, clone_bytes, shared = clone_cost(instantid_model)
    say(f"clone() of the patched model: {per_clone_ms:.2f} ms; {clone_bytes / 1e6:.2f} MB allocated by one clone; "
          f"face K/V shared with the original (no copy): {shared}")
    adapter_params = sum(k.numel() + v.numel() for k, v in adapter.projections) + sum(p.numel() for p in adapter.resampler.parameters())
    kv_bytes = sum(k.numel() * 2 + v.numel() * 2 for k, v in adapter.layer_kv(outcome.face_tokens)) // 2  # fp16 on the GPU
    say(f"adapter: {adapter_params / 1e6:.1f} M parameters kept on the CPU; what sampling needs on the device is the "
          f"face K/V of 70 layers: {kv_bytes / 1e6:.2f} MB at fp16")
    if cuda:
        width, height = sizes[0]
        latent = empty_latent(width, height)
        peaks = {}
        for name, (m, p, n) in {"identitynet": (model, *floor), "instantid": (instantid_model, outcome.positive, outcome.negative)}.items():
            timed_sample(m, p, n, latent, 1, "cuda")  # loads what this variant needs
            torch.cuda.reset_peak_memory_stats()
            timed_sample(m, p, n, latent, 2, "cuda")
            peaks[name] = torch.cuda.max_memory_allocated()
        say(f"peak GPU memory at {width}x{height}: UNet+IdentityNet {peaks['identitynet'] / 2**30:.3f} GiB, "
              f"ApplyInstantID {peaks['instantid'] / 2**30:.3f} GiB, added by the adapter {(peaks['instantid'] - peaks['identitynet']) / 2**20:.1f} MiB")
        say(f"host syncs in one UNet call at {width}x{height}: plain {host_syncs(model, 'cuda', width, height)}, "
              f"attention-patched {host_syncs(attention.model, 'cuda', width, height)}")
    say()


FLUX_GUIDANCE = 3.5  # FluxGuidance's default, as FLUX-dev graphs run at cfg 1


def flux_conditioning(seed: int, tokens: int) -> list:
    """Seeded FLUX-shaped text conditioning (T5 tokens 4096 wide, CLIP-L pooled 768)."""
    import torch
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, 4096, generator=generator), {"pooled_output": torch.randn(1, 768, generator=generator)}]]


def flux_case(options: argparse.Namespace, analyzer) -> None:
    """InfiniteYou on the FLUX bed: ApplyInfiniteYou against the same InfuseNet as a plain
    ControlNet, weight sharing, the Apply's own time, and what runs once per reference."""
    import comfy.controlnet
    import node_helpers
    import torch
    from comfy_extras.nodes_flux import FluxGuidance
    from support.call_meter import CallMeter, copied_bytes
    from support.flux_bed import HIDDEN, cached_flux_files, load_flux_model
    from support.flux_reference import StandInVAE
    from support.infiniteyou_models import write_infiniteyou_files

    import nodes as comfy_nodes
    from instantid import face_inputs
    from instantid.face_inputs import detect_faces
    from instantid.flux_apply import apply_infiniteyou
    from instantid.infiniteyou import load_infiniteyou
    from instantid.keypoints import keypoint_image_batch

    cuda = options.device == "cuda"
    width, height = (int(v) for v in (options.flux_size or ("1024x1024" if cuda else "64x64")).split("x"))
    n1, n2 = (int(v) for v in (options.flux_steps or ("4,12" if cuda else "1,3")).split(","))
    text_tokens = 256 if cuda else 32  # ComfyUI pads FLUX's T5 prompt to 256; a short prompt keeps the CPU run short

    started = time.perf_counter()
    flux_file, infusenet_file = cached_flux_files()  # built on first use (about half a minute), then cached
    # Both through ComfyUI's loaders (Load Diffusion Model, Load ControlNet Model), weights kept in the
    # bed's bf16: computed in bf16 on CUDA, cast per layer to fp32 on the CPU (fp32 copies would take
    # ~4.4 GB, more than a test machine gives one process).
    model = load_flux_model(flux_file)
    infusenet = comfy.controlnet.load_controlnet(str(infusenet_file), model_options={"dtype": torch.bfloat16})
    with tempfile.TemporaryDirectory() as folder:
        infiniteyou = load_infiniteyou(*write_infiniteyou_files(Path(folder)))
    built = time.perf_counter() - started
    vae = StandInVAE()
    (positive,) = FluxGuidance.execute(flux_conditioning(3, text_tokens), FLUX_GUIDANCE).args
    (negative,) = comfy_nodes.ConditioningZeroOut().zero_out(positive)

    def apply(face):
        return apply_infiniteyou(model=infiniteyou, control_net=infusenet, vae=vae, positive=positive, negative=negative,
                                 face_analysis=analyzer, image=face, image_kps=face)

    face = synthetic_face(width, height)
    outcome = apply(face)
    control = outcome.positive[0][1]["control"]
    keypoints = keypoint_image_batch([detect_faces(analyzer, face)[0].kps], width, height)
    # The plain ControlNet gets the same 8 identity tokens through ComfyUI's own ControlNet-context key.
    floor_positive = node_helpers.conditioning_set_values(positive, {"cross_attn_controlnet": outcome.face_embeds.tokens})
    floor = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(floor_positive, negative, infusenet, keypoints, 1.0,
                                                                   0.0, 1.0, vae=vae)
    same_hint = torch.equal(control.cond_hint_original, floor[0][0][1]["control"].cond_hint_original)
    weights = [*infusenet.control_model.parameters()]

    say(f"# InfiniteYou (FLUX) benchmark: {machine_name(cuda)}; torch {torch.__version__}; FLUX.1-dev layout at real "
        f"width {HIDDEN}, 1 double + 1 single block, and the InfuseNet (1 + 1 blocks, {sum(p.numel() for p in weights) / 1e6:.0f} M "
        f"parameters, {weights[0].dtype}) loaded by ComfyUI's loaders; {width}x{height}, {text_tokens} text tokens, "
        f"cfg 1 + FluxGuidance {FLUX_GUIDANCE}; per-step = (T({n2}) - T({n1}))/{n2 - n1}, {options.repeats} repeats; "
        f"models loaded in {built:.1f} s")
    variants = {"controlnet": (model, *floor), "infiniteyou": (model, outcome.positive, outcome.negative)}
    latent = empty_latent(width, height, channels=16)
    times = per_step_times(variants, latent, n1, n2, options.repeats, options.device, cfg=1.0)
    say("| size | FLUX + InfuseNet as a plain ControlNet, ms/step | + ApplyInfiniteYou, ms/step | "
        "ApplyInfiniteYou / plain ControlNet (median; per-repeat min-max) | same, by process CPU time |")
    say("|---|---|---|---|---|")
    ratios, cpu_ratios = times.ratios("infiniteyou", "controlnet"), times.ratios("infiniteyou", "controlnet", "cpu")
    say(f"| {width}x{height} | {times.median('controlnet') * 1000:.1f} | {times.median('infiniteyou') * 1000:.1f} | "
        f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) | "
        f"{statistics.median(cpu_ratios):.3f} ({min(cpu_ratios):.3f}-{max(cpu_ratios):.3f}) |")
    say(f"same keypoint hint on both: {same_hint}")
    say(f"no copy: the Apply's control object holds the loaded InfuseNet module "
        f"({control.control_model is infusenet.control_model}); bytes of its weights outside the loaded InfuseNet's "
        f"storage: {copied_bytes(control.control_model, infusenet.control_model)} of {sum(p.nbytes for p in weights)}")

    recognizer, projection = infiniteyou.recognizer.network, infiniteyou.projection
    # Face analysis: finding the faces (image conversion, detection; the pose image's from the cache),
    # IR-SE50 (crop, network), the projection. Everything else is the Apply's own work.
    parts = {"detection": (face_inputs, "detect_faces"), "irse50": (face_inputs, "recognized_rows"),
             "projection": (projection, "forward"), "drawing check": (face_inputs, "keypoint_drawings")}
    for size in dict.fromkeys([(width, height), (1024, 1024)]):  # the benchmark's size and a real one
        spent: dict[str, list[float]] = {name: [] for name in [*parts, "own"]}
        with CallMeter(parts, clock=time.process_time) as meter:  # CPU time: on a shared machine wall time is others' too
            for green in range(129, 134):  # a new identity each time: every stage runs, no cache hit
                meter.reset()
                start = time.process_time()
                apply(synthetic_face(*size, green))
                total = time.process_time() - start
                for name in parts:
                    spent[name].append(meter.seconds[name])
                spent["own"].append(total - meter.seconds["detection"] - meter.seconds["irse50"] - meter.seconds["projection"])
        ms = {name: statistics.median(values) * 1000 for name, values in spent.items()}
        say(f"ApplyInfiniteYou on a new face at {size[0]}x{size[1]} (median of 5, process CPU ms): its own work {ms['own']:.2f} beyond "
            f"face analysis (of which {ms['drawing check']:.2f} telling a keypoint drawing from a photo in image_kps; the "
            f"rest: drawing the hint, checks, attaching the control) | face analysis: finding the faces "
            f"{ms['detection']:.1f}, IR-SE50 {ms['irse50']:.1f}, projection {ms['projection']:.1f} (once per reference)")

    # One metered sampling run per variant: what runs per reference, and the control object's host
    # work per step outside the InfuseNet forward (the only place the two variants differ).
    result = apply(synthetic_face(width, height, 140))
    runs = {"controlnet": (floor, floor[0][0][1]["control"]), "infiniteyou": ((result.positive, result.negative),
                                                                             result.positive[0][1]["control"])}
    host_ms, calls = {}, {}
    for name, ((run_positive, run_negative), run_control) in runs.items():
        metered = {"irse50": (recognizer, "forward"), "projection": (projection, "forward"),
                   "infusenet": (infusenet.control_model, "forward"), "get_control": (run_control, "get_control")}
        with CallMeter(metered) as meter:
            timed_sample(model, run_positive, run_negative, latent, n2, options.device, cfg=1.0)
        host_ms[name] = (meter.seconds["get_control"] - meter.seconds["infusenet"]) / meter.calls["get_control"] * 1000
        calls[name] = meter.calls
    added = host_ms["infiniteyou"] - host_ms["controlnet"]
    say(f"control object's host work per step outside the InfuseNet forward (mean of {n2} steps, hint encoding "
        f"included): plain ControlNet {host_ms['controlnet']:.2f} ms, ApplyInfiniteYou {host_ms['infiniteyou']:.2f} ms; "
        f"difference {added:+.2f} ms = {added / (times.median('controlnet') * 1000):+.4%} of a step")
    with CallMeter({"irse50": (recognizer, "forward"), "projection": (projection, "forward")}) as meter:
        applied = apply(synthetic_face(width, height, 141))
        timed_sample(model, applied.positive, applied.negative, latent, n2, options.device, cfg=1.0)
    say(f"calls over one Apply (one new reference) and its {n2}-step sampling run: IR-SE50 {meter.calls['irse50']}, "
        f"projection {meter.calls['projection']}; during the sampling run alone: IR-SE50 "
        f"{calls['infiniteyou']['irse50']}, projection {calls['infiniteyou']['projection']}, InfuseNet forward "
        f"{calls['infiniteyou']['infusenet']}")
    say()


def keep_freed_blocks_in_the_heap() -> None:
    """On the CPU, ComfyUI casts the FLUX bed's bf16 weights to fp32 layer by layer at every step, and
    glibc hands each block of over 32 MB back to the system when it is freed: every step then faults
    ~2 GB of fresh pages in again, half the step time and most of its noise on a small machine. Keep
    such blocks in the heap for reuse (glibc's mallopt; elsewhere nothing changes)."""
    import ctypes
    import ctypes.util
    mmap_threshold, trim_threshold = -3, -1  # glibc's M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(mmap_threshold, 2**30)
    mallopt(trim_threshold, 2**31 - 1)


def machine_name(cuda: bool) -> str:
    import torch
    return torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores), {torch.get_num_threads()} compute thread(s)"


def main() -> int:
    options = parse_args()
    comfyui = options.comfyui or find_comfyui()
    if comfyui is None:
        sys.stderr.write(why_not_found() + "\n")
        return 2
    boot_comfy(comfyui, options.device)
    import torch
    from support.antelope import write_antelopev2

    from instantid.faces import FaceAnalyzer

    with tempfile.TemporaryDirectory() as folder:
        analyzer = FaceAnalyzer.load(write_antelopev2(Path(folder) / "antelopev2"), "auto")
    # One compute thread for the timed runs. On the GPU the runs are launch-bound, and idle OpenMP
    # workers spinning after each small CPU op steal cores from the launching thread; on a small CPU
    # machine two threads fight the system for two cores. Either way the timings become erratic.
    torch.set_num_threads(1)
    if options.device == "cpu":
        keep_freed_blocks_in_the_heap()
    if options.case in ("all", "sdxl"):
        sdxl_case(options, analyzer)
    if options.case in ("all", "flux"):
        flux_case(options, analyzer)

    import numpy as np
    detect_calls = []
    detector = analyzer.det_model.detect

    def counting_detect(*args, **kwargs):
        detect_calls.append(kwargs.get("input_size"))
        return detector(*args, **kwargs)
    analyzer.det_model.detect = counting_detect
    timings = []
    for i in range(5):
        pixels = np.zeros((1024, 1024, 3), np.uint8)
        pixels[0, 0, 0] = i + 1  # a new image each time: no cache hit
        from support import antelope
        antelope.draw_face(pixels, (4 + i, 3), 128, antelope.det_scale_for(1024, 1024, 640))
        start = time.perf_counter()
        analyzer.detect(np.ascontiguousarray(pixels[..., ::-1]))
        timings.append(time.perf_counter() - start)
    passes = len(detect_calls) / 5
    start = time.perf_counter()
    analyzer.detect(np.ascontiguousarray(pixels[..., ::-1]))
    cached_ms = (time.perf_counter() - start) * 1000
    say(f"face analysis (synthetic antelopev2, onnxruntime CPU): {statistics.median(timings) * 1000:.2f} ms per 1024x1024 image, "
          f"{passes:.1f} detection pass(es) per image, {cached_ms:.3f} ms for a repeated image (cache); "
          f"ONNX sessions: {analyzer.session_count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
