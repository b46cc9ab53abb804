"""A helper of the lifted-transform tests (tests/lift is on sys.path while they run)."""

import jax
import numpy as np


def assert_trees_equal(a, b, exact=True):
    """Same structure and, leaf by leaf, the same bits (``exact``) or values within 1e-5."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if exact:
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
        else:
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
