"""PyTorch static PTQ on the onnx2torch graph: prepare -> calibrate -> convert (torch.ao FX).

uint8: quint8 activations, qint8 weights, converted to the x86 (fbgemm) integer kernels.
int8:  qint8 activations, qint8 weights. No torch CPU kernel takes qint8 activations, so it is
       converted to a reference model (quantize / dequantize around float ops) whose Conv and
       Linear layers keep their weights as qint8 tensors and dequantize them when they run.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .adaround import GRIDS

class PercentileObserver(torch.ao.quantization.observer.UniformQuantizationObserverBase):
    """Range = the [100 - p, p] percentiles of the values seen (a seeded sample of each batch),
    widened to include 0: the same rule as ONNX Runtime's Percentile calibration."""

    SAMPLE = 200_000

    def __init__(self, percentile: float = 99.99, dtype=torch.quint8, qscheme=torch.per_tensor_affine,
                 reduce_range: bool = False, **kwargs) -> None:
        super().__init__(dtype=dtype, qscheme=qscheme, reduce_range=reduce_range, **kwargs)
        self.percentile = percentile
        self.samples: list[torch.Tensor] = []
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = x.detach().flatten().float()
        if values.numel() > self.SAMPLE:
            generator = torch.Generator().manual_seed(len(self.samples))
            values = values[torch.randint(0, values.numel(), (self.SAMPLE,), generator=generator)]
        self.samples.append(values)
        return x

    @torch.jit.export
    def calculate_qparams(self):
        values = torch.cat(self.samples)
        tail = (100.0 - self.percentile) / 100.0
        low, high = torch.quantile(values, torch.tensor([tail, 1.0 - tail]))
        self.min_val, self.max_val = torch.clamp(low, max=0.0), torch.clamp(high, min=0.0)
        return self._calculate_qparams(self.min_val, self.max_val)


OBSERVERS = {
    "MinMax": torch.ao.quantization.MinMaxObserver,
    "MovingAverageMinMax": torch.ao.quantization.MovingAverageMinMaxObserver,
    "Histogram": torch.ao.quantization.HistogramObserver,
    "Percentile": PercentileObserver,
}
ACTIVATION_DTYPES = {"uint8": torch.quint8, "int8": torch.qint8}
EXECUTION = {"uint8": "integer-kernels", "int8": "simulated-qdq"}


def qconfig_mapping(dtype: str, observer: str, per_channel: bool, reduce_range: bool, percentile: float):
    from torch.ao.quantization import QConfig, QConfigMapping

    act_dtype = ACTIVATION_DTYPES[dtype]
    extra = {"percentile": percentile} if observer == "Percentile" else {}
    activation = OBSERVERS[observer].with_args(dtype=act_dtype, qscheme=torch.per_tensor_affine,
                                               reduce_range=reduce_range, **extra)
    # the weight grid AdaRound rounds onto for this dtype (the one ONNX Runtime uses too)
    grid = dict(quant_min=GRIDS[dtype].qmin, quant_max=GRIDS[dtype].qmax)
    if per_channel:
        weight = torch.ao.quantization.PerChannelMinMaxObserver.with_args(
            dtype=torch.qint8, qscheme=torch.per_channel_symmetric, **grid)
    else:
        weight = torch.ao.quantization.MinMaxObserver.with_args(
            dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, **grid)
    mapping = QConfigMapping().set_global(QConfig(activation=activation, weight=weight))
    # Scores leave the network as float: an 8-bit softmax would turn close calls into ties.
    return mapping.set_object_type(nn.Softmax, None).set_object_type(F.softmax, None)


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


def pin_input_range(prepared: torch.fx.GraphModule, low: float = 0.0, high: float = 255.0) -> int:
    """The input is 8-bit pixels: give its observer the exact range, so that quantizing it is
    lossless (scale 1; zero point 0 for quint8, -128 for qint8) instead of a calibrated guess."""
    pinned = 0
    for node in prepared.graph.nodes:
        if node.op != "placeholder":
            continue
        for user in node.users:
            observer = prepared.get_submodule(user.target) if user.op == "call_module" else None
            if isinstance(observer, torch.ao.quantization.ObserverBase):
                exact = torch.ao.quantization.MinMaxObserver(dtype=observer.dtype, qscheme=torch.per_tensor_affine)
                exact(torch.tensor([low, high]))
                setattr(prepared, user.target, exact)
                pinned += 1
    return pinned


def quantize(float_model: torch.fx.GraphModule, calibration: Iterable[np.ndarray], dtype: str,
             observer: str, per_channel: bool, reduce_range: bool, percentile: float = 99.99) -> torch.nn.Module:
    """prepare -> calibrate -> convert. `calibration` yields float32 NHWC batches."""
    from torch.ao.quantization.quantize_fx import convert_fx, convert_to_reference_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    model = float_model.eval()
    batches = iter(calibration)
    first = torch.from_numpy(next(batches))
    backend = backend_config(dtype)
    prepared = prepare_fx(model, qconfig_mapping(dtype, observer, per_channel, reduce_range, percentile),
                          example_inputs=(first,), backend_config=backend)
    with torch.inference_mode():
        prepared(first)
        for batch in batches:
            prepared(torch.from_numpy(batch))
    pin_input_range(prepared)
    if dtype == "uint8":
        return convert_fx(prepared, backend_config=backend)
    return store_integer_weights(convert_to_reference_fx(prepared, backend_config=backend))
