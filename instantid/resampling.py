"""Where the pack's Resampler comes from: resampler.py sits at the repo root (the design card), a
sibling of this package when ComfyUI loads the pack and a top-level module when tests or the CLI
import `instantid` with the repo root on sys.path. Every back end imports it from here."""
try:  # the pack loaded by ComfyUI: resampler.py is a sibling module of this package
    from ..resampler import RESAMPLER_CONFIG, Resampler
except ImportError:  # instantid imported directly (tests, CLI): the repo root is on sys.path
    from resampler import RESAMPLER_CONFIG, Resampler

__all__ = ["RESAMPLER_CONFIG", "Resampler"]
