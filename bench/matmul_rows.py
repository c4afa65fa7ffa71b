"""Few-row matmuls on this CPU: `F.linear` (x @ W^T) against the weight-on-the-left form marl's lean forward uses
for 16-32 rows (marl/multilora.py `few_row_linear`, docs/speed.md "Few-row matmuls on a CPU").

    python -m bench.matmul_rows [--rows 4,8,16,32,64] [--threads 2]

Prints, for each weight shape and row count, the median microseconds of both forms and their ratio (> 1: the
weight-on-the-left form is faster). The two forms alternate call by call, each over weights cycled so that they do
not sit in cache. Run it on another CPU (or BLAS) to see whether marl's rule holds there; not a bench/RESULTS.md
row.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bench.common import md_table, median
from marl import multilora

SHAPES = [(128, 128), (256, 256), (512, 512), (512, 2048), (2048, 512), (896, 128), (896, 4864), (4864, 896)]


def timings(fns: dict, repeats: int = 7, calls: int = 20) -> dict[str, float]:
    """Median microseconds a call of each of `fns`, the functions alternating in blocks of `calls` calls."""
    for fn in fns.values():
        fn()
    out = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            out[k].append((time.perf_counter() - t) / calls * 1e6)
    return {k: median(v) for k, v in out.items()}


def _pair(k: int, n: int, m: int) -> dict[str, float]:
    """Both forms' microseconds for m rows through a (k -> n) float32 weight, over ~64 MB of weights cycled."""
    copies = max(2, min(8, int(64e6 / (k * n * 4))))  # more than a cache holds
    layers = [torch.nn.Linear(k, n, bias=False) for _ in range(copies)]
    forms = [multilora.few_row_linear(layer) for layer in layers]
    x = torch.randn(m, k)
    i = [0]

    def nxt() -> int:
        i[0] = (i[0] + 1) % copies
        return i[0]

    with torch.no_grad():
        return timings({"linear": lambda: F.linear(x, layers[nxt()].weight), "left": lambda: forms[nxt()](x)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="4,8,16,24,32,48,64", help="row counts, comma-separated")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the bench uses 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    (lo, hi), min_dim = multilora.WEIGHT_LEFT_ROWS, multilora.WEIGHT_LEFT_MIN_DIM  # marl's rule
    multilora.WEIGHT_LEFT_ROWS, multilora.WEIGHT_LEFT_MIN_DIM = (1, 1 << 30), 0  # the form at every shape
    rows = [int(r) for r in args.rows.split(",")]
    table = []
    for k, n in SHAPES:
        for m in rows:
            t = _pair(k, n, m)
            used = "(W @ x^T)^T" if min(k, n) >= min_dim and lo <= m <= hi else "F.linear"
            table.append([f"{k} x {n}", m, t["linear"], t["left"], t["linear"] / t["left"], used])
    print(md_table(["weight (in x out)", "rows", "F.linear (us)", "(W @ x^T)^T (us)", "ratio", "marl uses"], table))


if __name__ == "__main__":
    main()
