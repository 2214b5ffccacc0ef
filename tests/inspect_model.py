"""Print a JSON summary of a saved model's graph, in its own process:

    python -m tests.inspect_model onnx|torch PATH

onnx: quant_checks.onnx_summary; torch: quant_checks.torch_summary; both with the model's scores
on a fixed random input ("scores"), to compare a quantized model's outputs with its parent's.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from stages.lib import quant_checks, runners

if __name__ == "__main__":
    kind, path = sys.argv[1], Path(sys.argv[2])
    if kind == "onnx":
        summary = quant_checks.onnx_summary(path)
    else:
        summary = quant_checks.torch_summary(runners.torch_load(path))
    x = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3)).astype(np.float32)
    summary["scores"] = runners.load_runner(kind, path)(x).tolist()
    print(json.dumps(summary))
