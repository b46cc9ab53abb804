"""Containers and small layers: Sequential, MLP, Identity, Lambda and Flatten."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator, Sequence
from itertools import pairwise
from typing import Any, overload

import jax
import jax.numpy as jnp

from metoryx import errors, initializers
from metoryx._core.module import Module, module_label
from metoryx._docstrings import fill_docstring
from metoryx.initializers import Initializer
from metoryx.layout import TorchConversion, torch_conversions
from metoryx.nn._arguments import check_function, check_rate, positive_int
from metoryx.nn._compute import DEFAULT_KERNEL_INIT, TRAINING_DOC, layer_training, mode_repr
from metoryx.nn.activations import relu
from metoryx.nn.dropout import dropout
from metoryx.nn.linear import Dense


def _checked_layers(layers: Sequence[Any]) -> list[Any]:
    """``layers`` as a list, each a callable, else a LayerConfigError naming its index."""
    if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
        raise errors.LayerConfigError(
            f"Sequential: the layers are passed as separate arguments, got one "
            f"{type(layers[0]).__name__}. Unpack it: Sequential(*layers)."
        )
    for i, layer in enumerate(layers):
        if not callable(layer):
            raise errors.LayerConfigError(
                f"Sequential: layer {i} is a {type(layer).__name__}, which cannot be called. "
                f"Each layer must be a module or a function of one input, such as mx.Dense(4, 8) "
                f"or mx.relu."
            )
    return list(layers)


class Sequential(Module):
    """Layers applied one after the other: ``Sequential(a, b, c)(x) == c(b(a(x)))``.

    Each layer is a :class:`~metoryx.Module` or any callable of one input (``mx.relu``,
    ``lambda x: x * 2``). The layers are kept in the list attribute ``layers``, so their
    variables live under ``layers/<index>``: ``layers/0/kernel``, ``layers/2/bias``. A
    function holds no variables and takes up an index like any layer.

    The call takes exactly one input and passes nothing else to the layers. Layers that need
    another argument, such as ``is_training`` for dropout or batch normalization, belong in a
    custom :class:`~metoryx.Module` whose ``__call__`` passes it explicitly.

    In the definition world a Sequential behaves like a list of its layers: ``seq[0]``,
    ``seq[-1]``, ``len(seq)``, ``for layer in seq``; ``seq[1:]`` is a new Sequential sharing
    the same layer objects (so a model holding both ties their variables);
    ``seq.append(layer)``, ``seq.insert(index, layer)``, ``seq[i] = layer`` and ``del seq[i]``
    edit it. An edit assigns a new ``layers`` list, so inside ``apply_fn``, where the model is
    frozen, it raises :class:`~metoryx.errors.ImmutableModuleError`; indexing, slicing and
    iterating work there too.

    Args:
        *layers: the layers, in the order they are applied.

    Raises:
        LayerConfigError: if a layer is not callable, or the layers are passed as one list.

    Attributes:
        layers: the list of layers, in order (what indexing and iterating read).

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> model = mx.Sequential(mx.Dense(3, 8), mx.relu, mx.Dense(8, 2))
        >>> model.append(mx.tanh)
        >>> len(model), model[0].out_size
        (4, 8)
        >>> init_fn, apply_fn = mx.transform(model)
        >>> variables = init_fn(jax.random.key(0))
        >>> variables["params"]["layers"]["2"]["kernel"].shape
        (8, 2)
        >>> y, _ = apply_fn(variables, None, jnp.ones((5, 3)))
        >>> y.shape
        (5, 2)
    """

    def __init__(self, *layers: Callable[[Any], Any]):
        super().__init__()
        self.layers = _checked_layers(layers)

    def extra_repr(self) -> str:
        # Modules are printed as children; name the functions between them here.
        return ", ".join(
            f"layers/{i}={getattr(layer, '__name__', type(layer).__name__)}"
            for i, layer in enumerate(self.layers)
            if not isinstance(layer, Module)
        )

    def torch_conversions(self) -> list[TorchConversion]:
        """``torch.nn.Sequential``: the layers' entries are named ``0.weight``, ... (no
        ``layers.``)."""
        return [
            conversion.renamed(f"{i}.", f"layers/{i}/")
            for i, layer in enumerate(self.layers)
            if isinstance(layer, Module)
            for conversion in torch_conversions(layer)
        ]

    def __call__(self, x: Any) -> Any:
        """Applies the layers in order.

        Args:
            x: the input of the first layer.

        Returns:
            The output of the last layer (``x`` itself when there are no layers).
        """
        for layer in self.layers:
            x = layer(x)
        return x

    @overload
    def __getitem__(self, index: int) -> Any: ...

    @overload
    def __getitem__(self, index: slice) -> Sequential: ...

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return Sequential(*self.layers[index])
        return self.layers[index]

    def __setitem__(self, index: int | slice, layer: Any) -> None:
        layers = list(self.layers)
        layers[index] = layer
        self.layers = _checked_layers(layers)

    def __delitem__(self, index: int | slice) -> None:
        layers = list(self.layers)
        del layers[index]
        self.layers = layers

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.layers)

    def append(self, layer: Callable[[Any], Any]) -> None:
        """Adds ``layer`` at the end.

        Args:
            layer: a module or a callable of one input.

        Raises:
            LayerConfigError: if ``layer`` is not callable.

        Example:
            >>> import metoryx as mx
            >>> model = mx.Sequential(mx.Dense(3, 8))
            >>> model.append(mx.relu)
            >>> len(model)
            2
        """
        self.layers = _checked_layers([*self.layers, layer])

    def insert(self, index: int, layer: Callable[[Any], Any]) -> None:
        """Inserts ``layer`` before position ``index``, as ``list.insert`` does.

        Args:
            index: the position the new layer takes.
            layer: a module or a callable of one input.

        Raises:
            LayerConfigError: if ``layer`` is not callable.

        Example:
            >>> import metoryx as mx
            >>> model = mx.Sequential(mx.Dense(3, 8), mx.Dense(8, 2))
            >>> model.insert(1, mx.relu)
            >>> model[1] is mx.relu
            True
        """
        layers = list(self.layers)
        layers.insert(index, layer)
        self.layers = _checked_layers(layers)


@fill_docstring(training_attribute=TRAINING_DOC)
class MLP(Module):
    """A multilayer perceptron: Dense layers with an activation (and dropout) between them.

    ``MLP(4, [32, 32], 2)`` is ``Dense(4, 32)``, activation, ``Dense(32, 32)``, activation,
    ``Dense(32, 2)``: no activation after the last layer, whose output is usually logits. In
    training with ``dropout_rate > 0``, :func:`~metoryx.dropout` follows each hidden
    activation and draws its key from the ``"dropout"`` stream of ``apply_fn``'s ``rngs``.

    The Dense layers are in the list attribute ``layers``: ``layers/<i>/kernel`` of shape
    ``(sizes[i], sizes[i + 1])`` and ``layers/<i>/bias`` of shape ``(sizes[i + 1],)``, where
    ``sizes = [in_size, *hidden_sizes, out_size]``. An ``activation`` that is a module with
    variables (such as ``PReLU``) is one module shared by every hidden layer, at
    ``activation/...``.

    Args:
        in_size: size of the last axis of the input.
        hidden_sizes: the output size of each hidden layer; empty for a single Dense layer.
        out_size: size of the last axis of the output.
        activation: applied after each hidden layer; a function or a module of one input.
        dropout_rate: the probability of dropping an element after each hidden activation in
            training, in ``[0, 1]``.
        use_bias: whether each Dense layer adds a learned bias.
        kernel_init: initializer of each kernel.
        bias_init: initializer of each bias.
        dtype: the computation dtype (None: inferred from inputs and parameters).
        param_dtype: the storage dtype of the parameters.

    Raises:
        LayerConfigError: if a size is not a positive int, ``hidden_sizes`` is not a sequence,
            ``activation`` is not callable or ``dropout_rate`` is outside ``[0, 1]``.

    Attributes:
        layers: the list of ``Dense`` layers, first to last.
        activation: the activation between them (a module with variables is shared).
        {training_attribute}

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> init_fn, apply_fn = mx.transform(mx.MLP(4, [16], 2, dropout_rate=0.1))
        >>> variables = init_fn(jax.random.key(0))
        >>> [variables["params"]["layers"][i]["kernel"].shape for i in "01"]
        [(4, 16), (16, 2)]
        >>> x = jnp.ones((8, 4))
        >>> y, _ = apply_fn(variables, None, x)  # evaluation: no dropout, no key needed
        >>> y, _ = apply_fn(variables, jax.random.key(1), x, is_training=True)
        >>> y.shape
        (8, 2)
    """

    training: bool | None = None

    def __init__(
        self,
        in_size: int,
        hidden_sizes: Sequence[int],
        out_size: int,
        activation: Callable[[jax.Array], jax.Array] = relu,
        dropout_rate: float = 0.0,
        use_bias: bool = True,
        kernel_init: Initializer = DEFAULT_KERNEL_INIT,
        bias_init: Initializer = initializers.zeros,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__()
        if not isinstance(hidden_sizes, Sequence) or isinstance(hidden_sizes, str):
            raise errors.LayerConfigError(
                f"MLP: `hidden_sizes` must be a sequence of positive ints, one per hidden "
                f"layer, got {hidden_sizes!r}. For one hidden layer of 64 units pass "
                f"hidden_sizes=[64]; for none, hidden_sizes=[]."
            )
        self.in_size = positive_int("MLP", "in_size", in_size)
        self.hidden_sizes = tuple(
            positive_int("MLP", f"hidden_sizes[{i}]", size) for i, size in enumerate(hidden_sizes)
        )
        self.out_size = positive_int("MLP", "out_size", out_size)
        self.activation = check_function("MLP", "activation", activation, "mx.relu")
        self.dropout_rate = check_rate("MLP", "dropout_rate", dropout_rate)
        sizes = (self.in_size, *self.hidden_sizes, self.out_size)
        self.layers = [
            Dense(
                a,
                b,
                use_bias=use_bias,
                kernel_init=kernel_init,
                bias_init=bias_init,
                dtype=dtype,
                param_dtype=param_dtype,
            )
            for a, b in pairwise(sizes)
        ]

    def extra_repr(self) -> str:
        name = getattr(self.activation, "__name__", type(self.activation).__name__)
        return mode_repr(
            self,
            f"in_size={self.in_size}, hidden_sizes={self.hidden_sizes}, "
            f"out_size={self.out_size}, activation={name}, dropout_rate={self.dropout_rate}",
        )

    def __call__(self, x: jax.Array, is_training: bool = False) -> jax.Array:
        """Applies the layers.

        Args:
            x: input of shape ``(*batch, in_size)``, any number of leading batch axes.
            is_training: whether to apply dropout (when ``dropout_rate > 0``). A ``training``
                switch that is set decides instead.

        Returns:
            The output, of shape ``(*batch, out_size)``.

        Raises:
            InputShapeError: if the last axis of ``x`` is not ``in_size`` long.
            MissingRngError: in training with ``dropout_rate > 0`` and no key in ``apply_fn``.
        """
        *hidden, last = self.layers
        training = layer_training(self, is_training)
        for layer in hidden:
            x = dropout(self.activation(layer(x)), self.dropout_rate, training)
        return last(x)


class Identity(Module):
    """Returns its input unchanged: a placeholder, e.g. for a removed classifier head.

    Example:
        >>> import jax.numpy as jnp, metoryx as mx
        >>> _, apply_fn = mx.transform(mx.Identity())
        >>> apply_fn({}, None, jnp.arange(3.0))[0]
        Array([0., 1., 2.], dtype=float32)
    """

    def __call__(self, x: Any) -> Any:
        """Returns ``x``."""
        return x


class Lambda(Module):
    """A function of arrays as a layer, e.g. to put a reshape in a :class:`Sequential`.

    The function is called as it is; it holds no variables. Modules that ``fn`` uses (through
    a closure, a global or a bound method) are **not** part of the model's variables: they are
    neither initialized nor given arrays by ``apply_fn``, and metoryx does not look into the
    function to find them. Give such modules a place in the model instead: an attribute of a
    custom :class:`~metoryx.Module`, or a layer of a :class:`Sequential`.

    Args:
        fn: the function, called with the layer's arguments.

    Raises:
        LayerConfigError: if ``fn`` is not callable.

    Example:
        >>> import jax.numpy as jnp, metoryx as mx
        >>> _, apply_fn = mx.transform(mx.Lambda(lambda x: x * 2))
        >>> apply_fn({}, None, jnp.arange(3.0))[0]
        Array([0., 2., 4.], dtype=float32)
    """

    def __init__(self, fn: Callable[..., Any]):
        super().__init__()
        if not callable(fn):
            raise errors.LayerConfigError(
                f"Lambda: `fn` must be a function, got {type(fn).__name__} {fn!r:.60}."
            )
        self.fn = fn

    def extra_repr(self) -> str:
        return f"fn={getattr(self.fn, '__name__', type(self.fn).__name__)}"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Returns ``fn(*args, **kwargs)``."""
        return self.fn(*args, **kwargs)


def _axis(value: Any, name: str) -> int:
    if isinstance(value, bool):
        value = None
    try:
        return operator.index(value)
    except TypeError:
        raise errors.LayerConfigError(
            f"Flatten: `{name}` must be an int (an axis, negative from the end), got {value!r}."
        ) from None


class Flatten(Module):
    """Merges the axes ``start_axis`` to ``end_axis`` (both included) into one, as
    ``torch.nn.Flatten``.

    The defaults keep the first (batch) axis and flatten all the others: ``(N, H, W, C)``
    becomes ``(N, H * W * C)``. Negative axes count from the end. Elements keep their
    row-major order, so a channels-last feature map is flattened in ``(H, W, C)`` order where
    PyTorch, channels-first, flattens ``(C, H, W)``: a Dense layer that follows takes PyTorch
    weights only after its input features are permuted accordingly. As in PyTorch, a scalar
    counts as one axis of size 1.

    Args:
        start_axis: the first axis to merge.
        end_axis: the last axis to merge.

    Raises:
        LayerConfigError: if an axis is not an int, or both have the same sign and
            ``start_axis`` comes after ``end_axis``.

    Example:
        >>> import jax.numpy as jnp, metoryx as mx
        >>> _, apply_fn = mx.transform(mx.Flatten())
        >>> apply_fn({}, None, jnp.ones((2, 3, 4, 5)))[0].shape
        (2, 60)
        >>> _, apply_fn = mx.transform(mx.Flatten(0, -2))
        >>> apply_fn({}, None, jnp.ones((2, 3, 4, 5)))[0].shape
        (24, 5)
    """

    def __init__(self, start_axis: int = 1, end_axis: int = -1):
        super().__init__()
        self.start_axis = _axis(start_axis, "start_axis")
        self.end_axis = _axis(end_axis, "end_axis")
        if (self.start_axis < 0) == (self.end_axis < 0) and self.start_axis > self.end_axis:
            raise errors.LayerConfigError(
                f"Flatten: start_axis={start_axis} comes after end_axis={end_axis}; the axes "
                f"from start_axis to end_axis are merged, so start_axis must not come later."
            )

    def extra_repr(self) -> str:
        return f"start_axis={self.start_axis}, end_axis={self.end_axis}"

    def __call__(self, x: jax.Array) -> jax.Array:
        """Flattens ``x``.

        Args:
            x: an array with at least ``max(start_axis, end_axis) + 1`` axes (for negative
                axes, at least ``-min(start_axis, end_axis)``).

        Returns:
            ``x`` reshaped, with one axis of size ``prod(shape[start_axis:end_axis + 1])`` in
            place of the merged ones.

        Raises:
            InputShapeError: if an axis is out of range for ``x``, or ``start_axis`` comes
                after ``end_axis`` once both are counted from the front.
        """
        if not isinstance(x, jax.Array):
            x = jnp.asarray(x)
        shape = x.shape or (1,)
        ndim = len(shape)
        start = self.start_axis + ndim if self.start_axis < 0 else self.start_axis
        end = self.end_axis + ndim if self.end_axis < 0 else self.end_axis
        if not (0 <= start < ndim and 0 <= end < ndim):
            raise errors.InputShapeError(
                f"{module_label(self)}: start_axis={self.start_axis} and "
                f"end_axis={self.end_axis} must be axes of the input, in [-{ndim}, {ndim - 1}] "
                f"for its shape {x.shape}. Give an input with more axes, or build Flatten with "
                f"axes that it has."
            )
        if start > end:
            raise errors.InputShapeError(
                f"{module_label(self)}: for an input of shape {x.shape}, start_axis="
                f"{self.start_axis} is axis {start}, after end_axis={self.end_axis} (axis "
                f"{end}); the axes from start_axis to end_axis are merged, so start_axis must "
                f"not come later."
            )
        new_shape = (*shape[:start], math.prod(shape[start : end + 1]), *shape[end + 1 :])
        return x if new_shape == x.shape else x.reshape(new_shape)
