"""An independent IR-SE50 forward for the parity test: the state dict's tensors through torch's
functional ops, in the order of facexlib's Backbone (TreB1eN's InsightFace_Pytorch), reading the
unit structure from the keys alone. Deliberately plain: no modules, no shared code with the pack."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _bn(x: torch.Tensor, state: dict, prefix: str) -> torch.Tensor:
    return F.batch_norm(x, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"], state[f"{prefix}.weight"],
                        state[f"{prefix}.bias"], training=False, eps=1e-5)


def irse50_forward(state: dict, faces: torch.Tensor) -> torch.Tensor:
    """[B, 3, 112, 112] in [-1, 1] -> [B, 512] unit vectors."""
    x = F.conv2d(faces, state["input_layer.0.weight"], padding=1)
    x = F.prelu(_bn(x, state, "input_layer.1"), state["input_layer.2.weight"])
    unit = 0
    while f"body.{unit}.res_layer.1.weight" in state:
        p = f"body.{unit}"
        width_in, width_out = state[f"{p}.res_layer.0.weight"].shape[0], state[f"{p}.res_layer.1.weight"].shape[0]
        # The first unit of each stage (where the width changes, and the very first unit) strides by 2.
        stride = 2 if unit == 0 or width_in != width_out else 1
        if f"{p}.shortcut_layer.0.weight" in state:
            shortcut = _bn(F.conv2d(x, state[f"{p}.shortcut_layer.0.weight"], stride=stride), state, f"{p}.shortcut_layer.1")
        else:
            shortcut = F.max_pool2d(x, 1, stride)
        r = _bn(x, state, f"{p}.res_layer.0")
        r = F.prelu(F.conv2d(r, state[f"{p}.res_layer.1.weight"], padding=1), state[f"{p}.res_layer.2.weight"])
        r = _bn(F.conv2d(r, state[f"{p}.res_layer.3.weight"], stride=stride, padding=1), state, f"{p}.res_layer.4")
        gate = F.adaptive_avg_pool2d(r, 1)
        gate = torch.sigmoid(F.conv2d(F.relu(F.conv2d(gate, state[f"{p}.res_layer.5.fc1.weight"])),
                                      state[f"{p}.res_layer.5.fc2.weight"]))
        x = r * gate + shortcut
        unit += 1
    x = _bn(x, state, "output_layer.0").flatten(1)
    x = F.linear(x, state["output_layer.3.weight"], state["output_layer.3.bias"])
    x = _bn(x, state, "output_layer.4")
    return x / x.norm(dim=1, keepdim=True)
