"""Print what torch_quant.pattern_passes_skipped_where_they_cannot_match relies on and does, on the
installed ExecuTorch:

    python -m tests.check_pattern_passes

- `patterns_with_op`: per skipped pass, how many of its pattern graphs (built as XNNPACK builds
  them) hold the op PATTERN_PASS_OPS names for it, and how many patterns there are;
- `calls`: which graphs reached the pass's own code inside the context (a recorder stands in for
  it): an exported graph with torch.bmm must, one without (a conv) must not;
- `restored`: whether the pass's own code is back in place after the context.
"""
from __future__ import annotations

import json

import torch
from executorch.backends.xnnpack._passes.convert_to_sdpa import ConvertToSDPAPass
from executorch.backends.xnnpack._passes.convert_to_upsample_bilinear2d import ConvertToUpsampleBilinear2d
from executorch.backends.xnnpack.partition.graphs import bilinear_2d, sdpa

from stages.lib.torch_quant import PATTERN_PASS_OPS, op_names, pattern_passes_skipped_where_they_cannot_match

PATTERNS = {ConvertToUpsampleBilinear2d: bilinear_2d.get_graphs, ConvertToSDPAPass: sdpa.get_graphs}


class Bmm(torch.nn.Module):
    def forward(self, x):
        return torch.bmm(x, x)


def main() -> None:
    result = {"patterns_with_op": {}, "calls": [], "restored": False}
    for cls, graphs in PATTERNS.items():
        patterns = graphs()
        op = PATTERN_PASS_OPS[cls.__name__]
        result["patterns_with_op"][cls.__name__] = [sum(op in op_names(g) for g in patterns), len(patterns)]
    programs = {"bmm": torch.export.export(Bmm(), (torch.ones(1, 2, 2),)),
                "conv": torch.export.export(torch.nn.Conv2d(1, 1, 1), (torch.ones(1, 1, 2, 2),))}
    recorder = lambda self, graph_module: result["calls"].append(name)  # noqa: E731
    saved = ConvertToSDPAPass.call
    ConvertToSDPAPass.call = recorder
    try:
        with pattern_passes_skipped_where_they_cannot_match():
            for name, program in programs.items():
                ConvertToSDPAPass(program).call(program.graph_module)
        result["restored"] = ConvertToSDPAPass.call is recorder
    finally:
        ConvertToSDPAPass.call = saved
    print(json.dumps(result))


if __name__ == "__main__":
    main()
