"""PyTorch models from ONNX (onnx2torch) and their persistence as TorchScript archives.

A pickled onnx2torch GraphModule is reported not to reload in a fresh process, so every torch
model here is traced and saved with torch.jit: the archive loads with torch alone
(runners.torch_load) and gives outputs identical to the module it was traced from.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import PipelineError

TRACE_BATCH = 4


def from_onnx(path: Path) -> torch.fx.GraphModule:
    import onnx
    from onnx2torch import convert

    try:
        graph = onnx.load(str(path))
    except FileNotFoundError:
        raise PipelineError(f"{path}: ONNX model not found") from None
    except Exception as exc:  # protobuf's DecodeError and friends
        raise PipelineError(f"{path}: not a readable ONNX model ({' '.join(str(exc).split())[:200]})") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(graph).eval()


def save_torchscript(model: torch.nn.Module, path: Path, example: np.ndarray) -> None:
    """Trace `model` on `example` (float32 NHWC) and save; checked on another batch size."""
    from .runners import torch_load

    inputs = torch.from_numpy(np.asarray(example[:TRACE_BATCH], dtype=np.float32))
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, inputs, check_trace=False)
        buffer = io.BytesIO()  # not the file: its (temporary) name would go into the archive
        torch.jit.save(traced, buffer)
    path.write_bytes(buffer.getvalue())
    check = torch.from_numpy(np.asarray(example, dtype=np.float32))
    with torch.inference_mode():
        expected, reloaded = model(check), torch_load(path)(check)
    if not torch.equal(expected, reloaded):
        raise PipelineError(f"{path}: the saved TorchScript model does not reproduce the in-memory "
                            f"model (max |diff| {float((expected - reloaded).abs().max()):.3g})")
