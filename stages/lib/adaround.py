"""AdaRound (Nagel et al., 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization"):
choose, per weight, whether to round up or down so that each layer's output on calibration
images stays closest to the float layer's, instead of rounding every weight to nearest.

Works on the BatchNorm-folded float graph (onnx2torch), in float64 (so that the last-bit
differences between CPU kinds are far below anything that could flip a rounding decision), and
returns, per Conv / Gemm initializer, weights that already lie on the integer grid of the target
weight format. A quantizer that
uses the same grid (per-channel symmetric, scale = max|w| / grid_max) maps them exactly onto the
chosen integers, so the result feeds ONNX Runtime and PyTorch alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ZETA, GAMMA = 1.1, -0.1  # rectified sigmoid stretch


@dataclass(frozen=True)
class Grid:
    """Per-output-channel symmetric grid: q in [qmin, qmax], scale = max|w| / scale_divisor."""
    qmin: int
    qmax: int
    scale_divisor: float


# ONNX Runtime int8 symmetric weights use [-127, 127] and max/127; its uint8 symmetric weights
# (zero point 128) and PyTorch's qint8 per_channel_symmetric use max / 127.5 over [-128, 127].
GRIDS = {"int8": Grid(-127, 127, 127.0), "uint8": Grid(-128, 127, 127.5)}


def channel_scale(weight: torch.Tensor, grid: Grid) -> torch.Tensor:
    amax = weight.abs().flatten(1).max(dim=1).values.clamp(min=1e-12)
    return (amax / grid.scale_divisor).view(-1, *([1] * (weight.dim() - 1)))


def _soft(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _layer_output(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return F.conv2d(x, weight, module.bias, module.stride, module.padding, module.dilation, module.groups)
    return F.linear(x, weight, module.bias)


def round_layer(module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, grid: Grid,
                iterations: int, batch: int, seed: int) -> torch.Tensor:
    """Optimise the rounding of one layer; returns the float weights on the chosen grid points."""
    weight = module.weight.detach()
    scale = channel_scale(weight, grid)
    scaled = weight / scale
    floor = torch.floor(scaled)
    rest = (scaled - floor).clamp(1e-4, 1 - 1e-4)
    v = nn.Parameter(torch.log((rest - GAMMA) / (ZETA - rest)))  # _soft(v) == rest at the start
    # weights at the channel's max |w| define the scale: keep them exactly where they are
    fixed = (scaled.abs() >= grid.scale_divisor - 1e-4)
    # the others stay inside +-max|w|, or the quantizer would derive another scale
    low, high = max(grid.qmin, -int(grid.scale_divisor)), min(grid.qmax, int(grid.scale_divisor))
    optimizer = torch.optim.Adam([v], lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    for step in range(iterations):
        beta = 20 - (20 - 2) * max(0.0, (step / iterations - 0.2) / 0.8)
        pick = torch.randint(0, len(inputs), (batch,), generator=generator)
        soft = torch.where(fixed, weight, torch.clamp(floor + _soft(v), low, high) * scale)
        out = _layer_output(module, inputs[pick], soft)
        reconstruction = F.mse_loss(out, targets[pick])
        regulariser = (1 - (2 * _soft(v) - 1).abs().pow(beta)).sum() if step >= 0.2 * iterations else 0.0
        loss = reconstruction + 0.01 * regulariser / weight.numel() * 100
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        hard = torch.clamp(floor + (_soft(v) >= 0.5).to(floor.dtype), low, high) * scale
        return torch.where(fixed, weight, hard)


class _Enough(Exception):
    """Raised by a capture hook once the last wanted layer has run: the rest of the model is skipped."""


def _capture(model: nn.Module, modules: list[nn.Module], images: torch.Tensor, perturb=None,
             batch: int = 250) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each module's (inputs, outputs) on `images`, in one pass that stops after the last of
    them has run (modules in graph order); each tensor passed through `perturb` when given."""
    seen = [([], []) for _ in modules]
    change = (lambda t: t) if perturb is None else (lambda t: torch.from_numpy(perturb(t.numpy())))

    def hook_for(index: int):
        def hook(_module, args, output) -> None:
            seen[index][0].append(change(args[0].detach()))
            seen[index][1].append(change(output.detach()))
            if index == len(modules) - 1:
                raise _Enough
        return hook

    handles = [module.register_forward_hook(hook_for(i)) for i, module in enumerate(modules)]
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch):
                try:
                    model(images[start:start + batch])
                except _Enough:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return [(torch.cat(inputs), torch.cat(outputs)) for inputs, outputs in seen]


def fake_quantize(x: torch.Tensor, low: float, high: float, levels: int = 256) -> torch.Tensor:
    scale = max(high - low, 1e-8) / (levels - 1)
    zero = round(-low / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, levels - 1) - zero) * scale


def adaround(model: nn.Module, images: np.ndarray, grid: Grid, iterations: int = 1000,
             batch: int = 32, seed: int = 0, input_ranges: dict | None = None,
             perturb=None) -> dict:
    """Round every Conv2d and Linear of `model` layer by layer, in graph order, in float64. Each
    layer learns to reproduce the float model's outputs from the inputs it will see once
    quantized: computed with the layers before it already rounded and, with `input_ranges`
    ({module name: (low, high)}), with every layer's input fake-quantized to 8 bits over that
    range. `perturb` (tests) is applied to every captured float activation. Returns
    {module name: stats}; `model` is left in float64 with the new weights."""
    import copy

    model = model.double().eval()
    x = torch.from_numpy(np.asarray(images, dtype=np.float64))
    float_model = copy.deepcopy(model)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    float_layers = dict(float_model.named_modules())
    hooks, result = [], {}
    float_outputs = _capture(float_model, [float_layers[name] for name, _ in layers], x, perturb)
    for index, (name, module) in enumerate(layers):
        targets = float_outputs[index][1]
        if input_ranges is not None and index > 0:  # the first input is exact 8-bit pixels
            low, high = input_ranges[name]
            hooks.append(module.register_forward_pre_hook(
                lambda _m, args, low=low, high=high: (fake_quantize(args[0], low, high),)))
        [(inputs, _)] = _capture(model, [module], x, perturb)
        weight = round_layer(module, inputs, targets, grid, iterations, batch, seed + index)
        scale = channel_scale(module.weight.detach(), grid)
        flipped = int((torch.round(weight / scale) != torch.round(module.weight.detach() / scale)).sum())
        with torch.no_grad():
            module.weight.copy_(weight)
        result[name] = {"weights": int(weight.numel()), "rounded_away_from_nearest": flipped}
    for hook in hooks:
        hook.remove()
    return result


def onnx_node_of(nodes: dict, module_name: str):
    """The ONNX node an onnx2torch module came from (a padded Conv becomes `<node>.1`)."""
    node = nodes.get(module_name) or nodes.get(module_name.rsplit(".", 1)[0])
    if node is None:
        raise KeyError(f"no ONNX node for module {module_name}")
    return node


def input_ranges(onnx_path, model: nn.Module, ranges: dict) -> dict:
    """{Conv / Linear module name: (low, high)} of the ONNX tensor that feeds it."""
    import onnx

    nodes = {node.name: node for node in onnx.load(str(onnx_path)).graph.node}
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            tensor = onnx_node_of(nodes, name).input[0]
            found[name] = (ranges[tensor].low, ranges[tensor].high)
    return found


def weights_into_onnx(onnx_path, model: nn.Module, out_path) -> int:
    """Copy the Conv / Linear weights of an onnx2torch `model` into the ONNX graph it came from.
    onnx2torch names each module after its ONNX node (a padded Conv becomes `<node>.1`)."""
    import onnx
    from onnx import numpy_helper

    graph_model = onnx.load(str(onnx_path))
    nodes = {node.name: node for node in graph_model.graph.node}
    initializers = {init.name: init for init in graph_model.graph.initializer}
    written = 0
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        node = onnx_node_of(nodes, name)
        weight = module.weight.detach().numpy()
        if node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            weight = weight if trans_b else weight.T
        target = initializers[node.input[1]]
        if tuple(target.dims) != weight.shape:
            raise ValueError(f"{node.name}: weight shape {weight.shape} != ONNX {tuple(target.dims)}")
        target.CopyFrom(numpy_helper.from_array(weight.astype(np.float32), target.name))
        written += 1
    onnx.save(graph_model, str(out_path))
    return written
