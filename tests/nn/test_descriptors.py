"""Every layer through every transformation, from one table.

A layer gets all of these checks by adding one row to ``DESCRIPTORS``: the golden file of its
variables' paths, shapes and dtypes (paths are the checkpoint format), jit equal to eager,
gradients with respect to inputs and parameters (finite, and jit equal to eager), vmap over an
extra leading axis equal to a loop, ``jax.checkpoint`` equal to the plain call, bfloat16
computation close to float32, and float64 under ``jax_enable_x64`` (one subprocess for all).

Regenerate the golden file after a deliberate change of paths:
``python tests/nn/test_descriptors.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import assert_trees_close  # tests/_tolerance.py

import metoryx as mx

GOLDEN = Path(__file__).parent / "golden" / "variables.json"


class Descriptor(NamedTuple):
    """One row: how to build the layer, with a computation dtype, and what to feed it."""

    name: str
    make: Callable[..., mx.Module]  # (**dtypes) -> layer; dtypes: dtype=, param_dtype=
    shape: tuple[int, ...]
    kwargs: dict[str, Any] = {}
    # False when examples interact (BatchNorm's batch statistics in training).
    per_example: bool = True
    # An integer-id input in [0, ids) instead of floats (Embed).
    ids: int | None = None


DESCRIPTORS = [
    Descriptor("Dense", lambda **k: mx.Dense(3, 4, **k), (2, 3)),
    Descriptor("Dense/no_bias", lambda **k: mx.Dense(3, 4, use_bias=False, **k), (2, 5, 3)),
    Descriptor("Conv1d", lambda **k: mx.Conv(2, 3, kernel_size=3, **k), (2, 7, 2)),
    Descriptor(
        "Conv2d/strided_grouped",
        lambda **k: mx.Conv(4, 6, (3, 3), strides=2, padding=1, groups=2, **k),
        (2, 6, 6, 4),
    ),
    Descriptor(
        "Conv3d/dilated", lambda **k: mx.Conv(1, 2, (2, 2, 2), dilation=2, **k), (1, 5, 5, 5, 1)
    ),
    Descriptor(
        "BatchNorm/train",
        lambda **k: mx.BatchNorm(3, **k),
        (4, 5, 3),
        {"is_training": True},
        per_example=False,
    ),
    Descriptor("BatchNorm/eval", lambda **k: mx.BatchNorm(3, **k), (4, 3), {"is_training": False}),
    Descriptor("LayerNorm", lambda **k: mx.LayerNorm(4, **k), (2, 3, 4)),
    Descriptor("RMSNorm", lambda **k: mx.RMSNorm(4, **k), (2, 4)),
    Descriptor("GroupNorm", lambda **k: mx.GroupNorm(2, 4, **k), (2, 3, 3, 4)),
    Descriptor("InstanceNorm", lambda **k: mx.InstanceNorm(3, **k), (2, 5, 3)),
    Descriptor(
        "Einsum",
        lambda **k: mx.Einsum("btd,dhk->bthk", (4, 2, 3), bias_shape=(2, 3), **k),
        (2, 5, 4),
    ),
    Descriptor("Embed", lambda **k: mx.Embed(10, 4, **k), (2, 5), ids=10),
    Descriptor(
        "Sequential",
        lambda **k: mx.Sequential(mx.Dense(3, 4, **k), mx.relu, mx.Dense(4, 2, **k)),
        (2, 3),
    ),
    Descriptor("MLP", lambda **k: mx.MLP(3, [5, 5], 2, **k), (2, 3)),
    Descriptor("PReLU", lambda **k: mx.PReLU(3, **k), (2, 4, 3)),
    Descriptor(
        "Dropout/train",
        lambda **k: mx.Dropout(0.5),
        (4, 6),
        {"is_training": True},
        per_example=False,
    ),
    Descriptor(
        "ConvTranspose2d",
        lambda **k: mx.ConvTranspose(3, 2, (3, 3), strides=2, padding=1, output_padding=1, **k),
        (2, 4, 4, 3),
    ),
    Descriptor("MultiHeadAttention", lambda **k: mx.MultiHeadAttention(2, 8, **k), (2, 5, 8)),
    Descriptor(
        "MultiHeadAttention/gqa_causal",
        lambda **k: mx.MultiHeadAttention(4, 8, num_kv_heads=2, rotary=mx.RotaryEmbedding(), **k),
        (2, 5, 8),
        {"is_causal": True},
    ),
    Descriptor("WeightNorm", lambda **k: mx.WeightNorm(mx.Dense(3, 4, **k)), (2, 3)),
    Descriptor(
        "SpectralNorm/train",
        lambda **k: mx.SpectralNorm(mx.Conv(2, 3, (3, 3), **k)),
        (2, 5, 5, 2),
        {"is_training": True},
    ),
    Descriptor("RNN/SimpleRNN", lambda **k: mx.RNN(mx.SimpleRNNCell(3, 4, **k)), (2, 5, 3)),
    Descriptor("RNN/LSTM", lambda **k: mx.RNN(mx.LSTMCell(3, 4, **k)), (2, 5, 3)),
    Descriptor(
        "Bidirectional/GRU",
        lambda **k: mx.Bidirectional(
            mx.RNN(mx.GRUCell(3, 4, **k)), mx.RNN(mx.GRUCell(3, 4, **k), reverse=True)
        ),
        (2, 5, 3),
    ),
    Descriptor(
        "StackedRNN",
        lambda **k: mx.StackedRNN(mx.RNN(mx.GRUCell(3, 4, **k)), mx.RNN(mx.GRUCell(4, 4, **k))),
        (2, 4, 3),
    ),
    Descriptor(
        "Repeat",
        lambda **k: mx.Repeat(lambda: mx.Sequential(mx.Dense(3, 3, **k), mx.tanh), 3),
        (2, 3),
    ),
    Descriptor(
        "Repeat/remat_batchnorm",
        lambda **k: mx.Repeat(lambda: mx.BatchNorm(3, **k), 2, remat=True),
        (4, 3),
        {"is_training": True},
        per_example=False,
    ),
    Descriptor(
        "vmap/ensemble",
        lambda **k: mx.vmap(
            mx.Dense(3, 4, **k), in_axes=None, variable_axes={"params": 0}, axis_size=3
        ),
        (2, 3),
    ),
    Descriptor("vmap/shared", lambda **k: mx.vmap(mx.LayerNorm(3, **k)), (2, 3)),
    Descriptor("checkpoint", lambda **k: mx.checkpoint(mx.MLP(3, [5], 2, **k)), (2, 3)),
]

IDS = [d.name for d in DESCRIPTORS]


def _input(d: Descriptor, dtype: Any = jnp.float32, key: Any = 0) -> jax.Array:
    if d.ids is not None:
        return jax.random.randint(jax.random.key(key), d.shape, 0, d.ids)
    return jax.random.normal(jax.random.key(key), d.shape, dtype)


def _transformed(d: Descriptor, **dtypes: Any):
    init_fn, apply_fn = mx.transform(d.make(**dtypes))
    variables = init_fn(jax.random.key(1))
    return variables, lambda v, x: apply_fn(v, jax.random.key(2), x, **d.kwargs)


def _structure(variables: dict) -> dict[str, str]:
    """``{"params/kernel": "float32[3, 4]", ...}``: what the golden file records."""
    leaves = jax.tree_util.tree_leaves_with_path(variables)
    return {
        "/".join(k.key for k in path): f"{leaf.dtype.name}[{', '.join(map(str, leaf.shape))}]"
        for path, leaf in leaves
    }


# Jitted and eager, batched and looped, recomputed and saved: programs that XLA sums and fuses in
# their own orders. The catalogue's layers are small (dots of at most 8 terms, 5 time steps,
# attention over 5 keys), so no output goes through more than ~64 roundings; results are
# compared within tests/_tolerance.py's bound for that many, at the scale of the whole output
# (a gradient that is 0 in exact math is rounding noise of its neighbours' size).
N = 64


def _close(a, b):
    assert_trees_close(a, b, n=N)


@pytest.mark.parametrize("d", DESCRIPTORS, ids=IDS)
def test_variables_match_the_golden_file(d):
    golden = json.loads(GOLDEN.read_text())
    variables, _ = _transformed(d)
    assert d.name in golden, f"no golden entry for {d.name}: run python {__file__}"
    assert _structure(variables) == golden[d.name], (
        "The variables' paths, shapes or dtypes changed. They are the checkpoint format: if the "
        f"change is deliberate, regenerate the golden file with `python {__file__}`."
    )


@pytest.mark.parametrize("d", DESCRIPTORS, ids=IDS)
def test_jit_equals_eager(d):
    variables, run = _transformed(d)
    x = _input(d)
    _close(jax.jit(run)(variables, x), run(variables, x))


@pytest.mark.parametrize("d", DESCRIPTORS, ids=IDS)
def test_gradients_are_finite_and_jit_equals_eager(d):
    variables, run = _transformed(d)
    x = _input(d)

    params = variables.get("params", {})  # a layer without parameters (Dropout) has none

    def loss(params, x):
        out, _ = run({**variables, "params": params} if params else variables, x)
        return jnp.sum(jnp.sin(out))

    argnums = (0,) if d.ids is not None else (0, 1)  # no gradient with respect to ids
    grads = jax.grad(loss, argnums=argnums)(params, x)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert any(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads[-1]))
    _close(jax.jit(jax.grad(loss, argnums=argnums))(params, x), grads)


@pytest.mark.parametrize("d", [d for d in DESCRIPTORS if d.per_example], ids=lambda d: d.name)
def test_vmap_over_a_leading_axis_equals_a_loop(d):
    variables, run = _transformed(d)
    xs = jnp.stack([_input(d, key=k) for k in (3, 4, 5)])
    batched, _ = jax.vmap(run, in_axes=(None, 0))(variables, xs)
    looped = jnp.stack([run(variables, x)[0] for x in xs])
    _close(batched, looped)


@pytest.mark.parametrize("d", DESCRIPTORS, ids=IDS)
def test_checkpoint_equals_the_plain_call(d):
    variables, run = _transformed(d)
    x = _input(d)
    _close(jax.checkpoint(run)(variables, x), run(variables, x))


@pytest.mark.parametrize("d", DESCRIPTORS, ids=IDS)
def test_bfloat16_computation_is_close_to_float32(d):
    variables, run32 = _transformed(d)
    _, run16 = _transformed(d, dtype=jnp.bfloat16)
    x = _input(d)
    out16, _ = run16(variables, x if d.ids is not None else x.astype(jnp.bfloat16))
    out32, _ = run32(variables, x)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(out16, np.float32), np.asarray(out32), rtol=0.05, atol=0.05
    )


def _float64_report() -> dict[str, str]:
    """Run every descriptor under jax_enable_x64 in float64; name -> output dtype or error.

    Init and apply run as one jitted program per descriptor, compiled with most XLA
    optimizations off (JAX_DISABLE_MOST_OPTIMIZATIONS, set by the parent): the same operations
    on the same dtypes, at less than half the compile time of running them op by op. Eager
    against jitted is what the float32 tests above check for every descriptor.
    """
    report = {}
    for d in DESCRIPTORS:
        try:
            init_fn, apply_fn = mx.transform(d.make(dtype=jnp.float64, param_dtype=jnp.float64))

            def run(x, init_fn=init_fn, apply_fn=apply_fn, d=d):
                variables = init_fn(jax.random.key(1))
                return apply_fn(variables, jax.random.key(2), x, **d.kwargs)[0]

            report[d.name] = jax.jit(run)(_input(d, jnp.float64)).dtype.name
        except Exception as e:  # reported to the parent test, which shows it
            report[d.name] = f"{type(e).__name__}: {e}"
    return report


@pytest.mark.slow
def test_float64_under_x64():
    env = {**os.environ, "JAX_ENABLE_X64": "1", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    here = Path(__file__).parent  # tests/nn, and tests/ for the helpers it imports
    code = (
        f"import json, sys; sys.path[:0] = [{str(here)!r}, {str(here.parent)!r}]; "
        "import test_descriptors as t; print(json.dumps(t._float64_report()))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report == {d.name: "float64" for d in DESCRIPTORS}


if __name__ == "__main__":
    GOLDEN.parent.mkdir(exist_ok=True)
    entries = {d.name: _structure(_transformed(d)[0]) for d in DESCRIPTORS}
    GOLDEN.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")
    print(f"wrote {len(entries)} entries to {GOLDEN}")
