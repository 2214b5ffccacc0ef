"""Print what really runs for a saved model (stages.lib.execution.measure), in its own process:

    python -m tests.measure_execution onnx|torch|tflite|keras PATH
    python -m tests.measure_execution onnx-leave-one-float FOLDED.onnx RANGES.json OUT.onnx

The second form first quantizes FOLDED.onnx with ONNX Runtime (int8, the calibrated ranges) but
leaves its first Conv out, so one layer stays in float, then measures that model.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from stages.lib import execution
from stages.lib import ranges as ranges_lib

if __name__ == "__main__":
    kind, path = sys.argv[1], Path(sys.argv[2])
    if kind == "onnx-leave-one-float":
        import onnx
        from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static

        class OneBatch(CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = iter([{"input": np.zeros((2, 32, 32, 3), np.float32)}])

            def get_next(self):
                return next(self.batches, None)

        first_conv = next(n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Conv")
        kind, out = "onnx", Path(sys.argv[4])
        quantize_static(str(path), str(out), OneBatch(), activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        per_channel=True, nodes_to_exclude=[first_conv],
                        extra_options={"TensorQuantOverrides": ranges_lib.ort_overrides(ranges_lib.load(sys.argv[3]))})
        path = out
    print(json.dumps(execution.measure(kind, path)))
