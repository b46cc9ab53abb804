"""``mx.summary`` of a 48-block GPT: how long the table takes, with printing off.

Run from the repository root::

    python benchmarks/bench_summary.py [--quick]

The GPT is ``bench_deep.py``'s (d_model 64, 4 heads, batch 8, sequence 32), stacked with
``mx.Repeat`` (one traced block: the rows of one block, marked ``×48``) and unrolled (a list
of 48 blocks: every block's rows, each distinct call lowered once). Each summary starts from the
definition-world model (the snapshot is part of the time). Printed: the median of the repeats,
the rows and the FLOPs found, as a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _timing import header, markdown  # noqa: E402
from bench_deep import GPT, SMALL  # noqa: E402

import metoryx as mx  # noqa: E402

DEPTH = 48


def measure(layout: str, repeats: int) -> tuple[float, mx.Summary]:
    model = GPT(SMALL, DEPTH, layout)
    tokens = jax.ShapeDtypeStruct((SMALL.batch, SMALL.seq), jnp.int32)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = mx.summary(model, tokens, show=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat, stacked only")
    quick = parser.parse_args().quick
    print(header(mx))
    print(f"GPT of {DEPTH} blocks, {SMALL}\n")
    rows = []
    for layout in ("repeat",) if quick else ("repeat", "unrolled"):
        seconds, result = measure(layout, 1 if quick else 5)
        rows.append(
            [
                f"mx.summary, {layout}",
                f"{seconds:.2f} s",
                str(len(result.rows)),
                f"{result.variables['params']:,}",
                f"{result.flops / 1e9:.3f} G",
            ]
        )
    print(markdown(["", "median time", "rows", "parameters", "FLOPs"], rows))


if __name__ == "__main__":
    main()
