"""AdaRound (Nagel et al., 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization"):
choose, per weight, whether to round up or down so that each layer's output on calibration
images stays closest to the float layer's, instead of rounding every weight to nearest.

Works on the BatchNorm-folded float graph (onnx2torch), in float64 (so that the last-bit
differences between CPU kinds are far below anything that could flip a rounding decision), and
returns, per Conv / Gemm initializer, weights that already lie on the integer grid of the target
weight format. A quantizer that
uses the same grid (per-channel symmetric, scale = max|w| / grid_max) maps them exactly onto the
chosen integers, so the result feeds ONNX Runtime and PyTorch alike.

`adaround_many` rounds for several calibration draws (seeds) at once: each layer's optimisation is
one problem for all draws (a leading draw dimension on the rounding variable; the loss the sum of
the draws' losses), and gives each draw, bit for bit, what `adaround` gives it alone. `adaround`
is `adaround_many` for one draw. Its cost is the float64 arithmetic (the convs' gemms), little
else: activations are captured in one pass per model rather than one per layer, the convs run
as gemms on a few images' columns at a time, without the page faults of ATen's large
temporaries, and each step's gradient with respect to the rounding variable is written out
(`_SoftWeights`) rather than taped by autograd.

The pipeline's default (adaround.batch = 0) learns from the full batch: every step's gradient is
over all calibration images, from each layer's Gram matrix (`_Gram`), so the images are gone
through once per layer rather than a mini-batch per step (the `batch` argument's default, 32, is
the mini-batch method).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.adam import adam

from . import integer_gram

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


def _layer_output(module: nn.Module, x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return F.conv2d(x, weight, bias, module.stride, module.padding, module.dilation, module.groups)
    return F.linear(x, weight, bias)


class _Autograd:
    """One draw's mini-batch gradient of a layer's reconstruction loss (mean squared error to the
    float outputs) with respect to its weight, by autograd through F.conv2d / F.linear."""

    def __init__(self, module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch: int):
        self.module, self.inputs, self.targets = module, inputs, targets
        self.bias = None if module.bias is None else module.bias.detach()

    def gradient(self, pick: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():  # round_layers' loop runs under no_grad
            weight = weight.detach().requires_grad_()
            out = _layer_output(self.module, self.inputs[pick], weight, self.bias)
            return torch.autograd.grad(F.mse_loss(out, self.targets[pick]), weight)[0]


def _plain_conv(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether `module` applied to `x` is a conv `_Columns` can lay out: one group, no dilation,
    zero padding given as numbers, a 4-d float64 input (all of ResNet8's convs in onnx2torch's graph)."""
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and tuple(module.dilation) == (1, 1)
            and module.padding_mode == "zeros" and not isinstance(module.padding, str)
            and x.dtype == torch.float64 and x.dim() == 4)


def _channels_last_conv(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether `module` applied to `x` is a conv `_Columns` computes as ATen does: a `_plain_conv`
    on a channels-last input (ResNet8's, fed NHWC images), which ATen's CPU float64 conv
    (slow_conv2d) takes its channels-last path for."""
    return (_plain_conv(module, x) and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous())


class _Columns:
    """Conv2d as ATen's channels-last slow_conv2d computes it, without its cost. slow_conv2d
    builds the "columns" of a whole batch (each output position's input patch, in (kh, kw, c)
    order: tens of MB here) then, image by image, output = bias + columns @ weight_2d^T, and for
    the weight gradient builds them again and accumulates columns^T @ grad_output image after
    image. Such fresh buffers are mapped anew by the allocator at every call, and the page faults
    cost more than the arithmetic. Here the columns of a few images at a time go into buffers kept
    from call to call (and stay in cache for the gemms that use them), and one gemm serves those
    images. Each output is still the same dot product, and MKL gives the same bits whether one
    image or several share a gemm (checked for every ResNet8 conv, with 1 and 2 threads);
    GROUP_BYTES = 0 makes it one image per gemm, exactly slow_conv2d's calls."""

    GROUP_BYTES = 4 << 20  # columns per gemm: enough to amortise the calls, little enough for cache

    def __init__(self, module: nn.Conv2d, height: int, width: int, most: int, dtype: torch.dtype | None = None,
                 border: int = 0, group: int | None = None):
        """Columns of up to `group` images at a time (default: as many as GROUP_BYTES of
        float64 columns hold, at most `most`), of `dtype` (default the weight's), the padding
        filled with `border` (the value that stands for 0)."""
        self.o, self.c, self.kh, self.kw = module.weight.shape
        self.sh, self.sw = module.stride
        self.ph, self.pw = module.padding
        self.hp, self.wp = height + 2 * self.ph, width + 2 * self.pw
        self.ho, self.wo = (self.hp - self.kh) // self.sh + 1, (self.wp - self.kw) // self.sw + 1
        self.positions, self.size = self.ho * self.wo, self.kh * self.kw * self.c
        self.group = group or max(1, min(most, self.GROUP_BYTES // (self.positions * self.size * 8)))
        dtype = dtype or module.weight.dtype
        self.padded = torch.full((self.group, self.hp, self.wp, self.c), border, dtype=dtype)  # borders stay
        self.interior = self.padded[:, self.ph:self.ph + height, self.pw:self.pw + width]
        self.columns = torch.empty(self.group * self.positions, self.size, dtype=dtype)
        self.transposed = (torch.empty(self.o * self.group * self.positions, dtype=dtype)  # output_weights_first
                           if dtype.is_floating_point else None)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """[count * positions, kh * kw * c] columns of `images` (NHWC, count <= group)."""
        count = len(images)
        if self.ph or self.pw or not images.is_contiguous():
            self.interior[:count].copy_(images)
            images = self.padded
        row, pixel = self.wp * self.c, self.c
        patches = images.as_strided((count, self.ho, self.wo, self.kh, self.kw, self.c),
                                    (self.hp * row, self.sh * row, self.sw * pixel, row, pixel, 1))
        columns = self.columns[:count * self.positions]
        columns.view(count, self.ho, self.wo, self.kh, self.kw, self.c).copy_(patches)
        return columns

    def weight_2d(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.permute(0, 2, 3, 1).reshape(self.o, self.size)

    @staticmethod
    def output(columns: torch.Tensor, weight_2d: torch.Tensor, bias: torch.Tensor | None,
               out: torch.Tensor) -> torch.Tensor:
        if bias is None:
            return torch.mm(columns, weight_2d.t(), out=out)
        return torch.addmm(bias, columns, weight_2d.t(), out=out)

    def output_weights_first(self, columns: torch.Tensor, weight_2d: torch.Tensor, bias: torch.Tensor | None,
                             out: torch.Tensor) -> torch.Tensor:
        """`output` up to the last bits, faster: weight_2d @ columns^T (the weights as the gemm's
        left operand, 1.5 to 2 times as fast with MKL's float64 gemm for 16 to 64 output channels),
        then transposed into `out` as the bias is added. Not F.conv2d's bits: MKL sums each dot
        product in another order."""
        rows = len(columns)
        transposed = torch.mm(weight_2d, columns.t(), out=self.transposed[:self.o * rows].view(self.o, rows))
        if bias is None:
            return out.copy_(transposed.t())
        return torch.add(transposed.t(), bias, out=out)


def _fast_convs(model: nn.Module) -> None:
    """Have `model`'s Conv2d compute, where `_channels_last_conv` holds, with `_Columns`
    (`output_weights_first`: F.conv2d's numbers up to the last bits): for the copies
    `adaround_many` captures activations from. Such last-bit differences are what another CPU kind
    gives anyway; tests/test_stages_frameworks.py checks that noise of that size changes no range
    and no rounding, and the pipeline's weights came out byte for byte the same for every draw."""
    for module in model.modules():
        if not isinstance(module, nn.Conv2d):
            continue
        columns = {}

        def forward(x, module=module, columns=columns):
            if not _channels_last_conv(module, x):
                return type(module).forward(module, x)
            n, _, height, width = x.shape
            key = (height, width)
            if key not in columns:
                columns[key] = _Columns(module, height, width, n)
            im2col = columns[key]
            weight_2d = im2col.weight_2d(module.weight.detach())
            bias = None if module.bias is None else module.bias.detach()
            nhwc = x.permute(0, 2, 3, 1)
            out = x.new_empty(n, im2col.ho, im2col.wo, im2col.o)
            for start in range(0, n, im2col.group):
                part = nhwc[start:start + im2col.group]
                im2col.output_weights_first(im2col(part), weight_2d, bias,
                                            out[start:start + len(part)].view(-1, im2col.o))
            return out.permute(0, 3, 1, 2)

        module.forward = forward


class _ChannelsLastConv:
    """`_Autograd`'s gradient, same numbers, for a conv where `_channels_last_conv` holds: per
    group of images, columns, output = bias + columns @ weight_2d^T (`_Columns`), mse_loss's
    gradient 2 / n * (output - target), and the weight gradient accumulated as slow_conv2d does."""

    applies = staticmethod(_channels_last_conv)

    def __init__(self, module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch: int):
        self.bias = None if module.bias is None else module.bias.detach()
        self.inputs = inputs.permute(0, 2, 3, 1)  # NHWC, contiguous
        self.targets = targets.permute(0, 2, 3, 1).contiguous()  # a view when channels-last, as here
        _, height, width, channels = self.inputs.shape
        self.im2col = _Columns(module, height, width, batch)
        group = self.im2col.group
        self.picked = inputs.new_empty(group, height, width, channels)
        self.outputs = inputs.new_empty(group * self.im2col.positions, self.im2col.o)
        self.wanted = inputs.new_empty(group, *self.targets.shape[1:])

    def gradient(self, pick: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        im2col = self.im2col
        weight_2d = im2col.weight_2d(weight)
        norm = 2. / (len(pick) * im2col.positions * im2col.o)  # mse_loss: mean over the batch's outputs
        grad = weight.new_zeros(im2col.o, im2col.size)
        for start in range(0, len(pick), im2col.group):
            part = pick[start:start + im2col.group]
            picked, wanted = self.picked[:len(part)], self.wanted[:len(part)]
            columns = im2col(torch.index_select(self.inputs, 0, part, out=picked))
            outputs = im2col.output(columns, weight_2d, self.bias, self.outputs[:len(columns)])
            torch.index_select(self.targets, 0, part, out=wanted)
            outputs.sub_(wanted.view(len(columns), im2col.o)).mul_(norm)  # d mse / d output
            grad.addmm_(outputs.t(), columns)
        return grad.view(im2col.o, im2col.kh, im2col.kw, im2col.c).permute(0, 3, 1, 2)


class _Gram:
    """The full-batch gradient: the reconstruction loss over every calibration image at every step,
    which costs one pass over the images, not one per step. With X the layer's input columns (one
    per output position and image, M outputs in all), Y its float outputs and b its bias,
    mse = |W X + b - Y|^2 / M, so d mse / dW = 2 / M * (W G + A) with G = X X^T and
    A = b (sum of X)^T - Y X^T, both fixed for the layer and summed once (`GROUP_BYTES` of columns at
    a time). An input given as 8-bit `codes` (integer_gram.Codes: every layer's input once
    quantized, and the pixels) has G = scale^2 * C C^T, C the codes, summed exactly in integers
    (lib/integer_gram.py): the same matrix on every CPU kind. Otherwise G is summed by BLAS syrk in
    float64 (its upper triangle: half a gemm's multiplications), whose last bits differ between CPU
    kinds; for the pipeline's draws the rounding came out byte for byte the same either way."""

    def __init__(self, module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch: int,
                 codes: integer_gram.Codes | None = None):
        weight = module.weight.detach()
        bias = None if module.bias is None else module.bias.detach()
        # a layer's Gram matrix is [size, size], size = what one output sums over (weight[0].numel())
        exact = None if codes is None else integer_gram.IntegerGram(weight[0].numel(), codes.zero)
        if codes is not None and codes.shifted.shape != inputs.shape:
            raise ValueError(f"adaround: codes {tuple(codes.shifted.shape)} for inputs {tuple(inputs.shape)}")
        if isinstance(module, nn.Conv2d):
            inputs = inputs.contiguous(memory_format=torch.channels_last)  # same values, NHWC in memory
            targets = targets.contiguous(memory_format=torch.channels_last)
            if not _plain_conv(module, inputs):
                raise ValueError(f"adaround: no full-batch gradient for {module} (grouped, dilated or not float64)")
            im2col = _Columns(module, *inputs.shape[2:], len(inputs))
            self.to_2d = im2col.weight_2d
            self.from_2d = lambda g: g.view(im2col.o, im2col.kh, im2col.kw, im2col.c).permute(0, 3, 1, 2)
            nhwc, nhwc_targets = inputs.permute(0, 2, 3, 1), targets.permute(0, 2, 3, 1)
            if codes is None:
                # a generator: im2col fills the same buffer at every call, so each group is summed first
                parts = ((im2col(nhwc[i:i + im2col.group]), nhwc_targets[i:i + im2col.group].reshape(-1, im2col.o),
                          None) for i in range(0, len(inputs), im2col.group))
            else:
                parts = self._code_parts(module, codes, nhwc_targets, im2col.group, exact.offset)
            size, outputs = im2col.size, im2col.o
        else:  # Linear: one column per image
            self.to_2d, self.from_2d = (lambda w: w), (lambda g: g)
            shifted = None if codes is None else codes.shifted.reshape(len(inputs), -1)
            columns = (inputs.reshape(len(inputs), -1) if codes is None
                       else shifted.to(torch.float64).add_(exact.offset))
            parts = iter([(columns, targets.reshape(len(targets), -1), shifted)])
            size, outputs = weight.shape[1], weight.shape[0]
        from scipy.linalg.blas import dsyrk

        gram = np.zeros((size, size), order="F")  # its upper triangle: G is symmetric
        self.cross = weight.new_zeros(outputs, size)  # A
        total = weight.new_zeros(size)
        count = 0
        for columns, wanted, shifted in parts:
            if exact is None:
                # X X^T by BLAS syrk, half the multiplications of a gemm (columns^T is Fortran-ordered X)
                gram = dsyrk(1.0, columns.numpy().T, beta=1.0, c=gram, overwrite_c=1)
            else:
                exact.add(shifted, columns)
            self.cross.addmm_(wanted.t(), columns, alpha=-1)
            total += columns.sum(0)
            count += len(columns)
        if exact is None:
            self.gram = torch.from_numpy(np.triu(gram) + np.triu(gram, 1).T)
        else:  # the sums were over the codes: X = scale * codes
            self.gram = exact.matrix().mul_(codes.scale * codes.scale)
            self.cross.mul_(codes.scale)
            total.mul_(codes.scale)
        if bias is not None:
            self.cross.add_(torch.outer(bias, total))
        self.norm = 2. / (count * outputs)

    def gradient(self, pick: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.from_2d(torch.addmm(self.cross, self.to_2d(weight), self.gram).mul_(self.norm))

    @staticmethod
    def _code_parts(module: nn.Conv2d, codes: integer_gram.Codes, nhwc_targets: torch.Tensor, group: int,
                    offset: int):
        """Per group of images: (the codes' columns as float64 whole numbers, the targets, the same
        columns shifted to int8). Only the int8 columns are laid out (an eighth of the bytes); the
        float64 ones are converted from them, and the padding code stands for 0."""
        nhwc = codes.shifted.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        shifted_columns = _Columns(module, *nhwc.shape[1:3], len(nhwc), torch.int8,
                                   codes.zero - integer_gram.SHIFT, group)
        numbers = torch.empty(group * shifted_columns.positions, shifted_columns.size, dtype=torch.float64)
        for i in range(0, len(nhwc), group):
            shifted = shifted_columns(nhwc[i:i + group])
            yield (numbers[:len(shifted)].copy_(shifted).add_(offset),
                   nhwc_targets[i:i + group].reshape(-1, shifted_columns.o), shifted)


def _stacked(t: torch.Tensor, count: int) -> torch.Tensor:
    """`count` copies of `t` along a new leading dimension, each laid out in memory like `t`
    (onnx2torch's Dense weight is a transposed view: its copies stay transposed, so that each
    draw's layer computes exactly as it would alone)."""
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))  # outermost dimension first
    stacked = t.permute(order).contiguous().unsqueeze(0).repeat(count, *([1] * t.dim()))
    return stacked.permute(0, *(order.index(d) + 1 for d in range(t.dim())))


class _SoftWeights:
    """A layer's soft weights, [draws, *weight.shape], from the rounding variable v, and the
    gradient with respect to v, written out rather than taped by autograd at every step:

        soft = where(fixed, weight, clamp(floor + _soft(v), low, high) * scale)
        loss = sum over draws of reconstruction(soft) + 0.01 * regulariser(v) / numel * 100
        regulariser(v) = sum(1 - |2 * _soft(v) - 1| ** beta)   (from 20% of the steps on)

    `backward` runs the operations autograd's backward functions run for these expressions
    (where, mul, clamp_backward, pow_backward, abs's sgn, sigmoid_backward), in the same order on
    tensors of the same layout, and adds the two paths into v last as autograd's accumulation
    does, so the gradient is the same to the bit (tests/test_adaround_gradient.py compares it with
    autograd's); it saves the graph building and the engine, most of a small layer's step."""

    STRETCH = ZETA - GAMMA

    def __init__(self, weight, scale, floor, fixed, low: int, high: int):
        self.weight, self.scale, self.floor, self.fixed, self.low, self.high = weight, scale, floor, fixed, low, high
        self.regulariser_grad = -(1.0 * 100 / weight.numel() * 0.01)  # d loss / d (1 - |.| ** beta)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        self.sigmoid = torch.sigmoid(v)
        self.stretched = self.sigmoid * self.STRETCH + GAMMA
        self.rest = torch.clamp(self.stretched, 0, 1)  # _soft(v)
        self.unclamped = self.floor + self.rest
        return torch.where(self.fixed, self.weight, torch.clamp(self.unclamped, self.low, self.high) * self.scale)

    def _through_soft(self, grad: torch.Tensor) -> torch.Tensor:
        """d / dv from d / d _soft(v)."""
        grad = torch.where((self.stretched >= 0) & (self.stretched <= 1), grad, 0.) * self.STRETCH
        return torch.ops.aten.sigmoid_backward(grad, self.sigmoid)

    def backward(self, grads: torch.Tensor, beta: float | None) -> torch.Tensor:
        """d loss / dv for the `forward` just run, given d reconstruction / d soft (`grads`);
        beta None: no regulariser at this step."""
        grad = torch.where(self.fixed, 0., grads) * self.scale
        grad = torch.where((self.unclamped >= self.low) & (self.unclamped <= self.high), grad, 0.)
        grad = self._through_soft(grad)
        if beta is None:
            return grad
        centred = 2 * self.rest - 1
        magnitude = centred.abs()
        regulariser = self.regulariser_grad * (beta * magnitude.pow(beta - 1)) * centred.sgn() * 2
        return grad + self._through_soft(regulariser)


class _Adam:
    """torch.optim.Adam(lr=lr) for one tensor, stepped through the optimizer's functional form
    (torch.optim.adam.adam: the same single-tensor update the class runs on CPU, on the state the
    class would create), so the same numbers to the bit (tests/test_adaround_gradient.py), without
    the class's import of torch._dynamo (1.1 s per process, 10 s on an emulated CPU) and its
    per-step wrappers."""

    def __init__(self, param: torch.Tensor, lr: float):
        self.param, self.lr = param, lr
        self.exp_avg = torch.zeros_like(param, memory_format=torch.preserve_format)
        self.exp_avg_sq = torch.zeros_like(param, memory_format=torch.preserve_format)
        self.steps = torch.tensor(0.0)  # the class's step counter: a float32 scalar on the CPU

    def step(self, grad: torch.Tensor) -> None:
        adam([self.param], [grad], [self.exp_avg], [self.exp_avg_sq], [], [self.steps], foreach=False,
             amsgrad=False, beta1=0.9, beta2=0.999, lr=self.lr, weight_decay=0.0, eps=1e-8, maximize=False)


def round_layers(module: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor], grid: Grid,
                 iterations: int, batch: int, seeds: list[int],
                 codes: list[integer_gram.Codes | None] | None = None) -> torch.Tensor:
    """Optimise the rounding of one layer for several calibration draws at once; returns the float
    weights on the chosen grid points, [draws, *weight.shape].

    Draw d learns to map inputs[d] to targets[d] on mini-batches of `batch` images drawn by a
    generator seeded with seeds[d], or (batch 0) on all of them at every step (`_Gram`). Scale,
    floor and the fixed weights depend on the float weight only and are shared; the rounding
    variable has a leading draw dimension and one Adam optimises it. The loss is the sum of the
    draws' losses (mean squared error + rounding regulariser), so each draw's
    gradient, and Adam's elementwise step, are exactly those of the draw optimised alone. `codes`
    (full batch only): each draw's inputs as 8-bit codes, or None, for exact Gram matrices."""
    weight = module.weight.detach()
    scale = channel_scale(weight, grid)
    scaled = weight / scale
    floor = torch.floor(scaled)
    rest = (scaled - floor).clamp(1e-4, 1 - 1e-4)
    # _soft(v) == rest at the start
    v = _stacked(torch.log((rest - GAMMA) / (ZETA - rest)), len(seeds))
    # weights at the channel's max |w| define the scale: keep them exactly where they are
    fixed = (scaled.abs() >= grid.scale_divisor - 1e-4)
    # the others stay inside +-max|w|, or the quantizer would derive another scale
    low, high = max(grid.qmin, -int(grid.scale_divisor)), min(grid.qmax, int(grid.scale_divisor))
    optimizer = _Adam(v, lr=1e-2)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    codes = [None] * len(inputs) if codes is None else codes
    if batch == 0:
        draws = [_Gram(module, x, y, batch, c) for x, y, c in zip(inputs, targets, codes)]
    else:
        kind = lambda m, x, y, b: (_ChannelsLastConv if _ChannelsLastConv.applies(m, x) else _Autograd)(m, x, y, b)
        draws = [kind(module, x, y, batch) for x, y in zip(inputs, targets)]
    rounding = _SoftWeights(weight, scale, floor, fixed, low, high)
    with torch.no_grad():
        for step in range(iterations):
            beta = 20 - (20 - 2) * max(0.0, (step / iterations - 0.2) / 0.8)
            picks = ([None] * len(draws) if batch == 0 else
                     [torch.randint(0, len(x), (batch,), generator=g) for x, g in zip(inputs, generators)])
            soft = rounding.forward(v)
            # d(reconstruction loss) / d(soft weights), draw by draw
            grads = torch.stack([draw.gradient(pick, w) for draw, pick, w in zip(draws, picks, soft.unbind(0))])
            optimizer.step(rounding.backward(grads, beta if step >= 0.2 * iterations else None))
    with torch.no_grad():
        hard = torch.clamp(floor + (_soft(v) >= 0.5).to(floor.dtype), low, high) * scale
        return torch.where(fixed, weight, hard)


def round_layer(module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, grid: Grid,
                iterations: int, batch: int, seed: int) -> torch.Tensor:
    """Optimise the rounding of one layer; returns the float weights on the chosen grid points."""
    return round_layers(module, [inputs], [targets], grid, iterations, batch, [seed])[0]


class _Enough(Exception):
    """Raised by a capture hook once the wanted layer has run: the rest of the model is skipped."""


def _attribute(root, target: str):
    for atom in target.split("."):
        root = getattr(root, atom)
    return root


def _graph_steps(model: nn.Module, names: list[str]):
    """(steps, last_use, at): the nodes of an fx GraphModule as callables step(values, images),
    for each node the index of its last user, and {layer name: index of the node that calls it}.
    Anything else (a graph whose layers do not run in `names` order, each in a node of its own)
    is one step, the whole model, run again for every capture."""
    whole = ([lambda values, images: model(images)], [0], {name: 0 for name in names})
    if not isinstance(model, torch.fx.GraphModule):
        return whole
    nodes = list(model.graph.nodes)
    index = {node: i for i, node in enumerate(nodes)}
    at = {}
    for name in names:
        callers = [i for i, node in enumerate(nodes) if node.op == "call_module"
                   and (name == node.target or name.startswith(f"{node.target}."))]
        if len(callers) != 1:
            return whole
        at[name] = callers[0]
    positions = [at[name] for name in names]
    if (any(a >= b for a, b in zip(positions, positions[1:]))
            or sum(node.op == "placeholder" for node in nodes) != 1):
        return whole

    def step(node):
        def load(values, arguments):
            return torch.fx.node.map_arg(arguments, lambda n: values[index[n]])
        if node.op == "placeholder":
            return lambda values, images: images
        if node.op == "get_attr":
            return lambda values, images: _attribute(model, node.target)
        if node.op == "call_module":
            module = _attribute(model, node.target)
            return lambda values, images: module(*load(values, node.args), **load(values, node.kwargs))
        if node.op == "call_function":
            return lambda values, images: node.target(*load(values, node.args), **load(values, node.kwargs))
        if node.op == "call_method":
            def method(values, images):
                self, *args = load(values, node.args)
                return getattr(self, node.target)(*args, **load(values, node.kwargs))
            return method
        return lambda values, images: load(values, node.args)[0]  # output

    last_use = [max((index[user] for user in node.users), default=i) for i, node in enumerate(nodes)]
    return [step(node) for node in nodes], last_use, at


class _Stream:
    """A model run over fixed chunks of images node by node, keeping only the values that later
    nodes still need: each layer's input (or output) is captured by running only the graph
    between the previous layer and this one (the original re-ran the model from the start for
    every layer). Node for node the same operations on the same images, hence the same values.
    Chunks of 16 images: every op computes each image alone (the convs too, see `_Columns`), so
    the chunk size changes no number (the original used 250), and small chunks keep temporaries
    small enough to be reused rather than mapped afresh (page faults) at every op."""

    def __init__(self, model: nn.Module, images: torch.Tensor, names: list[str], chunk: int = 16):
        self.modules = dict(model.named_modules())
        self.count = len(images)
        self.chunks = [images[start:start + chunk] for start in range(0, len(images), chunk)]
        self.steps, self.last_use, self.at = _graph_steps(model, names)
        self.dies_at = [[] for _ in self.steps]  # the values whose last user is that node
        for i, last in enumerate(self.last_use):
            self.dies_at[last].append(i)
        self.values = [{} for _ in self.chunks]
        self.position = 0  # the nodes before it hold valid values

    def capture(self, name: str, outputs: bool, change=None) -> torch.Tensor:
        """Layer `name`'s outputs (else its inputs, after any input pre-hook) on all images,
        each passed through `change` when given. Once the weights of layer `name` change,
        capture nothing before the next layer's."""
        target = self.at[name]
        start = min(self.position, target)
        stop = not outputs or len(self.steps) == 1  # skip the layer itself / the rest of the model
        following = target if stop else target + 1  # the next capture starts there at the earliest
        result, filled = None, 0

        def keep(tensor):
            nonlocal result, filled
            changed = tensor.detach() if change is None else change(tensor.detach())
            if result is None:  # laid out as torch.cat of the chunks would be
                channels_last = (changed.dim() == 4 and not changed.is_contiguous()
                                 and changed.is_contiguous(memory_format=torch.channels_last))
                result = torch.empty((self.count, *changed.shape[1:]), dtype=changed.dtype,
                                     memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            if filled + len(changed) > self.count:
                raise RuntimeError(f"adaround: layer {name} runs more than once per forward pass")
            part = result[filled:filled + len(changed)]
            part.copy_(changed)
            filled += len(changed)
            if stop:
                raise _Enough
            # the model goes on with the captured copy (same numbers) rather than keep a second one
            return part if change is None else None

        module = self.modules[name]
        handle = (module.register_forward_hook(lambda _m, _args, output: keep(output)) if outputs
                  else module.register_forward_pre_hook(lambda _m, args: keep(args[0])))
        try:
            with torch.no_grad():
                for chunk, values in zip(self.chunks, self.values):
                    for i in [i for i in values if i >= start or self.last_use[i] < start]:
                        del values[i]
                    try:
                        for i in range(start, target + 1):
                            values[i] = self.steps[i](values, chunk)
                            if i < following:
                                for dead in self.dies_at[i]:
                                    values.pop(dead, None)
                    except _Enough:
                        pass
        finally:
            handle.remove()
        if filled != self.count:
            raise RuntimeError(f"adaround: layer {name} did not run on every image")
        self.position = following
        return result


def _activation_grid(low: float, high: float, levels: int = 256) -> tuple[float, int]:
    """(scale, zero point) of an 8-bit activation range."""
    scale = max(high - low, 1e-8) / (levels - 1)
    return scale, round(-low / scale)


def _codes(x: torch.Tensor, scale: float, zero: int, levels: int = 256) -> torch.Tensor:
    """clamp(round(x / scale) + zero, 0, levels - 1): float64 whole numbers, in one new tensor."""
    return (x / scale).round_().add_(zero).clamp_(0, levels - 1)


def fake_quantize(x: torch.Tensor, low: float, high: float, levels: int = 256) -> torch.Tensor:
    """(clamp(round(x / scale) + zero, 0, levels - 1) - zero) * scale, in one new tensor (the
    same operations in place: no temporary per step)."""
    scale, zero = _activation_grid(low, high, levels)
    return _codes(x, scale, zero, levels).sub_(zero).mul_(scale)


class _QuantizedInput:
    """A layer's input pre-hook: the input fake-quantized to 8 bits over [low, high], as deployed
    (`fake_quantize`), and, while `recording`, its codes kept chunk by chunk for `take`."""

    def __init__(self, low: float, high: float, recording: bool):
        self.recording, self.chunks = recording, []
        self.scale, self.zero = _activation_grid(low, high)

    def __call__(self, _module, args):
        codes = _codes(args[0], self.scale, self.zero)
        if self.recording:
            self.chunks.append(codes.sub(integer_gram.SHIFT).to(torch.int8))
        return (codes.sub_(self.zero).mul_(self.scale),)

    def take(self, count: int) -> integer_gram.Codes:
        """The codes of the `count` inputs recorded, in order; recording stops."""
        recorded = sum(len(chunk) for chunk in self.chunks)
        if recorded != count:
            raise RuntimeError(f"adaround: {recorded} quantized inputs recorded for {count} images")
        shifted = torch.cat(self.chunks)
        self.chunks, self.recording = [], False
        return integer_gram.Codes(shifted, self.zero, self.scale)


def adaround_many(model: nn.Module, images_per_seed: list[np.ndarray], grid: Grid, iterations: int = 1000,
                  batch: int = 32, seeds: list[int] | None = None,
                  input_ranges_per_seed: list[dict | None] | None = None,
                  perturb=None) -> list[tuple[dict[str, torch.Tensor], dict]]:
    """AdaRound for several calibration draws at once: draw d rounds the model on
    images_per_seed[d] with seed seeds[d] and input ranges input_ranges_per_seed[d] (None: no
    input fake-quantization; the whole argument None: none for any draw). Returns, per draw,
    ({module name: rounded float64 weight}, {module name: stats}), each exactly what `adaround`
    gives for that draw alone. `model` is not modified (the work happens on float64 copies).

    Every Conv2d and Linear is rounded layer by layer, in graph order, in float64. Each layer
    learns to reproduce the float model's outputs from the inputs it will see once quantized:
    computed with the layers before it already rounded (with this draw's weights) and, with
    input ranges ({module name: (low, high)}), with every layer's input after the first
    fake-quantized to 8 bits over that range. The layer's optimisation runs once for all draws
    (`round_layers`); with the full batch, a layer whose inputs are 8-bit codes (fake-quantized, or
    the pixels) gets its Gram matrix from the codes, exactly (`_Gram`). `perturb` (tests) is
    applied to every captured float activation the rounding learns from (the float model's layer
    outputs, the quantized model's layer inputs); the codes, whole numbers, take none."""
    import copy

    if seeds is None or len(seeds) != len(images_per_seed):
        raise ValueError("adaround_many needs one seed per image set")
    draws = len(seeds)
    all_ranges = [None] * draws if input_ranges_per_seed is None else list(input_ranges_per_seed)
    if len(all_ranges) != draws:
        raise ValueError("adaround_many needs one input_ranges (or None) per image set")
    change = None if perturb is None else (lambda t: torch.from_numpy(perturb(t.numpy())))

    float_model = copy.deepcopy(model).double().eval()
    names = [name for name, m in float_model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    float_layers = dict(float_model.named_modules())
    models = [copy.deepcopy(float_model) for _ in range(draws)]
    for m in (float_model, *models):
        _fast_convs(m)
    layers = [dict(m.named_modules()) for m in models]
    images = [torch.from_numpy(np.asarray(x, dtype=np.float64)) for x in images_per_seed]
    float_streams = [_Stream(float_model, x, names) for x in images]
    streams = [_Stream(m, x, names) for m, x in zip(models, images)]
    results = [({}, {}) for _ in range(draws)]
    for index, name in enumerate(names):
        targets = [stream.capture(name, True, change) for stream in float_streams]
        inputs, codes = [], []
        for stream, modules, ranges in zip(streams, layers, all_ranges):
            if ranges is not None and index > 0:  # the first input is exact 8-bit pixels
                hook = _QuantizedInput(*ranges[name], recording=batch == 0)  # codes: exact Gram matrices
                modules[name].register_forward_pre_hook(hook)
                inputs.append(stream.capture(name, False, change))
                codes.append(hook.take(len(inputs[-1])) if batch == 0 else None)
            else:
                inputs.append(stream.capture(name, False, change))
                codes.append(integer_gram.pixel_codes(inputs[-1]) if index == 0 and batch == 0 else None)
        module = float_layers[name]
        rounded = round_layers(module, inputs, targets, grid, iterations, batch, [seed + index for seed in seeds],
                               codes)
        del inputs, targets, codes
        weight = module.weight.detach()
        scale = channel_scale(weight, grid)
        nearest = torch.round(weight / scale)
        for (weights, stats), modules, new in zip(results, layers, rounded.unbind(0)):
            new = new.clone()
            with torch.no_grad():
                modules[name].weight.copy_(new)
            weights[name] = new
            stats[name] = {"weights": int(new.numel()),
                           "rounded_away_from_nearest": int((torch.round(new / scale) != nearest).sum())}
    return results


def adaround(model: nn.Module, images: np.ndarray, grid: Grid, iterations: int = 1000,
             batch: int = 32, seed: int = 0, input_ranges: dict | None = None,
             perturb=None) -> dict:
    """`adaround_many` for one draw, written into `model`: returns {module name: stats}; `model`
    is left in float64 (eval mode) with the new weights."""
    model = model.double().eval()
    [(weights, stats)] = adaround_many(model, [images], grid, iterations, batch, [seed], [input_ranges],
                                       perturb)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, weight in weights.items():
            modules[name].weight.copy_(weight)
    return stats


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
