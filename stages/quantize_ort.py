"""Stage quantize_ort: static post-training quantization with ONNX Runtime, one dtype per run,
every calibration seed in the same process.

    python -m stages.quantize_ort --dtype int8 --model models/adaround/int8 \
        --calibration data/calibration --ranges models/activation_ranges --out models/ort_int8

`int8`: int8 activations and int8 weights; `uint8`: uint8 activations and uint8 weights.
Starts from the BatchNorm-folded graph (with AdaRound's weights). Every activation range comes from
the activation_ranges stage, as tensor quantization overrides: ONNX Runtime's own calibration
pass is reduced to one image, whose ranges the overrides replace (every activation quantizer of
the saved model is checked to hold ours). Writes seed_<seed>/model.onnx and seed_<seed>/info.json
(settings and the graph check that proves every Conv and the Dense layer is quantized).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .lib import params as params_lib
from .lib import ranges as ranges_lib
from .lib.calibration import CalibrationSet, ort_reader, seed_dir, seed_file
from .lib.calibration import seeds as seeds_of
from .lib.errors import PipelineError, run_main
from .lib.files import atomic_path
from .lib.quant_checks import onnx_summary, require_quantized
from .lib.runners import onnx_session

WEIGHTED_LAYERS = 10  # ResNet8: 9 Conv + 1 Dense
# Every op but Softmax and AveragePool. Softmax: the scores leave the network as float, since an
# 8-bit softmax turns close calls into ties (measured: 121 tied top-2 scores on the test set with
# int8). AveragePool: the quantizer would give its output its input's scale (the last ReLU's,
# 0..17), four times coarser than the pooled features need (0..4.5). Left out, its output gets
# its own range (quantized before the Dense layer), and ONNX Runtime still fuses DQ -> AveragePool
# -> Q into an integer QLinearAveragePool with the two scales. Measured on 5,000 held-out
# training images: agreement with float 0.9872 -> 0.9900 (int8) and 0.9872 -> 0.9926 (uint8).
OP_TYPES = ["Conv", "Gemm", "Add", "Relu", "Reshape", "Transpose"]


def quantize(model: Path, out: Path, dtype: str, calibration: CalibrationSet, ranges: dict, p: dict) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[dtype]
    input_name = onnx_session(model).get_inputs()[0].name
    # quantize_static always runs its own calibration pass; every range it finds is replaced by
    # ours (TensorQuantOverrides, checked by require_calibrated_ranges), so one image feeds it
    throwaway = CalibrationSet(calibration.images[:1])
    quantize_static(
        str(model), str(out), ort_reader(throwaway, input_name),
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


def require_calibrated_ranges(model: Path, ranges: dict, dtype: str, symmetric: bool) -> int:
    """Every activation QuantizeLinear in the saved model must hold the scale and zero point that
    ONNX Runtime's own formula gives for our range of its tensor, not one from its calibration
    pass. Returns how many were checked."""
    import numpy as np
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

    graph = onnx.load(str(model)).graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[dtype].tensor_type
    qmin, qmax = get_qmin_qmax_for_qType(qtype, reduce_range=False, symmetric=symmetric)
    checked, wrong = 0, []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in values:
            continue  # not a quantizer, or a weight's
        checked += 1
        if node.input[0] not in ranges:  # its range came from quantize_static's own pass
            wrong.append(node.input[0])
            continue
        low, high = ranges[node.input[0]].low, ranges[node.input[0]].high
        zero, scale = compute_scale_zp(np.array(low, np.float32), np.array(high, np.float32), qmin, qmax, symmetric)
        if values[node.input[1]] != np.float32(scale) or values[node.input[2]] != zero:
            wrong.append(node.input[0])
    if wrong or not checked:
        raise PipelineError(f"{model}: {len(wrong)} of {checked} activation quantizers do not hold the calibrated "
                            f"range ({', '.join(wrong[:3]) or 'none checked'}); the range overrides did not take")
    return checked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", required=True, choices=params_lib.DTYPES)
    parser.add_argument("--model", type=Path, required=True, help="adaround output directory (seed_<seed>.onnx)")
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--ranges", type=Path, required=True, help="activation ranges directory (activation_ranges stage)")
    parser.add_argument("--out", type=Path, required=True, help="directory: seed_<seed>/model.onnx per seed")
    args = parser.parse_args()
    all_params = params_lib.load()
    p = all_params["quantize_ort"]
    variant = f"ort_{args.dtype}"

    with atomic_path(args.out, directory=True) as tmp:
        for seed in seeds_of(all_params):
            calibration = CalibrationSet.load(seed_dir(args.calibration, seed))
            ranges = ranges_lib.load(seed_file(args.ranges, seed, ".json"))
            out = seed_dir(tmp, seed)
            out.mkdir()
            quantize(seed_file(args.model, seed, ".onnx"), out / "model.onnx", args.dtype, calibration, ranges, p)
            summary = onnx_summary(out / "model.onnx")
            require_quantized(variant, summary, WEIGHTED_LAYERS)
            checked = require_calibrated_ranges(out / "model.onnx", ranges, args.dtype, p["symmetric_activations"])
            info = {"backend": "onnxruntime", "dtype": args.dtype, "seed": seed,
                    "calibrated_quantizers_checked": checked, "settings": p,
                    "calibration_images": len(calibration.images), "graph_check": summary}
            (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
            print(f"quantize_ort {args.dtype} seed {seed}: {summary['quantized_layers']} layers quantized "
                  f"({', '.join(summary['weight_dtypes'])} weights)")


if __name__ == "__main__":
    run_main(main)
