"""Exact Gram matrices of 8-bit codes: X^T X for rows X whose entries are the integer codes
(q - zero) of an 8-bit quantizer, summed in integers, so that every CPU kind, thread count and
summation order gives the same matrix (AdaRound's full-batch gradient, lib/adaround._Gram).

The codes come in shifted to int8 (q - 128); two ways lead to the same integers:
- int8 matrix multiplication (`torch._int_mm`, oneDNN, int32 sums) of the shifted codes, in
  blocks of at most `BLOCK_ROWS` rows (|sum| <= 2^16 * 2^14 < 2^31), summed in int64, then the
  shift taken out. torch hands `_int_mm` to oneDNN only on a CPU with AVX-512 VNNI (else it runs a
  scalar loop, exact but 40 times slower than syrk here), so only there is it used
  (`int8_products_usable`). oneDNN's VNNI kernels sum in int32; its AVX2 and AVX-512 ones (a CPU
  with VNNI whose oneDNN is capped, ONEDNN_MAX_CPU_ISA) add u8 x s8 products in pairs into 16 bits,
  which saturate: a block of codes that saturate there is tried once per block shape, and where
  the answer is wrong the float64 way is taken.
- float64 BLAS syrk of the unshifted codes (q - zero, |.| <= 255): each product is below 2^16 and
  every partial sum an integer below 2^53 for fewer than 2^37 rows, so float64 holds it exactly
  whatever the order of the additions.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

SHIFT = 128  # q - SHIFT is an int8 for an 8-bit code q in [0, 255]
BLOCK_ROWS = 1 << 16  # rows per int8 product: at most 2^16 * 128 * 128 = 2^30 in int32


@dataclass
class Codes:
    """A layer's input as an 8-bit quantizer gives it: value = (shifted + SHIFT - zero) * scale."""
    shifted: torch.Tensor  # int8, q - SHIFT, laid out like the float input
    zero: int
    scale: float


def pixel_codes(x: torch.Tensor) -> Codes | None:
    """`x` as codes if it holds 8-bit pixels (whole numbers 0..255), else None."""
    if not (x.dtype == torch.float64 and x.numel() and bool(((x >= 0) & (x <= 255) & (x == x.round())).all())):
        return None
    return Codes((x - SHIFT).to(torch.int8), 0, 1.0)


def _int_mm_runs_on_onednn() -> bool:
    """torch's own condition for handing `_int_mm` to oneDNN (aten's _int_mm_out_cpu)."""
    vnni = getattr(torch.cpu, "_is_vnni_supported", lambda: False)  # AVX-512 VNNI, by cpuinfo
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled and vnni()


@lru_cache(maxsize=None)
def int8_products_usable(rows: int, size: int) -> bool:
    """Whether `torch._int_mm` runs on oneDNN here and gives exact sums for a [size, rows] x
    [rows, size] product of int8, laid out as `IntegerGram.add` calls it: tried on codes whose
    products saturate a 16-bit pair sum (127 * 255 as u8 x s8) in every entry."""
    if not _int_mm_runs_on_onednn():
        return False
    probe = torch.full((rows, size), 127, dtype=torch.int8)
    probe[:, 1::2] = -128
    try:
        got = torch._int_mm(probe.t(), probe)
    except RuntimeError:  # no int8 kernel for this shape
        return False
    row = probe[0].to(torch.int64)
    return torch.equal(got.to(torch.int64), torch.outer(row, row) * rows)


class IntegerGram:
    """X^T X of the codes X = shifted + SHIFT - zero of every block `add` is given: `matrix()`,
    float64, whole numbers, the same on every CPU kind."""

    def __init__(self, size: int, zero: int):
        self.offset = SHIFT - zero  # X = shifted + offset
        self.products = torch.zeros(size, size, dtype=torch.int64)  # sum of shifted^T shifted
        self.column_sums = torch.zeros(size, dtype=torch.int64)  # sum of shifted over rows
        self.rows = 0
        self.float_sum = np.zeros((size, size), order="F")  # upper triangle of X^T X (float64 way)

    def add(self, shifted: torch.Tensor, numbers: torch.Tensor | None = None) -> None:
        """Rows [n, size] of shifted codes (int8); `numbers`, if the caller has them: the same rows
        as float64 codes (shifted + offset), for the float64 way."""
        for start in range(0, len(shifted), BLOCK_ROWS):
            block = shifted[start:start + BLOCK_ROWS]
            if int8_products_usable(*block.shape):
                self.products += torch._int_mm(block.t(), block)
                self.column_sums += block.sum(0, dtype=torch.int64)
                self.rows += len(block)
            else:
                from scipy.linalg.blas import dsyrk

                codes = (block.to(torch.float64).add_(self.offset) if numbers is None
                         else numbers[start:start + BLOCK_ROWS])
                self.float_sum = dsyrk(1.0, codes.numpy().T, beta=1.0, c=self.float_sum, overwrite_c=1)

    def matrix(self) -> torch.Tensor:
        """sum (s + c)(s + c)^T = S^T S + c (t 1^T + 1 t^T) + c^2 n, t the column sums, c the offset;
        plus the float64 way's blocks."""
        c, t = self.offset, self.column_sums
        exact = self.products + c * (t[:, None] + t[None, :]) + c * c * self.rows
        upper = np.triu(self.float_sum)
        return exact.to(torch.float64) + torch.from_numpy(upper + np.triu(upper, 1).T)
