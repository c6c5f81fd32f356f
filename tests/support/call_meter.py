"""Counting (and timing) the calls of chosen callables while a block runs: an object's method, a
torch module's forward or a Python module's function, replaced on that object only and restored on
exit. The FLUX benchmark and the InfiniteYou tests use it to show what runs once per reference and
what runs per step."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Self

_CLASS_ATTRIBUTE = object()  # the attribute was the class's, not set on the instance


class CallMeter:
    """`with CallMeter({"irse50": (network, "forward")}) as meter: ...` then meter.calls["irse50"]
    and meter.seconds["irse50"] (time spent inside by `clock`, wall time by default)."""

    def __init__(self, targets: dict[str, tuple[Any, str]], clock: Callable[[], float] = time.perf_counter) -> None:
        self.targets = targets
        self.clock = clock
        self._saved: list[tuple[Any, str, Any]] = []
        self.calls = dict.fromkeys(targets, 0)
        self.seconds = dict.fromkeys(targets, 0.0)

    def __enter__(self) -> Self:
        for name, (owner, attribute) in self.targets.items():
            real = getattr(owner, attribute)
            self._saved.append((owner, attribute, vars(owner).get(attribute, _CLASS_ATTRIBUTE)))

            def metered(*args: Any, _name: str = name, _real: Any = real, **kwargs: Any) -> Any:
                self.calls[_name] += 1
                start = self.clock()
                try:
                    return _real(*args, **kwargs)
                finally:
                    self.seconds[_name] += self.clock() - start
            setattr(owner, attribute, metered)
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, attribute, saved in reversed(self._saved):
            if saved is _CLASS_ATTRIBUTE:
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, saved)
        self._saved.clear()

    def reset(self) -> None:
        self.calls = dict.fromkeys(self.targets, 0)
        self.seconds = dict.fromkeys(self.targets, 0.0)


def copied_bytes(used: Any, loaded: Any) -> int:
    """Bytes of `used`'s parameters and buffers (a torch module) whose storage is not one of
    `loaded`'s: 0 when `used` shares every weight with the loaded model instead of copying it."""
    def tensors(module: Any) -> list:
        return [*module.parameters(), *module.buffers()]
    shared = {t.untyped_storage().data_ptr() for t in tensors(loaded)}
    return sum(t.numel() * t.element_size() for t in tensors(used) if t.untyped_storage().data_ptr() not in shared)
