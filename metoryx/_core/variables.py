"""Variables: descriptions of the arrays a model will own, not the arrays themselves.

In the definition world a variable is an initializer, a shape, a dtype, a collection and free
metadata (tags, sharding axes); ``init_fn`` turns it into an array. Setting ``.value`` fixes
its starting value instead (a pretrained kernel, a zero start).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np

from metoryx import errors
from metoryx.initializers import Initializer


def _shape_str(shape: Sequence[int], dtype: Any) -> str:
    return f"{jnp.dtype(dtype).name}[{', '.join(map(str, shape))}]"


# What type checkers see: a variable *is* a jax.Array, because that is what module code reads
# (`x @ self.kernel` runs inside apply_fn, where the attribute holds an array). At run time a
# variable is a plain description; in the definition world its array operators raise an error
# that says to transform the model first (see `_definition_world_operator` below).
if TYPE_CHECKING:
    _ArrayInModuleCode = jax.Array
else:
    _ArrayInModuleCode = object


class Variable(_ArrayInModuleCode):
    """A named array of a module: an initializer, a shape, a dtype and a collection.

    Use the two kinds, :class:`Parameter` (trainable, collection ``"params"``) and
    :class:`State` (any other collection, e.g. running statistics). Inside ``apply_fn`` a
    variable attribute reads as a plain ``jax.Array``.

    For type checkers a variable is a ``jax.Array`` (a subclass of it, seen only by the
    checker), so module code such as ``x @ self.kernel`` type-checks with no annotation, and
    ``layer.kernel.value = ...`` in the definition world type-checks too. The price: a checker
    also accepts array arithmetic on a variable in the definition world, where it fails at run
    time with :class:`~metoryx.errors.ApplyContextError` (transform the model first).

    Args:
        collection: the top-level key of ``variables`` this variable lives under.
        init: an initializer ``init(key, shape, dtype) -> jax.Array``.
        shape: the array's shape.
        dtype: the storage dtype of the array.
        mutable: whether module code may assign a new value inside ``apply_fn``.
        **metadata: free annotations (tags, sharding axis names) kept on the description.

    Example:
        >>> import metoryx as mx
        >>> v = mx.Variable("params", mx.initializers.zeros, (2, 3))
        >>> v
        Variable('params', float32[2, 3])
    """

    def __init__(
        self,
        collection: str,
        init: Initializer,
        shape: Sequence[int],
        dtype: Any = jnp.float32,
        mutable: bool = False,
        **metadata: Any,
    ):
        kind = type(self).__name__
        if not isinstance(collection, str) or not collection:
            raise errors.VariableDefinitionError(
                f"{kind}: the collection must be a non-empty string such as 'batch_stats', "
                f"got {collection!r}."
            )
        if not callable(init):
            raise errors.VariableDefinitionError(
                f"{kind}: `init` must be an initializer, a function (key, shape, dtype) -> "
                f"array such as mx.initializers.zeros or mx.initializers.lecun_normal(); "
                f"got {init!r}. To start from a given array, describe the variable with any "
                f"initializer and set `.value = array`."
            )
        try:
            shape = tuple(operator.index(d) for d in shape)
        except TypeError:
            raise errors.VariableDefinitionError(
                f"{kind}: `shape` must be a sequence of ints, got {shape!r}."
            ) from None
        if any(d < 0 for d in shape):
            raise errors.VariableDefinitionError(
                f"{kind}: `shape` must not contain negative sizes, got {shape}."
            )
        try:
            dtype = jnp.dtype(dtype)
        except TypeError:
            raise errors.VariableDefinitionError(
                f"{kind}: `dtype` must be a dtype such as jnp.float32, got {dtype!r}."
            ) from None
        self.collection = collection
        self.init = init
        self._shape: tuple[int, ...] = shape
        self._dtype: np.dtype[Any] = dtype
        self.mutable = bool(mutable)
        self.metadata = metadata
        self._value: jax.Array | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The array's shape."""
        return self._shape

    @property
    def dtype(self) -> np.dtype[Any]:
        """The storage dtype of the array."""
        return self._dtype

    @property
    def value(self) -> jax.Array:
        """The fixed starting value; raises :class:`~metoryx.errors.UnsetValueError` if none.

        Setting it checks the shape and casts to the variable's dtype; ``None`` clears it.
        """
        if self._value is None:
            raise errors.UnsetValueError(
                f"{self!r} has no fixed value: `init_fn(key)` from mx.transform(model) creates "
                f"its array with the initializer. Set `.value = array` to fix a starting value, "
                f"or read the array from the `variables` dict that init_fn returns."
            )
        return self._value

    @value.setter
    def value(self, value: Any) -> None:
        if value is None:
            self._value = None
            return
        shape = tuple(np.shape(value))
        if shape != self.shape:
            raise errors.VariableShapeError(
                f"{self!r}: expected a value of shape {self.shape}, got shape {shape}. "
                f"Give an array of shape {self.shape}, or replace the layer with one of the "
                f"shape you need."
            )
        if isinstance(value, jax.Array):
            self._value = jnp.asarray(value, dtype=self.dtype)  # immutable: safe to share
        else:
            # A copy: on CPU jnp.asarray aliases a 64-byte aligned NumPy buffer, and a later
            # in-place edit of the caller's array must not change the fixed value.
            self._value = jnp.array(value, dtype=self.dtype)

    @property
    def has_value(self) -> bool:
        """Whether a starting value is fixed (``.value`` can be read)."""
        return self._value is not None

    def _describe(self) -> str:
        return _shape_str(self.shape, self.dtype)

    def __repr__(self) -> str:
        extras = "" if self._value is None else ", value fixed"
        return f"{type(self).__name__}({self.collection!r}, {self._describe()}{extras})"


def _definition_world_operator(name: str) -> Callable[..., NoReturn]:
    def operator(self: Variable, *args: Any) -> NoReturn:
        raise errors.ApplyContextError(
            f"{self!r} was used as an array ({name}) in the definition world, e.g. by calling "
            f"model(x) before mx.transform. Here a variable is a description, not an array; "
            f"transform the model and call it through apply_fn: `init_fn, apply_fn = "
            f"mx.transform(model)`, then `y, _ = apply_fn(init_fn(key), rngs, x)`."
        )

    operator.__name__ = name
    return operator


# Python's operators reach a variable's reflected methods (`x @ kernel` calls
# `kernel.__rmatmul__`), so these are where a definition-world call of a module lands.
for _name in (
    *(f"__{op}__" for op in ("neg", "pos", "abs", "invert", "getitem")),
    *(
        f"__{side}{op}__"
        for op in ("add", "sub", "mul", "matmul", "truediv", "floordiv", "mod", "pow")
        for side in ("", "r")
    ),
):
    setattr(Variable, _name, _definition_world_operator(_name))


class Parameter(Variable):
    """A trainable array, stored under ``variables["params"]``.

    Inside ``apply_fn`` it reads as a plain ``jax.Array`` and is read-only; it changes only
    through the ``variables`` the caller passes in (e.g. after an optimizer step).

    Args:
        init: an initializer ``init(key, shape, dtype) -> jax.Array``.
        shape: the array's shape.
        dtype: the storage dtype (``param_dtype`` in layers); the computation dtype is the
            layer's business.
        **metadata: free annotations (tags, sharding axis names).

    Example:
        >>> import jax.numpy as jnp, metoryx as mx
        >>> w = mx.Parameter(mx.initializers.lecun_normal(), (3, 4))
        >>> w
        Parameter(float32[3, 4])
        >>> w.value = jnp.ones((3, 4))      # fix a starting value
        >>> w.value.dtype
        dtype('float32')
    """

    def __init__(
        self, init: Initializer, shape: Sequence[int], dtype: Any = jnp.float32, **metadata: Any
    ):
        super().__init__("params", init, shape, dtype, mutable=False, **metadata)

    def __repr__(self) -> str:
        extras = "" if self._value is None else ", value fixed"
        return f"Parameter({self._describe()}{extras})"


class State(Variable):
    """A non-trainable array in a named collection, e.g. BatchNorm's running statistics.

    Inside ``apply_fn`` it reads as a plain ``jax.Array``; if ``mutable``, module code updates
    it by assigning the attribute (``self.mean = new_mean``), and the new value appears in the
    ``new_variables`` that ``apply_fn`` returns.

    Args:
        collection: the top-level key of ``variables``, e.g. ``"batch_stats"``.
        init: an initializer ``init(key, shape, dtype) -> jax.Array``.
        shape: the array's shape.
        dtype: the storage dtype of the array.
        mutable: whether module code may assign it inside ``apply_fn``.
        **metadata: free annotations.

    Example:
        >>> import jax, jax.numpy as jnp, metoryx as mx
        >>> class Counter(mx.Module):
        ...     def __init__(self):
        ...         self.count = mx.State("counters", mx.initializers.zeros, (), jnp.int32)
        ...     def __call__(self):
        ...         self.count = self.count + 1
        ...         return self.count
        >>> init_fn, apply_fn = mx.transform(Counter())
        >>> out, new_vars = apply_fn(init_fn(jax.random.key(0)), None)
        >>> int(new_vars["counters"]["count"])
        1
    """

    def __init__(
        self,
        collection: str,
        init: Initializer,
        shape: Sequence[int],
        dtype: Any = jnp.float32,
        mutable: bool = True,
        **metadata: Any,
    ):
        super().__init__(collection, init, shape, dtype, mutable=mutable, **metadata)

    def __repr__(self) -> str:
        extras = "" if self.mutable else ", read-only"
        extras += "" if self._value is None else ", value fixed"
        return f"State({self.collection!r}, {self._describe()}{extras})"


def fix_stacked_value(var: Variable, value: Any) -> None:
    """Fixes every copy of a stacked variable at once: ``value`` has the whole stack's shape
    (a lifted wrapper's copies first), which the ``.value`` setter, checking one copy's shape,
    refuses. Used by ``mx.assign_variables``."""
    var._value = jnp.array(value, dtype=var.dtype)
