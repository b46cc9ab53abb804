"""What the benchmark scripts share: interleaved timing, the paired ratio, jaxpr walking, the
environment header and the Markdown table."""

from __future__ import annotations

import gc
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax


def interleaved(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run each ``fn`` (which returns one sample) ``repeats`` times, rotating the order
    (A B, B A, ... for two), so that slow phases of a busy machine hit every side alike.

    A collection runs before each sample, so that none lands inside one; the objects alive
    before the first sample are frozen (``gc.freeze``), so that a collection costs microseconds
    instead of the ~0.1 s of a full pass over the objects of JAX (and PyTorch)."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    gc.freeze()
    try:
        for r in range(repeats):
            shift = r % len(order)
            for name in order[shift:] + order[:shift]:
                gc.collect()
                samples[name].append(fns[name]())
    finally:
        gc.unfreeze()
    return samples


def paired(samples: dict[str, list[float]], ours: str = "mx", theirs: str = "hand") -> float:
    """The median of the per-repeat ratios ``ours / theirs``: robust to load that drifts
    between repeats, since each repeat times both sides back to back."""
    return statistics.median(o / t for o, t in zip(samples[ours], samples[theirs], strict=True))


def median_error(ratios: Sequence[float]) -> float:
    """Two standard errors of the median of ``ratios`` (per-repeat paired ratios), the spread
    taken from their interquartile range (``IQR / 1.349`` estimates the standard deviation,
    and the median's standard error is ``1.253 sigma / sqrt(n)``): how far a median ratio of
    two identical programs may land from 1 on this machine."""
    quartiles = statistics.quantiles(ratios, n=4)
    sigma = (quartiles[2] - quartiles[0]) / 1.349
    return 2 * 1.253 * sigma / math.sqrt(len(ratios))


def call_sampler(fn: Callable[[], Any], calls: int) -> Callable[[], float]:
    """A sampler of the time per call of ``fn``, blocking on the last result."""

    def sample() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            out = fn()
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / calls

    return sample


def one_call(fn: Callable[[], Any]) -> float:
    """The wall time of one call of ``fn``, blocking on its result."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def walk_eqns(jaxpr: Any) -> Iterator[Any]:
    """Every equation of a jaxpr, depth first, including those of nested jaxprs."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    yield from walk_eqns(inner)


def optimized_program(fn: Callable[..., Any], args: Sequence[Any]) -> str:
    """The HLO that XLA compiles ``fn`` to, without names and source locations: two sides
    with equal texts run the same machine code, whatever their jaxprs."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    # The source tables (file and function names, stack frames) sit between the module line
    # and the computations in XLA's text: their lines are a title or start with a number.
    sources = re.compile(r"(FileNames|FunctionNames|FileLocations|StackFrames)$|\d+ ")
    text = "\n".join(line for line in text.splitlines() if not sources.match(line))
    text = re.sub(r", metadata=\{[^}]*\}", "", text)
    text = re.sub(r"^HloModule \S+", "HloModule", text)
    text = re.sub(r"(\(|, )[\w.-]+: ", r"\1", text)  # a computation's parameter names
    names: dict[str, str] = {}
    return re.sub(r"%[\w.-]+", lambda m: names.setdefault(m.group(0), f"%{len(names)}"), text)


def header(library: Any, *others: Any) -> str:
    """One line naming the versions (``library``, JAX, then ``others``, all modules), Python
    and the machine."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    device = jax.devices()[0]
    jaxlib = jax.lib.__version__ if hasattr(jax.lib, "__version__") else "?"
    packages = [f"{m.__name__} {m.__version__}" for m in others]
    return " · ".join(
        [
            f"{library.__name__} {library.__version__}",
            f"JAX {jax.__version__} (jaxlib {jaxlib})",
            *packages,
            f"Python {platform.python_version()}",
            f"{device.platform.upper()} {device.device_kind}",
            f"{affinity} CPUs usable (os.cpu_count() = {os.cpu_count()})",
            f"{platform.machine()} {platform.system()}",
        ]
    )


def markdown(titles: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table: the first column left-aligned, the last centered, the others right."""
    align = ["---"] + ["---:"] * (len(titles) - 2) + [":---:"]
    lines = ["| " + " | ".join(titles) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
