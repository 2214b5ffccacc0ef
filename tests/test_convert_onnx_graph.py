"""convert_onnx's graph clean-up on hand-built ONNX graphs (onnx and onnxruntime only, no TensorFlow)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from stages.convert_onnx import canonical, constant_reshape_targets, drop_unused


def flatten_graph(batch_from_shape: bool) -> onnx.ModelProto:
    """x (batch, 32, 32, 3) -> Reshape to (batch, 3072), its target either computed from Shape(x)
    (what tf2onnx leaves on an unlucky hash seed) or the constant [-1, 3072]."""
    nodes, initializers = [], [numpy_helper.from_array(np.array([3072], np.int64), "width__4"),
                               numpy_helper.from_array(np.array([0], np.int64), "start__9"),
                               numpy_helper.from_array(np.array([1], np.int64), "end__2"),
                               numpy_helper.from_array(np.array([1.0], np.float32), "unused__5")]
    if batch_from_shape:
        nodes += [helper.make_node("Shape", ["input"], ["shape:0"], name="Shape__1"),
                  helper.make_node("Slice", ["shape:0", "start__9", "end__2"], ["batch:0"], name="batch"),
                  helper.make_node("Concat", ["batch:0", "width__4"], ["target:0"], axis=0, name="target")]
        target = "target:0"
    else:
        initializers.append(numpy_helper.from_array(np.array([-1, 3072], np.int64), "flat_shape__0"))
        target = "flat_shape__0"
    nodes.append(helper.make_node("Reshape", ["input", target], ["flat"], name="flat"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 32, 32, 3])],
                              [helper.make_tensor_value_info("flat", TensorProto.FLOAT, ["n", 3072])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def test_a_reshape_target_computed_from_the_batch_size_becomes_a_constant():
    x = np.random.default_rng(0).random((3, 32, 32, 3), dtype=np.float32)
    computed = flatten_graph(batch_from_shape=True)
    expected = run(computed, x)
    cleaned = drop_unused(constant_reshape_targets(computed))
    assert [n.op_type for n in cleaned.graph.node] == ["Reshape"]
    constants = {t.name: numpy_helper.to_array(t) for t in cleaned.graph.initializer}
    assert constants == {"flat_shape__0": constants["flat_shape__0"]}
    assert constants["flat_shape__0"].tolist() == [-1, 3072]
    np.testing.assert_array_equal(run(cleaned, x), expected)
    onnx.checker.check_model(cleaned, full_check=True)


def test_computed_and_constant_targets_end_as_the_same_bytes():
    def clean(model):
        return canonical(drop_unused(constant_reshape_targets(model))).SerializeToString()

    assert clean(flatten_graph(batch_from_shape=True)) == clean(flatten_graph(batch_from_shape=False))


def test_a_target_that_does_not_follow_the_batch_is_left_alone():
    """Here the target is [channels, -1], taken from Shape(x): not tf2onnx's Flatten, so it stays."""
    model = flatten_graph(batch_from_shape=True)
    for node in model.graph.node:
        if node.op_type == "Slice":
            node.input[1:] = ["last", "rank"]
        if node.op_type == "Concat":
            node.input[1] = "rest"
    model.graph.initializer.extend([numpy_helper.from_array(np.array([3], np.int64), "last"),
                                    numpy_helper.from_array(np.array([4], np.int64), "rank"),
                                    numpy_helper.from_array(np.array([-1], np.int64), "rest")])
    del model.graph.output[0].type.tensor_type.shape.dim[:]
    x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    assert run(model, x).shape == (3, 2048)
    before = [n.op_type for n in model.graph.node]
    after = constant_reshape_targets(model)
    assert [n.op_type for n in after.graph.node] == before
    assert after.graph.node[-1].input[1] == "target:0"
