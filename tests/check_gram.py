"""Print how far AdaRound's full-batch gradient (lib/adaround._Gram, from the Gram matrix of a
layer's inputs) is from autograd's gradient of the same loss over the same images:

    python -m tests.check_gram

For a strided padded conv with bias, a conv without bias, and a Linear, on random float64 data.
"""
from __future__ import annotations

import json

import torch
from torch import nn

from stages.lib import adaround


def relative_error(module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """The larger error of the Gram matrix summed over all images in one group of columns and
    over one image at a time (adaround._Columns.GROUP_BYTES = 0)."""
    weight = module.weight.detach() * 1.01 + 0.003  # not the weight the targets came from
    saved, errors = adaround._Columns.GROUP_BYTES, []
    try:
        for group_bytes in (saved, 0):
            adaround._Columns.GROUP_BYTES = group_bytes
            errors.append(_relative_error(module, inputs, targets, weight))
    finally:
        adaround._Columns.GROUP_BYTES = saved
    return max(errors)


def _relative_error(module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> float:
    full = adaround._Gram(module, inputs, targets, 0).gradient(None, weight)
    reference = adaround._Autograd(module, inputs, targets, 0).gradient(torch.arange(len(inputs)), weight)
    return float((full - reference).abs().max() / reference.abs().max())


if __name__ == "__main__":
    torch.manual_seed(0)
    cases = {}
    for name, conv in {"conv_stride2_pad_bias": nn.Conv2d(6, 5, 3, stride=2, padding=1),
                       "conv_no_bias": nn.Conv2d(4, 3, 3, padding=1, bias=False)}.items():
        conv = conv.double()
        x = torch.randn(12, conv.in_channels, 9, 9, dtype=torch.float64)  # NCHW in memory: _Gram lays it out
        y = (conv(x) + 0.1 * torch.randn_like(conv(x))).detach().contiguous(memory_format=torch.channels_last)
        cases[name] = relative_error(conv, x, y)
    linear = nn.Linear(7, 4).double()
    cases["linear"] = relative_error(linear, torch.randn(9, 7, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64))
    print(json.dumps(cases))
