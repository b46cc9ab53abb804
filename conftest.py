"""Strict settings for every test and docstring example.

Strict dtype promotion and rank-promotion errors turn silent broadcasting and up-casting bugs in
layers into failures; warnings are errors (see pyproject.toml).
"""

import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    """Hands out a fresh, deterministic key per call: ``k = getkey()``."""
    base = jax.random.key(1234)
    counter = iter(range(1 << 30))
    return lambda: jax.random.fold_in(base, next(counter))
