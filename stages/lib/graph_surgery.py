"""ONNX graph surgery on tf2onnx's output: each function takes a ModelProto and returns it changed.

- exact_batchnorm_constants: the BatchNorm scale and shift computed in float64 from the Keras
  weights and rounded once to float32 (TensorFlow computes them on the CPU, and they come out
  1-2 ulp apart on different CPU kinds);
- constant_reshape_targets, drop_unused, canonical: the same model gives the same bytes whatever
  Python's hash seed.
"""
from __future__ import annotations

import re

import numpy as np

from .errors import PipelineError


def constant_reshape_targets(model):
    """Depending on Python's hash seed, tf2onnx folds Flatten's target shape into a constant
    [-1, 64] or leaves it as a Shape -> Gather -> Slice -> Concat chain that only copies the batch
    size. The chain breaks PyTorch's FX quantization (it traces through onnx2torch's Reshape) and
    changes the bytes. Evaluate each computed target at batch 1 and 2: if only one entry follows the
    batch size, it becomes the constant with -1 there, as tf2onnx writes it on a good run."""
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


def batchnorm_exact(gamma, beta, mean, variance, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """Inference BatchNorm as y = x * scale + shift, computed in float64 and rounded once to float32."""
    gamma, beta, mean, variance = (np.asarray(v, np.float64) for v in (gamma, beta, mean, variance))
    scale = gamma / np.sqrt(variance + float(epsilon))
    return scale.astype(np.float32), (beta - mean * scale).astype(np.float32)


def exact_batchnorm_constants(model, batchnorms: list[tuple[np.ndarray, np.ndarray]], rtol: float = 1e-4):
    """Replace the constants of each BatchNorm that tf2onnx wrote as Mul(x, scale) -> Add(., shift)
    by the exact (scale, shift) pairs in `batchnorms` (one per Keras BatchNormalization layer).
    TensorFlow's own constants are matched to a layer by value (they are within a few ulp of the
    exact ones); every layer must match exactly one Mul -> Add pair, or the model is refused."""
    from onnx import numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def constant_input(node):
        names = [name for name in node.input if name in initializers]
        return names[0] if len(names) == 1 else None

    pairs = []  # (scale initializer, shift initializer)
    for node in graph.node:
        scale_name = constant_input(node) if node.op_type == "Mul" else None
        following = consumers.get(node.output[0], [])
        if scale_name is None or len(following) != 1 or following[0].op_type != "Add":
            continue
        shift_name = constant_input(following[0])
        if shift_name is not None:
            pairs.append((scale_name, shift_name))
    used: set[int] = set()
    for scale_name, shift_name in pairs:
        scale = numpy_helper.to_array(initializers[scale_name])
        shift = numpy_helper.to_array(initializers[shift_name])
        matches = [i for i, (s, t) in enumerate(batchnorms)
                   if s.size == scale.size and np.allclose(s, scale.ravel(), rtol=rtol, atol=0)
                   and np.allclose(t, shift.ravel(), rtol=rtol, atol=rtol * float(np.abs(t).max()))]
        if len(matches) != 1 or matches[0] in used:
            raise PipelineError(f"convert_onnx: the BatchNorm constants {scale_name} / {shift_name} match "
                                f"{len(matches)} Keras BatchNormalization layers (expected exactly one unused)")
        used.add(matches[0])
        exact_scale, exact_shift = batchnorms[matches[0]]
        initializers[scale_name].CopyFrom(numpy_helper.from_array(exact_scale.reshape(scale.shape), scale_name))
        initializers[shift_name].CopyFrom(numpy_helper.from_array(exact_shift.reshape(shift.shape), shift_name))
    if len(used) != len(batchnorms):
        raise PipelineError(f"convert_onnx: found {len(used)} BatchNorm Mul -> Add pairs in the ONNX graph "
                            f"for {len(batchnorms)} Keras BatchNormalization layers")
    return model


def fold_mismatches(unfolded, folded) -> list[str]:
    """Conv layers of `folded` whose weights and bias are not exactly the float32 element-wise fold
    of `unfolded`'s Conv -> Mul(scale) -> Add(shift): weight * scale and (bias * scale) + shift,
    each operation rounded to float32 (IEEE arithmetic, the same on every CPU). Unfused Convs must
    keep their weights. Returns the names of the layers that differ (empty: the fold is exact)."""
    from onnx import numpy_helper

    before = {t.name: numpy_helper.to_array(t) for t in unfolded.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    consumers: dict[str, list] = {}
    for node in unfolded.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    folded_nodes = {node.name: node for node in folded.graph.node}
    wrong = []
    for node in unfolded.graph.node:
        if node.op_type != "Conv":
            continue
        weight, bias = before[node.input[1]], before[node.input[2]]
        target = folded_nodes.get(node.name)
        if target is None:
            wrong.append(f"{node.name} (missing)")
            continue
        new_weight, new_bias = after[target.input[1]], after[target.input[2]]
        following = consumers.get(node.output[0], [])
        if len(following) == 1 and following[0].op_type == "Mul":
            scale = before[following[0].input[1]].reshape(-1)
            shift = before[consumers[following[0].output[0]][0].input[1]].reshape(-1)
            weight = weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))
            bias = (bias * scale).astype(np.float32) + shift
        if not (np.array_equal(weight.astype(np.float32), new_weight) and np.array_equal(bias.astype(np.float32), new_bias)):
            wrong.append(node.name)
    return wrong
