"""Print whether AdaRound's integer Gram matrix (lib/integer_gram.py) is exact in this process, on
codes whose int8 products saturate 16-bit pair sums, and how many rows went the int8 way:

    ONEDNN_MAX_CPU_ISA=AVX2 python -m tests.check_integer_gram

oneDNN reads its ISA limit once per process, hence a process per setting.
"""
from __future__ import annotations

import json

import torch

from stages.lib import integer_gram

if __name__ == "__main__":
    rows, size = 70_000, 27  # more than one int8 block
    codes = torch.full((rows, size), 255, dtype=torch.int64)
    codes[::2, 1::2] = 0
    codes[1::3] = torch.randint(0, 256, (len(codes[1::3]), size), generator=torch.Generator().manual_seed(0))
    gram = integer_gram.IntegerGram(size, 0)
    gram.add((codes - integer_gram.SHIFT).to(torch.int8))
    print(json.dumps({"rows_by_int8_products": gram.rows, "rows": rows,
                      "exact": torch.equal(gram.matrix(), (codes.t() @ codes).to(torch.float64))}))
