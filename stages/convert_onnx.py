"""Stage convert_onnx: Keras -> ONNX with tf2onnx, verified against Keras on the real test images.

    python -m stages.convert_onnx --keras models/keras/pretrainedResnet.h5 --data data/cifar10 \
        --out models/onnx/resnet8.onnx --metrics metrics/convert_onnx.json
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from .lib import cifar10, runners
from .lib import params as params_lib
from .lib.errors import PipelineError, run_main
from .lib.files import atomic_path, write_json
from .lib.verify import conversion_report

INPUT_NAME = "input"
BATCH_SIZE = 1000


def to_onnx(keras_path: Path, out: Path, opset: int) -> None:
    model = runners.keras_model(keras_path)
    import onnx
    import tensorflow as tf
    import tf2onnx

    signature = (tf.TensorSpec((None, 32, 32, 3), tf.float32, name=INPUT_NAME),)

    @tf.function(input_signature=signature)
    def forward(x):
        return {"probabilities": model(x, training=False)}

    model_proto, _ = tf2onnx.convert.from_function(forward, input_signature=signature, opset=opset)
    onnx.save(canonical(drop_unused(constant_reshape_targets(model_proto))), str(out))


def constant_reshape_targets(model):
    """Depending on Python's hash seed, tf2onnx folds Flatten's target shape into a constant
    [-1, 64] or leaves it as a Shape -> Gather -> Slice -> Concat chain that only copies the batch
    size. The chain breaks PyTorch's FX quantization (it traces through onnx2torch's Reshape) and
    changes the bytes. Evaluate each computed target at batch 1 and 2: if only one entry follows the
    batch size, it becomes the constant with -1 there, as tf2onnx writes it on a good run."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    graph = model.graph
    constants = {t.name for t in graph.initializer}
    reshapes = [n for n in graph.node if n.op_type == "Reshape" and n.input[1] not in constants]
    if not reshapes:
        return model
    wanted = [n.input[1] for n in reshapes]
    probe = onnx.ModelProto()  # the model cut down to what computes the targets
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None)
                              for name in wanted)
    session = ort.InferenceSession(drop_unused(probe).SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name for i in session.get_inputs()}
    one, two = (session.run(wanted, {name: np.zeros((b, 32, 32, 3), np.float32) for name in feeds})
                for b in (1, 2))
    for node, at_one, at_two in zip(reshapes, one, two):
        follows_batch = at_one != at_two
        if (at_one.shape != at_two.shape or follows_batch.sum() != 1 or (at_one == -1).any()
                or at_one[follows_batch][0] != 1 or at_two[follows_batch][0] != 2):
            continue  # not "the batch size and constants": leave it computed
        target = at_one.astype(np.int64)
        target[follows_batch] = -1
        name = f"{node.name}_shape__0"  # renumbered by canonical() like tf2onnx's own constants
        graph.initializer.append(numpy_helper.from_array(target, name))
        node.input[1] = name
    return model


def drop_unused(model):
    """Remove nodes whose outputs nothing reads, then initializers nothing reads."""
    graph = model.graph
    while True:
        read = {name for node in graph.node for name in node.input} | {v.name for v in graph.output}
        dead = [node for node in graph.node if not any(name in read for name in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = {name for node in graph.node for name in node.input}
    unused = [t for t in graph.initializer if t.name not in read]
    for tensor in unused:
        graph.initializer.remove(tensor)
    return model


def canonical(model):
    """Same model, same bytes: tf2onnx numbers the constants it generates (`name__N`) in an order
    that varies from run to run, and calls the batch dimension unk__N. Rename both predictably."""
    graph = model.graph
    generated = {t.name for t in graph.initializer if re.search(r"__\d+$", t.name)}
    renames: dict[str, str] = {}
    for node in graph.node:
        for name in node.input:
            if name in generated and name not in renames:
                renames[name] = re.sub(r"__\d+$", f"__{len(renames)}", name)
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
    for tensor in graph.initializer:
        tensor.name = renames.get(tensor.name, tensor.name)
    names = [t.name for t in graph.initializer]
    if len(set(names)) != len(names):
        raise PipelineError("convert_onnx: renaming tf2onnx's constants made two initializers share a name")
    ordered = sorted(graph.initializer, key=lambda t: t.name)
    del graph.initializer[:]
    graph.initializer.extend(ordered)
    for value in (*graph.input, *graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    return model


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
        to_onnx(args.keras, tmp, p["opset"])
        graph = check_graph(tmp)
        keras_scores = runners.predict_all(runners.load_runner("keras", args.keras), test.images, BATCH_SIZE)
        onnx_scores = runners.predict_all(runners.load_runner("onnx", tmp), test.images, BATCH_SIZE)
        report = conversion_report("convert_onnx", keras_scores, onnx_scores, p["max_abs_diff"], p["min_agreement"])
    write_json(args.metrics, {**graph, "vs_keras": report})
    print(f"convert_onnx: opset {graph['opset']}, max |diff| {report['max_abs_diff']:.2e}, "
          f"argmax agreement {report['argmax_agreement']:.4f} on {report['images']} test images")


if __name__ == "__main__":
    run_main(main)
