"""PyTorch models from ONNX (onnx2torch), made exportable, and their persistence with torch.export.

onnx2torch's graph cannot be exported as it comes: its Reshape module branches on data
(`if torch.any(shape == 0)`), which torch.export refuses. `exportable` swaps it for a plain
flatten that keeps the batch dimension (ResNet8's only Reshape: the pooled features before the
Dense layer), and stores every parameter contiguously (onnx2torch keeps the Dense weight as a
transposed view; torchao's x86 lowering packs such a weight as if it were contiguous and gives
wrong scores, 0.17 top-1, without an error).

Saved programs (`.pt2`) hold no path of this checkout and no memory address: the stack traces
torch.export records in each node (file names in the virtualenv, used only in error messages)
and each node's provenance are dropped, so the same model gives the same bytes, and dvc.lock the
same hashes, in every clone and process.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import PipelineError

MAX_BATCH = 100_000  # the exported programs take any batch size from 1 to this


TORCHVISION_CONVERTERS = ("nms", "roialign")  # onnx2torch's converters that import torchvision


def _onnx2torch_convert():
    """onnx2torch's `convert`, loaded without its NonMaxSuppression and RoiAlign converters unless
    torchvision is already imported: those two import torchvision (1.4 s per process, several
    times that on an emulated CPU), and ResNet8 has neither op. A graph with one fails to convert
    with onnx2torch's own error naming the op."""
    import sys
    import types

    if "torchvision" not in sys.modules and "onnx2torch" not in sys.modules:
        for name in TORCHVISION_CONVERTERS:
            sys.modules[f"onnx2torch.node_converters.{name}"] = types.ModuleType(f"onnx2torch.node_converters.{name}")
    from onnx2torch import convert

    return convert


def from_onnx(path: Path) -> torch.fx.GraphModule:
    import onnx

    convert = _onnx2torch_convert()

    try:
        graph = onnx.load(str(path))
    except FileNotFoundError:
        raise PipelineError(f"{path}: ONNX model not found") from None
    except Exception as exc:  # protobuf's DecodeError and friends
        raise PipelineError(f"{path}: not a readable ONNX model ({' '.join(str(exc).split())[:200]})") from None
    return convert(graph).eval()


def exportable(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The onnx2torch graph with each Reshape replaced by a batch-keeping flatten, parameters contiguous."""
    for node in list(model.graph.nodes):
        if node.op == "call_module" and type(model.get_submodule(node.target)).__name__ == "OnnxReshape":
            model.add_submodule(node.target, nn.Flatten())
            node.args = (node.args[0],)
    model.graph.eliminate_dead_code()
    model.delete_all_unused_submodules()
    model.recompile()
    for parameter in model.parameters():
        parameter.data = parameter.data.contiguous()
    return model


def export(model: nn.Module, example: np.ndarray, dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """torch.export of `model` on a float32 NHWC batch; the batch dimension stays dynamic."""
    inputs = (torch.from_numpy(np.asarray(example, dtype=np.float32)),)
    shapes = ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},) if dynamic_batch else None
    return torch.export.export(model, inputs, dynamic_shapes=shapes)


def _portable(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Without the stack traces (paths of this checkout), the provenance of each node (`from_node`,
    which records the id() of the graphs a pass went through: a memory address, different in every
    process) and the example inputs (images)."""
    for node in program.graph.nodes:
        node.meta.pop("stack_trace", None)
        node.meta.pop("from_node", None)
    program.example_inputs = None
    return program


def used_attributes_only(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The graph module with only the attributes its graph reads: after PT2E's convert, the float
    weights stay on the module beside their int8 copies, and torch.export would save both."""
    return torch.fx.GraphModule(model, model.graph)


def save_program(program: torch.export.ExportedProgram, path: Path, check: np.ndarray) -> None:
    """Save with torch.export.save, then reload the file and require the same outputs on `check`."""
    from .runners import exported_module

    buffer = io.BytesIO()  # not the file: a failed save leaves nothing behind under its name
    torch.export.save(_portable(program), buffer)
    path.write_bytes(buffer.getvalue())
    batch = torch.from_numpy(np.asarray(check, dtype=np.float32))
    with torch.no_grad():
        expected, reloaded = program.module()(batch), exported_module(path)(batch)
    if not torch.equal(expected, reloaded):
        raise PipelineError(f"{path}: the saved program does not reproduce the in-memory model "
                            f"(max |diff| {float((expected - reloaded).abs().max()):.3g})")
