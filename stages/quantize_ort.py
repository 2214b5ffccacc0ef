"""Stage quantize_ort: static post-training quantization with ONNX Runtime, one dtype per run.

    python -m stages.quantize_ort --dtype int8 --model models/adaround_int8/resnet8.onnx \
        --calibration data/calibration --ranges models/activation_ranges.json --out models/ort_int8

`int8`: int8 activations and int8 weights; `uint8`: uint8 activations and uint8 weights.
Starts from the BatchNorm-folded graph (with AdaRound's weights). Every activation range comes from
the activation_ranges stage, as tensor quantization overrides: ONNX Runtime's own calibration
pass is reduced to one batch, whose results the overrides replace (checked in the saved model). Writes model.onnx and info.json (settings, execution,
the graph check that proves every Conv and the Dense layer is quantized).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from .lib import cifar10, layer_error
from .lib import params as params_lib
from .lib import ranges as ranges_lib
from .lib.calibration import CalibrationSet, ort_reader
from .lib.errors import run_main
from .lib.files import atomic_path, write_json
from .lib.quant_checks import onnx_summary, require_quantized
from .lib.runners import onnx_session

WEIGHTED_LAYERS = 10  # ResNet8: 9 Conv + 1 Dense
# Every op but Softmax: the scores leave the network as float, since an 8-bit softmax turns
# close calls into ties (measured: 121 tied top-2 scores on the test set with int8).
OP_TYPES = ["Conv", "Gemm", "Add", "Relu", "AveragePool", "Reshape", "Transpose"]
INTEGER_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "QLinearAdd", "ConvInteger", "MatMulInteger")


def quantize(model: Path, out: Path, dtype: str, calibration: CalibrationSet, ranges: dict, p: dict) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[dtype]
    input_name = onnx_session(model).get_inputs()[0].name
    one_batch = CalibrationSet(calibration.images[:calibration.batch_size])  # overridden below
    quantize_static(
        str(model), str(out), ort_reader(one_batch, input_name),
        quant_format=QuantFormat[p["format"]],
        op_types_to_quantize=OP_TYPES,
        per_channel=p["per_channel"],
        reduce_range=p["reduce_range"],
        activation_type=qtype,
        weight_type=qtype,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": p["symmetric_activations"],
                       "WeightSymmetric": p["symmetric_weights"],
                       "TensorQuantOverrides": ranges_lib.ort_overrides(ranges)},
    )


def execution_kind(model: Path) -> tuple[str, list[str]]:
    """What ONNX Runtime's CPU provider really runs after its graph optimizations."""
    import onnx

    with tempfile.TemporaryDirectory() as work:
        optimized = Path(work) / "optimized.onnx"
        onnx_session(model, optimized)
        ops = sorted({n.op_type for n in onnx.load(str(optimized)).graph.node})
    integer = [op for op in ops if op in INTEGER_OPS]
    return ("integer-kernels" if integer else "simulated-qdq"), ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", required=True, choices=params_lib.DTYPES)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--ranges", type=Path, required=True, help="activation ranges (activation_ranges stage)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--float-model", type=Path, required=True, help="float graph for the per-layer error")
    parser.add_argument("--data", type=Path, required=True, help="prepared CIFAR-10 (test images for the error)")
    parser.add_argument("--layer-error", type=Path, required=True, help="per-layer SQNR JSON to write")
    args = parser.parse_args()
    p = params_lib.load()["quantize_ort"]
    variant = f"ort_{args.dtype}"

    calibration = CalibrationSet.load(args.calibration)
    with atomic_path(args.out, directory=True) as tmp:
        quantize(args.model, tmp / "model.onnx", args.dtype, calibration, ranges_lib.load(args.ranges), p)
        summary = onnx_summary(tmp / "model.onnx")
        require_quantized(variant, summary, WEIGHTED_LAYERS)
        execution, runtime_ops = execution_kind(tmp / "model.onnx")
        info = {"backend": "onnxruntime", "dtype": args.dtype, "execution": execution,
                "settings": p, "calibration_images": len(calibration.images),
                "graph_check": summary, "runtime_ops": runtime_ops}
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
        test = cifar10.load(args.data, "test", limit=layer_error.IMAGES)
        errors = layer_error.ort_layer_errors(args.float_model, tmp / "model.onnx", test.images)
    write_json(args.layer_error, {"variant": variant, "images": len(test.images), "layers": errors})
    print(f"quantize_ort {args.dtype}: {summary['quantized_layers']} layers quantized "
          f"({', '.join(summary['weight_dtypes'])} weights), execution {execution}")


if __name__ == "__main__":
    run_main(main)
