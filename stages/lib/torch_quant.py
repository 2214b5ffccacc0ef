"""PyTorch static PTQ with PT2E (torchao): export -> prepare -> (ranges fixed) -> convert -> lower.

uint8: torchao's X86InductorQuantizer (uint8 activations, the graph input on 7 bits, see
       INPUT_QUANT_MAX; int8 per-channel symmetric weights).
       Saved as a torch.export program of the quantized model; runners.torch_x86 lowers it to
       oneDNN's integer kernels with torchao's x86 lowering.
int8:  ExecuTorch's XNNPACKQuantizer (int8 activations, int8 per-channel symmetric weights),
       lowered to an ExecuTorch program whose layers the XNNPACK delegate runs on integer kernels.

Both start from the BatchNorm-folded graph with AdaRound's weights, and every activation
observer holds the range of the tensor it observes from the activation_ranges stage (the ranges
ONNX Runtime uses): no calibration pass runs in torch. Each call site gets its own observer, so a
tensor that a quantizer would have tied to its input's scale (the average pool's output) gets
its own range, as in ONNX Runtime.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from .adaround import GRIDS
from .errors import PipelineError
from .runners import EXECUTORCH_BATCH, pin_onednn_isa

QUANTIZER_NAMES = {"uint8": "X86InductorQuantizer", "int8": "XNNPACKQuantizer"}
# uint8: the graph input (raw 0-255 pixels) takes 7 bits, 0..127. oneDNN's uint8 x int8 kernels
# are pinned to AVX2 (runners.ONEDNN_ISA), whose 16-bit pair sums (vpmaddubsw) saturate when
# full-range 8-bit pixels meet the first Conv's full-range weights: 0.7254 top-1 (test) with an
# 8-bit input. With a 7-bit input: 0.9894 agreement with float on held-out training images; with
# every activation 7 bits (torchao's reduce_range): 0.9878. So only the input is narrowed.
INPUT_QUANT_MAX = {"uint8": 127}
EXPORT_EXAMPLES = 8  # images given to torch.export as examples (and the weight observers' one pass)


def quantizer(dtype: str, per_channel: bool):
    """The PT2E quantizer of each dtype. Its weight grid is the one AdaRound rounds onto for
    that dtype (X86: [-128, 127], scale max/127.5; XNNPACK: [-127, 127], scale max/127)."""
    if dtype == "uint8":
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer, get_default_x86_inductor_quantization_config)

        if not per_channel:
            raise PipelineError("quantize_torch.per_channel: false is not available for uint8 "
                                "(X86InductorQuantizer quantizes weights per channel only)")
        return X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)

    class Quantizer(XNNPACKQuantizer):
        """XNNPACKQuantizer that skips its conv + BatchNorm patterns on a graph with no BatchNorm
        (ours is folded): each of those patterns is exported afresh to be matched, 60 exports per
        graph and about a third of the quantize step, and none can match. Same annotations."""

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            if not any("batch_norm" in str(node.target) for node in model.graph.nodes):
                self.SUPPORTED_PATTERNS = [p for p in XNNPACKQuantizer.SUPPORTED_PATTERNS if "_bn" not in p.name]
            return super().annotate(model)

    return Quantizer().set_global(get_symmetric_quantization_config(is_per_channel=per_channel))


def observed_tensor(node: torch.fx.Node, onnx_graph) -> str:
    """The ONNX tensor whose values the exported-graph node `node` computes. onnx2torch names each
    module after its ONNX node, and torch.export keeps that name in the node's module stack; a
    padded Conv is a Sequential of `<node>.0` (the Pad) and `<node>.1` (the Conv)."""
    if node.op == "placeholder":
        return onnx_graph.input[0].name
    nodes = {n.name: n for n in onnx_graph.node}
    stack = list(node.meta.get("nn_module_stack", {}).values())
    if not stack:
        raise KeyError(f"exported node {node.name} has no module, so no ONNX node")
    path = stack[-1][0]
    onnx_node = nodes.get(path)
    if onnx_node is None and path.rsplit(".", 1)[0] in nodes:
        onnx_node = nodes[path.rsplit(".", 1)[0]]
        if path.endswith(".0"):  # the Pad before a padded Conv: its input, plus zeros
            return onnx_node.input[0]
    if onnx_node is None:
        raise KeyError(f"exported node {node.name} ({path}) has no ONNX node")
    return onnx_node.output[0]


def _observer_class():
    from torchao.quantization.pt2e.observer import MinMaxObserver

    class FixedRangeObserver(MinMaxObserver):
        """An observer that holds a given range and ignores the values it sees."""

        def __init__(self, low: float, high: float, **kwargs) -> None:
            super().__init__(**kwargs)
            super().forward(torch.tensor([low, high]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    return FixedRangeObserver


def fix_activation_ranges(prepared: torch.fx.GraphModule, onnx_graph, ranges: dict,
                          input_quant_max: int | None = None) -> int:
    """Give every activation observer call its own observer holding the calibrated range of the
    tensor it observes (weights keep theirs); the graph input's with `input_quant_max` when
    given. Returns the number of activation observers set."""
    from torchao.quantization.pt2e.observer import ObserverBase

    fixed_range = _observer_class()
    fixed = 0
    pixels = {onnx_graph.input[0].name} | {n.output[0] for n in onnx_graph.node  # and its NHWC -> NCHW copy
                                           if n.op_type == "Transpose" and n.input[0] == onnx_graph.input[0].name}
    for node in list(prepared.graph.nodes):
        if node.op != "call_module":
            continue
        observer = prepared.get_submodule(node.target)
        if not isinstance(observer, ObserverBase) or node.args[0].op == "get_attr":
            continue  # not an observer, or a weight's
        if observer.qscheme not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            raise PipelineError(f"activation observer {node.target} is {observer.qscheme}, expected per tensor")
        tensor = observed_tensor(node.args[0], onnx_graph)
        if tensor not in ranges:
            raise PipelineError(f"no calibrated range for ONNX tensor '{tensor}' (observer {node.target})")
        qmax = observer.quant_max
        if input_quant_max is not None and tensor in pixels:
            qmax = input_quant_max
        name = f"fixed_range_{fixed}"
        prepared.add_submodule(name, fixed_range(
            ranges[tensor].low, ranges[tensor].high, dtype=observer.dtype, qscheme=observer.qscheme,
            quant_min=observer.quant_min, quant_max=qmax, eps=float(observer.eps)))
        node.target = name
        fixed += 1
    prepared.delete_all_unused_submodules()
    prepared.recompile()
    return fixed


def unfloor_weight_scales(prepared: torch.fx.GraphModule) -> int:
    """Both quantizers floor every weight scale at eps = 2**-12. ResNet8's first Conv takes 0-255
    pixels, so its weights are small (max |w| about 0.01, scale about 1e-4): floored, they would be
    quantized on a grid up to 8 times coarser than AdaRound's (-83..87 instead of -128..127). The
    weight observers get float32's eps instead, as torch.ao's observers have by default."""
    from torchao.quantization.pt2e.observer import ObserverBase

    count = 0
    for node in prepared.graph.nodes:
        if node.op == "call_module" and node.args and getattr(node.args[0], "op", None) == "get_attr":
            observer = prepared.get_submodule(node.target)
            if isinstance(observer, ObserverBase) and hasattr(observer, "eps"):
                observer.eps = torch.tensor([torch.finfo(torch.float32).eps])
                count += 1
    return count


def quantize(float_model: torch.fx.GraphModule, onnx_graph, ranges: dict, dtype: str, per_channel: bool,
             example: np.ndarray) -> tuple[torch.fx.GraphModule, int]:
    """prepare -> (ranges fixed from the calibration stage) -> convert, on the exportable
    onnx2torch graph `float_model` (torch_models.exportable) converted from `onnx_graph`.
    Returns the quantized (quantize / dequantize) graph and the number of activation ranges set."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from .torch_models import export

    pin_onednn_isa()
    prepared = prepare_pt2e(export(float_model, example).module(), quantizer(dtype, per_channel))
    fixed = fix_activation_ranges(prepared, onnx_graph, ranges, INPUT_QUANT_MAX.get(dtype))
    unfloor_weight_scales(prepared)
    with torch.no_grad():  # one pass for the weight observers; activation observers keep their ranges
        prepared(torch.from_numpy(np.asarray(example, dtype=np.float32)))
    return convert_pt2e(prepared), fixed


def quantize_graph(onnx_path, ranges: dict, dtype: str, per_channel: bool, example: np.ndarray):
    """PT2E-quantize an ONNX graph (a seed's AdaRound graph) with fixed activation `ranges`.
    Returns (the quantize / dequantize graph, activation ranges set, layers on AdaRound's grid);
    `example` images serve only for export and the weight observers' one pass."""
    import onnx

    from .torch_models import exportable, from_onnx

    float_model = exportable(from_onnx(onnx_path))
    converted, fixed = quantize(float_model, onnx.load(str(onnx_path)).graph, ranges, dtype, per_channel, example)
    return converted, fixed, weights_on_grid(converted, float_model, dtype)


def weights_on_grid(converted: torch.fx.GraphModule, float_model: torch.fx.GraphModule, dtype: str) -> int:
    """Check that each per-channel int8 weight of the quantized graph is a nearest integer of the
    float weight divided by its scale (the quantizer stored the weights given, nothing else), and
    count the layers whose float weights already lay on this dtype's grid, as AdaRound leaves them
    (all but the channel's largest |w|, which sets the scale and lies half way)."""
    grid = GRIDS[dtype]
    weights = [p.detach().double() for p in float_model.parameters() if p.dim() > 1]
    on_grid = 0
    for node in converted.graph.nodes:
        if node.target != torch.ops.quantized_decomposed.dequantize_per_channel.default:
            continue
        q, scales, zero_points = (getattr(converted, a.target) for a in node.args[:3])
        name = node.args[0].target
        if q.dtype != torch.int8 or bool(zero_points.any()):
            raise PipelineError(f"quantized weight {name}: not a symmetric int8 weight")
        shape = (-1,) + (1,) * (q.dim() - 1)
        offsets = [(w / scales.double().view(shape) - q.double()).abs() for w in weights if w.shape == q.shape]
        nearest = [off for off in offsets if bool((off <= 0.5 + 1e-3).all())]
        if not nearest:
            raise PipelineError(f"quantized weight {name}: not the float weight rounded onto its "
                                f"{dtype} grid [{grid.qmin}, {grid.qmax}]")
        on_grid += any(bool((off[off < 0.5 - 1e-3] < 1e-3).all()) for off in nearest)
    return on_grid


# XNNPACK's preprocessing runs all its passes on every program. Two of them look for bilinear
# upsampling and attention by matching pattern graphs, which they export and lower the first time
# (2.6 s of a process's first lowering, then 0.3 s per lowering). A pattern matches only a graph
# that has every op the pattern has, and every pattern of each pass has the op named here
# (tests/test_stages_frameworks.py checks that on the installed ExecuTorch): a graph without it
# cannot match, and the pass is skipped. ResNet8 has neither op; its programs came out byte for
# byte the same for every seed.
PATTERN_PASS_OPS = {"ConvertToUpsampleBilinear2d": "aten.upsample_bilinear2d.vec", "ConvertToSDPAPass": "aten.bmm.default"}


def op_names(graph_module: torch.fx.GraphModule) -> set[str]:
    """The overload names (`aten.bmm.default`) of the ops a graph calls."""
    return {str(node.target if isinstance(node.target, torch._ops.OpOverload)
                else getattr(node.target, "_op", node.target))  # an edge op wraps its ATen op
            for node in graph_module.graph.nodes if node.op == "call_function"}


@contextlib.contextmanager
def pattern_passes_skipped_where_they_cannot_match():
    """While in it, XNNPACK's pattern passes (PATTERN_PASS_OPS) leave a graph without their op as
    it is, without building their patterns; other graphs go through them as before."""
    from executorch.backends.xnnpack._passes.convert_to_sdpa import ConvertToSDPAPass
    from executorch.backends.xnnpack._passes.convert_to_upsample_bilinear2d import ConvertToUpsampleBilinear2d
    from torch.fx.passes.infra.pass_base import PassResult

    originals = {cls: cls.call for cls in (ConvertToUpsampleBilinear2d, ConvertToSDPAPass)}

    def call(self, graph_module):
        if PATTERN_PASS_OPS[type(self).__name__] not in op_names(graph_module):
            return PassResult(graph_module, False)
        return originals[type(self)](self, graph_module)

    for cls in originals:
        cls.call = call
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.call = original


def to_executorch(converted: torch.fx.GraphModule, example: np.ndarray) -> bytes:
    """The quantized graph as an ExecuTorch program, XNNPACK delegate, for EXECUTORCH_BATCH images."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from .torch_models import export

    batch = np.resize(np.asarray(example, np.float32), (EXECUTORCH_BATCH, *example.shape[1:]))
    program = export(converted, batch, dynamic_batch=False)
    for node in program.graph.nodes:
        node.meta.pop("stack_trace", None)
    with pattern_passes_skipped_where_they_cannot_match():
        return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer
