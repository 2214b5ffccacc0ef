"""PyTorch static PTQ on the onnx2torch graph: prepare -> calibrate -> convert (torch.ao FX).

uint8: quint8 activations, qint8 weights, converted to PyTorch's integer kernels (QNNPACK, ENGINE).
int8:  qint8 activations, qint8 weights. No torch CPU kernel takes qint8 activations, so it is
       converted to a reference model (quantize / dequantize around float ops) whose Conv and
       Linear layers keep their weights as qint8 tensors and dequantize them when they run.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .adaround import GRIDS
from .runners import TORCH_ENGINE as ENGINE

ACTIVATION_DTYPES = {"uint8": torch.quint8, "int8": torch.qint8}


def qconfig_mapping(dtype: str, per_channel: bool, reduce_range: bool):
    from torch.ao.quantization import QConfig, QConfigMapping

    # activation observers are placeholders: fix_activation_ranges gives each its calibrated range
    activation = torch.ao.quantization.MinMaxObserver.with_args(
        dtype=ACTIVATION_DTYPES[dtype], qscheme=torch.per_tensor_affine, reduce_range=reduce_range)
    # the weight grid AdaRound rounds onto for this dtype (the one ONNX Runtime uses too)
    grid = dict(quant_min=GRIDS[dtype].qmin, quant_max=GRIDS[dtype].qmax)
    if per_channel:
        weight = torch.ao.quantization.PerChannelMinMaxObserver.with_args(
            dtype=torch.qint8, qscheme=torch.per_channel_symmetric, **grid)
    else:
        weight = torch.ao.quantization.MinMaxObserver.with_args(
            dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, **grid)
    mapping = QConfigMapping().set_global(QConfig(activation=activation, weight=weight))
    # Scores leave the network as float: an 8-bit softmax would turn close calls into ties. The
    # average pool runs in float too: quantized, it keeps its input's scale (the last ReLU's, four
    # times coarser than the pooled features need); in float, the features get their own range
    # before the Linear layer (agreement with float on held-out images: 0.9864 -> 0.9906, uint8).
    return (mapping.set_object_type(nn.Softmax, None).set_object_type(F.softmax, None)
            .set_object_type(nn.AvgPool2d, None))


def backend_config(dtype: str):
    """fbgemm's native config; for int8 every pattern also accepts qint8 activations (reference only)."""
    from torch.ao.quantization.backend_config import BackendConfig, DTypeConfig, get_native_backend_config

    native = get_native_backend_config()
    if dtype == "uint8":
        return native
    qint8 = DTypeConfig(input_dtype=torch.qint8, output_dtype=torch.qint8,
                        weight_dtype=torch.qint8, bias_dtype=torch.float)
    config = BackendConfig("reference_qint8")
    for pattern in native.configs:
        config.set_backend_pattern_config(pattern.add_dtype_config(qint8))
    return config


class QuantizedWeightConv2d(nn.Module):
    """A reference Conv2d that stores its weight as a quantized tensor (int8 in the file)."""

    def __init__(self, reference) -> None:
        super().__init__()
        self.register_buffer("qweight", reference.get_quantized_weight())
        self.bias = reference.bias
        self.stride, self.padding = reference.stride, reference.padding
        self.dilation, self.groups = reference.dilation, reference.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.qweight.dequantize(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class QuantizedWeightLinear(nn.Module):
    """A reference Linear that stores its weight as a quantized tensor (int8 in the file)."""

    def __init__(self, reference) -> None:
        super().__init__()
        self.register_buffer("qweight", reference.get_quantized_weight())
        self.bias = reference.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qweight.dequantize(), self.bias)


def is_quantized_layer(module: nn.Module) -> bool:
    """A converted Conv / Linear: fbgemm's integer modules, or our integer-weight reference ones
    (alone or inside a fused ConvReLU / LinearReLU)."""
    import torch.ao.nn.intrinsic.quantized as nniq
    import torch.ao.nn.quantized as nnq

    if isinstance(module, (nnq.Conv2d, nnq.Linear, nniq.ConvReLU2d, nniq.LinearReLU,
                           QuantizedWeightConv2d, QuantizedWeightLinear)):
        return True
    return isinstance(module, nn.Sequential) and len(module) > 0 and isinstance(
        module[0], (QuantizedWeightConv2d, QuantizedWeightLinear))


def store_integer_weights(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    import torch.ao.nn.quantized.reference as ref

    swaps = {ref.Conv2d: QuantizedWeightConv2d, ref.Linear: QuantizedWeightLinear}
    for name, module in list(model.named_modules()):
        replacement = swaps.get(type(module))
        if replacement is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement(module))
    model.recompile()
    return model


def observed_tensor(prepared: torch.fx.GraphModule, node: torch.fx.Node, onnx_graph) -> str:
    """The ONNX tensor whose values the FX node `node` computes. onnx2torch names each module after
    its ONNX node; FX keeps that name as the node's module path (nn_module_stack), splits a padded
    Conv into `<node>.0` (the Pad) and `<node>.1`, and fuses Conv + ReLU into one module."""
    if node.op == "placeholder":
        return onnx_graph.input[0].name
    nodes = {n.name: n for n in onnx_graph.node}
    stack = list(node.meta.get("nn_module_stack", {}).values())
    path = node.target if node.op == "call_module" else (stack[-1][0] if stack else node.name)
    onnx_node = nodes.get(path) or nodes.get(str(path).rsplit(".", 1)[0])
    if onnx_node is None:
        raise KeyError(f"FX node {node.name} ({path}) has no ONNX node")
    if path not in nodes and str(path).endswith(".0"):  # the Pad before a padded Conv: its input, plus zeros
        return onnx_node.input[0]
    module = prepared.get_submodule(node.target) if node.op == "call_module" else None
    output = onnx_node.output[0]
    if isinstance(module, torch.ao.nn.intrinsic.ConvReLU2d):  # fused: the ReLU's output is observed
        relu = [n for n in onnx_graph.node if output in n.input and n.op_type == "Relu"]
        if len(relu) != 1:
            raise KeyError(f"fused {node.target}: no single ONNX Relu after it")
        output = relu[0].output[0]
    return output


class FixedRangeObserver(torch.ao.quantization.MinMaxObserver):
    """An observer that holds a given range and ignores the values it sees."""

    def __init__(self, low: float, high: float, **kwargs) -> None:
        super().__init__(**kwargs)
        super().forward(torch.tensor([low, high]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fix_activation_ranges(prepared: torch.fx.GraphModule, onnx_graph, ranges: dict) -> int:
    """Give every activation observer the calibrated range of the tensor it observes (an observer
    fed exactly [low, high]); no calibration pass runs in torch."""
    fixed = 0
    for node in prepared.graph.nodes:
        if node.op != "call_module":
            continue
        observer = prepared.get_submodule(node.target)
        if not isinstance(observer, torch.ao.quantization.ObserverBase):
            continue
        tensor = observed_tensor(prepared, node.args[0], onnx_graph)
        setattr(prepared, node.target, FixedRangeObserver(
            ranges[tensor].low, ranges[tensor].high, dtype=observer.dtype, qscheme=observer.qscheme,
            reduce_range=observer.reduce_range))
        fixed += 1
    return fixed


def quantize(float_model: torch.fx.GraphModule, onnx_graph, ranges: dict, dtype: str,
             per_channel: bool, reduce_range: bool, example: np.ndarray) -> torch.nn.Module:
    """prepare -> (ranges fixed from the calibration stage) -> convert. `onnx_graph` is the graph
    the model was converted from; `example` a float32 NHWC batch for tracing."""
    from torch.ao.quantization.quantize_fx import convert_fx, convert_to_reference_fx, prepare_fx

    torch.backends.quantized.engine = ENGINE
    backend = backend_config(dtype)
    prepared = prepare_fx(float_model.eval(), qconfig_mapping(dtype, per_channel, reduce_range),
                          example_inputs=(torch.from_numpy(example),), backend_config=backend)
    fix_activation_ranges(prepared, onnx_graph, ranges)
    if dtype == "uint8":
        return convert_fx(prepared, backend_config=backend)
    return store_integer_weights(convert_to_reference_fx(prepared, backend_config=backend))
