"""What layers share: the dtype rules, the training flag and the per-layer training switch, the
bias add that traces like hand-written code, the channels-last convolution layout (Conv and the
LoRA adapters of a Conv), the default kernel initializer, and a function differentiated as
another form of itself."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.core import Tracer
from jax.custom_derivatives import SymbolicZero

from metoryx import errors, initializers
from metoryx._core.module import Module, module_label
from metoryx._core.variables import numeric_dtype

#: The default kernel initializer of Dense, Conv, ConvTranspose and MLP: LeCun normal.
DEFAULT_KERNEL_INIT = initializers.lecun_normal()


def compute_dtype(dtype: Any, *arrays: jax.Array | None) -> jnp.dtype:
    """The dtype a layer computes in: ``dtype`` if given, else the promotion of ``arrays``.

    The promotion uses JAX's standard lattice even under ``jax_numpy_dtype_promotion="strict"``:
    the layer casts explicitly, so a bfloat16 parameter meeting a float32 input is a decision
    made here (float32), not an implicit promotion.
    """
    if dtype is not None:
        return jnp.dtype(dtype)
    dtypes = {a.dtype for a in arrays if a is not None}
    if len(dtypes) == 1:
        return dtypes.pop()
    with jax.numpy_dtype_promotion("standard"):
        return functools.reduce(jnp.promote_types, dtypes)


def layer_dtype(layer: str, dtype: Any) -> Any:
    """A layer's ``dtype`` argument (its computation dtype) as given, if it is None (inferred
    from the inputs) or a dtype a JAX array can hold; else a LayerConfigError."""
    if dtype is None or numeric_dtype(dtype) is not None:
        return dtype
    raise errors.LayerConfigError(
        f"{layer}: `dtype` is the dtype the layer computes in and must be None (inferred from "
        f"the inputs and parameters) or a numeric dtype such as jnp.float32 or jnp.bfloat16, "
        f"got {dtype!r}. Pass one of those."
    )


def training_flag(is_training: Any, label: Callable[[], str], name: str = "is_training") -> bool:
    """``is_training`` as a Python bool, for a layer that picks its code path with it.

    A traced flag (``jax.jit(apply_fn)`` without ``static_argnames``) or anything but a bool
    (a string such as ``"False"`` is truthy) raises a StaticArgumentError naming the layer
    (``label()``, called on the error path only) and the fix.
    """
    if is_training is True or is_training is False:
        return is_training
    if isinstance(is_training, Tracer):
        raise errors.StaticArgumentError(
            f"{label()}: `{name}` is a traced value, so the layer cannot choose between its "
            f"training and evaluation code: jax.jit traces every argument of apply_fn. Make it "
            f"static: jax.jit(apply_fn, static_argnames={name!r}) (the same for a step "
            f"function that passes it on)."
        )
    array_like = isinstance(is_training, (np.bool_, np.ndarray, jax.Array))
    if array_like and is_training.shape == () and is_training.dtype == np.bool_:
        return bool(is_training)  # a NumPy bool, or a concrete 0-d bool array
    raise errors.StaticArgumentError(
        f"{label()}: `{name}` must be a bool (True in training, False in evaluation), got "
        f"{type(is_training).__name__} {is_training!r:.40}. Pass {name}=True or False."
    )


#: The ``Attributes:`` entry of every layer with a training switch (``fill_docstring``).
TRAINING_DOC = """
training: the layer's own mode, a plain attribute to set before ``mx.transform``: None (the
    default) follows the call's ``is_training``, False always evaluates (as PyTorch's
    ``layer.eval()``), True always trains. :func:`~metoryx.set_training` sets it on every layer
    of a part of a model; ``print(model)`` shows it when it is not None.
"""


def layer_training(layer: Module, is_training: Any) -> bool:
    """Whether ``layer`` runs its training code in this call: its own ``training`` switch when
    that is set, else the call's ``is_training``.

    Every layer that behaves differently in training (:class:`~metoryx.BatchNorm`,
    :class:`~metoryx.Dropout`, :class:`~metoryx.MultiHeadAttention`, :class:`~metoryx.MLP`,
    :class:`~metoryx.StackedRNN`, :class:`~metoryx.SpectralNorm`) decides with this. Its class
    declares ``training: bool | None = None``: None follows the call, False always evaluates (a
    frozen backbone's BatchNorm), True always trains; :func:`~metoryx.set_training` sets it on a
    whole sub-tree. The switch is a Python bool fixed before ``mx.transform``, read once when
    the layer is traced: a compiled call pays nothing for it.

    A layer of your own opts in the same way: declare the class attribute and decide with this
    function in ``__call__``, as in the example.

    Args:
        layer: the layer deciding (``self``); its class declares ``training``.
        is_training: the call's flag, a Python bool. It is checked even where the switch
            decides, so that a traced flag is reported alike by every layer.

    Returns:
        True to run the training code, False to run the evaluation code.

    Raises:
        StaticArgumentError: if ``is_training`` is traced or not a bool.
        LayerConfigError: if the layer's ``training`` is not None, True or False, or its
            class declares no ``training`` (so :func:`~metoryx.set_training` would miss it).

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> class Noise(mx.Module):
        ...     training: bool | None = None  # the switch: mx.set_training finds it
        ...     def __call__(self, x, is_training):
        ...         if mx.layer_training(self, is_training):
        ...             return x + jax.random.normal(mx.next_rng_key("noise"), x.shape)
        ...         return x
        >>> _, apply_fn = mx.transform(mx.set_training(Noise(), False))
        >>> apply_fn({}, None, jnp.zeros(2), is_training=True)[0]  # evaluates: no noise
        Array([0., 0.], dtype=float32)
    """
    called = training_flag(is_training, lambda: module_label(layer))
    if not hasattr(type(layer), "training"):
        raise errors.LayerConfigError(
            f"{module_label(layer)}: calls mx.layer_training, but its class declares no "
            f"training switch, so mx.set_training would pass it by. Add the class attribute "
            f"`training: bool | None = None` to {type(layer).__name__}."
        )
    switch = layer.training
    if switch is None:
        return called
    if switch is True or switch is False:
        return switch
    raise errors.LayerConfigError(
        f"{module_label(layer)}: {bad_training_switch(switch)} Set it with "
        f"mx.set_training(layer, False), or assign True, False or None to `training`."
    )


def bad_training_switch(value: Any) -> str:
    """What is wrong with ``value`` as a layer's ``training`` switch, for an error message."""
    return (
        f"`training` is the layer's own mode and must be None (follow the call's is_training), "
        f"True (always train) or False (always evaluate, e.g. a frozen backbone's BatchNorm), "
        f"got {type(value).__name__} {value!r:.40}."
    )


def mode_repr(layer: Module, config: str) -> str:
    """``config`` (a layer's ``extra_repr``) with ``training=...`` added when the layer's
    switch is set, so that ``print(model)`` shows which layers do not follow the call."""
    if layer.training is None:
        return config
    mode = f"training={layer.training!r}"
    return f"{config}, {mode}" if config else mode


def conv_dimension_numbers(ndim: int) -> lax.ConvDimensionNumbers:
    """Channels-last input and output, kernel ``(*spatial, in, out)``: XLA reads these
    layouts directly, so no transpose is traced."""
    spatial = tuple(range(1, ndim + 1))
    return lax.ConvDimensionNumbers(
        lhs_spec=(0, ndim + 1, *spatial),
        rhs_spec=(ndim + 1, ndim, *range(ndim)),
        out_spec=(0, ndim + 1, *spatial),
    )


def one_batch_axis(conv: Callable[[jax.Array], jax.Array], x: jax.Array, ndim: int) -> jax.Array:
    """``conv`` (which takes exactly one batch axis, as lax does) applied to ``x`` with any
    number of them: several are flattened, and one is added when there is none."""
    batch = x.shape[: x.ndim - ndim - 1]
    if len(batch) == 1:
        return conv(x)
    y = conv(jnp.reshape(x, (math.prod(batch), *x.shape[len(batch) :])))
    return jnp.reshape(y, (*batch, *y.shape[1:]))


def at_least_float32(dtype: Any) -> jnp.dtype:
    """float32 for narrower floats (bfloat16, float16), the dtype itself if wider: the dtype
    of statistics (norms, means, variances) that half precision would get wrong."""
    with jax.numpy_dtype_promotion("standard"):
        return jnp.promote_types(dtype, jnp.float32)


def cast(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """``x`` in ``dtype``, adding no operation to the program when it already is."""
    return x if x.dtype == dtype else x.astype(dtype)


def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """``y + bias`` over the last axis, exactly as a hand-written ``y + bias`` traces.

    The rank promotion is ours to make, so it is allowed here even when the user runs with
    ``jax_numpy_rank_promotion="raise"``: the same two equations (``broadcast_in_dim``, ``add``)
    on every JAX version and one eager dispatch. (A ``jit(inline=True)`` helper is no longer
    inlined into jaxprs by JAX 0.12, and ``lax.broadcast_to_rank`` costs a second dispatch.)
    """
    # The documented read of an option (the context's value); some JAX versions' stubs lack it.
    config: Any = jax.config
    if config.jax_numpy_rank_promotion == "allow":  # the default: no context to enter
        return y + bias
    with jax.numpy_rank_promotion("allow"):
        return y + bias


def differentiated_as(fn: Callable[..., Any], form: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, whose derivatives of every mode are those of ``form``: the same function written
    so that its derivative compiles faster (a custom JVP; ``fn`` runs where nothing is
    differentiated). Both take the arrays as positional arguments (PyTrees), since a custom
    derivative cannot close over traced values. An argument whose tangent is a symbolic zero
    (data, frozen weights, an integer mask) is held constant in ``form``'s JVP, which so
    multiplies no zero tangent: XLA would keep ``zeros @ kernel`` in a loop."""
    wrapped = jax.custom_jvp(fn)
    wrapped.defjvp(functools.partial(_jvp_of_nonzero, form), symbolic_zeros=True)
    return wrapped


def is_symbolic_zero(tangent: Any) -> bool:
    """Whether ``tangent``, as a custom JVP rule defined with ``symbolic_zeros=True`` gets it,
    is a symbolic zero: its argument is not differentiated."""
    return isinstance(tangent, SymbolicZero)


def _jvp_of_nonzero(fn: Callable[..., Any], primals: tuple, tangents: tuple) -> tuple[Any, Any]:
    """``jax.jvp(fn, primals, tangents)`` with the arguments whose tangent is a symbolic zero
    held constant."""
    leaves, tree = jax.tree.flatten(primals)
    speeds = jax.tree.leaves(tangents, is_leaf=is_symbolic_zero)
    moving = [i for i, t in enumerate(speeds) if not is_symbolic_zero(t)]

    def of_moving(*values: Any) -> Any:
        args = list(leaves)
        for i, value in zip(moving, values, strict=True):
            args[i] = value
        return fn(*tree.unflatten(args))

    return jax.jvp(of_moving, [leaves[i] for i in moving], [speeds[i] for i in moving])
