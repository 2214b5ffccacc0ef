"""Stage fold_batchnorm: fold each BatchNorm (tf2onnx's Mul + Add after a Conv) into its Conv,
and MatMul + Add into Gemm, with onnxruntime's quant_pre_process; verified against the float ONNX.

    python -m stages.fold_batchnorm --onnx models/onnx/resnet8.onnx --data data/cifar10 \
        --out models/onnx_folded/resnet8.onnx --metrics metrics/fold_batchnorm.json

Both quantizers start from this graph: quantizing the unfolded one costs accuracy. The stage
checks that every folded weight and bias is the exact float32 result of weight * scale and
bias * scale + shift (single IEEE operations: the same bits on every CPU kind).
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from .lib import cifar10, runners
from .lib import params as params_lib
from .lib.errors import PipelineError, run_main
from .lib.files import atomic_path, write_json
from .lib.graph_surgery import fold_mismatches
from .lib.verify import conversion_report, recorded

BATCH_SIZE = 1000


def _quant_pre_process():
    """onnxruntime's quant_pre_process, loaded without torch: its symbolic shape inference lives in
    onnxruntime.tools, whose __init__ imports a PyTorch export helper whenever torch is installed
    (1.3 s per process, about 18 s on the emulated CPU). The fold uses nothing of that helper; the
    stand-in raises if anything ever calls it."""
    import sys
    import types

    helper = "onnxruntime.tools.pytorch_export_helpers"
    if "torch" not in sys.modules and helper not in sys.modules:
        def infer_input_info(*_args, **_kwargs):
            raise RuntimeError(f"{helper} was not loaded (stages.fold_batchnorm keeps torch out)")

        sys.modules[helper] = types.ModuleType(helper)
        sys.modules[helper].infer_input_info = infer_input_info
    from onnxruntime.quantization.shape_inference import quant_pre_process

    return quant_pre_process


def fold(source: Path, out: Path) -> dict:
    import onnx

    _quant_pre_process()(str(source), str(out), skip_symbolic_shape=False)
    folded = onnx.load(str(out))
    ops = Counter(node.op_type for node in folded.graph.node)
    if ops.get("Mul") or ops.get("MatMul"):
        raise PipelineError(f"{out}: folding left {ops.get('Mul', 0)} Mul and {ops.get('MatMul', 0)} "
                            "MatMul nodes; expected every BatchNorm in its Conv and the Dense as Gemm")
    wrong = fold_mismatches(onnx.load(str(source)), folded)
    if wrong:
        raise PipelineError(f"{out}: the folded weights of {', '.join(wrong)} are not the exact float32 "
                            "products weight * scale and bias * scale + shift (a machine-dependent fold)")
    return dict(sorted(ops.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    p = params_lib.load()["convert"]

    test = cifar10.load(args.data, "test")
    parent = runners.predict_all(runners.load_runner("onnx", args.onnx), test.images, BATCH_SIZE)
    with atomic_path(args.out) as tmp:
        ops = fold(args.onnx, tmp)
        child = runners.predict_all(runners.load_runner("onnx", tmp), test.images, BATCH_SIZE)
        report = conversion_report("fold_batchnorm", parent, child, p["max_abs_diff"], p["min_agreement"])
    write_json(args.metrics, {"ops": ops, "vs_onnx": recorded(report)})
    print(f"fold_batchnorm: ops {ops}, max |diff| {report['max_abs_diff']:.2e}")


if __name__ == "__main__":
    run_main(main)
