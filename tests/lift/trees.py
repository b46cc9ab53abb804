"""A helper of the lifted-transform tests (tests/lift is on sys.path while they run)."""

import jax
import numpy as np
from _tolerance import assert_trees_close  # tests/_tolerance.py


def assert_trees_equal(a, b, exact=True, *, n=None):
    """Same structure and, leaf by leaf, the same bits (``exact``: the same operations in the
    same order, or pure data movement such as stacking), or else values within
    ``_tolerance.assert_trees_close``'s bound for ``n`` roundings (a loop against its unrolled
    form, a batched against a per-member program: XLA orders and fuses their sums differently).
    """
    if not exact:
        assert n is not None, "say how many roundings the compared values went through"
        assert_trees_close(a, b, n=n)
        return
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert (x.shape, x.dtype) == (y.shape, y.dtype)
        assert x.tobytes() == y.tobytes()
