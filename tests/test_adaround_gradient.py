"""AdaRound's gradient with respect to its rounding variable, written out (lib/adaround._SoftWeights)
rather than taped by autograd at every step: it must be autograd's gradient for the same loss, to
the bit, so that the learned rounding does not depend on which of the two computed it."""
from __future__ import annotations

import pytest
import torch

from stages.lib import adaround


def autograds(v, weight, scale, floor, fixed, low, high, grads, beta):
    """The gradient as the loss was written before: autograd through _soft, the soft weights
    (given d reconstruction / d soft) and, with beta, the rounding regulariser."""
    v = v.detach().clone().requires_grad_()
    soft = torch.where(fixed, weight, torch.clamp(floor + adaround._soft(v), low, high) * scale)
    outputs, output_grads = [soft], [grads]
    if beta is not None:
        regulariser = (1 - (2 * adaround._soft(v) - 1).abs().pow(beta)).sum()
        outputs.append(0.01 * regulariser / weight.numel() * 100)
        output_grads.append(None)
    torch.autograd.backward(outputs, output_grads)
    return soft.detach(), v.grad


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int64)


@pytest.mark.parametrize("shape, transposed", [((8, 4, 3, 3), False), ((16, 10), True)])
@pytest.mark.parametrize("draws", [1, 3])
@pytest.mark.parametrize("beta", [None, 20.0, 7.3, 2.0])
def test_written_out_gradient_is_autograds_to_the_bit(shape, transposed, draws, beta):
    generator = torch.Generator().manual_seed(draws * 100 + len(shape))
    weight = torch.randn(shape, generator=generator, dtype=torch.float64)
    if transposed:  # onnx2torch's Dense weight is a transposed view
        weight = weight.t().contiguous().t()
    scale = adaround.channel_scale(weight, adaround.GRIDS["uint8"])
    floor = torch.randint(-130, 130, shape, generator=generator).to(torch.float64)  # some beyond low / high
    fixed = torch.rand(shape, generator=generator) < 0.1
    # v wide enough that _soft clamps at 0 and at 1 for some weights
    v = adaround._stacked(torch.randn(shape, generator=generator, dtype=torch.float64) * 4, draws)
    grads = torch.randn((draws, *shape), generator=generator, dtype=torch.float64)
    rounding = adaround._SoftWeights(weight, scale, floor, fixed, -127, 127)
    with torch.no_grad():
        soft = rounding.forward(v)
        gradient = rounding.backward(grads, beta)
    expected_soft, expected = autograds(v, weight, scale, floor, fixed, -127, 127, grads, beta)
    stretched = torch.sigmoid(v) * (adaround.ZETA - adaround.GAMMA) + adaround.GAMMA
    assert bool((stretched < 0).any()) and bool((stretched > 1).any())  # both clamps of _soft are hit
    assert bool(((floor + stretched.clamp(0, 1)) > 127).any())  # and the grid's upper end
    assert torch.equal(bits(soft), bits(expected_soft))
    assert torch.equal(bits(gradient), bits(expected))
    assert bool((gradient != 0).any())


def test_a_changed_operation_order_is_caught():
    """The comparison is strict enough to see a reordered product (last bits)."""
    generator = torch.Generator().manual_seed(0)
    a, b, c = (torch.rand(10_000, generator=generator, dtype=torch.float64) for _ in range(3))
    assert not torch.equal(bits(a * b * c), bits(a * (b * c)))


def taped_rounding(module, inputs, targets, grid, iterations, batch, seed):
    """round_layer as it was written before, with autograd taping every step (the oracle)."""
    weight = module.weight.detach()
    scale = adaround.channel_scale(weight, grid)
    scaled = weight / scale
    floor = torch.floor(scaled)
    rest = (scaled - floor).clamp(1e-4, 1 - 1e-4)
    v = torch.nn.Parameter(adaround._stacked(torch.log((rest - adaround.GAMMA) / (adaround.ZETA - rest)), 1))
    fixed = scaled.abs() >= grid.scale_divisor - 1e-4
    low, high = max(grid.qmin, -int(grid.scale_divisor)), min(grid.qmax, int(grid.scale_divisor))
    optimizer = torch.optim.Adam([v], lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    if batch == 0:
        draw = adaround._Gram(module, inputs, targets, batch)
    elif adaround._ChannelsLastConv.applies(module, inputs):
        draw = adaround._ChannelsLastConv(module, inputs, targets, batch)
    else:
        draw = adaround._Autograd(module, inputs, targets, batch)
    for step in range(iterations):
        beta = 20 - (20 - 2) * max(0.0, (step / iterations - 0.2) / 0.8)
        pick = None if batch == 0 else torch.randint(0, len(inputs), (batch,), generator=generator)
        with torch.no_grad():
            soft = torch.where(fixed, weight, torch.clamp(floor + adaround._soft(v), low, high) * scale)
        grads = torch.stack([draw.gradient(pick, w) for w in soft.unbind(0)])
        v.grad = autograds(v, weight, scale, floor, fixed, low, high, grads,
                           beta if step >= 0.2 * iterations else None)[1]
        optimizer.step()
    with torch.no_grad():
        hard = torch.clamp(floor + (adaround._soft(v) >= 0.5).to(floor.dtype), low, high) * scale
        return torch.where(fixed, weight, hard)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("batch", [0, 8])
def test_round_layer_learns_what_the_taped_loop_learns(kind, batch):
    """Full batch (Gram matrix) and mini-batches (autograd through F.linear, or the channels-last
    conv), 40 steps: the same rounded weights, to the bit, with some weights rounded away from
    nearest (else the comparison would show nothing)."""
    generator = torch.Generator().manual_seed(7)
    if kind == "linear":
        module = torch.nn.Linear(24, 6).double()
        inputs = torch.randn(64, 24, generator=generator, dtype=torch.float64)
    else:
        module = torch.nn.Conv2d(3, 5, 3, padding=1).double()
        inputs = torch.randn(64, 3, 6, 6, generator=generator, dtype=torch.float64).contiguous(
            memory_format=torch.channels_last)
    with torch.no_grad():  # the weights from this test's generator too (nn's init draws from the global one)
        bound = 1 / module.weight[0].numel() ** 0.5  # nn.Linear's and nn.Conv2d's default init range
        for parameter in module.parameters():
            parameter.uniform_(-bound, bound, generator=generator)
        outputs = module(inputs)
        targets = outputs + 0.05 * torch.randn(outputs.shape, generator=generator, dtype=torch.float64)
        if kind == "conv":
            targets = targets.contiguous(memory_format=torch.channels_last)
    grid = adaround.GRIDS["int8"]
    learned = adaround.round_layer(module, inputs, targets, grid, iterations=40, batch=batch, seed=3)
    expected = taped_rounding(module, inputs, targets, grid, iterations=40, batch=batch, seed=3)
    assert torch.equal(bits(learned), bits(expected[0]))
    scale = adaround.channel_scale(module.weight.detach(), grid)
    assert bool((torch.round(learned / scale) != torch.round(module.weight.detach() / scale)).any())


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_adaround_adam_steps_as_torch_optim_adam_does_to_the_bit(layout):
    """AdaRound steps its rounding variable with torch.optim.adam's functional form (`_Adam`); on
    the layouts its variables have (a conv's channels-last weight, onnx2torch's transposed Dense
    weight) 60 steps must give what torch.optim.Adam gives, bit for bit."""
    generator = torch.Generator().manual_seed(5)
    if layout == "channels_last":
        start = torch.randn(4, 16, 3, 3, generator=generator, dtype=torch.float64).contiguous(
            memory_format=torch.channels_last).unsqueeze(0)
    else:
        start = torch.randn(1, 64, 10, generator=generator, dtype=torch.float64).transpose(1, 2)
    grads = [torch.randn(start.shape, generator=generator, dtype=torch.float64) for _ in range(60)]
    ours, theirs = start.clone(memory_format=torch.preserve_format), torch.nn.Parameter(start.clone())
    stepper, optimizer = adaround._Adam(ours, lr=1e-2), torch.optim.Adam([theirs], lr=1e-2)
    with torch.no_grad():
        for grad in grads:
            stepper.step(grad)
            theirs.grad = grad
            optimizer.step()
    assert ours.stride() == theirs.stride() and torch.equal(bits(ours), bits(theirs.detach()))
    assert not torch.equal(bits(ours), bits(start))
