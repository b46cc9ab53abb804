"""Sharded init and apply on 8 CPU devices (a subprocess: the device count is fixed at import)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import metoryx as mx
    sys.path.insert(0, sys.argv[1])  # tests/, for its tolerance helper
    from _tolerance import assert_close

    assert len(jax.devices()) == 8
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    model = mx.Dense(16, 32)
    init_fn, apply_fn = mx.transform(model)

    # Shardings are chosen by path, on the abstract variables: nothing is allocated for this.
    abstract = jax.eval_shape(init_fn, jax.random.key(0))
    spec = {"params": {"kernel": P(None, "model"), "bias": P("model")}}
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), spec)
    is_sharding = lambda x: isinstance(x, NamedSharding)
    assert jax.tree.structure(abstract) == jax.tree.structure(shardings, is_leaf=is_sharding)

    variables = jax.jit(init_fn, out_shardings=shardings)(jax.random.key(0))
    kernel = variables["params"]["kernel"]
    assert kernel.sharding == shardings["params"]["kernel"], kernel.sharding
    assert {s.data.shape for s in kernel.addressable_shards} == {(16, 16)}
    # Sharded init draws the arrays of unsharded init: the same random bits, through the
    # normal sampler's polynomial, which XLA may compile with other fused multiply-adds for a
    # (16, 16) shard than for the whole (16, 32) kernel: equal to a few ulps of the largest.
    unsharded = init_fn(jax.random.key(0))["params"]["kernel"]
    assert_close(np.asarray(kernel), np.asarray(unsharded))

    x = jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P("data", None)))
    y, _ = jax.jit(apply_fn)(variables, None, x)
    expected, _ = apply_fn(init_fn(jax.random.key(0)), None, jnp.ones((8, 16)))
    # Each output is a 16-term dot product plus the bias, summed in another order per shard:
    # the bound scales with the magnitude of its terms, as outputs may cancel to nearly 0.
    w, b = np.asarray(unsharded), np.asarray(variables["params"]["bias"])
    terms = np.ones((8, 16)) @ np.abs(w) + np.abs(b)  # |x| @ |w| + |b|, x being ones
    assert_close(np.asarray(y), np.asarray(expected), n=17, scale=terms)
    print("ok")
    """
)


@pytest.mark.slow
def test_sharded_init_and_apply_on_eight_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(Path(__file__).parents[1])],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("ok")
