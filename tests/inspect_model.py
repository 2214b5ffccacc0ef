"""Print a JSON summary of a saved model, in its own process:

    python -m tests.inspect_model onnx|torch|torch_quantized PATH [PATH ...]

One JSON line per PATH (several models of a kind in one process: one import of the frameworks).

onnx: quant_checks.onnx_summary. torch (a float torch.export program) and torch_quantized (a
quantize_torch directory): what runs (execution.measure) and how many weights are stored as
int8. Each with the model's scores on a fixed random input ("scores"), to compare a quantized
model's outputs with its parent's.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from stages.lib import execution, quant_checks, runners

def torch_int8_weights(kind: str, path: Path) -> int:
    """How many weight tensors (2 or more dimensions) a saved torch model stores as int8: the
    state of a torch.export program (`torch`, `torch_x86`), or the constants of the XNNPACK graphs
    inside an ExecuTorch program (`executorch`: per-channel int8, XNNPACK's qcint8)."""
    if kind == "executorch":
        from executorch.exir._serialize._program import deserialize_pte_binary

        from stages.lib.execution import xnnpack_graph

        program = deserialize_pte_binary(Path(path).read_bytes()).program
        count = 0
        for delegate in program.execution_plan[0].delegates:
            graph = xnnpack_graph(program.backend_delegate_data[delegate.processed.index].data)
            for value in graph["xvalues"]:
                tensor = value["xvalue_union"].get("tensor_value", value["xvalue_union"])
                count += (tensor.get("datatype") == "xnn_datatype_qcint8" and tensor.get("constant_buffer_idx", 0) > 0
                          and tensor.get("num_dims", 0) >= 2)
        return count
    import io

    import torch

    from stages.lib.runners import exported_module

    exported_module(path)  # registers the quantized operators the program names
    program = torch.export.load(io.BytesIO(Path(path).read_bytes()))
    return sum(1 for t in program.state_dict.values() if t.dtype == torch.int8 and t.dim() >= 2)


def summary(kind: str, path: Path) -> dict:
    if kind == "onnx":
        found = quant_checks.onnx_summary(path)
    else:
        file_kind, file = runners.torch_quantized_model(path) if kind == "torch_quantized" else (kind, path)
        found = {"execution": execution.measure(file_kind, file), "int8_weights": torch_int8_weights(file_kind, file)}
    x = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3)).astype(np.float32)
    found["scores"] = runners.load_runner(kind, path)(x).tolist()
    return found


if __name__ == "__main__":
    for path in sys.argv[2:]:
        print(json.dumps(summary(sys.argv[1], Path(path))), flush=True)
