"""Tolerances for floating-point results that two computations round differently.

Compare exactly only what the math guarantees bit for bit: the same program run twice, pure
data movement (reshape, stack, gather, copy), integer and boolean math, and operations that
round once with no multiply feeding an add. Everything else may round differently from one
compiled program to another, and from one CPU to another: a sum split or ordered differently
(XLA picks matmul and reduction kernels by shape and vector width, AVX2 or AVX-512), a multiply
and the add it feeds fused into one FMA in one kernel and not in another, a vectorised
``exp``/``tanh``/``log`` whose polynomial is evaluated differently.

Each such rounding moves a value by at most half an ulp of the values it combines, and the
differences of ``n`` of them add up like a random walk, so two results differ by about
``eps * sqrt(n) * scale``: ``eps`` of the dtype, ``scale`` the magnitude of the values that were
rounded (for a sum, of its terms, not of the result, which may cancel to nearly 0), ``n`` the
number of roundings a result went through (the terms of its longest reductions, added along
a chain of layers). ``k`` is the safety factor over that typical size.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np


def eps(dtype) -> float:
    """The machine epsilon of a float dtype (``bfloat16`` and ``float16`` included)."""
    return float(jnp.finfo(dtype).eps)


def tolerance(dtype, *, n: int = 1, scale=1.0, k: float = 4.0):
    """``k * eps(dtype) * sqrt(n) * scale``: how far two roundings of a result may fall apart.

    ``scale`` may be an array (the magnitude of the terms behind each element, for instance
    ``abs(x) @ abs(w)`` for ``x @ w``); the tolerance then has its shape.
    """
    return k * eps(dtype) * math.sqrt(max(n, 1)) * np.asarray(scale, np.float64)


def _dtype(x) -> np.dtype:
    try:
        return np.dtype(x.dtype)  # without converting a JAX array
    except (AttributeError, TypeError):  # a Python number, a PyTorch tensor
        return np.asarray(x).dtype


def _float(x) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def assert_close(
    actual, desired, *, n: int = 1, scale=None, k: float = 4.0, dtype=None, err_msg: str = ""
):
    """``|actual - desired| <= tolerance(dtype, n=n, scale=scale, k=k)`` element by element.

    ``dtype`` defaults to the coarser float dtype of the two (integers and booleans are compared
    exactly), ``scale`` to the largest magnitude in ``desired`` and ``actual``: right where the
    values are the magnitude of what was rounded; a result that cancels towards 0 needs the
    scale of its terms passed in. Equal values (infinities, NaN where both are NaN) pass.
    """
    if dtype is None:
        floats = [t for t in map(_dtype, (actual, desired)) if jnp.issubdtype(t, jnp.floating)]
        if not floats:  # integers and booleans: exact
            np.testing.assert_array_equal(actual, desired)
            return
        dtype = max(floats, key=eps)
    a, d = _float(actual), _float(desired)
    assert a.shape == d.shape, (a.shape, d.shape)
    if scale is None:
        scale = max(np.abs(a).max(initial=0.0), np.abs(d).max(initial=0.0))
    bound = np.broadcast_to(tolerance(dtype, n=n, scale=scale, k=k), d.shape)
    diff = np.abs(a - d)
    bad = ~((diff <= bound) | (a == d) | (np.isnan(a) & np.isnan(d)))
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, diff - bound, -np.inf)), d.shape)
        raise AssertionError(
            f"{err_msg + ': ' if err_msg else ''}"
            f"{int(bad.sum())} of {d.size} elements differ by more than "
            f"{k} * eps({np.dtype(dtype).name}) * sqrt({n}) * scale; worst at {i}: actual "
            f"{a[i]!r}, desired {d[i]!r}, difference {diff[i]:.3g}, tolerance {bound[i]:.3g}"
        )


def assert_trees_close(actual, desired, *, n: int = 1, k: float = 4.0):
    """Same structure, and every leaf close to its counterpart, ``assert_close``'s way, with one
    scale for the whole tree: the largest magnitude among all leaves of both trees.

    One scale because the leaves are results of one computation (the gradients of one loss, the
    statistics of one forward pass): a leaf that is mathematically 0 (the gradient of a bias
    that a normalisation cancels) is pure rounding noise of the size of its neighbours' terms.
    """
    assert jax.tree.structure(actual) == jax.tree.structure(desired)
    pairs = list(zip(jax.tree.leaves(actual), jax.tree.leaves(desired), strict=True))
    scale = max(
        (max(np.abs(_float(x)).max(initial=0.0), np.abs(_float(y)).max(initial=0.0)))
        for x, y in pairs
    )
    for x, y in pairs:
        assert_close(x, y, n=n, scale=scale, k=k)
