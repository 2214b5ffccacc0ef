"""AdaRound's Gram matrices of 8-bit codes (lib/integer_gram.py): the exact integers, whichever way
they are summed, and the codes AdaRound records are those of the inputs it learns from."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from stages.lib import adaround, integer_gram


def reference(codes: torch.Tensor) -> torch.Tensor:
    """X^T X in int64 arithmetic (torch's int64 mm), as float64."""
    x = codes.to(torch.int64)
    return (x.t() @ x).to(torch.float64)


def codes_of(rows: int, size: int, seed: int) -> torch.Tensor:
    """Codes 0..255 with runs of the extremes, which saturate 16-bit pair sums."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (rows, size), generator=generator)
    codes[: rows // 3] = 255
    codes[rows // 3: rows // 2, ::2] = 0
    return codes


@pytest.mark.parametrize("zero", [0, 37, 128, 255])
@pytest.mark.parametrize("int8_products", [True, False])
def test_the_gram_of_codes_is_exact_on_either_path(monkeypatch, zero, int8_products):
    """More rows than one int8 block holds, codes at the extremes: the int8 products (where this
    CPU's kernels sum them exactly) and the float64 way both give the exact integers."""
    if not int8_products:
        monkeypatch.setattr(integer_gram, "int8_products_usable", lambda rows, size: False)
    codes = codes_of(integer_gram.BLOCK_ROWS + 3001, 19, zero)
    gram = integer_gram.IntegerGram(19, zero)
    shifted = (codes - integer_gram.SHIFT).to(torch.int8)
    gram.add(shifted[:2000])
    gram.add(shifted[2000:])  # more than one block
    assert torch.equal(gram.matrix(), reference(codes - zero))
    blocks = [2000, integer_gram.BLOCK_ROWS, 1001]  # as add() cuts them
    assert gram.rows == sum(rows for rows in blocks if int8_products and integer_gram.int8_products_usable(rows, 19))


def test_pixels_are_codes_and_other_values_are_not():
    pixels = torch.tensor([[0., 17., 255.]], dtype=torch.float64)
    codes = integer_gram.pixel_codes(pixels)
    assert codes.zero == 0 and codes.scale == 1.0 and codes.shifted.tolist() == [[-128, -111, 127]]
    for other in ([[0., 17.5]], [[-1., 3.]], [[256., 0.]]):
        assert integer_gram.pixel_codes(torch.tensor(other, dtype=torch.float64)) is None


def test_the_recorded_codes_are_those_of_the_fake_quantized_input():
    hook = adaround._QuantizedInput(-0.3, 5.1, recording=True)
    generator = torch.Generator().manual_seed(0)
    chunks = [torch.randn(4, 3, 5, 5, generator=generator, dtype=torch.float64) * 3 for _ in range(3)]
    outputs = [hook(None, (chunk,))[0] for chunk in chunks]
    codes = hook.take(12)
    for chunk, output in zip(chunks, outputs):
        assert torch.equal(output, adaround.fake_quantize(chunk, -0.3, 5.1))
    values = (codes.shifted.to(torch.float64) + integer_gram.SHIFT - codes.zero) * codes.scale
    assert torch.equal(values, torch.cat(outputs))
    assert not hook.recording and codes.zero == round(0.3 / codes.scale)
    with pytest.raises(RuntimeError, match="recorded"):
        adaround._QuantizedInput(0.0, 1.0, recording=True).take(1)


@pytest.mark.parametrize("conv", [nn.Conv2d(6, 5, 3, stride=2, padding=1), nn.Conv2d(4, 3, 3, padding=1),
                                  nn.Conv2d(4, 3, 1, bias=False)])
@pytest.mark.parametrize("int8_products", [True, False])
def test_the_gradient_from_codes_is_the_float_gram_gradient_up_to_last_bits(monkeypatch, conv, int8_products):
    """A conv's full-batch gradient from the codes of its fake-quantized inputs (padding included:
    the border code stands for 0), either way of summing, against the float64 Gram of the same
    inputs."""
    if not int8_products:
        monkeypatch.setattr(integer_gram, "int8_products_usable", lambda rows, size: False)
    conv = conv.double()
    generator = torch.Generator().manual_seed(conv.in_channels)
    raw = torch.randn(12, conv.in_channels, 9, 9, generator=generator, dtype=torch.float64) + 0.5
    hook = adaround._QuantizedInput(-1.2, 3.0, recording=True)
    inputs = hook(None, (raw,))[0].contiguous(memory_format=torch.channels_last)
    codes = hook.take(12)
    targets = (conv(inputs) + 0.1).detach().contiguous(memory_format=torch.channels_last)
    weight = conv.weight.detach() * 1.01 + 0.003
    exact = adaround._Gram(conv, inputs, targets, 0, codes)
    summed = adaround._Gram(conv, inputs, targets, 0)
    assert (exact.gram - summed.gram).abs().max() <= 1e-12 * summed.gram.abs().max()
    assert not torch.equal(exact.gram, torch.zeros_like(exact.gram))
    a, b = exact.gradient(None, weight), summed.gradient(None, weight)
    assert (a - b).abs().max() <= 1e-12 * b.abs().max()


def test_adaround_learns_every_conv_from_the_codes_of_exactly_its_inputs(monkeypatch):
    """adaround_many with input ranges and the full batch: every layer's Gram matrix comes from codes
    (the first conv's: the pixels), and the codes give back, bit for bit, the inputs it learns from."""
    seen = []
    original = adaround._Gram.__init__

    def spy(self, module, inputs, targets, batch, codes=None):
        if codes is not None:
            values = (codes.shifted.to(torch.float64) + integer_gram.SHIFT - codes.zero) * codes.scale
            seen.append((type(module).__name__, torch.equal(values, inputs)))
        else:
            seen.append((type(module).__name__, None))
        original(self, module, inputs, targets, batch, codes)

    monkeypatch.setattr(adaround._Gram, "__init__", spy)
    torch.manual_seed(0)
    model = torch.fx.symbolic_trace(nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)))
    images = torch.randint(0, 256, (10, 3, 8, 8), generator=torch.Generator().manual_seed(1)).numpy()
    ranges = {"0": (0.0, 255.0), "2": (0.0, 40.0), "6": (0.0, 9.0)}
    [(weights, _)] = adaround.adaround_many(model, [images], adaround.GRIDS["int8"], iterations=3, batch=0,
                                            seeds=[0], input_ranges_per_seed=[ranges])
    assert seen == [("Conv2d", True), ("Conv2d", True), ("Linear", True)]
    assert set(weights) == {"0", "2", "6"}


@pytest.mark.parametrize("int8_products", [True, False])
def test_a_linear_layers_gradient_from_codes_is_the_float_gram_gradient_up_to_last_bits(monkeypatch, int8_products):
    if not int8_products:
        monkeypatch.setattr(integer_gram, "int8_products_usable", lambda rows, size: False)
    linear = nn.Linear(7, 4).double()
    raw = torch.randn(30, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 1
    hook = adaround._QuantizedInput(0.0, 4.0, recording=True)
    inputs = hook(None, (raw,))[0]
    codes = hook.take(30)
    targets = (linear(inputs) + 0.1).detach()
    weight = linear.weight.detach() * 1.01 + 0.003
    exact, summed = adaround._Gram(linear, inputs, targets, 0, codes), adaround._Gram(linear, inputs, targets, 0)
    assert (exact.gram - summed.gram).abs().max() <= 1e-12 * summed.gram.abs().max()
    a, b = exact.gradient(None, weight), summed.gradient(None, weight)
    assert (a - b).abs().max() <= 1e-12 * b.abs().max()


def test_without_avx512_vnni_the_int8_way_is_not_taken(monkeypatch):
    """torch runs `_int_mm` as a scalar loop where it does not hand it to oneDNN (no AVX-512 VNNI):
    exact, but far slower than syrk, so the float64 way is taken there, with the same matrix."""
    integer_gram.int8_products_usable.cache_clear()
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False)
    try:
        codes = codes_of(3000, 11, 0)
        gram = integer_gram.IntegerGram(11, 0)
        gram.add((codes - integer_gram.SHIFT).to(torch.int8))
        assert gram.rows == 0 and torch.equal(gram.matrix(), reference(codes))
    finally:
        integer_gram.int8_products_usable.cache_clear()
