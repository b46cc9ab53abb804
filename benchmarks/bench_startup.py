"""Time to first step: what a user waits for each time a training run starts.

Run from the repository root::

    python benchmarks/bench_startup.py           # the recorded numbers (docs/benchmarks.md)
    python benchmarks/bench_startup.py --quick   # a smoke run: one repeat, fewer cases

Each sample is a **fresh Python process** that imports, builds the model, initializes it and
runs one jitted train step (``value_and_grad`` of the mean softmax cross-entropy, an
``optax.adam`` update and ``optax.apply_updates``, the step of ``benchmarks/_models.py``),
timing each phase with a wall clock:

- *import*: ``import jax, optax`` and the library (``metoryx``, ``flax.linen``, ``flax.nnx``,
  ``equinox``; nothing more for hand-written JAX);
- *build + init*: the model object and its arrays (``_models.build``: for metoryx
  ``mx.transform`` and ``init_fn``, for Linen ``jax.jit(model.init)``, for NNX and Equinox the
  constructor, for hand-written JAX ``jax.random`` draws written here, eagerly, in metoryx's
  layout, which ``_models`` stacks for the scan);
- *first step*: ``optimizer.init`` and the first call of the jitted step (trace, compile, run),
  blocked on its result.

The models are those of ``_models.py``: the 12-block GPT (d_model 64, 4 heads, MLP 256, vocab
256, batch 8, sequence 32), unrolled and stacked (``mx.Repeat``, Linen's ``nn.scan``, NNX's
scan, Equinox's scan over layers, ``lax.scan`` by hand), and the digits ConvNet of
``examples/train_digits.py`` (batch 64). The harness (``_models``, which imports every
installed library, and the batch) is imported and made between the import and the build, and
is not timed. Processes run interleaved (each repeat runs every case once, the order
rotating); the table gives medians.

**With the persistent compilation cache** (``jax_compilation_cache_dir`` in a temporary
directory, ``jax_persistent_cache_min_compile_time_secs=0``,
``jax_persistent_cache_min_entry_size_bytes=-1``): one process per case fills a fresh cache,
then further processes start with it; the second table gives their phases and the number of
cache hits (``/jax/compilation_cache/cache_hits`` events), which must be at least one in the
first step: the lowered program of a model is the same in every process
(``tests/test_compilation_cache.py``).

Python's bytecode of the repository's modules is written once before the first sample (the
parent imports them with ``sys.dont_write_bytecode`` off), as an installed package's is: a
process that compiled metoryx's sources each time would time the compiler.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
NAMES = {
    "metoryx": "metoryx",
    "jax": "hand-written JAX",
    "linen": "Flax Linen",
    "nnx": "Flax NNX",
    "equinox": "Equinox",
}
IMPORTS = {
    "metoryx": "metoryx",
    "jax": None,
    "linen": "flax.linen",
    "nnx": "flax.nnx",
    "equinox": "equinox",
}
# (model, scan): the rows, in order
CASES = [("gpt", False), ("gpt", True), ("convnet", False)]
QUICK_CASES = [("gpt", True), ("convnet", False)]
PHASES = ("import", "build + init", "first step")
HIT_EVENT = "/jax/compilation_cache/cache_hits"


# ---------------------------------------------------------------------------------------------
# The child: one cold start, its phases as JSON on the last line of stdout.


def child(model: str, library: str, scan: bool, cache_dir: str | None) -> None:
    start = time.perf_counter()
    import importlib

    import jax
    import optax

    if IMPORTS[library] is not None:
        importlib.import_module(IMPORTS[library])
    imported = time.perf_counter()

    hits = {"build + init": 0, "first step": 0}
    phase = ["harness"]
    if cache_dir is not None:  # before anything compiles
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

        def listen(event: str, **kwargs: Any) -> None:
            if event == HIT_EVENT and phase[0] in hits:
                hits[phase[0]] += 1

        jax.monitoring.register_event_listener(listen)

    sys.path.insert(0, str(HERE))
    import _models as models

    models.batch(model)  # the harness's batch: its random draws compiled before the timing
    options: dict[str, Any] = {"scan": scan} if model == "gpt" else {}
    layout = None
    if library == "jax":  # the shapes to draw, abstractly (nothing is compiled)
        layout = jax.eval_shape(lambda: models.reference_params(model))
    harness = time.perf_counter()

    phase[0] = "build + init"
    reference = hand_written_params(layout) if library == "jax" else None
    built = models.build(model, library, reference=reference, **options)
    jax.block_until_ready((built.params, built.state))
    built_at = time.perf_counter()

    phase[0] = "first step"
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(built.params)
    step = jax.jit(models.make_train_step(built.forward, optimizer))
    out = step(built.params, built.state, opt_state, jax.random.key(1), built.x, built.y)
    loss = float(jax.block_until_ready(out[-1]))
    done = time.perf_counter()

    report = {
        "import": imported - start,
        "harness": harness - imported,
        "build + init": built_at - harness,
        "first step": done - built_at,
        "hits": hits,
        "loss": loss,
    }
    print(json.dumps(report))


def hand_written_params(layout: Any) -> Any:
    """The hand-written side's own init, as a script written without a library would:
    ``jax.random`` draws of the shapes of ``layout`` (metoryx's variable layout, which the
    hand-written forward of ``_models`` reads), eagerly, leaf by leaf: LeCun-normal kernels,
    unit-normal embeddings, zero biases, unit scales. (One ``jax.jit`` of the same draws
    compiles a threefry hash per leaf: 2-3x slower for the 12-block GPT.)"""
    import math

    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree_util.tree_flatten_with_path(layout)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    arrays = []
    for key, (path, leaf) in zip(keys, leaves, strict=True):
        name = path[-1].key
        if name == "kernel":
            fan_in = math.prod(leaf.shape[:-1])
            arrays.append(jax.random.normal(key, leaf.shape) / math.sqrt(fan_in))
        elif name == "embedding":
            arrays.append(jax.random.normal(key, leaf.shape))
        else:
            arrays.append((jnp.ones if name == "scale" else jnp.zeros)(leaf.shape))
    return jax.tree_util.tree_unflatten(treedef, arrays)


# ---------------------------------------------------------------------------------------------
# The parent: processes interleaved, medians, the tables.


def run_child(case: tuple[str, str, bool], cache_dir: str | None = None) -> dict[str, Any]:
    model, library, scan = case
    args = [sys.executable, __file__, "--child", model, library, str(int(scan))]
    if cache_dir is not None:
        args += ["--cache", cache_dir]
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{case} failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["process"] = wall
    return report


def interleave(cases: list[Any], repeats: int, sample: Any) -> dict[Any, list[dict[str, Any]]]:
    """``sample(case)`` for every case, ``repeats`` times, the order rotating each repeat."""
    samples: dict[Any, list[dict[str, Any]]] = {case: [] for case in cases}
    for r in range(repeats):
        shift = r % len(cases)
        for case in cases[shift:] + cases[:shift]:
            samples[case].append(sample(case))
            print(".", end="", flush=True, file=sys.stderr)
    print(file=sys.stderr)
    return samples


def median(reports: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in reports)


def label(case: tuple[str, str, bool]) -> tuple[str, str]:
    model, library, scan = case
    layout = ("stacked" if scan else "unrolled") if model == "gpt" else ""
    return f"{model} {layout}".strip(), NAMES[library]


def tables(
    cases: list[tuple[str, str, bool]],
    cold: dict[Any, list[dict[str, Any]]],
    warm: dict[Any, list[dict[str, Any]]],
) -> str:
    from _timing import markdown

    rows = []
    for case in cases:
        reports = cold[case]
        phases = [median(reports, p) for p in PHASES]
        total = sum(phases)
        hand = cold.get((case[0], "jax", case[2]))
        ratio = total / sum(median(hand, p) for p in PHASES) if hand else float("nan")
        rows.append(
            [
                *label(case),
                *(f"{t:.2f}" for t in phases),
                f"{total:.2f}",
                f"{median(reports, 'process'):.2f}",
                f"{ratio:.2f}" if hand else "-",
            ]
        )
    out = [
        "Cold start, seconds (medians of fresh processes):",
        "",
        markdown(["model", "library", *PHASES, "sum", "process", "sum / hand-written"], rows),
    ]
    if warm:
        rows = []
        for case, reports in warm.items():
            step_cold = median(cold[case], "first step") if cold.get(case) else float("nan")
            rows.append(
                [
                    *label(case),
                    f"{median(reports, 'build + init'):.2f}",
                    f"{median(reports, 'first step'):.2f}",
                    f"{step_cold:.2f}",
                    str(min(r["hits"]["build + init"] for r in reports)),
                    str(min(r["hits"]["first step"] for r in reports)),
                ]
            )
        out += [
            "",
            "With the persistent compilation cache, a process after the one that filled it:",
            "",
            markdown(
                [
                    "model",
                    "library",
                    "build + init",
                    "first step",
                    "first step, cold",
                    "hits in build + init",
                    "hits in first step",
                ],
                rows,
            ),
        ]
    return "\n".join(out)


def write_bytecode() -> None:
    """Compile the repository's modules to bytecode once, as an installed package has it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import metoryx, _models"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat, fewer cases")
    parser.add_argument("--repeats", type=int, default=None, help="processes per case (5)")
    parser.add_argument("--libraries", nargs="+", default=None, help="some libraries only")
    parser.add_argument("--cache-repeats", type=int, default=3, help="cached starts per case")
    parser.add_argument("--no-cache", action="store_true", help="skip the cached starts")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "LIBRARY", "SCAN"))
    parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, library, scan = args.child
        child(model, library, bool(int(scan)), args.cache)
        return 0

    sys.path.insert(0, str(HERE))
    import _models as models
    import optax
    from _timing import header

    import metoryx as mx

    repeats = args.repeats or (1 if args.quick else 5)
    installed = [lib for lib in NAMES if lib in models.LIBRARIES]
    libraries = [lib for lib in installed if args.libraries is None or lib in args.libraries]
    cases = [
        (model, lib, scan)
        for model, scan in (QUICK_CASES if args.quick else CASES)
        for lib in libraries
    ]
    print(header(mx, optax, *models.PEER_MODULES))
    warm_repeats = 1 if args.quick else args.cache_repeats
    print(f"{repeats} cold and {warm_repeats} cached processes per case, interleaved; medians\n")
    write_bytecode()
    cold = interleave(cases, repeats, run_child)
    warm: dict[Any, list[dict[str, Any]]] = {}
    if not args.no_cache:
        cached = [c for c in cases if c[1] in ("metoryx", "jax")] if args.quick else cases
        with tempfile.TemporaryDirectory(prefix="bench_startup_cache_") as root:
            dirs = {case: os.path.join(root, "-".join(map(str, case))) for case in cached}
            for case in cached:  # fill each case's cache
                run_child(case, dirs[case])
            warm = interleave(cached, warm_repeats, lambda case: run_child(case, dirs[case]))
    print(tables(cases, cold, warm))
    missed = [label(c) for c, rs in warm.items() if min(r["hits"]["first step"] for r in rs) < 1]
    losses = {c: cold[c][0]["loss"] for c in cases}
    print(
        "\nfirst-step losses: "
        + ", ".join(f"{' '.join(label(c))} {v:.4f}" for c, v in losses.items())
    )
    if missed:
        print(f"MISSED: no cache hit in the first step of {missed}")
        return 1
    if warm:
        print("OK: every cached start hit the cache in its first step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
