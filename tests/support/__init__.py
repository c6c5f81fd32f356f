"""Test-only helpers: ComfyUI discovery and boot, tiny models, synthetic face models."""
