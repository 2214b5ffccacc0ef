"""Stage convert_onnx: Keras -> ONNX with tf2onnx, verified against Keras on the real test images.

    python -m stages.convert_onnx --keras models/keras/pretrainedResnet.h5 --data data/cifar10 \
        --out models/onnx/resnet8.onnx --metrics metrics/convert_onnx.json
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .lib import cifar10, runners
from .lib.graph_surgery import (batchnorm_exact, canonical, constant_reshape_targets, drop_unused,
                                exact_batchnorm_constants)
from .lib import params as params_lib
from .lib.errors import PipelineError, run_main
from .lib.files import atomic_path, write_json
from .lib.verify import conversion_report, recorded

INPUT_NAME = "input"
BATCH_SIZE = 1000


def to_onnx(keras_path: Path, out: Path, opset: int) -> dict[str, str]:
    """Convert; returns {ONNX Conv / MatMul node name: the Keras layer it came from}."""
    model = runners.keras_model(keras_path)
    import onnx
    import tensorflow as tf
    import tf2onnx

    signature = (tf.TensorSpec((None, 32, 32, 3), tf.float32, name=INPUT_NAME),)

    @tf.function(input_signature=signature)
    def forward(x):
        return {"probabilities": model(x, training=False)}

    model_proto, _ = tf2onnx.convert.from_function(forward, input_signature=signature, opset=opset)
    model_proto = exact_batchnorm_constants(model_proto, keras_batchnorms(model))
    model_proto = canonical(drop_unused(constant_reshape_targets(model_proto)))
    onnx.save(model_proto, str(out))
    return keras_layer_names(model, model_proto)


def keras_layer_names(model, model_proto) -> dict[str, str]:
    """Match each Keras Conv2D / Dense layer to the ONNX node holding its kernel, bit for bit
    (tf2onnx copies kernels unchanged, transposed to OIHW for Conv), so that per-layer figures can
    be shown under the names a Keras user knows."""
    import keras
    import numpy as np
    from onnx import numpy_helper

    weights = {t.name: numpy_helper.to_array(t) for t in model_proto.graph.initializer}
    names = {}
    for layer in model.layers:
        if not isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            continue
        kernel = layer.kernel.numpy()
        expected = kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel
        nodes = [n.name for n in model_proto.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")
                 and len(n.input) > 1 and n.input[1] in weights and np.array_equal(weights[n.input[1]], expected)]
        if len(nodes) != 1:
            raise PipelineError(f"convert_onnx: Keras layer '{layer.name}' matches {len(nodes)} ONNX nodes by weight")
        names[nodes[0]] = layer.name
    return names


def keras_batchnorms(model) -> list:
    """(scale, shift) of every BatchNormalization layer, from its weights in exact arithmetic."""
    import keras

    found = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            if not (layer.center and layer.scale):
                raise PipelineError(f"convert_onnx: BatchNormalization '{layer.name}' without center/scale "
                                    "is not supported")
            gamma, beta, mean, variance = (w.numpy() for w in (layer.gamma, layer.beta,
                                                              layer.moving_mean, layer.moving_variance))
            found.append(batchnorm_exact(gamma, beta, mean, variance, layer.epsilon))
    return found


def check_graph(path: Path) -> dict:
    """onnx.checker plus the interface: one float32 input (batch, 32, 32, 3), one output (batch, 10)."""
    import onnx

    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise PipelineError(f"{path}: onnx.checker rejects the model ({str(exc).splitlines()[0]})") from None

    def shape(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    inputs, outputs = list(model.graph.input), list(model.graph.output)
    if len(inputs) != 1 or len(outputs) != 1:
        raise PipelineError(f"{path}: {len(inputs)} inputs and {len(outputs)} outputs, expected 1 and 1")
    in_shape, out_shape = shape(inputs[0]), shape(outputs[0])
    in_type = inputs[0].type.tensor_type.elem_type
    if in_type != onnx.TensorProto.FLOAT or in_shape[1:] != [32, 32, 3] or isinstance(in_shape[0], int):
        raise PipelineError(f"{path}: input is {onnx.TensorProto.DataType.Name(in_type)}{in_shape}, "
                            "expected FLOAT[batch, 32, 32, 3] with a dynamic batch")
    if out_shape[1:] != [10]:
        raise PipelineError(f"{path}: output shape {out_shape}, expected [batch, 10]")
    return {
        "checker": "passed",
        "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "input": {"name": inputs[0].name, "shape": in_shape, "dtype": "float32"},
        "output": {"name": outputs[0].name, "shape": out_shape},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keras", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    p = params_lib.load()["convert"]

    test = cifar10.load(args.data, "test")
    with atomic_path(args.out) as tmp:
        keras_layers = to_onnx(args.keras, tmp, p["opset"])
        graph = check_graph(tmp)
        keras_scores = runners.predict_all(runners.load_runner("keras", args.keras), test.images, BATCH_SIZE)
        onnx_scores = runners.predict_all(runners.load_runner("onnx", tmp), test.images, BATCH_SIZE)
        report = conversion_report("convert_onnx", keras_scores, onnx_scores, p["max_abs_diff"], p["min_agreement"])
    write_json(args.metrics, {**graph, "vs_keras": recorded(report), "keras_layers": keras_layers})
    print(f"convert_onnx: opset {graph['opset']}, max |diff| {report['max_abs_diff']:.2e}, "
          f"argmax agreement {report['argmax_agreement']:.4f} on {report['images']} test images")


if __name__ == "__main__":
    run_main(main)
