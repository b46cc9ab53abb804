"""Fixtures of the layer tests: PyTorch as the reference, and the parity check against it."""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metoryx as mx

FORWARD_TOL = 1e-5
GRAD_TOL = 1e-4


def _permute(a, perm):
    return a if perm is None else a.permute(perm) if hasattr(a, "permute") else a.transpose(perm)


def _forward_backward(fn, args, cotangent):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(cotangent)


@pytest.fixture
def assert_matches_torch(torch):
    """``check(jax_fn, torch_fn, torch_args, layouts, out_layout=None)``.

    Runs ``torch_fn`` on ``torch_args`` and ``jax_fn`` on the same arrays moved to our layouts
    (``layouts[i]`` is the permutation taking torch argument ``i`` to ours, None for the same
    layout; ``out_layout`` does the same for the output). Compares the outputs within 1e-5 and
    the gradients of a random linear function of the output with respect to every argument
    within 1e-4.
    """

    def check(
        jax_fn: Callable,
        torch_fn: Callable,
        torch_args: Sequence,
        layouts: Sequence[Sequence[int] | None],
        out_layout: Sequence[int] | None = None,
    ) -> None:
        torch_args = [a.detach().clone().requires_grad_(True) for a in torch_args]
        jax_args = [
            jnp.asarray(_permute(a.detach().numpy(), p))
            for a, p in zip(torch_args, layouts, strict=True)
        ]
        out_shape = jax.eval_shape(jax_fn, *jax_args).shape
        cotangent = np.random.default_rng(0).standard_normal(out_shape).astype(np.float32)
        # One compiled program for the forward and backward passes: cheaper to build than
        # one per operation.
        out, grads = jax.jit(_forward_backward, static_argnums=0)(jax_fn, jax_args, cotangent)
        torch_out = _permute(torch_fn(*torch_args), out_layout)
        np.testing.assert_allclose(
            out, torch_out.detach().numpy(), atol=FORWARD_TOL, rtol=FORWARD_TOL
        )
        (torch_out * torch.from_numpy(cotangent)).sum().backward()
        for grad, arg, perm in zip(grads, torch_args, layouts, strict=True):
            np.testing.assert_allclose(
                grad, _permute(arg.grad.numpy(), perm), atol=GRAD_TOL, rtol=GRAD_TOL
            )

    return check


@pytest.fixture
def kernel_bias_fn():
    """``kernel_bias_fn(layer)``: ``fn(x, kernel[, bias])``, the layer applied with those
    parameters, a function of arrays for ``jax.vjp``."""

    def make(layer):
        _, apply_fn = mx.transform(layer)

        def run(x, *params):
            names = ("kernel", "bias")[: len(params)]
            return apply_fn({"params": dict(zip(names, params, strict=True))}, None, x)[0]

        return run

    return make


@pytest.fixture
def jitted_equations():
    """``jitted_equations(fn, *args)``: ``(primitive, params)`` of each equation that
    ``jax.jit(fn)`` compiles, to compare a layer's program with a hand-written one."""

    def equations(fn, *args):
        (call,) = jax.make_jaxpr(jax.jit(fn))(*args).jaxpr.eqns
        return [(e.primitive.name, e.params) for e in call.params["jaxpr"].jaxpr.eqns]

    return equations


@pytest.fixture
def all_equations():
    """``all_equations(jaxpr)``: the equations of ``jaxpr`` and of every jaxpr nested in them
    (a custom_jvp's, a scan's body), depth first."""

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            yield eqn
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)  # a ClosedJaxpr's Jaxpr
                if hasattr(inner, "eqns"):
                    yield from walk(inner)

    return walk


@pytest.fixture
def numpy_init():
    """``numpy_init(init_fn)``: variables of ``init_fn``'s structure and dtypes, filled with
    standard normal draws from NumPy. Compiles nothing, unlike running the initializers,
    which compiles JAX's random number kernels once per shape."""
    rng = np.random.default_rng(0)

    def fill(init_fn):
        shapes = jax.eval_shape(init_fn, jax.random.key(0))
        return jax.tree.map(
            lambda s: jnp.asarray(rng.standard_normal(s.shape).astype(s.dtype)), shapes
        )

    return fill
